"""A standby orchestrator: the leader lease, takeover by epoch, failover at the gateway.

Layers: the gateway's skipping of text a client already has (a table); two
orchestrators in this process sharing a PostgreSQL database (the lease, the
standby refusing submits, the takeover expiring the old epoch's jobs so a
keyed resend runs at once under its own id); and ``haif up`` with
``orchestrators: 2`` whose leader is killed with SIGKILL in the middle of a
stream, which the client still receives whole, billed once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from harness.api import MODEL, expected_text, sse_data
from harness.cluster import Up
from harness.pg import fresh_database

from haif.contracts import Request
from haif.control.config import CoreConfig
from haif.runtime.cluster import ClusterConfig
from haif.runtime.gateway import _skip_text
from haif.runtime.messages import TokenChunk
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.relay import Pending
from haif.runtime.reservations import request_body_hash
from haif.runtime.rpc import RpcError
from haif.runtime.store import open_store

# ------------------------------------------------------------------ the gateway's skip


@pytest.mark.parametrize(
    ("texts", "skip", "seen", "kept", "start", "seen_after"),
    [
        (("a", "bc", "d"), 0, 0, ("a", "bc", "d"), 0, 0),
        (("a", "bc", "d"), 1, 0, ("bc", "d"), 1, 1),
        (("a", "bc", "d"), 2, 0, ("c", "d"), 1, 2),
        (("a", "bc", "d"), 3, 0, ("d",), 2, 3),
        (("a", "bc", "d"), 9, 0, (), 3, 4),  # all of it: nothing left, all seen
        (("hello world",), 6, 10, ("world",), 0, 16),  # a replayed answer: one piece
    ],
)
def test_the_gateway_skips_text_already_passed_on(
    texts: tuple[str, ...], skip: int, seen: int, kept: tuple[str, ...], start: int, seen_after: int
) -> None:
    chunk, after = _skip_text(TokenChunk(0, texts), skip, seen)
    assert (chunk.texts, chunk.start, after) == (kept, start, seen_after)


def test_a_standby_pair_needs_postgresql_and_its_own_gateway() -> None:
    with pytest.raises(ValueError, match="needs a shared store"):
        ClusterConfig(orchestrators=2)
    with pytest.raises(ValueError, match="do not go together"):
        ClusterConfig(orchestrators=2, store="postgresql://x/y", colocate_gateway=True)
    assert ClusterConfig(orchestrators=2, store="postgresql://x/y").orchestrators == 2


# ------------------------------------------------------------------ two orchestrators


@pytest_asyncio.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with fresh_database("haif_standby") as dsn:
        yield dsn


LEASE_S = 0.4


async def _pair(dsn: str) -> tuple[Orchestrator, Orchestrator]:
    pair = []
    for name in ("a", "b"):
        orch = Orchestrator(
            CoreConfig(),
            await open_store(dsn),
            leader_lease_s=LEASE_S,
            lease_store=lambda: open_store(dsn),
            name=name,
        )
        await orch.start()
        pair.append(orch)
    return pair[0], pair[1]


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _request(rid: str, key: str) -> Request:
    return Request(rid, "acme", MODEL, 3, 4, 0.0, prompt="hi", idempotency_key=key)


@pytest.mark.postgres
async def test_one_leads_the_standby_refuses_and_takes_over_by_epoch(pg_dsn: str) -> None:
    a, b = await _pair(pg_dsn)
    try:
        await _until(lambda: a.leading or b.leading)
        leader, standby = (a, b) if a.leading else (b, a)
        assert not standby.leading and leader.presence()["leader"]
        with pytest.raises(RpcError) as refused:
            await standby.rpc_submit(_request("r0", "k0"))
        assert (refused.value.code, refused.value.status) == ("not_leader", 503)

        # The leader runs a keyed request (no worker: it stays open), then dies without
        # a word: its loops stop, its lease is left to lapse.
        first = await leader.reservations.enter(_request("r1", "k1"))
        assert isinstance(first, Pending)
        job = await leader.store.get_job("r1")
        assert job is not None and job.epoch == leader.leadership.epoch == 1  # type: ignore[union-attr]
        for task in leader._loops:
            task.cancel()
        died = time.monotonic()
        await _until(lambda: standby.leading, timeout_s=10 * LEASE_S)
        assert time.monotonic() - died < 3 * LEASE_S
        assert standby.leadership is not None and standby.leadership.epoch == 2
        old = await standby.store.get_job("r1")
        assert old is not None and old.status == "expired"  # fenced at the takeover

        # The gateway's resend runs at once under the same id, the job now epoch 2's,
        # not after the 30 s job lease.
        resent = await standby.reservations.enter(_request("r1", "k1"))
        assert isinstance(resent, Pending) and resent.request.request_id == "r1"
        taken = await standby.store.get_job("r1")
        assert taken is not None and (taken.status, taken.epoch) == ("reserved", 2)
        assert taken.body_hash == request_body_hash(_request("r1", "k1"))
    finally:
        for orch in (a, b):
            await orch.stop()


@pytest.mark.postgres
async def test_a_leader_whose_loop_is_blocked_past_its_lease_keeps_it(pg_dsn: str) -> None:
    """The lease is renewed off the orchestrators' event loop: a leader busy for three
    leases (both orchestrators here share the loop, so neither's loop runs) still
    leads the moment its loop runs again, under the same epoch, and the standby
    took nothing."""
    a, b = await _pair(pg_dsn)
    try:
        await _until(lambda: a.leading or b.leading)
        leader, standby = (a, b) if a.leading else (b, a)
        assert leader.leadership is not None
        epoch = leader.leadership.epoch
        time.sleep(3 * LEASE_S)  # blocks the event loop, as a backlog of work would
        assert leader.leading and leader.leadership.epoch == epoch
        assert not standby.leading
        holder = await leader.store.leadership("orchestrator")
        assert holder is not None and holder[:2] == (leader.leadership.holder, epoch)
    finally:
        for orch in (a, b):
            await orch.stop()


@pytest.mark.postgres
async def test_a_clean_stop_hands_over_at_once(pg_dsn: str) -> None:
    a, b = await _pair(pg_dsn)
    try:
        await _until(lambda: a.leading or b.leading)
        leader, standby = (a, b) if a.leading else (b, a)
        await leader.stop()
        stopped = time.monotonic()
        await _until(lambda: standby.leading)
        # The next try after the release, not the lease's end.
        assert time.monotonic() - stopped < LEASE_S
    finally:
        await standby.stop()


# ------------------------------------------------------------------ haif up, leader killed


@pytest.mark.postgres
@pytest.mark.cluster
@pytest.mark.slow
async def test_a_stream_survives_its_leaders_sigkill(tmp_path: Path, pg_dsn: str) -> None:
    workers = [
        {"id": f"w{i}", "region": "local", "capacity": 8, "mean_s": 3.0, "ttft_s": 0.02}
        for i in (1, 2)
    ]
    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps({"store": pg_dsn, "orchestrators": 2, "workers": workers}))
    up = await asyncio.to_thread(Up, tmp_path / "data", config)
    try:
        await asyncio.to_thread(up.wait_ready, 30)
        leaders = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            for service in up.state["services"]:
                if service["kind"] == "orchestrator":
                    async with session.get(
                        f"{service['url']}/status", ssl=up.internal_tls or True
                    ) as resp:
                        if (await resp.json())["leader"]:
                            leaders.append(service["name"])
            assert len(leaders) == 1, leaders
            body = {"model": MODEL, "prompt": "p", "max_tokens": 30, "stream": True}
            body["stream_options"] = {"include_usage": True}
            headers = {"x-request-id": "survivor"}
            texts: list[str] = []
            usage = None
            async with session.post(f"{up.url}/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200
                async for data in sse_data(resp):
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    assert "error" not in chunk, chunk
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    elif chunk.get("choices"):
                        texts.append(chunk["choices"][0]["text"])
                        if len(texts) == 3:  # mid-stream: the leader dies
                            status, answer = await asyncio.to_thread(
                                up.control, "POST", f"/services/{leaders[0]}/kill"
                            )
                            assert status == 200, answer
        assert "".join(texts) == expected_text("survivor", 30)
        assert usage is not None and usage["completion_tokens"] == 30
        store = await open_store(pg_dsn)
        try:
            billed = [u for u in await store.list_usage() if u.request_id == "survivor"]
            job = await store.get_job("survivor")
        finally:
            await store.close()
        assert [u.output_tokens for u in billed] == [30]
        assert job is not None and job.status == "done" and job.epoch == 2
    finally:
        output = await asyncio.to_thread(up.stop)
        print(output[-3000:])
