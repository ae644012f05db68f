"""``haif artifacts``: build, publish, verify and list signed model artifacts.

- ``haif artifacts make-tiny --store DIR [--key PATH] [--arch gpt2|llama]``
  builds a real, tiny model here, without downloading anything (random
  weights from a fixed seed, a byte-level BPE tokenizer trained with
  ``tokenizers`` on a built-in text, a small chat template) and publishes it
  signed with the cluster key at ``--key`` (created if absent, with its
  public key next to it as ``<key>.pub``). Needs ``haif[torch]`` (torch,
  transformers, tokenizers).

  - ``--arch gpt2`` (the default): ``tiny-gpt2`` version ``1``, GPT-2-style,
    2 layers, 2 heads, 64 wide (about 110 k parameters), for the
    transformers engine.
  - ``--arch llama``: ``tiny-llama`` version ``1``, a Llama (hidden 256,
    4 layers, 4 heads, MLP 2048, about 7.6 M parameters) with Llama-3-style
    special tokens (``<|begin_of_text|>``, ``<|eot_id|>``, header tokens)
    and chat template; an architecture vLLM runs, so the ``vllm`` engine
    and a vLLM OpenAI server serve it as well as the transformers engine
    (the manifest's engine is ``any``).
- ``haif artifacts publish --store DIR --name N --version V --key PATH --dir MODEL_DIR``
  publishes a local model directory (e.g. what ``save_pretrained`` wrote).
- ``haif artifacts verify --store DIR --name N --version V --keyring DIR``
  checks the signature against the trusted ``*.pub`` keys in ``--keyring``
  and every file's digest; exit 1 with the reason if anything is wrong.
- ``haif artifacts fetch --store DIR --name N --version V --keyring DIR --dest OUT``
  verifies an artifact as ``verify`` does and copies its files into ``OUT``
  (e.g. for ``python -m vllm.entrypoints.openai.api_server --model OUT``).
- ``haif artifacts list --store DIR`` lists the manifests (not verified).

A worker serves an artifact with ``--engine transformers --artifact-store DIR
--model-ref tiny-gpt2:1 --keyring DIR --models tiny-gpt2`` (or ``--engine
vllm ... --model-ref tiny-llama:1``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from haif.configfile import ConfigError
from haif.runtime.artifacts import ArtifactError, fetch, list_artifacts, publish, verify
from haif.runtime.security import Keyring, Signer, generate_keypair

__all__ = [
    "TINY_ARCHS",
    "TINY_LLAMA_CHAT_TEMPLATE",
    "add_artifact_commands",
    "load_or_create_key",
    "make_tiny",
    "public_key_path",
]

TINY_NAME = "tiny-gpt2"
TINY_VERSION = "1"
#: The architectures ``make-tiny`` builds, and each one's default artifact name.
TINY_ARCHS: dict[str, str] = {"gpt2": TINY_NAME, "llama": "tiny-llama"}
DEFAULT_KEY = ".haif/keys/cluster.key"

#: The text the tiny tokenizer is trained on (no download; any text would do).
TINY_CORPUS = (
    "HAIF routes inference requests from clients in several regions to GPU workers. "
    "A gateway checks the tenant's key, applies rate limits and quotas, and forwards "
    "the request to an orchestrator, which places it on a worker with free capacity. "
    "The worker streams tokens back as they are generated; if it fails mid-stream, the "
    "orchestrator resumes the response on another worker from the tokens already sent. "
    "Heartbeats tell the orchestrator which workers are alive and which models are warm. "
    "Model weights are stored by their digests and every manifest is signed, so a worker "
    "never serves a model whose files were changed. The quick brown fox jumps over the "
    "lazy dog. Hello world! How are you today? 0 1 2 3 4 5 6 7 8 9 10 100 1000. "
    "Latency, throughput, cost and availability are measured for every request; "
    "the simulator and the live cluster write the same records, so results compare. "
)


def public_key_path(key: Path) -> Path:
    """Where the public key of ``key`` lives: ``cluster.key`` -> ``cluster.pub``."""
    return key.with_suffix(".pub") if key.suffix else key.with_name(key.name + ".pub")


def load_or_create_key(key: Path) -> tuple[Signer, bool]:
    """The signer at ``key``; a new Ed25519 pair (private 0600, public ``.pub``) if absent."""
    created = False
    if not key.exists():
        private_pem, public_pem = generate_keypair()
        key.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        public_key_path(key).write_bytes(public_pem)
        created = True
    try:
        signer = Signer.from_file(key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--key {key}: {exc}") from None
    pub = public_key_path(key)
    if not pub.exists():
        pub.write_bytes(signer.public_pem)
    return signer, created


#: The tiny model's chat template (Jinja, as a tokenizer's ``chat_template``):
#: each message as ``role; content`` closed by the end-of-text token, then
#: ``assistant;`` to prompt the answer. Only characters of :data:`TINY_CORPUS`
#: (and the special token), so every character has a token.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}; {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant;{% endif %}"
)


def _libraries() -> tuple[Any, Any, Any]:
    """torch, transformers and tokenizers, or a ConfigError saying how to install them."""
    try:
        torch: Any = importlib.import_module("torch")
        transformers: Any = importlib.import_module("transformers")
        tokenizers: Any = importlib.import_module("tokenizers")
    except ImportError as exc:
        raise ConfigError(
            f"make-tiny needs torch and transformers ({exc.name} is missing): "
            "pip install 'haif[torch]'"
        ) from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return torch, transformers, tokenizers


def _byte_bpe(tokenizers: Any, corpus: str, unk: str, special: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (as GPT-2's and Llama 3's) trained on ``corpus``, offline.

    Its alphabet is only the bytes of the corpus, so every token the model can
    emit is printable text; other input characters become ``unk``.
    """
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=unk))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=special, show_progress=False
    )
    bpe.train_from_iterator([corpus] * 4, trainer=trainer)
    return bpe


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    model.eval()
    model.save_pretrained(str(out))  # safetensors (the default since transformers 4.35)
    tokenizer.save_pretrained(str(out))
    if not (out / "model.safetensors").is_file():
        raise ConfigError(f"transformers did not write {out / 'model.safetensors'}")


def _build_tiny(out: Path, seed: int) -> dict[str, Any]:
    """Write a tiny GPT-2 (safetensors) and its tokenizer into ``out``; return facts."""
    torch, transformers, tokenizers = _libraries()
    special = "<|endoftext|>"
    bpe = _byte_bpe(tokenizers, TINY_CORPUS, special, [special], 512)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=special,
        eos_token=special,
        unk_token=special,
        model_max_length=256,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE  # saved with the tokenizer
    eos = tokenizer.convert_tokens_to_ids(special)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        initializer_range=0.2,  # sharper logits than GPT-2's 0.02: varied greedy text
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = transformers.GPT2LMHeadModel(config)
    _save(model, tokenizer, out)
    return {
        "architecture": "gpt2",
        "parameters": sum(int(p.numel()) for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "seed": seed,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


#: The tiny Llama's special tokens (Llama 3's names): text begins, text ends,
#: a turn ends (the end of sequence in chat), a role header opens and closes.
LLAMA_BOS = "<|begin_of_text|>"
LLAMA_END = "<|end_of_text|>"
LLAMA_EOT = "<|eot_id|>"
LLAMA_HEADER = ("<|start_header_id|>", "<|end_header_id|>")
LLAMA_UNK = "<|unk|>"

#: The tiny Llama's chat template: Llama 3's layout (BOS; per message a role
#: header, a blank line, the content and ``<|eot_id|>``; then the assistant's
#: header to prompt the answer).
TINY_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

#: What the tiny Llama's tokenizer is trained on: the built-in text, then a
#: chat in the template's layout (roles, newlines) so those have tokens too.
TINY_LLAMA_CORPUS = (
    TINY_CORPUS
    + "\nsystem\n\nYou are a helpful assistant.\nuser\n\nHello! What is HAIF?\n"
    + "assistant\n\nHAIF routes requests to workers in several regions.\n"
)


def _build_tiny_llama(out: Path, seed: int) -> dict[str, Any]:
    """Write a tiny Llama (safetensors), its tokenizer and chat template into ``out``."""
    torch, transformers, tokenizers = _libraries()
    special = [LLAMA_BOS, LLAMA_END, LLAMA_EOT, *LLAMA_HEADER, LLAMA_UNK]
    bpe = _byte_bpe(tokenizers, TINY_LLAMA_CORPUS, LLAMA_UNK, special, 1024)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOT,
        unk_token=LLAMA_UNK,
        model_max_length=2048,
    )
    tokenizer.chat_template = TINY_LLAMA_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as Llama 3
        max_position_embeddings=2048,
        initializer_range=0.2,  # sharper logits than 0.02: varied greedy text
        tie_word_embeddings=False,
        bos_token_id=ids[LLAMA_BOS],
        eos_token_id=ids[LLAMA_EOT],
    )
    # bfloat16, vLLM's dtype on CPU (it would cast float32 weights on load).
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    _save(model, tokenizer, out)
    return {
        "architecture": "llama",
        "parameters": sum(int(p.numel()) for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "seed": seed,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


#: What ``make-tiny --arch`` builds: the builder, and the engine its manifest names.
_BUILDERS: dict[str, tuple[Callable[[Path, int], dict[str, Any]], str]] = {
    "gpt2": (_build_tiny, "transformers"),
    "llama": (_build_tiny_llama, "any"),
}


def _dir_files(directory: Path) -> dict[str, Path]:
    return {
        p.relative_to(directory).as_posix(): p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    }


def make_tiny(
    store: Path,
    key: Path,
    *,
    name: str | None = None,
    version: str = TINY_VERSION,
    seed: int = 0,
    overwrite: bool = False,
    arch: str = "gpt2",
) -> dict[str, Any]:
    """Build the tiny model of ``arch`` and publish it signed; return the signed manifest.

    ``name`` defaults to the architecture's (:data:`TINY_ARCHS`).
    """
    if arch not in _BUILDERS:
        raise ConfigError(f"--arch {arch!r}: expected one of {', '.join(sorted(_BUILDERS))}")
    build, engine = _BUILDERS[arch]
    with tempfile.TemporaryDirectory(prefix="haif-tiny-") as tmp:
        out = Path(tmp)
        facts = build(out, seed)
        signer, _created = load_or_create_key(key)
        return publish(
            store,
            name or TINY_ARCHS[arch],
            version,
            _dir_files(out),
            signer,
            engine=engine,
            metadata=facts,
            overwrite=overwrite,
        )


def _size(manifest: dict[str, Any]) -> int:
    files = manifest.get("files")
    if not isinstance(files, dict):
        return 0
    return sum(int(e.get("size", 0)) for e in files.values() if isinstance(e, dict))


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    key = Path(args.key)
    existed = key.exists()
    try:
        manifest = make_tiny(
            Path(args.store),
            key,
            name=args.name,
            version=args.version,
            seed=args.seed,
            overwrite=args.force,
            arch=args.arch,
        )
    except ArtifactError as exc:
        hint = " (--force replaces it; --version publishes another)" if exc.code == "exists" else ""
        print(f"error: {exc.message}{hint}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    ref = f"{manifest['name']}:{manifest['version']}"
    print(
        f"published {ref} in {args.store}: {len(manifest['files'])} files, "
        f"{_size(manifest) / 1e6:.2f} MB, {manifest['metadata']['parameters']:,} parameters, "
        f"signed by {manifest['kid']} ({elapsed:.1f} s)"
    )
    if not existed:
        print(f"new cluster key {key} (public key {public_key_path(key)})")
    print(f"trust it with: --keyring {public_key_path(key).parent}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        raise ConfigError(f"--dir {directory} is not a directory")
    signer, _ = load_or_create_key(Path(args.key))
    try:
        manifest = publish(
            Path(args.store),
            args.name,
            args.version,
            _dir_files(directory),
            signer,
            engine=args.engine,
            overwrite=args.force,
        )
    except ArtifactError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"published {args.name}:{args.version}: {len(manifest['files'])} files, "
        f"{_size(manifest) / 1e6:.2f} MB, signed by {manifest['kid']}"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    keyring = _keyring(args.keyring)
    t0 = time.perf_counter()
    try:
        files = verify(Path(args.store), args.name, args.version, keyring)
    except ArtifactError as exc:
        return _refused(args, exc)
    total = sum(p.stat().st_size for p in files.values())
    print(
        f"OK {args.name}:{args.version}: signature and {len(files)} digests verified, "
        f"{total / 1e6:.2f} MB in {time.perf_counter() - t0:.2f} s"
    )
    return 0


def _keyring(path: str) -> Keyring:
    """``--keyring``'s trusted keys, or a ConfigError naming the option."""
    try:
        return Keyring.from_dir(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--keyring {path}: {exc}") from None


def _refused(args: argparse.Namespace, exc: ArtifactError) -> int:
    """Say why the artifact was refused; exit status 1."""
    print(f"REFUSED {args.name}:{args.version} ({exc.code}): {exc.message}", file=sys.stderr)
    return 1


def _cmd_fetch(args: argparse.Namespace) -> int:
    keyring = _keyring(args.keyring)
    dest = Path(args.dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"--dest {dest}: exists and is not an empty directory")
    try:
        files = fetch(Path(args.store), args.name, args.version, keyring, dest)
    except ArtifactError as exc:
        return _refused(args, exc)
    total = sum(p.stat().st_size for p in files.values())
    print(
        f"fetched {args.name}:{args.version} into {dest}: {len(files)} verified files, "
        f"{total / 1e6:.2f} MB"
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    manifests = list_artifacts(Path(args.store))
    if args.json:
        print(json.dumps(manifests, indent=2, sort_keys=True))
        return 0
    if not manifests:
        print(f"no artifacts in {args.store}")
        return 0
    print(f"{'NAME:VERSION':<32} {'ENGINE':<13} {'FILES':>5} {'MB':>9}  {'SIGNER':<16}  CREATED")
    for m in manifests:
        ref = f"{m.get('name')}:{m.get('version')}"
        if "error" in m:
            print(f"{ref:<32} unreadable: {m['error']}")
            continue
        files = m.get("files")
        count = len(files) if isinstance(files, dict) else 0
        print(
            f"{ref:<32} {m.get('engine')!s:<13} {count:>5} {_size(m) / 1e6:>9.2f}  "
            f"{m.get('kid')!s:<16}  {m.get('created')}"
        )
    print("(listed, not verified: use `haif artifacts verify`)")
    return 0


def add_artifact_commands(subparsers: Any) -> None:
    """Add ``haif artifacts ...`` to the CLI's subparsers."""
    art = subparsers.add_parser("artifacts", help="build, publish, verify and list model artifacts")
    sub = art.add_subparsers(dest="artifacts_command", required=True)

    tiny = sub.add_parser(
        "make-tiny",
        help="build a tiny GPT-2 or Llama locally and publish it signed (needs haif[torch])",
    )
    tiny.add_argument("--store", required=True, help="artifact store directory")
    tiny.add_argument(
        "--key",
        default=DEFAULT_KEY,
        help=f"Ed25519 signing key, created if absent (default {DEFAULT_KEY})",
    )
    tiny.add_argument(
        "--arch",
        choices=sorted(_BUILDERS),
        default="gpt2",
        help="gpt2 (default: tiny-gpt2, 2 layers, 64 wide) or llama (tiny-llama: hidden 256, "
        "4 layers, Llama 3 chat template; what the vllm engine and a vLLM server load)",
    )
    tiny.add_argument("--name")
    tiny.add_argument("--version", default=TINY_VERSION)
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    tiny.add_argument("--force", action="store_true", help="replace an existing version")
    tiny.set_defaults(func=_cmd_make_tiny)

    pub = sub.add_parser("publish", help="publish a local model directory, signed")
    pub.add_argument("--store", required=True)
    pub.add_argument("--name", required=True)
    pub.add_argument("--version", required=True)
    pub.add_argument("--dir", required=True, help="the model's files (e.g. save_pretrained)")
    pub.add_argument("--key", default=DEFAULT_KEY, help="signing key (created if absent)")
    pub.add_argument("--engine", default="transformers")
    pub.add_argument("--force", action="store_true", help="replace an existing version")
    pub.set_defaults(func=_cmd_publish)

    ver = sub.add_parser("verify", help="check an artifact's signature and every digest")
    ver.add_argument("--store", required=True)
    ver.add_argument("--name", required=True)
    ver.add_argument("--version", required=True)
    ver.add_argument("--keyring", required=True, help="directory of trusted *.pub keys")
    ver.set_defaults(func=_cmd_verify)

    fet = sub.add_parser("fetch", help="verify an artifact and copy its files into a directory")
    fet.add_argument("--store", required=True, help="artifact store directory")
    fet.add_argument("--name", required=True, help="artifact name")
    fet.add_argument("--version", required=True, help="artifact version")
    fet.add_argument("--keyring", required=True, help="directory of trusted *.pub keys")
    fet.add_argument("--dest", required=True, help="new (or empty) directory for the files")
    fet.set_defaults(func=_cmd_fetch)

    lst = sub.add_parser("list", help="list the artifacts in a store (not verified)")
    lst.add_argument("--store", required=True)
    lst.add_argument("--json", action="store_true", help="the manifests as JSON")
    lst.set_defaults(func=_cmd_list)
