"""Worker engines: synthetic, OpenAI upstream, vLLM (absent here) and transformers.

The OpenAI upstream engine talks to real aiohttp servers on loopback: a small
OpenAI-style SSE server defined here, and HAIF's own gateway in front of an
orchestrator and a synthetic worker. The transformers tests (skipped without
torch / transformers, failed under ``CI=true``: ``make test`` installs them)
build the tiny GPT-2 artifact locally, nothing is downloaded, and serve it
from a real worker process behind the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from harness.cluster import running, serve, wait_fresh
from harness.require import require
from harness.tiny import make_tiny_store
from virtual_loop import run_virtual

from haif.contracts import ChatTurn, Request, SamplingParams
from haif.runtime import gateway as gateway_mod
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime import worker as worker_mod
from haif.runtime.artifacts import ArtifactError, blob_path, load_manifest
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.engines import (
    Engine,
    EngineError,
    EngineUnavailable,
    IncrementalDetokenizer,
    OpenAIUpstreamEngine,
    SyntheticEngine,
    VllmEngine,
    make_engine,
)
from haif.runtime.engines_cli import engine_from_args
from haif.runtime.gateway import Gateway
from haif.runtime.messages import InferCall, InferEnd, TokenChunk
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.rpc import RpcError
from haif.runtime.security import Keyring
from haif.runtime.store import DuckDBStore
from haif.runtime.worker import Worker, WorkerSpec

# Belt and braces: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent


def req(
    rid: str, max_tokens: int, prompt: str | None = "hello", model: str = "m", stream: bool = False
) -> Request:
    return Request(rid, "t", model, 1, max_tokens, 0.0, prompt=prompt, stream=stream)


async def collect(engine: Engine, request: Request, start: int = 0) -> list[TokenChunk]:
    return [chunk async for chunk in engine.stream(request, start)]


def pieces(chunks: list[TokenChunk]) -> list[str]:
    out: list[str] = []
    expected_start = chunks[0].start if chunks else 0
    for chunk in chunks:
        assert chunk.start == expected_start, chunks  # gap-free, in order
        expected_start += len(chunk.texts)
        out.extend(chunk.texts)
    return out


def worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    worker_mod.add_worker_args(parser)
    return parser


BASE_ARGS = ["--port", "1", "--id", "w", "--region", "r", "--orchestrator", "http://x"]


# ------------------------------------------------------------------ synthetic


def reference_synthetic_text(request_id: str, n: int) -> str:
    """The synthetic engine's text, as the worker has always produced it."""
    seed = hashlib.sha256(request_id.encode()).digest()
    return " ".join(f"tok{seed[i % len(seed)] + i}" for i in range(n))


async def test_synthetic_engine_is_unchanged() -> None:
    assert worker_mod.SyntheticEngine is SyntheticEngine  # still importable from the worker
    engine = SyntheticEngine(mean_s=0.05, ttft_s=0.01)
    request = req("req-42", 40)
    assert SyntheticEngine.text(request) == reference_synthetic_text("req-42", 40)
    full = await collect(engine, request)
    assert "".join(pieces(full)) == SyntheticEngine.text(request)
    resumed = await collect(engine, request, 25)
    assert resumed[0].start == 25 and pieces(resumed) == pieces(full)[25:]
    assert await collect(engine, request, 40) == []
    text, ttft, service = await engine.generate(req("req-1", 3))
    assert text == reference_synthetic_text("req-1", 3) and 0 <= ttft <= service


def test_synthetic_engine_paces_its_tokens_by_mean_s() -> None:
    """On a virtual clock: the first token at ``ttft_s``, then one every
    ``(mean_s - ttft_s) / (n - 1)``, the last at ``mean_s``; tokens already due
    (the consumer was late) come out together in one chunk."""
    engine = SyntheticEngine(mean_s=0.05, ttft_s=0.01)
    step = (0.05 - 0.01) / 39

    async def timed(late_after: int | None = None) -> list[tuple[float, TokenChunk]]:
        loop = asyncio.get_running_loop()
        t0, out = loop.time(), []
        async for chunk in engine.stream(req("req-42", 40)):
            out.append((loop.time() - t0, chunk))
            if chunk.start == late_after:
                await asyncio.sleep(3.5 * step)  # a slow consumer: tokens 11-13 come due
        return out

    words = SyntheticEngine.text(req("req-42", 40)).split()
    on_time = run_virtual(timed)
    assert [c.start for _, c in on_time] == list(range(40))  # one token per chunk
    for (at, chunk), i in zip(on_time, range(40), strict=True):
        assert at == pytest.approx(0.01 + i * step, abs=1e-9), (i, at)
        assert [t.strip() for t in chunk.texts] == [words[i]]
    assert on_time[-1][0] == pytest.approx(0.05, abs=1e-9)

    late = run_virtual(lambda: timed(late_after=10))
    sizes = {c.start: len(c.texts) for _, c in late}
    assert sizes[11] == 3 and 12 not in sizes and sizes[14] == 1  # 11-13 in one chunk
    assert late[-1][0] == pytest.approx(0.05, abs=1e-9)  # the pace resumes on schedule


def test_the_worker_command_line_defaults_to_the_synthetic_engine() -> None:
    args = worker_parser().parse_args([*BASE_ARGS, "--mean-s", "0.3", "--ttft-s", "0.02"])
    engine = engine_from_args(args)
    assert isinstance(engine, SyntheticEngine)
    assert (engine.mean_s, engine.ttft_s) == (0.3, 0.02)
    worker = worker_mod.worker_from_args(args)
    assert isinstance(worker.engine, SyntheticEngine) and worker.spec.models == ("llama-3-8b",)
    # A namespace without the engine options at all (haif/cli.py before wiring).
    bare = argparse.Namespace(mean_s=0.1, ttft_s=0.01)
    assert isinstance(engine_from_args(bare), SyntheticEngine)


def test_engine_registry_errors_are_clear() -> None:
    with pytest.raises(EngineError) as info:
        make_engine("tensorrt")
    assert str(info.value) == (
        "unknown engine 'tensorrt'; known engines: openai, synthetic, transformers, vllm"
    )
    with pytest.raises(EngineError, match="engine 'synthetic'"):
        make_engine("synthetic", mean_s=1.0, ttft_s=0.1, warp=9)
    engine = make_engine("synthetic", mean_s=1.0, ttft_s=0.1)
    assert isinstance(engine, SyntheticEngine)

    parser = worker_parser()
    with pytest.raises(EngineError, match="needs --artifact-store, --model-ref, --keyring"):
        engine_from_args(parser.parse_args([*BASE_ARGS, "--engine", "transformers"]))
    with pytest.raises(EngineError, match="needs --upstream-url and --upstream-model"):
        engine_from_args(parser.parse_args([*BASE_ARGS, "--engine", "openai"]))
    with pytest.raises(EngineError, match="http"):
        OpenAIUpstreamEngine("ftp://x", "m")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_says_how_to_install_vllm(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable) as info:
        VllmEngine(tmp_path, "tiny-gpt2:1", Keyring())
    assert str(info.value) == "vllm is not installed: pip install 'haif[vllm]'"
    parser = worker_parser()
    argv = [*BASE_ARGS, "--engine", "vllm", "--artifact-store", str(tmp_path)]
    argv += ["--model-ref", "tiny-gpt2:1", "--keyring", str(tmp_path)]
    with pytest.raises(EngineUnavailable, match="pip install 'haif\\[vllm\\]'"):
        engine_from_args(parser.parse_args(argv))


def test_engines_import_without_torch_transformers_or_vllm() -> None:
    code = (
        "import sys\n"
        "import haif.runtime.engines, haif.runtime.worker, haif.runtime.artifacts_cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'tokenizers')\n"
        "         if sys.modules.get(m) is not None]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"  # no heavy engine module was imported


# ------------------------------------------------------------ detokenization


def test_incremental_detokenizer_holds_back_incomplete_characters() -> None:
    vocab = {0: b"h", 1: b"\xc3", 2: b"\xa9", 3: b"llo", 4: b" w", 5: b"\xe2\x98", 6: b"\x83"}

    def decode(ids: list[int]) -> str:
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    ids = [0, 1, 2, 3, 4, 5, 6]
    detok = IncrementalDetokenizer(decode, [3, 4])
    out = [detok.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert out == ["h", "", "é", "llo", " w", "", "☃"]
    assert "".join(out) == decode(ids)
    # The final token releases whatever is held back, even half a character.
    detok = IncrementalDetokenizer(decode)
    assert [detok.add(0), detok.add(1, final=True)] == ["h", "\ufffd"]


def test_incremental_detokenizer_keeps_the_first_tokens_space() -> None:
    vocab = {0: "▁Hello", 1: "▁world", 2: "!"}

    def decode(ids: list[int]) -> str:  # SentencePiece-like: no space at text start
        return "".join(vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")

    detok = IncrementalDetokenizer(decode, [0])
    assert [detok.add(1), detok.add(2, final=True)] == [" world", "!"]


# ------------------------------------------------------ OpenAI upstream: fake


class FakeUpstream:
    """A small OpenAI-compatible server: completions and chat completions, JSON or SSE.

    It reports :attr:`PROMPT_TOKENS` prompt tokens whatever the prompt (its
    own tokenizer's count, unlike the gateway's word count), streamed in a
    last usage chunk when ``stream_options.include_usage`` asks for it.
    """

    API_KEY = "sekret"
    PROMPT_TOKENS = 5

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    @staticmethod
    def tokens(n: int) -> list[str]:
        return [f" w{i}" for i in range(n)]

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.API_KEY}"

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "up-model"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        self.bodies.append(body)
        self.headers.append({**request.headers, "X-Path": request.path})
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if prompt == "fail500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if prompt == "bad":
            return web.json_response({"error": {"message": "no such thing"}}, status=400)
        n = body["max_tokens"]
        toks = self.tokens(3 if prompt == "early" else n)
        stop = "stop" if prompt == "early" else "length"
        usage = {
            "prompt_tokens": self.PROMPT_TOKENS,
            "completion_tokens": len(toks),
            "total_tokens": self.PROMPT_TOKENS + len(toks),
        }
        if not body.get("stream"):
            if prompt == "cut" and request.transport is not None:
                request.transport.close()
                return web.Response()
            text = "".join(toks)
            answer: dict[str, Any] = (
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            kind = "chat.completion" if chat else "text_completion"
            return web.json_response(
                {
                    "id": "x",
                    "object": kind,
                    "choices": [{"index": 0, **answer, "finish_reason": stop}],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keepalive comment\n\n")

        def event(choice: dict[str, Any]) -> bytes:
            obj = {"id": "x", "object": "text_completion", "choices": [{"index": 0, **choice}]}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        if chat:
            await resp.write(event({"delta": {"role": "assistant", "content": ""}}))
        if prompt == "cut":  # the upstream dies mid-stream
            await resp.write(event({"text": " w0", "finish_reason": None}))
            if request.transport is not None:
                request.transport.close()
            return resp
        step = 2 if prompt == "pairs" else 1
        for i in range(0, len(toks), step):
            group = toks[i : i + step]
            text = "".join(group)
            choice: dict[str, Any] = {"delta": {"content": text}} if chat else {"text": text}
            choice["logprobs"] = {"tokens": group} if step > 1 else None
            choice["finish_reason"] = None
            await resp.write(event(choice))
            await asyncio.sleep(0.002)
        last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
        await resp.write(event({**last, "finish_reason": stop}))
        if (body.get("stream_options") or {}).get("include_usage"):
            obj = {"id": "x", "object": "text_completion", "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/completions", fake.complete)
    app.router.add_post("/v1/chat/completions", fake.complete)
    runner, url = await serve(app)
    try:
        yield fake, url
    finally:
        await runner.cleanup()


async def test_openai_upstream_streams_and_resumes(upstream: tuple[FakeUpstream, str]) -> None:
    fake, url = upstream
    engine = OpenAIUpstreamEngine(url, "up-model", api_key=FakeUpstream.API_KEY)
    await engine.load()
    try:
        chunks = await collect(engine, req("u1", 8, "say it", stream=True))
        assert pieces(chunks) == FakeUpstream.tokens(8) and chunks[0].start == 0
        sent = fake.bodies[-1]
        assert sent == {
            "model": "up-model",
            "prompt": "say it",
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
        }
        assert fake.headers[-1]["Accept"] == "text/event-stream"
        assert "x-request-id" not in {k.lower() for k in fake.headers[-1]}
        # The upstream's usage rides on a last, empty chunk.
        assert chunks[-1].usage == (FakeUpstream.PROMPT_TOKENS, 8) and chunks[-1].texts == ()
        resumed = await collect(engine, req("u1", 8, "say it", stream=True), 3)
        assert resumed[0].start == 3 and pieces(resumed) == FakeUpstream.tokens(8)[3:]
        # Several tokens in one event, spelled out by logprobs: one token each.
        paired = await collect(engine, req("u2", 6, "pairs", stream=True), 1)
        assert paired[0].start == 1 and pieces(paired) == FakeUpstream.tokens(6)[1:]
    finally:
        await engine.close()


def chat_req(rid: str, max_tokens: int, *turns: tuple[str, str], stream: bool = False) -> Request:
    messages = tuple(ChatTurn(role, content) for role, content in turns)
    return Request(rid, "t", "m", 1, max_tokens, 0.0, messages=messages, stream=stream)


async def test_openai_upstream_forwards_chat_as_chat_and_json_as_json(
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, url = upstream
    engine = OpenAIUpstreamEngine(url + "/v1/", "up-model", FakeUpstream.API_KEY)
    turns = (("system", "be brief"), ("user", "hi"))
    try:
        # Chat, streamed: /v1/chat/completions with the messages, SSE, the usage asked for.
        chunks = await collect(engine, chat_req("c1", 5, *turns, stream=True))
        assert pieces(chunks) == FakeUpstream.tokens(5)
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
        assert chunks[-1].usage == (FakeUpstream.PROMPT_TOKENS, 5)
        sent = fake.bodies[-1]
        assert sent["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ]
        assert "prompt" not in sent and sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}
        # Chat, JSON: one JSON call, the whole text in one chunk with reason and usage.
        chunks = await collect(engine, chat_req("c2", 10, ("user", "early")))
        assert len(chunks) == 1 and chunks[0].texts == ("".join(FakeUpstream.tokens(3)),)
        assert chunks[0].finish_reason == "stop"
        assert chunks[0].usage == (FakeUpstream.PROMPT_TOKENS, 3)
        assert fake.bodies[-1]["stream"] is False and "stream_options" not in fake.bodies[-1]
        assert fake.headers[-1]["Accept"] == "application/json"
        # A completion, JSON: /v1/completions with the prompt.
        chunks = await collect(engine, req("c3", 4, "go"))
        assert chunks == [
            TokenChunk(0, ("".join(FakeUpstream.tokens(4)),), "length", (5, 4)),
        ]
        assert fake.bodies[-1]["prompt"] == "go" and "messages" not in fake.bodies[-1]
        assert fake.bodies[-1]["stream"] is False
    finally:
        await engine.close()
    paths = [h.get("X-Path") for h in fake.headers]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/v1/completions"]


async def test_the_upstream_chat_option_is_deprecated_and_ignored(
    upstream: tuple[FakeUpstream, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = upstream
    with caplog.at_level(logging.WARNING):
        engine = OpenAIUpstreamEngine(url, "up-model", FakeUpstream.API_KEY, chat=True)
    assert "deprecated" in caplog.text
    try:
        await collect(engine, req("d1", 2, "go"))
        assert fake.headers[-1]["X-Path"] == "/v1/completions"
    finally:
        await engine.close()


async def test_upstream_usage_is_billed(upstream: tuple[FakeUpstream, str]) -> None:
    """The worker reports the upstream's usage; the attempt and record carry it."""
    _fake, url = upstream
    engine = OpenAIUpstreamEngine(url, "up-model", FakeUpstream.API_KEY)
    spec = WorkerSpec("wb", "local", "http://127.0.0.1:1", "http://127.0.0.1:1", models=("m",))
    worker = Worker(spec, engine)
    try:
        for stream in (False, True):
            request = chat_req(f"b-{stream}", 10, ("user", "early"), stream=stream)
            frames = [f async for f in worker.rpc_infer_stream(InferCall(request))]
            end = frames[-1]
            assert isinstance(end, InferEnd)
            assert end.usage == (FakeUpstream.PROMPT_TOKENS, 3) and end.finish_reason == "stop"
            reply = await worker.rpc_infer(request)
            assert reply.output_tokens == 3
    finally:
        await engine.close()


async def test_openai_upstream_errors(upstream: tuple[FakeUpstream, str]) -> None:
    _fake, url = upstream
    engine = OpenAIUpstreamEngine(url, "up-model", FakeUpstream.API_KEY)
    try:
        with pytest.raises(RpcError) as info:
            await collect(engine, req("e1", 4, "fail500"))
        assert info.value.code == "unavailable" and "500" in info.value.message
        with pytest.raises(RpcError) as info:
            await collect(engine, req("e2", 4, "bad"))
        assert info.value.code == "bad_request"
        for stream in (False, True):
            with pytest.raises(RpcError) as info:
                await collect(engine, req("e3", 4, "cut", stream=stream))
            assert info.value.code == "unavailable"
    finally:
        await engine.close()
    for wrong in (
        OpenAIUpstreamEngine(url, "other-model", FakeUpstream.API_KEY),
        OpenAIUpstreamEngine(url, "up-model", "wrong-key"),
        OpenAIUpstreamEngine(f"http://127.0.0.1:{free_port()}", "up-model"),
    ):
        with pytest.raises(EngineError):
            await wrong.load()
        await wrong.close()
    dead = OpenAIUpstreamEngine(f"http://127.0.0.1:{free_port()}", "up-model")
    with pytest.raises(RpcError) as info:
        await collect(dead, req("e3", 4))
    assert info.value.code == "unavailable"
    await dead.close()


async def test_a_worker_reports_an_upstream_that_stopped_early(
    upstream: tuple[FakeUpstream, str],
) -> None:
    _fake, url = upstream
    engine = OpenAIUpstreamEngine(url, "up-model", FakeUpstream.API_KEY)
    spec = WorkerSpec("wu", "local", "http://127.0.0.1:1", "http://127.0.0.1:1", models=("m",))
    worker = Worker(spec, engine)
    try:
        reply = await worker.rpc_infer(req("early-1", 10, "early"))
        assert reply.text == "".join(FakeUpstream.tokens(3)) and reply.output_tokens == 3
        reply = await worker.rpc_infer(req("full-1", 10, "go"))
        assert reply.output_tokens == 10
    finally:
        await engine.close()


async def test_openai_upstream_forwards_sampling_and_its_finish_reason(
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, url = upstream
    engine = OpenAIUpstreamEngine(url, "up-model", api_key=FakeUpstream.API_KEY)
    sampling = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        seed=3,
        stop=("x", "y"),
        presence_penalty=0.1,
        frequency_penalty=-0.2,
        ignore_eos=True,
    )
    try:
        request = Request("s1", "t", "m", 1, 6, 0.0, prompt="go", sampling=sampling, stream=True)
        chunks = await collect(engine, request)
        assert pieces(chunks) == FakeUpstream.tokens(6) and chunks[-2].finish_reason == "length"
        assert fake.bodies[-1] == {
            "model": "up-model",
            "prompt": "go",
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 5,
            "seed": 3,
            "stop": ["x", "y"],
            "presence_penalty": 0.1,
            "frequency_penalty": -0.2,
            "ignore_eos": True,
        }
        # Nothing given: the engine's own temperature, nothing else; the upstream's "stop".
        early = Request("s2", "t", "m", 1, 10, 0.0, prompt="early", sampling=SamplingParams())
        chunks = await collect(engine, early)
        assert pieces(chunks) == ["".join(FakeUpstream.tokens(3))]
        assert chunks[-1].finish_reason == "stop"
        assert fake.bodies[-1] == {
            "model": "up-model",
            "prompt": "early",
            "max_tokens": 10,
            "stream": False,
            "temperature": 0.0,
        }
    finally:
        await engine.close()


# ----------------------------------------------- a live stack on loopback


class Stack:
    """An in-process orchestrator and gateway (real HTTP, msgpack RPC, DuckDB)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runners: list[web.AppRunner] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.orch: Orchestrator | None = None
        self.orch_url = ""
        self.url = ""

    async def start(self) -> Stack:
        self.orch = Orchestrator(
            ClusterConfig().policy, DuckDBStore(self.tmp / "store.duckdb"), idle_timeout_s=10.0
        )
        runner, self.orch_url = await serve(orchestrator_mod.build_app(self.orch))
        self.runners.append(runner)
        gw = Gateway(self.orch_url, "local", idle_timeout_s=15.0)
        runner, self.url = await serve(gateway_mod.build_app(gw))
        self.runners.append(runner)
        return self

    async def wait_worker(self, wid: str, proc: subprocess.Popen[bytes] | None = None) -> None:
        assert self.orch is not None
        await wait_fresh(self.orch, {wid}, {wid: proc} if proc else {}, self.tmp, 60.0)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running(Stack(tmp_path)) as s:
        yield s


@pytest.mark.cluster
async def test_openai_upstream_against_the_haif_gateway(stack: Stack) -> None:
    port = free_port()
    spec = WorkerSpec(
        "ws", "local", f"http://127.0.0.1:{port}", stack.orch_url, mean_s=0.1, heartbeat_s=0.1
    )
    runner, _url = await serve(worker_mod.build_app(Worker(spec)), port=port)
    stack.runners.insert(0, runner)
    await stack.wait_worker("ws")
    engine = OpenAIUpstreamEngine(stack.url, "llama-3-8b", forward_request_id=True)
    await engine.load()  # the gateway lists the model
    try:
        request = req("via-gateway-1", 12, "hello there", model="llama-3-8b")
        text = "".join(pieces(await collect(engine, request)))
        assert text == SyntheticEngine.text(request)
    finally:
        await engine.close()


@pytest.mark.cluster
async def test_the_record_bills_the_upstreams_usage(
    stack: Stack, upstream: tuple[FakeUpstream, str]
) -> None:
    """Through a gateway, orchestrator and worker: the upstream says 5 prompt tokens,
    the answer's usage and the record say 5 (the gateway's word count is 1)."""
    fake, up_url = upstream
    port = free_port()
    spec = WorkerSpec(
        "wu", "local", f"http://127.0.0.1:{port}", stack.orch_url, models=("m",), heartbeat_s=0.1
    )
    engine = OpenAIUpstreamEngine(up_url, "up-model", FakeUpstream.API_KEY)
    runner, _url = await serve(worker_mod.build_app(Worker(spec, engine)), port=port)
    stack.runners.insert(0, runner)
    await stack.wait_worker("wu")
    chat = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "early"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url + "/v1/chat/completions", json=chat) as resp:
            answer = await resp.json()
        assert resp.status == 200, answer
        assert answer["usage"]["prompt_tokens"] == FakeUpstream.PROMPT_TOKENS
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["choices"][0]["message"]["content"] == "".join(FakeUpstream.tokens(3))
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert fake.bodies[-1]["stream"] is False
        assert fake.headers[-1]["X-Path"] == "/v1/chat/completions"
        streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(stack.url + "/v1/chat/completions", json=streamed) as resp:
            events = [
                json.loads(line[6:])
                for line in (await resp.text()).splitlines()
                if line.startswith("data: {")
            ]
        assert resp.status == 200
        assert events[-1]["usage"]["prompt_tokens"] == FakeUpstream.PROMPT_TOKENS
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
        )
        assert text == "".join(FakeUpstream.tokens(3))
        assert fake.bodies[-1]["stream"] is True
        completion = {"model": "m", "max_tokens": 4, "prompt": "go"}
        async with http.post(stack.url + "/v1/completions", json=completion) as resp:
            answer = await resp.json()
        assert answer["usage"] == {
            "prompt_tokens": FakeUpstream.PROMPT_TOKENS,
            "completion_tokens": 4,
            "total_tokens": FakeUpstream.PROMPT_TOKENS + 4,
        }
        assert fake.headers[-1]["X-Path"] == "/v1/completions"
    assert stack.orch is not None
    records = await stack.orch.store.records()
    assert sorted(r.prompt_tokens for r in records) == [FakeUpstream.PROMPT_TOKENS] * 3
    assert sorted(r.output_tokens for r in records) == [3, 3, 4]
    await engine.close()


# ------------------------------------------------------------- transformers


def worker_command(port: int, orch_url: str, store: Path, keys: Path, wid: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "haif.runtime.worker",
        "--port",
        str(port),
        "--id",
        wid,
        "--region",
        "local",
        "--orchestrator",
        orch_url,
        "--models",
        "tiny-gpt2",
        "--heartbeat-s",
        "0.2",
        "--engine",
        "transformers",
        "--artifact-store",
        str(store),
        "--model-ref",
        "tiny-gpt2:1",
        "--keyring",
        str(keys),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``haif artifacts make-tiny`` into a temporary store: (store, keyring dir)."""
    return make_tiny_store(tmp_path_factory.mktemp("tiny"))


def tampered_copy(store: Path, keys: Path, dest: Path) -> Path:
    shutil.copytree(store, dest)
    manifest = load_manifest(dest, "tiny-gpt2", "1", Keyring.from_dir(keys))
    blob = blob_path(dest, manifest["files"]["model.safetensors"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[-7] ^= 0xFF  # one byte of the weights
    blob.write_bytes(bytes(data))
    return dest


async def loaded_engine(store: Path, keys: Path) -> Any:
    from haif.runtime.engines import TransformersEngine

    engine = TransformersEngine(store, "tiny-gpt2:1", keys, device="cpu")
    await engine.load()
    return engine


@pytest.mark.slow
def test_make_tiny_builds_a_small_signed_safetensors_model(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from haif.runtime.artifacts_cli import make_tiny

    store, keys = tiny
    manifest = load_manifest(store, "tiny-gpt2", "1", Keyring.from_dir(keys))
    # The build is reproducible: the same seed gives the same bytes.
    again = make_tiny(tmp_path / "store", tmp_path / "k.key")
    assert again["files"] == manifest["files"]
    files = manifest["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt"))]
    total = sum(e["size"] for e in files.values())
    assert total < 5_000_000, total
    assert manifest["engine"] == "transformers"
    assert manifest["metadata"]["architecture"] == "gpt2"
    assert 50_000 < manifest["metadata"]["parameters"] < 1_000_000


@pytest.mark.slow
async def test_transformers_engine_is_deterministic_and_resumes(tiny: tuple[Path, Path]) -> None:
    engine = await loaded_engine(*tiny)
    try:
        request = req("tf-1", 8, "Hello world, how are", model="tiny-gpt2")
        first = pieces(await collect(engine, request))
        assert len(first) == 8 and "".join(first).strip()
        assert pieces(await collect(engine, request)) == first
        resumed = await collect(engine, request, 3)
        assert resumed[0].start == 3 and pieces(resumed) == first[3:]
        # Concurrent requests interleave but each gets exactly its own text.
        again = await asyncio.gather(*(collect(engine, request) for _ in range(3)))
        assert [pieces(c) for c in again] == [first] * 3
        # Another prompt, another text; no prompt at all starts from BOS.
        other = pieces(await collect(engine, req("tf-2", 8, "The quick brown fox")))
        assert other != first
        assert len(pieces(await collect(engine, req("tf-3", 5, None)))) == 5
        with pytest.raises(RpcError) as info:
            await collect(engine, req("tf-4", 1000, "x"))
        assert info.value.code == "bad_request"
        stats = engine.stats()["cache"]
        assert stats["models"] == ["tiny-gpt2:1"] and stats["pinned"] == ["tiny-gpt2:1"]
    finally:
        await engine.close()
    assert engine.cache.stats()["models"] == []


def test_next_token_penalties_top_k_and_top_p() -> None:
    require("torch")
    import torch

    from haif.runtime.engines.transformers_engine import next_token

    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)

    def pick(counts: dict[int, int] | None = None, **kw: Any) -> int:
        return next_token(torch, logits, SamplingParams(**kw), counts or {}, g)

    assert pick(temperature=0.0) == 0  # greedy
    # Presence: minus 0.2 once seen; frequency: minus 0.05 per time seen (OpenAI's).
    assert pick({0: 1}, temperature=0.0, presence_penalty=0.2) == 1
    assert pick({0: 1}, temperature=0.0, frequency_penalty=0.05) == 0
    assert pick({0: 3}, temperature=0.0, frequency_penalty=0.05) == 1
    assert pick({2: 1}, temperature=0.0, presence_penalty=-2.0, frequency_penalty=-2.0) == 2
    assert torch.equal(logits, torch.tensor([3.0, 2.9, 0.0, -1.0]))  # left as they were
    # top_k 1 and a small top_p keep only the most likely token, at any temperature.
    assert {pick(temperature=2.0, top_k=1) for _ in range(50)} == {0}
    assert {pick(temperature=1.0, top_p=0.3) for _ in range(50)} == {0}
    assert {pick(temperature=1.0, top_p=0.9) for _ in range(200)} == {0, 1}
    assert len({pick(temperature=2.0) for _ in range(400)}) == 4
    # The same seed draws the same tokens.
    draws = []
    for _ in range(2):
        g.manual_seed(7)
        draws.append([pick(temperature=2.0) for _ in range(30)])
    assert draws[0] == draws[1]


@pytest.mark.slow
async def test_transformers_engine_samples_and_stops(tiny: tuple[Path, Path]) -> None:
    engine = await loaded_engine(*tiny)
    prompt = "Hello world, how are"

    def sampled(rid: str, n: int, **kw: Any) -> Request:
        return Request(
            rid, "t", "tiny-gpt2", 1, n, 0.0, prompt=prompt, sampling=SamplingParams(**kw)
        )

    try:
        hot = {"temperature": 1.0, "ignore_eos": True}
        a = pieces(await collect(engine, sampled("a", 12, seed=1, **hot)))
        b = pieces(await collect(engine, sampled("b", 12, seed=1, **hot)))
        c = pieces(await collect(engine, sampled("a", 12, seed=2, **hot)))
        assert a == b != c
        # Unseeded: seeded by the request id, so a resumed attempt draws the same tokens.
        unseeded = pieces(await collect(engine, sampled("u", 12, **hot)))
        assert pieces(await collect(engine, sampled("u", 12, **hot), 5)) == unseeded[5:]
        # top_k 1 is greedy: the text of a request without sampling parameters.
        greedy = await collect(engine, req("g", 12, prompt, model="tiny-gpt2"))
        assert greedy[-1].finish_reason == "length"
        assert pieces(await collect(engine, sampled("k", 12, top_k=1, seed=5, **hot))) == pieces(
            greedy
        )
        # A stop string: the text is cut before it and the response ends, "stop".
        text = "".join(pieces(greedy))
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        cut = text[: text.index(stop)]
        stopped = await collect(
            engine, sampled("st", 12, temperature=0.0, stop=(stop,), ignore_eos=True)
        )
        assert "".join(pieces(stopped)) == cut and stopped[-1].finish_reason == "stop"
        assert sum(len(ch.texts) for ch in stopped) < 12
        # End of sequence: pretend the first greedy token is the model's EOS token.
        loaded = engine.loaded
        assert loaded is not None and loaded.eos_id is not None
        first_id = engine.prompt_ids(req("x", 1, prompt))
        with loaded.torch.inference_mode():
            logits = loaded.model(input_ids=loaded.torch.tensor([first_id])).logits
        eos, loaded.eos_id = loaded.eos_id, int(logits[0, -1].argmax())
        try:
            ended = await collect(engine, sampled("e", 12, temperature=0.0))
            assert [(ch.start, ch.texts, ch.finish_reason) for ch in ended] == [(0, ("",), "stop")]
            on = await collect(engine, sampled("e", 12, temperature=0.0, ignore_eos=True))
            assert pieces(on) == pieces(greedy) and on[-1].finish_reason == "length"
        finally:
            loaded.eos_id = eos
    finally:
        await engine.close()


@pytest.mark.slow
async def test_transformers_engine_renders_the_chat_template(tiny: tuple[Path, Path]) -> None:
    from haif.runtime.artifacts_cli import TINY_CHAT_TEMPLATE

    engine = await loaded_engine(*tiny)
    turns = (("system", "Be brief."), ("user", "Hello world, how are you?"))
    chat = Request(
        "ch", "t", "tiny-gpt2", 1, 8, 0.0, messages=tuple(ChatTurn(r, c) for r, c in turns)
    )
    try:
        loaded = engine.loaded
        assert loaded is not None and loaded.tokenizer.chat_template == TINY_CHAT_TEMPLATE
        messages = [{"role": r, "content": c} for r, c in turns]
        expected = loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if not isinstance(expected, list):  # transformers 5: a BatchEncoding
            expected = list(expected["input_ids"])
        assert engine.prompt_ids(chat) == expected
        rendered = loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert rendered == (
            "system; Be brief.<|endoftext|>user; Hello world, how are you?<|endoftext|>assistant;"
        )
        # The chat generates what a completion of its rendered text generates.
        answer = pieces(await collect(engine, chat))
        assert answer == pieces(await collect(engine, req("cc", 8, rendered, model="tiny-gpt2")))
        # A model without a chat template refuses chat (a 400, as vLLM), not completions.
        template, loaded.tokenizer.chat_template = loaded.tokenizer.chat_template, None
        try:
            with pytest.raises(RpcError) as info:
                await collect(engine, chat)
            assert info.value.code == "bad_request" and "chat template" in info.value.message
            assert len(pieces(await collect(engine, req("np", 3, "hi")))) == 3
        finally:
            loaded.tokenizer.chat_template = template
    finally:
        await engine.close()


@pytest.mark.slow
async def test_transformers_engine_refuses_a_tampered_artifact(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from haif.runtime.engines import TransformersEngine

    store, keys = tiny
    bad = tampered_copy(store, keys, tmp_path / "bad")
    engine = TransformersEngine(bad, "tiny-gpt2:1", keys, device="cpu")
    with pytest.raises(ArtifactError) as info:
        await engine.load()
    assert info.value.code == "digest_mismatch" and "model.safetensors" in info.value.message
    assert engine.loaded is None and engine.cache.stats()["models"] == []
    with pytest.raises(RpcError):
        await collect(engine, req("x", 2))


@pytest.mark.cluster
@pytest.mark.slow
async def test_a_worker_process_with_a_tampered_artifact_exits_without_announcing(
    tiny: tuple[Path, Path], tmp_path: Path, stack: Stack
) -> None:
    store, keys = tiny
    bad = tampered_copy(store, keys, tmp_path / "bad")
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            worker_command(free_port(), stack.orch_url, bad, keys, "wbad"),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
            cwd=ROOT,
        )
    text = log.read_text()
    assert proc.returncode != 0, text
    assert "digest_mismatch" in text or "tampered" in text, text
    assert "not announcing tiny-gpt2" in text
    assert stack.orch is not None and "wbad" not in stack.orch.status().fresh_workers


@pytest.mark.cluster
@pytest.mark.slow
async def test_a_worker_process_serves_the_tiny_model_through_the_gateway(
    tiny: tuple[Path, Path], tmp_path: Path, stack: Stack
) -> None:
    store, keys = tiny
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        worker_command(free_port(), stack.orch_url, store, keys, "wtf"),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    stack.procs.append(proc)
    engine = await loaded_engine(store, keys)
    try:
        prompt = "Hello world, how are"
        expected = "".join(pieces(await collect(engine, req("local", 8, prompt))))
    finally:
        await engine.close()
    await stack.wait_worker("wtf", proc)

    # Greedy, exactly 8 tokens: what the engine gave for a request without sampling.
    body = {"model": "tiny-gpt2", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    body["ignore_eos"] = True
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{stack.url}/v1/completions", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        assert answer["choices"][0]["text"] == expected
        assert answer["usage"]["completion_tokens"] == 8
        streamed: list[str] = []
        async with session.post(
            f"{stack.url}/v1/completions", json={**body, "stream": True}
        ) as resp:
            assert resp.status == 200
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    choices = json.loads(line[6:])["choices"]
                    streamed.extend(c["text"] for c in choices)
        assert "".join(streamed) == expected
