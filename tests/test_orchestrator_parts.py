"""The orchestrator's parts, each on its own: write queue, relay, reservations.

The reservation tests run against a real (in-memory DuckDB) store with a
hand-advanced wall clock; the relay and write queue on a plain event loop.
End-to-end behaviour (idempotent resends over HTTP, PostgreSQL, restarts)
is in test_store_contract.py and test_runtime_reliability.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from harness.records import ok_record

from haif.contracts import Request, RequestRecord
from haif.runtime.messages import SubmitReply, TokenChunk
from haif.runtime.relay import Pending
from haif.runtime.reservations import Reservations, request_body_hash
from haif.runtime.rpc import RpcError
from haif.runtime.store import DeadLetterRow, JobRow, MetadataStore, open_store
from haif.runtime.write_queue import WriteQueue
from haif.wire import encode

# ------------------------------------------------------------------ write queue


async def test_writes_run_in_order_per_key_and_concurrently_across_keys() -> None:
    done: list[str] = []
    drained: list[str] = []
    gate = asyncio.Event()
    queue = WriteQueue(on_drained=drained.append)

    def write(name: str, wait: bool = False) -> Any:
        async def op() -> None:
            if wait:
                await gate.wait()
            done.append(name)

        return op

    queue.put("a", "a1", write("a1", wait=True))
    queue.put("a", "a2", write("a2"))
    queue.put("b", "b1", write("b1"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert done == ["b1"] and "a" in queue and len(queue) == 1  # b ran while a1 waits
    gate.set()
    assert await queue.close(5.0) == []
    assert done == ["b1", "a1", "a2"]
    assert sorted(drained) == ["a", "b"] and len(queue) == 0


async def test_an_interim_write_is_skipped_when_a_later_one_is_queued() -> None:
    done: list[str] = []
    gate = asyncio.Event()

    async def first() -> None:
        await gate.wait()
        done.append("first")

    async def running() -> None:
        done.append("running")

    async def final() -> None:
        done.append("final")

    queue = WriteQueue()
    queue.put("r", "first", first)
    queue.put("r", "running", running, interim=True)
    queue.put("r", "final", final)
    gate.set()
    await queue.close(5.0)
    assert done == ["first", "final"]
    # Alone at the head of its queue, an interim write runs.
    queue.put("s", "running", running, interim=True)
    await queue.close(5.0)
    assert done[-1] == "running"


async def test_a_failed_write_is_retried_until_it_succeeds_and_order_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[str] = []
    failures = 3

    async def flaky() -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError("store down")
        done.append("finalize")

    async def after() -> None:
        done.append("dead letter")

    queue = WriteQueue(retry_first_s=0.001, retry_max_s=0.004)
    with caplog.at_level(logging.WARNING, logger="haif.orchestrator"):
        queue.put("r", "finalize r", flaky)
        queue.put("r", "dead letter r", after)
        assert await queue.close(5.0) == []
    assert done == ["finalize", "dead letter"] and queue.failures == 3
    assert "store write failed (try 1" in caplog.text and "finalize r" in caplog.text


async def test_close_gives_up_after_its_grace_and_names_what_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def down() -> None:
        raise OSError("store down")

    queue = WriteQueue(retry_first_s=0.001, retry_max_s=0.01)
    queue.put("r", "finalize r", down)
    with caplog.at_level(logging.ERROR, logger="haif.orchestrator"):
        assert await queue.close(0.05) == ["finalize r"]
    assert "store write lost at shutdown: finalize r" in caplog.text and len(queue) == 0


# ------------------------------------------------------------------ relay


def _request(rid: str = "r1", max_tokens: int = 5, **kw: Any) -> Request:
    return Request(rid, "acme", "llama-3-8b", 10, max_tokens, 0.0, **kw)


def _pending(max_tokens: int = 5) -> Pending:
    future: asyncio.Future[SubmitReply] = asyncio.get_running_loop().create_future()
    return Pending(_request(max_tokens=max_tokens), "r1", future)


def _drain(queue: asyncio.Queue[Any]) -> list[Any]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_the_relay_forwards_each_token_once_across_attempts() -> None:
    pending = _pending()
    early = pending.listen()
    pending.attempt = 1
    pending.relay(1, TokenChunk(0, ("a", "b")))
    pending.relay(1, TokenChunk(1, ("b", "c")))  # "b" again: only "c" is new
    pending.attempt = 2  # the core retried, resuming at token 3
    pending.relay(1, TokenChunk(3, ("late",)))  # the old attempt: dropped
    pending.relay(2, TokenChunk(0, ("a", "b", "c", "d", "e", "f")))  # capped at max_tokens
    late = pending.listen()
    assert [c.texts for c in _drain(early)] == [("a", "b"), ("c",), ("d", "e")]
    assert [c.texts for c in _drain(late)] == [("a", "b", "c", "d", "e")]
    with pytest.raises(RpcError) as gap:
        pending.relay(2, TokenChunk(7, ("x",)))
    assert gap.value.code == "bad_reply"


async def test_finish_ends_every_stream_and_answers_with_the_whole_text() -> None:
    pending = _pending()
    queue = pending.listen()
    pending.relay(0, TokenChunk(0, ("a", "b")))
    record = _record("r1")
    pending.finish(record)
    frames = _drain(queue)
    assert isinstance(frames[-1], SubmitReply) and frames[-1].text == ""
    assert pending.result.result().text == "ab" and pending.listeners == []
    after = _drain(pending.listen())  # a caller attaching now gets everything at once
    assert after[0].texts == ("a", "b") and after[1] == pending.final


def _record(rid: str) -> RequestRecord:
    return ok_record(rid)


# ------------------------------------------------------------------ reservations


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


class Harness:
    """Reservations over a real store; admitted requests are kept, not run."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.clock = Clock()
        self.running: dict[str, Pending] = {}
        self.writes = WriteQueue()
        self.res = Reservations(
            store,
            self.running,
            self.admit,
            self.writes,
            lease_ttl_s=30.0,
            wait_limit_s=0.3,
            wall=self.clock,
        )

    def admit(self, body: Request, rid: str, replay_of: DeadLetterRow | None) -> Pending:
        future: asyncio.Future[SubmitReply] = asyncio.get_running_loop().create_future()
        pending = Pending(replace(body, request_id=rid), body.request_id, future)
        self.running[rid] = pending
        return pending

    async def finish(self, rid: str) -> SubmitReply:
        """The request ends here; its job settles in the store."""
        del self.running[rid]
        reply = SubmitReply(_record(rid), "done!", None)
        job_id = self.res.job_id(rid)
        record = replace(reply.record, request_id=job_id)
        await self.store.finalize(job_id, record, encode(reply), 0)
        return reply


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    store = await open_store("duckdb://:memory:", linger_s=0.0)
    try:
        yield Harness(store)
    finally:
        await store.close()


async def test_created_runs_and_a_resend_attaches_then_replays(harness: Harness) -> None:
    keyed = _request(idempotency_key="k1")
    first = await harness.res.enter(keyed)
    assert isinstance(first, Pending) and first.request.request_id == "r1"  # RUN
    again = await harness.res.enter(replace(keyed, request_id="r2", stream=True))
    assert again is first  # ATTACH: same key and body, running here
    reply = await harness.finish("r1")
    replayed = await harness.res.enter(keyed)
    assert replayed == reply  # REPLAY: the stored reply, nothing runs
    assert not harness.running


async def test_the_same_key_with_another_body_conflicts(harness: Harness) -> None:
    await harness.res.enter(_request(idempotency_key="k1"))
    with pytest.raises(RpcError) as err:
        await harness.res.enter(_request(rid="r2", max_tokens=9, idempotency_key="k1"))
    assert err.value.code == "idempotency_conflict"


async def test_a_twin_elsewhere_is_waited_for_then_runs_here_once_expired(
    harness: Harness,
) -> None:
    body = _request(idempotency_key="k1")
    # Another orchestrator holds the key: its job row is in the store, not here.
    row = JobRow("r1", "acme", "k1", request_body_hash(body), expires_s=1_030.0)
    await harness.store.reserve(row, 1_000.0)
    with pytest.raises(RpcError) as waited:
        await harness.res.enter(body)  # WAIT until wait_limit_s
    assert waited.value.code == "conflict" and "still running" in str(waited.value)
    # Its lease lapses and the reconciler expires it: the resend runs here.
    assert await harness.store.expire_reservations(1_031.0) == ["r1"]
    entered = await harness.res.enter(body)
    assert isinstance(entered, Pending)  # RESERVE_AGAIN, then RUN


async def test_an_id_taken_by_another_tenant_is_renamed(harness: Harness) -> None:
    other = JobRow("r1", "globex", None, "x", expires_s=None)
    await harness.store.reserve(other, 1_000.0)
    entered = await harness.res.enter(_request(idempotency_key="k1"))
    assert isinstance(entered, Pending)
    rid = entered.request.request_id
    assert rid.startswith("r1~") and entered.client_id == "r1"  # RENAME, then RUN
    job = await harness.store.get_job(rid)
    assert job is not None and job.tenant == "acme"


async def test_a_request_without_a_key_runs_at_once_and_its_row_follows(
    harness: Harness,
) -> None:
    taken = JobRow("r1", "globex", None, "x", expires_s=None)
    await harness.store.reserve(taken, 1_000.0)
    entered = await harness.res.enter(_request())
    assert isinstance(entered, Pending) and entered.request.request_id == "r1"
    assert "r1" in harness.writes  # the reservation is a queued write
    await harness.writes.close(5.0)
    job_id = harness.res.job_id("r1")
    assert job_id.startswith("r1~")  # the id was another tenant's: its row moved
    job = await harness.store.get_job(job_id)
    assert job is not None and job.tenant == "acme"
    harness.res.forget("r1")
    assert harness.res.job_id("r1") == "r1"


async def test_a_reserve_retried_after_its_commit_keeps_its_own_id(harness: Harness) -> None:
    """The first try commits, then its answer is lost (the connection died)."""
    real_reserve = harness.store.reserve
    tries = 0

    async def commit_then_lose(job: JobRow, now: float) -> Any:
        nonlocal tries
        tries += 1
        reservation = await real_reserve(job, now)
        if tries == 1:
            raise ConnectionError("connection was closed in the middle of operation")
        return reservation

    harness.store.reserve = commit_then_lose  # type: ignore[method-assign]
    harness.writes = harness.res._writes = WriteQueue(retry_first_s=0.001)
    entered = await harness.res.enter(_request())
    assert isinstance(entered, Pending)
    await harness.writes.close(5.0)
    assert tries == 2 and harness.res.job_id("r1") == "r1"  # its own row, not renamed
    job = await harness.store.get_job("r1")
    assert job is not None and job.status == "reserved" and job.tenant == "acme"
    # A later request reusing the id (same body, no key) still gets a fresh row.
    del harness.running["r1"]
    harness.res.forget("r1")
    harness.clock.t += 1.0
    again = await harness.res.enter(_request())
    assert isinstance(again, Pending)
    await harness.writes.close(5.0)
    assert harness.res.job_id("r1").startswith("r1~")


async def test_a_store_that_is_down_is_an_rpc_error(harness: Harness) -> None:
    await harness.store.close()
    with pytest.raises(RpcError) as err:
        await harness.res.enter(_request(idempotency_key="k1"))
    assert err.value.code == "store_unavailable"


async def test_a_bad_key_is_refused() -> None:
    store = await open_store("duckdb://:memory:")
    try:
        res = Harness(store).res
        with pytest.raises(RpcError) as err:
            await res.enter(_request(idempotency_key="x" * 256))
        assert err.value.code == "bad_request"
    finally:
        await store.close()
