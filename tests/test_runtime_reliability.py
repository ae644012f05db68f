"""Reliability of the live runtime: idempotency, crashes, dead letters, leaks, PostgreSQL.

Real services on loopback, as in ``tests/test_runtime_stream.py``: the
orchestrator and the gateway run in the test's event loop (or as
``python -m haif`` processes where the test kills them), workers are
``python -m haif worker`` processes, and "a worker dies" is a SIGKILL.
Nothing of HAIF is mocked; the store is a real DuckDB file or a fresh
PostgreSQL database (127.0.0.1:5432, user ``postgres``; skipped when the
server is missing, except under ``CI=true`` where that fails).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from harness.api import MODEL, completion_text, expected_text, post_json, sse_data
from harness.cluster import LiveCluster, Up, kill, run_haif, running, spawn_worker
from harness.pg import fresh_database
from multidict import CIMultiDict
from virtual_loop import run_virtual

from haif.contracts import Dispatch, Finalize, Request, Submit, WorkerGone, WorkerSnapshot
from haif.control.config import CoreConfig
from haif.policy.admission import ThrottleConfig
from haif.policy.retry import RetryConfig
from haif.records import read_parquet
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.journal import Journal
from haif.runtime.messages import Announce, SubmitReply, TokenChunk
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.rpc import RpcClient
from haif.runtime.store import DuckDBStore, MetadataStore, open_store

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.cluster]


class ReliableCluster(LiveCluster):
    """:class:`LiveCluster` with worker capacity, store URL and upkeep settings."""

    def __init__(
        self,
        tmp: Path,
        *,
        capacity: int = 8,
        store_url: str | None = None,
        lease_ttl_s: float = 30.0,
        reconcile_interval_s: float = 5.0,
        colocated: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(tmp, capacity=capacity, **kwargs)
        self.colocated = colocated  # the gateway calls the orchestrator in-process
        self.store_url = store_url or str(self.store_path)
        self.lease_ttl_s = lease_ttl_s
        self.reconcile_interval_s = reconcile_interval_s

    async def start(self) -> ReliableCluster:
        self.orch = Orchestrator(
            self.policy,
            await open_store(self.store_url),
            idle_timeout_s=3.0,
            lease_ttl_s=self.lease_ttl_s,
            reconcile_interval_s=self.reconcile_interval_s,
            journal=Journal(self.tmp / "journal"),
        )
        self.orch_url = await self._serve(orchestrator_mod.build_app(self.orch))
        assert self.orch.driver is not None
        self.orch.driver.events, self.orch.driver.decisions = [], []
        for wid in self.worker_ids:
            self.spawn_worker(wid)
        self.url = await self.add_gateway(colocated=self.colocated)
        await self.wait_workers(set(self.worker_ids))
        return self

    @property
    def store(self) -> MetadataStore:
        assert self.orch is not None
        return self.orch.store

    def submits(self, key: str) -> list[Request]:
        """Requests the core was given with Idempotency-Key ``key``."""
        assert self.orch is not None and self.orch.driver is not None
        events = self.orch.driver.events or []
        return [
            e.request
            for _, e in events
            if isinstance(e, Submit) and e.request.idempotency_key == key
        ]

    def decisions_for(self, rid: str, kind: type) -> list[Any]:
        assert self.orch is not None and self.orch.driver is not None
        out = []
        for _, d in self.orch.driver.decisions or []:
            if not isinstance(d, kind):
                continue
            did = d.record.request_id if isinstance(d, Finalize) else d.request_id
            if did == rid:
                out.append(d)
        return out


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], Any]:
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.json()


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    """``(status, text, outcome)``: outcome is ``"done"``, an error event or an error body."""
    async with session.post(
        f"{url}/v1/completions", json={**body, "stream": True}, headers=headers
    ) as resp:
        if resp.status != 200:
            return resp.status, "", await resp.json()
        pieces: list[str] = []
        async for data in sse_data(resp):
            if data == "[DONE]":
                return 200, "".join(pieces), "done"
            chunk = json.loads(data)
            if "error" in chunk:
                return 200, "".join(pieces), chunk
            pieces.append(completion_text(chunk))
    return 200, "".join(pieces), "cut"


def dlq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``haif dlq ...`` in a subprocess (the same parser ``haif`` mounts)."""
    return run_haif("dlq", *args, module="haif.runtime.dlq_cli")


async def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ReliableCluster]:
    async with running(ReliableCluster(tmp_path_factory.mktemp("reliability"), mean_s=1.0)) as c:
        yield c


@pytest.fixture
def http_timeout_s() -> float:
    """The ``session`` fixture's requests may take a minute here (crashes, retries)."""
    return 60.0


# ---------------------------------------------------------------- idempotency


async def test_same_key_and_body_at_once_runs_once(
    cluster: ReliableCluster, session: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "prompt": "count to ten", "max_tokens": 10}

    def headers(rid: str) -> dict[str, str]:
        return {"Idempotency-Key": "idem-1", "x-request-id": rid}

    async def late_stream() -> tuple[int, str, Any]:
        await asyncio.sleep(0.4)  # attaches mid-stream: gets the backlog, then the rest
        return await stream(session, cluster.url, body, headers("idem-c"))

    a, b, c = await asyncio.gather(
        post(session, cluster.url, body, headers("idem-a")),
        stream(session, cluster.url, body, headers("idem-b")),
        late_stream(),
    )
    runs = [rid for rid in ("idem-a", "idem-b", "idem-c") if await cluster.store.get_job(rid)]
    assert len(runs) == 1, runs  # one job row: the other callers attached to it
    (ran,) = runs
    text = expected_text(ran, 10)
    assert a[0] == 200 and a[2]["choices"][0]["text"] == text, a
    assert a[2]["id"] == ran and a[1]["x-request-id"] == "idem-a"
    assert b[:3] == (200, text, "done"), b
    assert c[:3] == (200, text, "done"), c
    assert len(cluster.submits("idem-1")) == 1
    assert len(cluster.decisions_for(ran, Dispatch)) == 1  # the worker served it once
    await cluster.record(ran)
    usage = [u for u in await cluster.store.list_usage() if u.request_id == ran]
    assert len(usage) == 1 and usage[0].output_tokens == 10
    job = await cluster.store.get_job(ran)
    assert job is not None and job.status == "done" and job.idempotency_key == "idem-1"

    # Resent after completion: the stored result is replayed, nothing runs.
    status, _, again = await post(session, cluster.url, body, headers("idem-d"))
    assert status == 200 and again["choices"][0]["text"] == text and again["id"] == ran
    assert again["usage"] == a[2]["usage"]
    assert await stream(session, cluster.url, body, headers("idem-e")) == (200, text, "done")
    assert len(cluster.submits("idem-1")) == 1
    assert len(cluster.decisions_for(ran, Dispatch)) == 1
    assert len([u for u in await cluster.store.list_usage() if u.request_id == ran]) == 1

    # The same key with another body: 409, and still nothing runs.
    status, _, conflict = await post(
        session, cluster.url, {**body, "max_tokens": 11}, headers("idem-f")
    )
    assert status == 409, conflict
    assert conflict["error"]["code"] == "idempotency_conflict"
    assert conflict["error"]["type"] == "invalid_request_error"
    assert len(cluster.submits("idem-1")) == 1
    assert await cluster.store.get_job("idem-f") is None


@pytest.mark.slow
async def test_keys_and_request_ids_are_per_tenant(
    cluster: ReliableCluster, session: aiohttp.ClientSession
) -> None:
    acme = {"Authorization": f"Bearer {await cluster.add_key('acme')}"}
    globex = {"Authorization": f"Bearer {await cluster.add_key('globex')}"}
    body = {"model": MODEL, "prompt": "shared", "max_tokens": 4}
    key = {"Idempotency-Key": "shared-key"}

    first = await post(session, cluster.url, body, {**acme, **key, "x-request-id": "ten-a"})
    second = await post(session, cluster.url, body, {**globex, **key, "x-request-id": "ten-b"})
    assert first[0] == second[0] == 200, (first, second)
    # globex's request ran on its own: it did not get acme's result.
    assert first[2]["choices"][0]["text"] == expected_text("ten-a", 4)
    assert second[2]["choices"][0]["text"] == expected_text("ten-b", 4)
    assert (await cluster.record("ten-a")).tenant == "acme"
    assert (await cluster.record("ten-b")).tenant == "globex"
    assert len(cluster.submits("shared-key")) == 2
    # Each tenant's resend replays its own result; another body conflicts per tenant.
    again = await post(session, cluster.url, body, {**globex, **key, "x-request-id": "ten-c"})
    assert again[0] == 200 and again[2]["id"] == "ten-b"
    other = await post(session, cluster.url, {**body, "prompt": "x"}, {**acme, **key})
    assert other[0] == 409 and other[2]["error"]["code"] == "idempotency_conflict"

    # The same x-request-id from two tenants at once: two requests, two records.
    both = await asyncio.gather(
        post(session, cluster.url, body, {**acme, "x-request-id": "same-rid"}),
        post(session, cluster.url, body, {**globex, "x-request-id": "same-rid"}),
    )
    for status, headers, answer in both:
        assert status == 200, answer
        assert headers["x-request-id"] == "same-rid"
        assert answer["choices"][0]["text"] == expected_text("same-rid", 4)
    ids = {answer["id"] for _, _, answer in both}
    assert len(ids) == 2 and "same-rid" in ids, ids
    tenants = {(await cluster.record(rid)).tenant for rid in ids}
    assert tenants == {"acme", "globex"}


@pytest.mark.slow
async def test_a_request_without_a_key_runs_at_once_and_its_job_follows(
    cluster: ReliableCluster, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an Idempotency-Key nothing in the store can change what happens to a
    request, so it runs without waiting for its reservation (minted id or chosen);
    a request with a key still waits (the key must be looked up)."""
    store = cluster.store
    real = store.reserve
    gate = asyncio.Event()
    held: list[str] = []

    async def reserve(job: Any, now: float) -> Any:
        held.append(job.request_id)
        await gate.wait()
        return await real(job, now)

    monkeypatch.setattr(store, "reserve", reserve)
    statuses: list[tuple[str, str]] = []
    real_status = store.set_job_status

    async def set_job_status(rid: str, status: Any, *args: Any, **kw: Any) -> bool:
        statuses.append((rid, status))
        return await real_status(rid, status, *args, **kw)

    monkeypatch.setattr(store, "set_job_status", set_job_status)
    body = {"model": MODEL, "prompt": "no key", "max_tokens": 3}
    status, headers, answer = await post(session, cluster.url, body)
    assert status == 200, answer
    rid = answer["id"]
    assert rid == headers["x-request-id"] and rid.startswith("req-")
    status, _, chosen = await post(session, cluster.url, body, {"x-request-id": "chosen-1"})
    assert status == 200 and chosen["id"] == "chosen-1", chosen
    assert held == [rid, "chosen-1"]  # both ran; their rows are not written yet
    assert await store.get_job(rid) is None and await store.get_job("chosen-1") is None

    keyed = asyncio.create_task(
        post(session, cluster.url, body, {"x-request-id": "keyed-1", "Idempotency-Key": "k-1"})
    )
    await asyncio.sleep(0.5)
    assert held[-1] == "keyed-1" and not keyed.done()  # waits for its reservation
    gate.set()
    assert (await keyed)[0] == 200

    async def settled(job_id: str) -> Any:
        job = await store.get_job(job_id)
        return job if job is not None and job.status == "done" else None

    for job_id in (rid, "chosen-1"):
        job = await wait_for(partial(settled, job_id), 10, f"the job row of {job_id}")
        assert job.idempotency_key is None and job.tenant == (await cluster.record(job_id)).tenant
        usage = [u for u in await store.list_usage() if u.request_id == job_id]
        assert len(usage) == 1 and usage[0].output_tokens == 3
    # Its "running" status was still queued behind the reserve when it finished:
    # the finalization superseded it, so it was never written.
    assert (rid, "running") not in statuses


async def test_a_reused_request_id_without_a_key_runs_again_under_a_fresh_job_id(
    cluster: ReliableCluster, session: aiohttp.ClientSession
) -> None:
    """The id was an earlier request's: the new one runs at once, and its job row,
    usage and record go under ``id~suffix``; the earlier request's are untouched."""
    body = {"model": MODEL, "prompt": "reused", "max_tokens": 2}
    first = await post(session, cluster.url, body, {"x-request-id": "reused-1"})
    assert first[0] == 200, first

    async def done(job_id: str) -> Any:
        job = await cluster.store.get_job(job_id)
        return job if job is not None and job.status == "done" else None

    await wait_for(lambda: done("reused-1"), 10, "the first request's job row")
    second = await post(
        session, cluster.url, {**body, "max_tokens": 3}, {"x-request-id": "reused-1"}
    )
    assert second[0] == 200 and second[1]["x-request-id"] == "reused-1", second
    assert second[2]["choices"][0]["text"] == expected_text("reused-1", 3)

    async def renamed() -> list[Any]:
        usage = [u for u in await cluster.store.list_usage() if u.request_id.startswith("reused-1")]
        return usage if len(usage) == 2 else []

    usage = {u.request_id: u.output_tokens for u in await wait_for(renamed, 10, "two usage rows")}
    fresh = next(job_id for job_id in usage if job_id != "reused-1")
    assert fresh.startswith("reused-1~") and usage == {"reused-1": 2, fresh: 3}
    assert (await cluster.record("reused-1")).output_tokens == 2
    assert (await cluster.record(fresh)).output_tokens == 3
    assert (await wait_for(lambda: done(fresh), 10, "the second job row")).idempotency_key is None


async def test_a_refused_request_keeps_no_key(
    cluster: ReliableCluster, session: aiohttp.ClientSession
) -> None:
    """A refusal (it never ran) is not saved: a resend with the key is decided again."""
    body = {"model": "no-such-model", "prompt": "x", "max_tokens": 2}
    headers = {"Idempotency-Key": "refused-key", "x-request-id": "refused-1"}
    status, _, answer = await post(session, cluster.url, body, headers)
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    record = await cluster.record("refused-1")
    assert record.status == "rejected"

    async def released() -> bool:
        job = await cluster.store.get_job("refused-1")
        return job is not None and job.status == "expired"

    await wait_for(released, 5, "the refused job's release")
    assert "refused-1" not in {u.request_id for u in await cluster.store.list_usage()}
    status, _, answer = await post(session, cluster.url, body, headers)
    assert status == 404
    assert len(cluster.submits("refused-key")) == 2


async def test_bad_idempotency_key(
    cluster: ReliableCluster, session: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    status, _, answer = await post(session, cluster.url, body, {"Idempotency-Key": "k" * 256})
    assert status == 400 and answer["error"]["param"] == "Idempotency-Key"


# ------------------------------------------------------------- worker crash


@pytest.mark.slow
@pytest.mark.parametrize("colocated", [False, True], ids=["gateway-rpc", "gateway-colocated"])
async def test_kill_9_of_a_worker_under_load_loses_nothing(
    tmp_path: Path, session: aiohttp.ClientSession, colocated: bool
) -> None:
    n, tokens = 40, 30
    base = ClusterConfig().policy
    policy = replace(
        base,
        retry=RetryConfig(budget_ratio=1.0, budget_min_retries=n),
        # One region: with the default route breaker (20 calls, 50 %) the
        # 20 attempts failing at once would open the whole region, turning
        # the failover into dead letters. Here the worker breaker is enough.
        route_breaker=replace(base.route_breaker, min_calls=10 * n),
    )
    c = await ReliableCluster(
        tmp_path, mean_s=2.0, capacity=32, policy=policy, colocated=colocated
    ).start()
    try:
        assert c.orch is not None
        rids = [f"load-{i:02d}" for i in range(n)]
        body = {"model": MODEL, "prompt": "under load", "max_tokens": tokens}
        tasks = [
            asyncio.create_task(
                stream(
                    session,
                    c.url,
                    body,
                    {"x-request-id": rid, **({"Idempotency-Key": rid} if i % 2 else {})},
                )
            )
            for i, rid in enumerate(rids)
        ]

        async def all_running() -> bool:
            return sum(c.orch.status().outstanding.values()) == n if c.orch else False

        await wait_for(all_running, 10, "every request to be dispatched")
        await asyncio.sleep(0.6)  # mid-way through the responses
        outstanding = c.orch.status().outstanding
        victim = max(outstanding, key=lambda w: outstanding[w])
        assert outstanding[victim] > 0
        c.kill(victim)
        async with asyncio.timeout(30):
            results = await asyncio.gather(*tasks)

        # Every request ended definitively: the whole text, or an error.
        for rid, (status, text, outcome) in zip(rids, results, strict=True):
            if outcome == "done":
                assert status == 200 and text == expected_text(rid, tokens), rid
            else:
                assert outcome != "cut" and (status != 200 or "error" in outcome), (rid, outcome)
        # With a retry budget for all of them, all of them succeed.
        assert all(outcome == "done" for _, _, outcome in results), results

        async def all_recorded() -> list[Any] | None:
            records = [r for r in await c.store.records() if r.request_id in rids]
            return records if len(records) == n else None

        records = await wait_for(all_recorded, 10, "every record")
        assert sorted(r.request_id for r in records) == rids  # none lost, none doubled
        assert all(r.status == "ok" and r.output_tokens == tokens for r in records)
        moved = [r for r in records if r.attempts > 1]
        assert moved and all(r.worker_id != victim for r in moved)
        # Finalized exactly once: one Finalize each, one usage row per record.
        assert all(len(c.decisions_for(rid, Finalize)) == 1 for rid in rids)
        usage = {u.request_id: u for u in await c.store.list_usage()}
        assert sorted(usage) == rids
        assert all(usage[r.request_id].output_tokens == r.output_tokens for r in records)
        for rid in rids:
            job = await c.store.get_job(rid)
            assert job is not None and job.status == "done", job
        # The dead worker stopped heartbeating and was evicted.
        assert victim in c.orch.presence()["evicted_workers"]
        assert any(isinstance(e, WorkerGone) for _, e in c.orch.driver.events or [])  # type: ignore[union-attr]
    finally:
        await c.stop()


async def test_silent_workers_are_counted_stale_then_evicted() -> None:
    """The stale and eviction boundaries, checked 10 ms either side on a virtual
    clock (its own loop, in a thread of this one).

    Heartbeats every 0.3 s at 0, 0.3 and 0.6 s make the estimated interval
    0.3 s; a worker is stale after 1.5 intervals of silence (0.45 s, i.e. from
    1.05 s) and evicted after ``evict_after_missed`` = 3 (0.9 s, at 1.5 s).
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        orch = Orchestrator(CoreConfig(), DuckDBStore(":memory:"), evict_after_missed=3)
        await orch.start()
        try:
            assert orch.driver is not None
            orch.driver.events = []
            snap = WorkerSnapshot("quiet", "local", "A100-80G", models_warm=(MODEL,), capacity=4)

            async def until(t: float) -> dict[str, Any]:
                await asyncio.sleep(t - loop.time())
                assert loop.time() == pytest.approx(t, abs=1e-9)
                return orch.presence()

            for at in (0.0, 0.3, 0.6):
                await until(at)
                await orch.rpc_heartbeat(Announce(snap, "http://127.0.0.1:9"))
            view = await until(1.04)  # 0.44 s of silence: fresh
            assert view["fresh_workers"] == ["quiet"] and view["stale_workers"] == []
            view = await until(1.06)  # 0.46 s: a heartbeat missed (> 1.5 x 0.3 s)
            assert view["stale_workers"] == ["quiet"] and view["evicted_workers"] == []
            view = await until(1.49)  # 0.89 s: still not evicted (3 x 0.3 s)
            assert view["stale_workers"] == ["quiet"] and view["evicted_workers"] == []
            assert [e for _, e in orch.driver.events if isinstance(e, WorkerGone)] == []
            view = await until(1.51)  # 0.91 s: evicted by the presence timer itself
            assert view["stale_workers"] == [] and view["evicted_workers"] == ["quiet"]
            assert view["evictions"] == 1 and "quiet" not in orch.status().outstanding
            gone = [(t, e) for t, e in orch.driver.events if isinstance(e, WorkerGone)]
            assert [e for _, e in gone] == [WorkerGone("quiet")]
            assert gone[0][0] == pytest.approx(1.5, abs=1e-6)  # at its limit, not later
            # It comes back with its next heartbeat.
            await orch.rpc_heartbeat(Announce(snap, "http://127.0.0.1:9"))
            assert orch.presence()["evicted_workers"] == []
            assert orch.status().fresh_workers == ("quiet",)
        finally:
            await orch.stop()

    await asyncio.to_thread(run_virtual, main)


# ------------------------------------------------------------- dead letters


@pytest.mark.slow
async def test_dead_letters_listed_then_replayed(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    policy = replace(
        ClusterConfig().policy,
        retry=RetryConfig(max_attempts=2, budget_ratio=1.0),
        # After an outage of every worker the adaptive throttle (SRE, K = 2)
        # would shed most new requests for a while, the replays included.
        throttle=ThrottleConfig(enabled=False),
    )
    c = await ReliableCluster(tmp_path, mean_s=3.0, policy=policy).start()
    rids = ["dlq-1", "dlq-2", "dlq-3"]
    try:
        body = {"model": MODEL, "prompt": "doomed", "max_tokens": 20}
        tasks = [
            asyncio.create_task(stream(session, c.url, body, {"x-request-id": rid})) for rid in rids
        ]

        async def running() -> bool:
            assert c.orch is not None
            return sum(c.orch.status().outstanding.values()) == len(rids)

        await wait_for(running, 10, "the requests to run")
        await asyncio.sleep(0.3)
        for wid in c.worker_ids:
            c.kill(wid)
        c.procs.clear()  # all dead
        async with asyncio.timeout(20):
            results = await asyncio.gather(*tasks)
        assert all(outcome != "done" for _, _, outcome in results), results

        async def parked() -> bool:
            return len(await c.store.list_dead_letters()) == 3

        await wait_for(parked, 10, "three dead letters")
        url = c.orch_url
        listed = await asyncio.to_thread(dlq_cli, "list", "--orchestrator", url, "--json")
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)
        assert sorted(e["request_id"] for e in entries) == rids
        assert all(e["reason"].startswith("attempts_exhausted:") for e in entries), entries
        assert all(e["request"]["tenant"] == "anonymous" for e in entries)
        table = await asyncio.to_thread(dlq_cli, "list", "--orchestrator", url)
        assert table.returncode == 0 and "dlq-2" in table.stdout and "3 dead letter" in table.stdout

        shown = await asyncio.to_thread(dlq_cli, "show", "dlq-1", "--orchestrator", url)
        assert shown.returncode == 0, shown.stderr
        assert "attempts_exhausted" in shown.stdout and '"doomed"' in shown.stdout
        unknown = await asyncio.to_thread(dlq_cli, "show", "nope", "--orchestrator", url)
        assert unknown.returncode == 1 and "no dead letter 'nope'" in unknown.stderr
        # The running cluster holds the DuckDB file: a clear error, with the way out.
        locked = await asyncio.to_thread(dlq_cli, "list", "--store", str(c.store_path))
        assert locked.returncode == 2, locked
        assert "lock" in locked.stderr and "--orchestrator" in locked.stderr

        # Nothing can serve it yet: the replay fails and the entry stays.
        failed = await asyncio.to_thread(dlq_cli, "replay", "dlq-2", "--orchestrator", url)
        assert failed.returncode == 1 and "stays in the dead-letter queue" in failed.stderr
        assert len(await c.store.list_dead_letters()) == 3

        c.spawn_worker("w1")
        await c.wait_workers({"w1"})
        replayed = await asyncio.to_thread(dlq_cli, "replay", "dlq-1", "--orchestrator", url)
        assert replayed.returncode == 0, replayed.stderr
        assert "removed from the dead-letter queue" in replayed.stdout
        left = {d.request_id for d in await c.store.list_dead_letters()}
        assert left == {"dlq-2", "dlq-3"}
        again = await asyncio.to_thread(dlq_cli, "replay", "dlq-1", "--orchestrator", url)
        assert again.returncode == 1 and "no dead letter" in again.stderr
        ok = [r for r in await c.store.records() if r.request_id.startswith("dlq-1~")]
        assert len(ok) == 1 and ok[0].status == "ok" and ok[0].output_tokens == 20
        assert ok[0].tenant == "anonymous"
    finally:
        await c.stop()
    # The cluster is down: the store can be read directly.
    listed = await asyncio.to_thread(dlq_cli, "list", "--store", str(c.store_path), "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(e["request_id"] for e in json.loads(listed.stdout)) == ["dlq-2", "dlq-3"]


# ------------------------------------------------------------------ reconciler


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never answered 200")


@pytest.mark.slow
async def test_reconciler_expires_a_reservation_leaked_by_a_killed_orchestrator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="haif.orchestrator")
    config = tmp_path / "cluster.yaml"
    config.write_text("orchestrator: {lease_ttl_s: 1.0, reconcile_interval_s: 0.2}\n")
    store = tmp_path / "store.duckdb"
    port = free_port()
    orch_url = f"http://127.0.0.1:{port}"
    orch_log = (tmp_path / "orchestrator.log").open("wb")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "haif",
            "orchestrator",
            "--port",
            str(port),
            "--store",
            str(store),
            "--config",
            str(config),
        ],
        stdout=orch_log,
        stderr=subprocess.STDOUT,
    )
    worker = spawn_worker(tmp_path, "w1", orch_url, mean_s=2.0, capacity=8)
    runner: web.AppRunner | None = None
    request = Request(
        "leak-1", "anonymous", MODEL, 1, 40, 0.0, prompt="leak", idempotency_key="leak-key"
    )
    try:
        await asyncio.to_thread(_wait_http, f"{orch_url}/readyz", first)
        async with aiohttp.ClientSession() as http:
            frames = RpcClient(http, orch_url, 30).stream(
                "submit_stream", request, idle_timeout_s=5
            )
            first_frame = await anext(frames)
            assert isinstance(first_frame, TokenChunk)
            kill(first)  # mid-request: its reservation is left behind
            await frames.aclose()

        # A new orchestrator on the same store and port (the worker finds it there).
        orch = Orchestrator(
            ClusterConfig().policy,
            DuckDBStore(store),
            lease_ttl_s=1.0,
            reconcile_interval_s=0.2,
        )
        runner = web.AppRunner(orchestrator_mod.build_app(orch))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        leaked = await orch.store.get_job("leak-1")
        assert leaked is not None and leaked.idempotency_key == "leak-key"
        # Resent at once: it waits for the lease to lapse instead of running twice ...
        reply = await asyncio.wait_for(orch.rpc_submit(request), 20)
        assert isinstance(reply, SubmitReply) and reply.record.status == "ok"
        # ... then the reconciler expired the leak and the resend took it over: the
        # same id (usage is unique by it), run once.
        assert any(
            "leaked reservation" in r.getMessage() and "leak-1" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        assert reply.record.request_id == "leak-1"
        assert reply.text == expected_text("leak-1", 40)
        rerun = await orch.store.get_job("leak-1")
        assert rerun is not None and rerun.status in ("running", "done")
        assert rerun.idempotency_key == "leak-key"
        await runner.cleanup()  # the orchestrator stops: its writes land
        runner = None
        async with DuckDBStore(store) as db:
            usage = [u for u in await db.list_usage() if u.request_id == "leak-1"]
        assert [u.output_tokens for u in usage] == [40]
    finally:
        kill(first)
        kill(worker)
        if runner is not None:
            await runner.cleanup()


# ------------------------------------------------------------------ PostgreSQL


@pytest_asyncio.fixture(loop_scope="module")
async def pg_dsn() -> AsyncIterator[str]:
    async with fresh_database("haif_reliability") as dsn:
        yield dsn


@pytest.fixture
def up_processes() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.stop()


@pytest.mark.postgres
@pytest.mark.slow
async def test_postgresql_store_end_to_end(
    tmp_path: Path, pg_dsn: str, up_processes: list[Up]
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(f"store: {pg_dsn}\n")
    up = await asyncio.to_thread(Up, tmp_path / "data", config)
    up_processes.append(up)
    url = f"{up.url}/v1/completions"
    body = {"model": MODEL, "prompt": "from postgres", "max_tokens": 5}
    headers = {"x-request-id": "pg-1", "Idempotency-Key": "pg-key"}
    deadline = time.monotonic() + 20
    while True:  # until the workers' first heartbeats arrived
        status, _, answer = await asyncio.to_thread(
            post_json, url, json.dumps(body).encode(), headers
        )
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == expected_text("pg-1", 5)
    replayed = await asyncio.to_thread(
        post_json, url, json.dumps(body).encode(), {**headers, "x-request-id": "x"}
    )
    assert replayed[0] == 200 and replayed[2]["id"] == "pg-1"
    output = await asyncio.to_thread(up.stop)
    assert up.proc.returncode == 0, output
    assert "request records in" in output, output

    exported = {r.request_id: r for r in read_parquet(tmp_path / "data" / "records.parquet")}
    assert exported["pg-1"].status == "ok"
    assert not (tmp_path / "data" / "store.duckdb").exists()
    store = await open_store(pg_dsn)
    try:
        records = {r.request_id: r for r in await store.records()}
        assert records["pg-1"].status == "ok" and records["pg-1"].output_tokens == 5
        usage = [u for u in await store.list_usage() if u.request_id == "pg-1"]
        assert len(usage) == 1 and usage[0].output_tokens == 5
        job = await store.get_job("pg-1")
        assert job is not None and job.status == "done" and job.idempotency_key == "pg-key"
    finally:
        await store.close()
