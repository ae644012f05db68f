"""The gateway's prompt measure (haif/runtime/prompt_tokens.py): counts and hashes from the
model's tokenizer, the same ids the engine computes."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from harness.bench import load_bench
from harness.cluster import serve
from harness.tiny import make_tiny_store

from haif.configfile import ConfigError
from haif.contracts import ChatTurn, Request
from haif.fleet.prefix import block_hashes, prefix_root, word_token_ids
from haif.fleet.profiles import load_catalog
from haif.runtime import gateway as gateway_mod
from haif.runtime.artifacts import ArtifactError, blob_path, load_manifest
from haif.runtime.cluster import WorkerConfig
from haif.runtime.gateway import Gateway
from haif.runtime.prompt_tokens import (
    ArtifactTokenizer,
    PromptMeasure,
    PromptTokens,
    WordTokenizer,
    prompt_tokens_for,
)
from haif.runtime.security import Keyring

WORDS = " ".join(f"w{i}" for i in range(40))
CHAT = (ChatTurn("system", "be brief " * 10), ChatTurn("user", WORDS))


@pytest.mark.parametrize(
    ("prompt", "messages", "tokens"),
    [
        (WORDS, (), 40),
        ("", (), 1),  # an empty prompt still counts one token (and has no blocks)
        (None, (), 1),
        ("  spaced\tout \n words ", (), 3),
        (None, CHAT, 20 + 40),  # a chat: its contents' words, joined
    ],
)
def test_synthetic_words_count_and_hash(
    prompt: str | None, messages: tuple[ChatTurn, ...], tokens: int
) -> None:
    got = PromptTokens().measure("llama-3-8b", prompt, messages)
    text = "\n".join(m.content for m in messages) if messages else prompt or ""
    ids = word_token_ids(text)
    assert got.tokens == tokens
    assert got.block_tokens == 16  # the catalog's kv_block_tokens for llama-3-8b
    assert got.prefix_hashes == block_hashes(ids, 16, prefix_root("llama-3-8b"))
    assert len(got.prefix_hashes) == len(ids) // 16


def test_the_block_size_is_the_profiles(tmp_path: Path) -> None:
    doc = yaml.safe_load(
        (Path(__file__).parent.parent / "haif/fleet/data/profiles.yaml").read_text()
    )
    doc["models"]["llama-2-7b"]["kv_block_tokens"] = 8
    doc["models"]["llama-2-7b"]["sources"]["kv_block_tokens"] = "test"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    prompts = PromptTokens(catalog=load_catalog(path))
    assert prompts.measure("llama-2-7b", WORDS).block_tokens == 8
    assert len(prompts.measure("llama-2-7b", WORDS).prefix_hashes) == 40 // 8
    assert prompts.measure("llama-3-8b", WORDS).block_tokens == 16


async def test_loading_reads_the_catalog_before_any_request() -> None:
    """The gateway's startup (load) reads the profile catalog for block sizes, so the
    first request does not pay for it (30 ms here; it set the first request apart from
    the simulator's in `haif parity`)."""
    prompts = PromptTokens()
    assert prompts.catalog is None
    await prompts.load()
    assert prompts.catalog is not None
    assert prompts.block_tokens("llama-3-8b") == prompts.catalog.block_tokens("llama-3-8b")


def test_an_upstream_model_is_estimated_and_not_hashed() -> None:
    prompts = PromptTokens({"gpt-up": None})
    assert prompts.measure("gpt-up", WORDS) == PromptMeasure(40)
    assert prompts.measure("gpt-up", None, CHAT) == PromptMeasure(60)
    # Another model: the default, the synthetic words.
    assert prompts.measure("llama-3-8b", WORDS).prefix_hashes


def test_the_same_prompt_hashes_apart_under_two_models() -> None:
    prompts = PromptTokens()
    a = prompts.measure("llama-3-8b", WORDS).prefix_hashes
    b = prompts.measure("llama-2-7b", WORDS).prefix_hashes
    assert a and b and not set(a) & set(b)


def _worker(wid: str, engine: str, models: list[str], **kw: Any) -> WorkerConfig:
    return WorkerConfig(id=wid, region="r", engine=engine, models=tuple(models), **kw)  # type: ignore[arg-type]


ARTIFACT = {"artifact_store": "art", "model_ref": "tiny-gpt2:1", "keyring": "keys"}
UPSTREAM = {"upstream_url": "http://u/v1", "upstream_model": "m"}


def test_the_cluster_says_whose_tokenizer_a_model_has(tmp_path: Path) -> None:
    prompts = prompt_tokens_for(
        [
            _worker("s1", "synthetic", ["llama-3-8b"]),
            _worker("s2", "synthetic", ["llama-3-8b", "llama-2-7b"]),
            _worker("t1", "transformers", ["tiny-gpt2"], **ARTIFACT),
            _worker("v1", "vllm", ["tiny-gpt2"], **ARTIFACT),
            _worker("o1", "openai", ["gpt-up"], **UPSTREAM),
        ],
        tmp_path,
    )
    assert isinstance(prompts.tokenizers["llama-3-8b"], WordTokenizer)
    assert isinstance(prompts.tokenizers["llama-2-7b"], WordTokenizer)
    tiny = prompts.tokenizers["tiny-gpt2"]
    assert isinstance(tiny, ArtifactTokenizer)
    assert tiny.store == tmp_path / "art" and str(tiny.ref) == "tiny-gpt2:1"
    assert prompts.tokenizers["gpt-up"] is None
    assert isinstance(prompts.default, WordTokenizer)


@pytest.mark.parametrize(
    "second",
    [
        _worker("t1", "transformers", ["llama-3-8b"], **ARTIFACT),
        _worker("o1", "openai", ["llama-3-8b"], **UPSTREAM),
    ],
)
def test_one_model_two_tokenizers_is_refused_naming_it(second: WorkerConfig) -> None:
    with pytest.raises(ConfigError, match=r"model 'llama-3-8b' is served with the synthetic words"):
        prompt_tokens_for([_worker("s1", "synthetic", ["llama-3-8b"]), second])


# ------------------------------------------------------------------ a real tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``haif artifacts make-tiny`` into a temporary store: (store, keyring dir)."""
    return make_tiny_store(tmp_path_factory.mktemp("tiny"))


PROMPTS = [
    ("the quick brown fox jumps over the lazy dog " * 6, ()),
    ("", ()),
    (None, (ChatTurn("system", "you are terse"), ChatTurn("user", "hello there " * 20))),
    (None, (ChatTurn("user", "a"), ChatTurn("assistant", "b c"), ChatTurn("user", "d " * 30))),
]


async def test_the_gateway_hashes_the_ids_the_engine_computes(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from haif.runtime.engines import TransformersEngine

    store, keys = tiny
    engine = TransformersEngine(store, "tiny-gpt2:1", keys, device="cpu")
    await engine.load()
    tokenizer = ArtifactTokenizer(store, "tiny-gpt2:1", keys, workdir=tmp_path)
    prompts = PromptTokens({"tiny-gpt2": tokenizer})
    await prompts.load()
    try:
        for prompt, messages in PROMPTS:
            request = Request("r", "t", "tiny-gpt2", 1, 8, 0.0, prompt=prompt, messages=messages)
            ids = engine.prompt_ids(request)
            got = prompts.measure("tiny-gpt2", prompt, messages)
            assert got.tokens == len(ids) >= 1
            assert got.prefix_hashes == block_hashes(ids, 16, prefix_root("tiny-gpt2"))
        long = prompts.measure("tiny-gpt2", PROMPTS[0][0])
        assert len(long.prefix_hashes) >= 2  # the comparison covered full blocks
        # The engine bills the same count on its last chunk (with the tokens made).
        request = Request("r2", "t", "tiny-gpt2", 1, 5, 0.0, prompt=PROMPTS[0][0])
        chunks = [c async for c in engine.stream(request)]
        assert chunks[-1].usage == (long.tokens, 5)
        assert all(c.usage is None for c in chunks[:-1])
    finally:
        await engine.close()
    assert not list(tmp_path.iterdir())  # the copied tokenizer files are gone once loaded


async def test_the_tokenizer_needs_no_weights_but_a_verified_artifact(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    store, keys = tiny
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    manifest = load_manifest(copy, "tiny-gpt2", "1", Keyring.from_dir(keys))
    files = manifest["files"]
    blob_path(copy, files["model.safetensors"]["sha256"]).unlink()  # never read
    tokenizer = ArtifactTokenizer(copy, "tiny-gpt2:1", keys)
    await tokenizer.load()
    assert tokenizer.encode("tiny-gpt2", "hello", ())
    # A tokenizer file that is not the signed one is refused.
    blob = blob_path(copy, files["tokenizer.json"]["sha256"])
    blob.write_bytes(blob.read_bytes().replace(b'"hello"', b'"hellO"', 1) + b" ")
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is corrupted or tampered with"):
        await ArtifactTokenizer(copy, "tiny-gpt2:1", keys).load()
    # So is an artifact signed by a key the gateway does not trust.
    with pytest.raises(ArtifactError) as refused:
        await ArtifactTokenizer(store, "tiny-gpt2:1", Keyring()).load()
    assert refused.value.code == "untrusted_signer"


async def test_a_chat_the_tokenizer_cannot_render_is_a_400_at_the_gateway(
    tiny: tuple[Path, Path],
) -> None:
    store, keys = tiny
    tokenizer = ArtifactTokenizer(store, "tiny-gpt2:1", keys)
    await tokenizer.load()
    tokenizer.tokenizer.chat_template = None  # a model published without one
    # Refused before the orchestrator is called: none listens at this address.
    gw = Gateway("http://127.0.0.1:9", "local", prompts=PromptTokens({"tiny-gpt2": tokenizer}))
    runner, url = await serve(gateway_mod.build_app(gw), shutdown_timeout=1.0)
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
    finally:
        await runner.cleanup()
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    assert "has no chat template" in error["message"]


class _Threaded(WordTokenizer):
    """The words, encoded in a thread of its own (as an artifact's tokenizer is)."""

    def __init__(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tok-test")
        self.threads: list[str] = []

    def encode(self, model: str, prompt: str | None, messages: tuple[ChatTurn, ...]) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return super().encode(model, prompt, messages)


async def test_a_tokenizer_with_a_thread_encodes_off_the_event_loop() -> None:
    threaded = _Threaded()
    prompts = PromptTokens({"m": threaded})
    got = await prompts.measure_async("m", WORDS)
    assert got == prompts.measure("m", WORDS)  # the same measure, wherever it runs
    assert threaded.threads[0].startswith("tok-test")
    assert threaded.threads[1] == threading.current_thread().name
    # Without a thread of its own (the words): on the caller's thread.
    assert await prompts.measure_async("other", WORDS) == prompts.measure("other", WORDS)
    prompts.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        await prompts.measure_async("m", WORDS)


def test_the_bench_prints_the_cost_per_request(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("prompt_tokens")
    report = bench.main(["--calls", "2", "--repeat", "1", "--no-artifact"])
    cases = {(r["case"], r["prompt_words"]): r for r in report["rows"]}
    measured = cases[("words: measure (both)", 1000)]
    assert measured["tokens"] == 1000 and measured["blocks"] == 1000 // 16
    assert all(r["us_per_request"] > 0 for r in report["rows"])
    assert "words: measure (both)" in capsys.readouterr().out
