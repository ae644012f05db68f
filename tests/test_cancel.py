"""A request whose callers all went away is stopped, finalized as cancelled, billed what they got.

The core part by hand (events in, decisions out, a hand-advanced clock);
the live part on a real cluster on loopback: a streaming client reads a few
tokens and closes its connection; a JSON client gives up before the answer.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from harness.api import MODEL, completion_text, sse_data
from harness.cluster import LiveCluster, running

from haif.contracts import (
    AttemptResult,
    Cancel,
    ClientGone,
    Dispatch,
    Finalize,
    Heartbeat,
    Request,
    RetryAt,
    Submit,
    WorkerSnapshot,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore
from haif.policy.retry import Backoff, RetryConfig


def _snap(wid: str) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=wid,
        region="a",
        gpu_class="A100-80G",
        models_warm=(MODEL,),
        models_loadable=(MODEL,),
        capacity=4,
    )


def _core() -> ControlCore:
    retry = RetryConfig(max_attempts=3, backoff=Backoff("constant", 0.5, 0.5))
    core = ControlCore(CoreConfig(retry=retry), random.Random(0))
    core.handle(Heartbeat(_snap("w1")), 0.0)
    return core


def _request(rid: str = "r1") -> Request:
    return Request(rid, "acme", MODEL, 100, 50, 0.0, origin_region="a")


def test_a_running_request_is_cancelled_and_billed_what_was_received() -> None:
    core = _core()
    [dispatch] = core.handle(Submit(_request()), 0.0)
    assert isinstance(dispatch, Dispatch)
    assert core.outstanding("w1") == 1
    out = core.handle(ClientGone("r1", output_tokens=7), 1.0)
    assert out[0] == Cancel("r1", "w1", 1, "client_gone")
    assert isinstance(out[1], Finalize)
    record = out[1].record
    assert (record.status, record.reason, record.output_tokens) == ("cancelled", "client_gone", 7)
    assert record.finish_s == 1.0 and record.attempts == 1
    assert core.outstanding("w1") == 0 and core.in_flight() == 0
    assert core.breaker_state("w1", 1.0) == "closed"  # not held against the worker
    # The attempt's late result changes nothing; nor does a second ClientGone.
    late = AttemptResult("r1", 1, "w1", True, 0.0, 1.2, 0.1, 50)
    assert core.handle(late, 1.2) == [] and core.handle(ClientGone("r1"), 1.3) == []


def test_a_request_waiting_for_its_retry_is_finalized_and_its_timer_dropped() -> None:
    core = _core()
    core.handle(Submit(_request()), 0.0)
    failed = AttemptResult("r1", 1, "w1", False, 0.0, 0.2, error="worker_crashed")
    [retry] = core.handle(failed, 0.2)
    assert isinstance(retry, RetryAt)
    [final] = core.handle(ClientGone("r1"), 0.3)
    assert isinstance(final, Finalize) and final.record.status == "cancelled"
    assert final.record.output_tokens == 0
    assert core.on_timer(retry.at) == []  # no dispatch for a request that is gone


def test_an_unknown_request_is_left_alone() -> None:
    assert _core().handle(ClientGone("nope", 3), 0.0) == []


# ------------------------------------------------------------------ live


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LiveCluster]:
    # 400 tokens over 8 s: a request is still generating when its client leaves.
    async with running(LiveCluster(tmp_path, workers=("w1",), mean_s=8.0, ttft_s=0.05)) as c:
        yield c


async def _tokens_generated(session: aiohttp.ClientSession, cluster: LiveCluster) -> float:
    """The worker's own count of the tokens it generated (from its /metrics)."""
    assert cluster.orch is not None
    url = cluster.orch._workers["w1"]  # the address w1 announced
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("haif_worker_tokens_generated_total "):
            return float(line.split()[1])
    return 0.0


def _cancelled(cluster: LiveCluster) -> float:
    assert cluster.orch is not None
    value = cluster.orch.metrics.registry.get_sample_value("haif_orchestrator_cancelled_total")
    return value or 0.0


async def _worker_stopped(session: aiohttp.ClientSession, cluster: LiveCluster) -> None:
    """The worker's token counter stops moving (it aborted the generation)."""
    await asyncio.sleep(0.3)
    before = await _tokens_generated(session, cluster)
    await asyncio.sleep(1.0)
    assert await _tokens_generated(session, cluster) == before


async def _billed(cluster: LiveCluster, rid: str) -> list[int]:
    assert cluster.orch is not None
    return [u.output_tokens for u in await cluster.orch.store.list_usage() if u.request_id == rid]


@pytest.mark.cluster
async def test_a_stream_whose_client_leaves_stops_on_the_worker(cluster: LiveCluster) -> None:
    body = {"model": MODEL, "prompt": "bye", "max_tokens": 400, "stream": True}
    received = 0
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{cluster.url}/v1/completions", json=body, headers={"x-request-id": "leaver"}
        )
        async for data in sse_data(resp):
            received += len(completion_text(json.loads(data)).split()) if data != "[DONE]" else 0
            if received >= 5:
                break
        resp.close()  # the client goes away mid-stream
        record = await cluster.record("leaver", 10.0)
        assert (record.status, record.reason) == ("cancelled", "client_gone")
        assert received <= record.output_tokens < 400
        assert await _billed(cluster, "leaver") == [record.output_tokens]
        await _worker_stopped(session, cluster)
        assert _cancelled(cluster) == 1


@pytest.mark.cluster
async def test_a_json_client_that_gives_up_cancels_its_request(cluster: LiveCluster) -> None:
    body = {"model": MODEL, "prompt": "bye", "max_tokens": 400}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            await session.post(
                f"{cluster.url}/v1/completions",
                json=body,
                headers={"x-request-id": "impatient"},
                timeout=aiohttp.ClientTimeout(total=1.0),
            )
        record = await cluster.record("impatient", 10.0)
        assert (record.status, record.reason) == ("cancelled", "client_gone")
        # Billed for what was generated before it left (about 1 s of 8 s), which
        # the gateway was collecting for its JSON answer.
        assert 0 < record.output_tokens < 400
        assert await _billed(cluster, "impatient") == [record.output_tokens]
        await _worker_stopped(session, cluster)
