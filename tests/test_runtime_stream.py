"""Streaming end to end: real gateway, orchestrator and workers on loopback.

The orchestrator and the gateway run in the test's event loop (aiohttp
``AppRunner``); the synthetic workers are real ``python -m haif worker``
processes, so "a worker dies mid-stream" is a SIGKILL. Everything talks
real HTTP and msgpack; nothing of HAIF is mocked.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from harness.api import MODEL, completion_text, expected_text, sse_data
from harness.cluster import LiveCluster, running
from harness.require import require

from haif.contracts import Dispatch, RetryAt
from haif.runtime import gateway as gateway_mod
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.gateway import Gateway

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.cluster]


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with session.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveCluster]:
    async with running(LiveCluster(tmp_path_factory.mktemp("stream"))) as c:
        yield c


async def test_streamed_completion_equals_the_non_streamed_text(
    cluster: LiveCluster, session: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "prompt": "tell me more", "max_tokens": 12, "stream": True}
    async with session.post(
        f"{cluster.url}/v1/completions", json=body, headers={"x-request-id": "st-1"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"] == "st-1"
        events = [e async for e in sse_data(resp)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == "st-1" for c in chunks)
    assert all("usage" not in c for c in chunks)  # not asked for
    texts = [completion_text(c) for c in chunks]
    assert sum(1 for t in texts if t) >= 3, texts  # paced: several events
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed = "".join(texts)
    assert streamed == expected_text("st-1", 12)

    # The same request id, not streamed: the same text.
    status, answer = await post(
        session,
        f"{cluster.url}/v1/completions",
        {**body, "stream": False},
        {"x-request-id": "st-1"},
    )
    assert status == 200, answer
    assert answer["choices"][0]["text"] == streamed
    record = await cluster.record("st-1")
    assert record.status == "ok" and record.tenant == "anonymous" and record.output_tokens == 12


async def test_chat_stream_and_include_usage(
    cluster: LiveCluster, session: aiohttp.ClientSession
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(
        f"{cluster.url}/v1/chat/completions", json=body, headers={"x-request-id": "st-chat"}
    ) as resp:
        assert resp.status == 200
        events = [e async for e in sse_data(resp)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert "".join(completion_text(c) for c in chunks) == expected_text("st-chat", 6)


async def test_stream_options_need_stream(
    cluster: LiveCluster, session: aiohttp.ClientSession
) -> None:
    status, answer = await post(
        session,
        f"{cluster.url}/v1/completions",
        {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
    )
    assert status == 400 and answer["error"]["param"] == "stream_options"


async def test_refusal_before_the_first_token_is_a_plain_http_error(
    cluster: LiveCluster, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{cluster.url}/v1/completions",
        json={"model": "no-such-model", "prompt": "x", "stream": True},
    ) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_openai_sdk_streaming_and_not(cluster: LiveCluster) -> None:
    openai = require("openai", extra="test")
    key = await cluster.add_key("sdk-tenant")
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=key, max_retries=0)
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]

        done = await client.completions.create(
            model=MODEL, prompt="one two", max_tokens=5, extra_headers={"x-request-id": "sdk-1"}
        )
        assert done.choices[0].text == expected_text("sdk-1", 5)
        assert done.usage is not None and done.usage.completion_tokens == 5

        stream = await client.completions.create(
            model=MODEL,
            prompt="one two",
            max_tokens=7,
            stream=True,
            extra_headers={"x-request-id": "sdk-2"},
        )
        pieces = [c.choices[0].text async for c in stream if c.choices]
        assert "".join(pieces) == expected_text("sdk-2", 7)

        chat = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            extra_headers={"x-request-id": "sdk-3"},
        )
        assert chat.choices[0].message.content == expected_text("sdk-3", 4)

        chat_stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": "sdk-4"},
        )
        deltas: list[str] = []
        usage = None
        async for chunk in chat_stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(deltas) == expected_text("sdk-4", 9)
        assert usage is not None and usage.completion_tokens == 9
    finally:
        await client.close()
    assert (await cluster.record("sdk-4")).tenant == "sdk-tenant"


async def test_readyz(cluster: LiveCluster, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{cluster.url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["fresh_workers"] == 2
    lonely = Gateway(f"http://127.0.0.1:{free_port()}", "local")
    runner = web.AppRunner(gateway_mod.build_app(lonely))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        host, port = runner.addresses[0][:2]
        async with session.get(f"http://{host}:{port}/readyz") as resp:
            assert resp.status == 503
            assert "orchestrator unavailable" in (await resp.json())["reason"]
    finally:
        await runner.cleanup()


async def test_graceful_shutdown_lets_a_stream_finish(
    cluster: LiveCluster, session: aiohttp.ClientSession
) -> None:
    url = await cluster.add_gateway(shutdown_timeout=10.0)
    runner = cluster.gateway_runner
    assert runner is not None
    body = {"model": MODEL, "prompt": "drain", "max_tokens": 10, "stream": True}
    async with session.post(
        f"{url}/v1/completions", json=body, headers={"x-request-id": "drain-1"}
    ) as resp:
        assert resp.status == 200
        events = sse_data(resp)
        first = await anext(events)
        cleanup = asyncio.create_task(runner.cleanup())
        await asyncio.sleep(0.05)
        # Not accepting new connections any more ...
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as other:
                await other.get(f"{url}/healthz")
        # ... while the stream in flight runs to its end.
        rest = [e async for e in events]
    await asyncio.wait_for(cleanup, 10)
    assert rest[-1] == "[DONE]"
    text = "".join(completion_text(json.loads(e)) for e in [first, *rest[:-1]])
    assert text == expected_text("drain-1", 10)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig",
    [signal.SIGKILL, signal.SIGSTOP],
    ids=["killed", "frozen"],  # frozen: only the idle timeout between frames notices
)
async def test_worker_lost_mid_stream_resumes_on_another(
    tmp_path: Path, session: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    c = await LiveCluster(tmp_path, mean_s=2.0).start()
    try:
        assert c.orch is not None and c.orch.driver is not None
        c.orch.driver.decisions = []  # keep the core's decisions for the assertions
        n = 30
        body = {"model": MODEL, "prompt": "long answer", "max_tokens": n, "stream": True}
        texts: list[str] = []
        victim = None
        async with asyncio.timeout(30):
            async with session.post(
                f"{c.url}/v1/completions", json=body, headers={"x-request-id": "kill-1"}
            ) as resp:
                assert resp.status == 200
                async for data in sse_data(resp):
                    if data == "[DONE]":
                        texts.append(data)
                        break
                    texts.append(completion_text(json.loads(data)))
                    seen = sum(len(t.split()) for t in texts)
                    if victim is None and seen >= 5:
                        (victim,) = c.serving()
                        c.kill(victim, sig)
                        seen_at_kill = seen
        assert victim is not None and texts[-1] == "[DONE]"
        streamed = "".join(texts[:-1])
        assert streamed == expected_text("kill-1", n)  # no gap, no duplicate
        record = await c.record("kill-1")
        assert record.status == "ok" and record.attempts == 2, record
        assert record.worker_id not in (None, victim) and record.output_tokens == n
        dispatches = [d for _, d in c.orch.driver.decisions if isinstance(d, Dispatch)]
        assert [d.attempt for d in dispatches] == [1, 2]
        error = "worker_crashed" if sig == signal.SIGKILL else "timeout"
        assert [r.reason for _, r in c.orch.driver.decisions if isinstance(r, RetryAt)] == [error]
        # The second worker continued the response instead of starting over.
        assert seen_at_kill <= dispatches[1].resume_tokens < n
    finally:
        await c.stop()


@pytest.mark.slow
async def test_all_workers_dead_ends_the_stream_with_an_error_event(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    c = await LiveCluster(tmp_path, mean_s=3.0).start()
    try:
        body = {"model": MODEL, "prompt": "doomed", "max_tokens": 30, "stream": True}
        events: list[str] = []
        killed = False
        async with asyncio.timeout(20):
            async with session.post(
                f"{c.url}/v1/completions", json=body, headers={"x-request-id": "dead-1"}
            ) as resp:
                assert resp.status == 200
                async for data in sse_data(resp):
                    events.append(data)
                    if not killed and len(events) >= 3:
                        for wid in c.worker_ids:
                            c.kill(wid)
                        killed = True
        assert killed
        last = json.loads(events[-1])
        assert set(last) == {"error"}
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert "[DONE]" not in events
        record = await c.record("dead-1")
        assert record.status in ("dead_lettered", "failed") and record.attempts >= 2
        # Once the heartbeats are stale, the gateway says it is not ready.
        async with asyncio.timeout(10):
            while True:
                async with session.get(f"{c.url}/readyz") as ready:
                    if ready.status == 503:
                        assert (await ready.json())["reason"] == "no fresh worker"
                        break
                await asyncio.sleep(0.2)
    finally:
        await c.stop()


async def test_default_cluster_policy_resumes_partial_responses() -> None:
    assert ClusterConfig().policy.resume_partial
    assert ClusterConfig.model_validate({"policy": {"placement": "jsq"}}).policy.resume_partial
    explicit = ClusterConfig.model_validate({"policy": {"resume_partial": False}})
    assert not explicit.policy.resume_partial
