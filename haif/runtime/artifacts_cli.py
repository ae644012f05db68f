"""``haif artifacts``: build, publish, verify and list signed model artifacts.

- ``haif artifacts make-tiny --store DIR [--key PATH]`` builds a real, tiny
  GPT-2-style model here, without downloading anything (2 layers, 2 heads,
  64-wide, random weights from a fixed seed, a byte-level BPE tokenizer
  trained on a built-in text, a small chat template) and publishes it as ``tiny-gpt2`` version ``1``
  signed with the cluster key at ``--key`` (created if absent, with its public
  key next to it as ``<key>.pub``). Needs ``haif[torch]``.
- ``haif artifacts publish --store DIR --name N --version V --key PATH --dir MODEL_DIR``
  publishes a local model directory (e.g. what ``save_pretrained`` wrote).
- ``haif artifacts verify --store DIR --name N --version V --keyring DIR``
  checks the signature against the trusted ``*.pub`` keys in ``--keyring``
  and every file's digest; exit 1 with the reason if anything is wrong.
- ``haif artifacts list --store DIR`` lists the manifests (not verified).

A worker serves an artifact with ``--engine transformers --artifact-store DIR
--model-ref tiny-gpt2:1 --keyring DIR --models tiny-gpt2``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from haif.configfile import ConfigError
from haif.runtime.artifacts import ArtifactError, list_artifacts, publish, verify
from haif.runtime.security import Keyring, Signer, generate_keypair

__all__ = ["add_artifact_commands", "load_or_create_key", "make_tiny", "public_key_path"]

TINY_NAME = "tiny-gpt2"
TINY_VERSION = "1"
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


def _build_tiny(out: Path, seed: int) -> dict[str, Any]:
    """Write a tiny GPT-2 (safetensors) and its tokenizer into ``out``; return facts."""
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
    special = "<|endoftext|>"
    # A byte-level BPE (as GPT-2's) whose alphabet is only the bytes of the
    # corpus, so every token the model can emit is printable text; other input
    # characters become the unknown token.
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=special))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=512, min_frequency=1, special_tokens=[special], show_progress=False
    )
    bpe.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
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
    model.eval()
    model.save_pretrained(str(out))  # safetensors (the default since transformers 4.35)
    tokenizer.save_pretrained(str(out))
    if not (out / "model.safetensors").is_file():
        raise ConfigError(f"transformers did not write {out / 'model.safetensors'}")
    params = sum(int(p.numel()) for p in model.parameters())
    return {
        "parameters": params,
        "vocab_size": len(tokenizer),
        "seed": seed,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
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
    name: str = TINY_NAME,
    version: str = TINY_VERSION,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the tiny model and publish it signed; return the signed manifest."""
    with tempfile.TemporaryDirectory(prefix="haif-tiny-") as tmp:
        out = Path(tmp)
        facts = _build_tiny(out, seed)
        signer, _created = load_or_create_key(key)
        return publish(
            store,
            name,
            version,
            _dir_files(out),
            signer,
            engine="transformers",
            metadata={"architecture": "gpt2", **facts},
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
    try:
        keyring = Keyring.from_dir(args.keyring)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--keyring {args.keyring}: {exc}") from None
    t0 = time.perf_counter()
    try:
        files = verify(Path(args.store), args.name, args.version, keyring)
    except ArtifactError as exc:
        print(f"REFUSED {args.name}:{args.version} ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    total = sum(p.stat().st_size for p in files.values())
    print(
        f"OK {args.name}:{args.version}: signature and {len(files)} digests verified, "
        f"{total / 1e6:.2f} MB in {time.perf_counter() - t0:.2f} s"
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
        "make-tiny", help="build a tiny GPT-2 locally and publish it signed (needs haif[torch])"
    )
    tiny.add_argument("--store", required=True, help="artifact store directory")
    tiny.add_argument(
        "--key",
        default=DEFAULT_KEY,
        help=f"Ed25519 signing key, created if absent (default {DEFAULT_KEY})",
    )
    tiny.add_argument("--name", default=TINY_NAME)
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

    lst = sub.add_parser("list", help="list the artifacts in a store (not verified)")
    lst.add_argument("--store", required=True)
    lst.add_argument("--json", action="store_true", help="the manifests as JSON")
    lst.set_defaults(func=_cmd_list)
