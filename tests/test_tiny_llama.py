"""``haif artifacts make-tiny --arch llama`` and ``haif artifacts fetch``, without vLLM.

The tiny Llama is what the vLLM lane serves (tests/vllm_lane); here it is built in
``.venv`` (torch and transformers), checked, and served by the transformers
engine, which its manifest (engine ``any``) allows as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from harness.require import require

from haif.configfile import ConfigError
from haif.contracts import ChatTurn, Request, SamplingParams
from haif.fleet.profiles import load_catalog
from haif.runtime.artifacts import load_manifest
from haif.runtime.artifacts_cli import TINY_LLAMA_CHAT_TEMPLATE, add_artifact_commands, make_tiny
from haif.runtime.replay import prompt_text
from haif.runtime.security import Keyring

pytestmark = pytest.mark.slow


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="haif")
    add_artifact_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["artifacts", *argv])
    code: int = args.func(args)
    return code


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``haif artifacts make-tiny --arch llama`` into a temporary store: (store, keyring dir)."""
    require("torch")
    require("transformers")
    base = tmp_path_factory.mktemp("tiny-llama")
    store, key = base / "store", base / "keys" / "cluster.key"
    assert cli("make-tiny", "--arch", "llama", "--store", str(store), "--key", str(key)) == 0
    return store, key.parent


def test_make_tiny_llama_is_a_small_signed_llama_with_a_chat_template(
    tiny_llama: tuple[Path, Path], tmp_path: Path
) -> None:
    store, keys = tiny_llama
    manifest = load_manifest(store, "tiny-llama", "1", Keyring.from_dir(keys))
    assert manifest["engine"] == "any"  # transformers and vllm alike
    meta = manifest["metadata"]
    assert meta["architecture"] == "llama"
    assert 6_000_000 < meta["parameters"] < 10_000_000
    files = manifest["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        files
    )
    assert not [f for f in files if f.endswith((".bin", ".pt"))]
    # The same seed gives the same bytes.
    again = make_tiny(tmp_path / "store", tmp_path / "k.key", arch="llama")
    assert again["files"] == files


def test_the_tiny_llamas_tokenizer_and_template(
    tiny_llama: tuple[Path, Path], tmp_path: Path
) -> None:
    transformers = require("transformers")
    store, keys = tiny_llama
    dest = tmp_path / "files"
    assert cli(
        "fetch", "--store", str(store), "--name", "tiny-llama", "--version", "1",
        "--keyring", str(keys), "--dest", str(dest),
    ) == 0  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    assert tokenizer.chat_template == TINY_LLAMA_CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello! How are you today?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hello! How are you today?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Each special token of the template is one token of its own.
    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    counts = [ids.count(tokenizer.convert_tokens_to_ids(t)) for t in special]
    assert counts == [1, 2, 2, 1]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text  # byte-level BPE: a lossless round trip
    # Replayed prompts count as the trace says: each filler word is one token, so a
    # prompt of n words is n tokens plus a constant (the salt word's extra pieces, BOS).
    extra = {
        len(tokenizer(prompt_text(n, salt="r0000042"))["input_ids"]) - n for n in (10, 100, 1000)
    }
    assert len(extra) == 1 and 0 <= extra.pop() <= 8
    # The catalog's figures for it (the simulator's tiny-llama) are this model's.
    config = transformers.AutoConfig.from_pretrained(str(dest), local_files_only=True)
    model = load_catalog().models["tiny-llama"]
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2  # bf16
    assert (model.n_layers, model.hidden_size, model.kv_bytes_per_token) == (
        config.num_hidden_layers,
        config.hidden_size,
        kv,
    )


def test_fetch_refuses_a_directory_with_files_and_an_unknown_artifact(
    tiny_llama: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, keys = tiny_llama
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    common = ("--store", str(store), "--keyring", str(keys), "--version", "1")
    with pytest.raises(ConfigError, match="is not an empty directory"):
        cli("fetch", *common, "--name", "tiny-llama", "--dest", str(busy))
    assert cli("fetch", *common, "--name", "tiny-mistral", "--dest", str(tmp_path / "new")) == 1
    assert "REFUSED tiny-mistral:1 (not_found)" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_make_tiny_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--arch 'mistral': expected one of gpt2, llama"):
        make_tiny(tmp_path / "store", tmp_path / "k.key", arch="mistral")


async def test_the_transformers_engine_serves_it_with_its_template_and_a_stop(
    tiny_llama: tuple[Path, Path],
) -> None:
    from haif.runtime.engines import TransformersEngine

    store, keys = tiny_llama
    engine = TransformersEngine(store, "tiny-llama:1", keys, device="cpu")
    await engine.load()
    try:
        chat = (ChatTurn("user", "Hello! What is HAIF?"),)

        async def text(stop: tuple[str, ...] = ()) -> tuple[str, str | None]:
            request = Request(
                "c", "t", "tiny-llama", 8, 16, 0.0, prompt=None, messages=chat,
                sampling=SamplingParams(temperature=0.0, stop=stop),
            )  # fmt: skip
            chunks = [c async for c in engine.stream(request)]
            return "".join(t for c in chunks for t in c.texts), chunks[-1].finish_reason

        full, reason = await text()
        assert reason == "length" and full.strip()
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        assert stop.strip(), full
        cut, reason = await text((stop,))
        assert (cut, reason) == (full[: full.index(stop)], "stop")
    finally:
        await engine.close()
