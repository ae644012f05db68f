"""One contract for the metadata store, run against both backends.

Every test takes the ``store`` fixture, parametrized over embedded DuckDB and
a real PostgreSQL server (127.0.0.1:5432, user ``postgres``; override with
``HAIF_TEST_PG_ADMIN_DSN``). The PostgreSQL runs use a fresh, uniquely named
database created for the session and dropped at its end; each test starts
from an empty ``public`` schema. If the server is unreachable the PostgreSQL
cases are skipped, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import duckdb
import pyarrow.parquet as pq
import pytest
from harness.pg import dsn_for, pg_admin, pg_unavailable

from haif.configfile import ConfigError
from haif.contracts import DeadLetter, Request, RequestRecord, WorkerSnapshot
from haif.records import FILE_SCHEMA, read_parquet
from haif.runtime.cluster import load_cluster
from haif.runtime.store import (
    LATEST_VERSION,
    DuckDBStore,
    JobRow,
    MetadataStore,
    PostgresStore,
    Quota,
    Reservation,
    open_store,
    store_backend,
)
from haif.runtime.store.duckdb_store import ARROW_MIN_ROWS, DEFAULT_LINGER_S
from haif.runtime.store.group_commit import BatchStats
from haif.runtime.store.sql_store import SqlStore

T = TypeVar("T")


# -------------------------------------------------------------- PostgreSQL


@dataclasses.dataclass(frozen=True)
class PgServer:
    """The session's throwaway database (``dsn``), or why there is none (``error``)."""

    dsn: str | None
    error: str | None


def _in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on its own loop in a worker thread (safe inside a running loop)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    name = f"haif_store_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        _in_thread(pg_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # refused, timed out, auth, ...: all mean "no server"
        yield PgServer(None, f"{type(exc).__name__}: {exc}")
        return
    try:
        yield PgServer(dsn_for(name), None)
    finally:
        _in_thread(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _fresh_schema(dsn: str) -> None:
    con = await asyncpg.connect(dsn, timeout=5)
    try:
        await con.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    finally:
        await con.close()


BACKENDS = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextlib.asynccontextmanager
async def _open(
    request: pytest.FixtureRequest, tmp_path: Path, linger_s: float | None = None
) -> AsyncIterator[MetadataStore]:
    s: MetadataStore
    if request.param == "duckdb":
        s = await open_store(f"duckdb://{tmp_path / 'store.duckdb'}", linger_s=linger_s)
        assert isinstance(s, DuckDBStore)
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        if server.dsn is None:
            pg_unavailable(server.error or "unknown error")
        await _fresh_schema(server.dsn)
        s = await open_store(server.dsn, linger_s=linger_s)
        assert isinstance(s, PostgresStore)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    async with _open(request, tmp_path) as s:
        yield s


@pytest.fixture(params=BACKENDS)
async def eager_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MetadataStore]:
    """A store whose off-path writes do not linger: for tests that await hundreds of
    writes one by one (on DuckDB each would wait out its 200 ms linger)."""
    async with _open(request, tmp_path, linger_s=0.0) as s:
        yield s


@pytest.mark.postgres
def test_postgres_reachable(pg_server: PgServer) -> None:
    """Fails (not errors, not skips) under CI=true when the server is missing."""
    if pg_server.dsn is None:
        pg_unavailable(pg_server.error or "unknown error")


# ----------------------------------------------------------------- helpers


def _record(
    rid: str,
    arrival: float,
    *,
    tenant: str = "t1",
    status: str = "ok",
    prompt: int = 10,
    output: int = 5,
    cost: float = 0.5,
) -> RequestRecord:
    return RequestRecord(
        request_id=rid,
        tenant=tenant,
        model="llama-3-8b",
        origin_region="eu",
        served_region="eu" if status == "ok" else None,
        worker_id="w1" if status == "ok" else None,
        gpu_class="a100" if status == "ok" else None,
        arrival_s=arrival,
        admitted_s=arrival + 0.01 if status == "ok" else None,
        first_token_s=arrival + 0.1 if status == "ok" else None,
        finish_s=arrival + 1.25,
        prompt_tokens=prompt,
        output_tokens=output,
        attempts=1,
        status=status,
        reason=None if status == "ok" else "worker_crashed",
        cold_start=status == "ok",
        cost=cost,
    )


def _job(rid: str, key: str | None = "k1", body: str = "h1", *, tenant: str = "t1") -> JobRow:
    return JobRow(
        request_id=rid, tenant=tenant, idempotency_key=key, body_hash=body, expires_s=100.0
    )


# -------------------------------------------------------------- migrations


async def test_migrations_are_idempotent(store: MetadataStore) -> None:
    assert await store.schema_version() == LATEST_VERSION
    assert await store.migrate() == LATEST_VERSION
    assert await store.migrate() == LATEST_VERSION
    assert await store.schema_version() == LATEST_VERSION
    await store.write_record(_record("r1", 1.0))
    # Concurrent starters (several processes on one server) do not collide.
    versions = await asyncio.gather(*(store.migrate() for _ in range(4)))
    assert versions == [LATEST_VERSION] * 4
    assert [r.request_id for r in await store.records()] == ["r1"]


# ------------------------------------------------------------------ records


async def test_records_upsert_order_and_parquet(store: MetadataStore, tmp_path: Path) -> None:
    await store.write_record(_record("b", 2.0))
    await store.write_record(_record("a", 2.0, status="failed"))
    await store.write_record(_record("c", 0.5))
    updated = _record("b", 2.0, output=7, cost=1.75)
    await store.write_record(updated)  # upsert: still one row for "b"
    records = await store.records()
    assert [r.request_id for r in records] == ["c", "a", "b"]
    assert records[2] == updated
    assert records[1] == _record("a", 2.0, status="failed")  # NULLs survive
    path = await store.export_parquet(tmp_path / "out" / "records.parquet")
    assert pq.read_schema(path) == FILE_SCHEMA  # with the columns it leaves null
    assert read_parquet(path) == records


# ------------------------------------------------------------- reservations


async def test_reserve_created_existing_conflict(store: MetadataStore) -> None:
    first = await store.reserve(_job("r1"), now=1.0)
    assert first.outcome == "created" and first.created
    assert first.job == dataclasses.replace(_job("r1"), created_s=1.0, updated_s=1.0)

    again = await store.reserve(_job("r2"), now=2.0)  # resend: same key, same body
    assert again.outcome == "existing"
    assert again.job.request_id == "r1"
    assert await store.get_job("r2") is None

    clash = await store.reserve(_job("r3", body="other"), now=3.0)
    assert clash.outcome == "conflict"
    assert clash.job.request_id == "r1"

    other_tenant = await store.reserve(_job("r4", tenant="t2"), now=4.0)
    assert other_tenant.outcome == "created"  # keys are per tenant

    # Jobs without a key always create.
    assert (await store.reserve(_job("r5", key=None), now=5.0)).outcome == "created"
    assert (await store.reserve(_job("r6", key=None), now=5.0)).outcome == "created"

    # A done job is replayed with its result.
    assert await store.finalize("r1", _record("r1", 1.0), b"payload", now=6.0)
    replay = await store.reserve(_job("r7"), now=7.0)
    assert replay.outcome == "existing"
    assert replay.job.status == "done" and replay.job.result == b"payload"


async def test_reserve_rejects_a_settled_status(store: MetadataStore) -> None:
    with pytest.raises(ValueError, match="reserved"):
        await store.reserve(dataclasses.replace(_job("r1"), status="done"), now=1.0)


async def test_concurrent_reserve_creates_one_job(store: MetadataStore) -> None:
    results = await asyncio.gather(
        *(store.reserve(_job(f"r{i}", key="same"), now=1.0) for i in range(10))
    )
    created = [r for r in results if r.outcome == "created"]
    assert len(created) == 1
    winner = created[0].job.request_id
    assert all(r.job.request_id == winner for r in results)
    assert [r.outcome for r in results].count("existing") == 9
    jobs = [await store.get_job(f"r{i}") for i in range(10)]
    assert [j.request_id for j in jobs if j is not None] == [winner]

    # Mixed bodies racing for one key: one winner, the rest existing or conflict.
    mixed = await asyncio.gather(
        *(store.reserve(_job(f"m{i}", key="mixed", body=f"b{i % 2}"), now=1.0) for i in range(10))
    )
    assert sum(r.outcome == "created" for r in mixed) == 1
    body = next(r.job.body_hash for r in mixed if r.created)
    for i, r in enumerate(mixed):
        if not r.created:
            assert r.outcome == ("existing" if f"b{i % 2}" == body else "conflict")


async def test_set_job_status_and_terminal_states(store: MetadataStore) -> None:
    assert not await store.set_job_status("missing", "running", now=1.0)
    await store.reserve(_job("r1"), now=1.0)
    assert await store.set_job_status("r1", "running", now=2.0, worker_id="w7", expires_s=50.0)
    job = await store.get_job("r1")
    assert job is not None
    assert (job.status, job.worker_id, job.updated_s, job.expires_s) == ("running", "w7", 2.0, 50.0)
    assert await store.set_job_status("r1", "running", now=3.0)  # keeps worker and lease
    job = await store.get_job("r1")
    assert job is not None and (job.worker_id, job.expires_s) == ("w7", 50.0)
    with pytest.raises(ValueError, match="unknown job status"):
        await store.set_job_status("r1", "bogus", now=3.0)  # type: ignore[arg-type]
    assert await store.finalize("r1", _record("r1", 1.0, status="failed"), None, now=4.0)
    job = await store.get_job("r1")
    assert job is not None and job.status == "failed"
    assert not await store.set_job_status("r1", "running", now=5.0)  # a late update is ignored
    job = await store.get_job("r1")
    assert job is not None and job.status == "failed"


async def test_expire_reservations(store: MetadataStore) -> None:
    await store.reserve(dataclasses.replace(_job("a", key="ka"), expires_s=10.0), now=0.0)
    await store.reserve(dataclasses.replace(_job("b", key="kb"), expires_s=20.0), now=0.0)
    await store.reserve(dataclasses.replace(_job("c", key=None), expires_s=5.0), now=0.0)
    await store.reserve(dataclasses.replace(_job("d", key=None), expires_s=None), now=0.0)
    await store.reserve(dataclasses.replace(_job("e", key=None), expires_s=1.0), now=0.0)
    await store.set_job_status("c", "running", now=1.0)
    assert await store.finalize("e", _record("e", 0.0), b"ok", now=0.5)

    assert await store.expire_reservations(now=4.0) == []
    assert await store.expire_reservations(now=10.0) == ["a", "c"]  # expires_s <= now
    assert await store.expire_reservations(now=10.0) == []
    job = await store.get_job("a")
    assert job is not None and (job.status, job.updated_s) == ("expired", 10.0)
    assert await store.expire_reservations(now=1e9) == ["b"]  # "d" has no lease, "e" is done
    assert not await store.set_job_status("a", "running", now=11.0)  # expired is final

    # An expired reservation releases its key: a resend runs again.
    retry = await store.reserve(_job("a2", key="ka"), now=12.0)
    assert retry.outcome == "created" and retry.job.request_id == "a2"
    assert (await store.reserve(_job("a3", key="ka"), now=13.0)).job.request_id == "a2"
    old = await store.get_job("a")
    assert old is not None and old.status == "expired" and old.idempotency_key is None


# ---------------------------------------------------------------- finalize


async def test_finalize_exactly_once(store: MetadataStore) -> None:
    await store.reserve(_job("r1"), now=1.0)
    record = _record("r1", 1.0, prompt=11, output=22, cost=0.25)
    assert await store.finalize("r1", record, b"result-1", now=2.0)
    second = _record("r1", 1.0, prompt=99, output=99, cost=9.0)
    assert not await store.finalize("r1", second, b"result-2", now=3.0)

    job = await store.get_job("r1")
    assert job is not None
    assert (job.status, job.result, job.updated_s) == ("done", b"result-1", 2.0)
    assert await store.records() == [record]
    [usage] = await store.list_usage()
    assert (usage.request_id, usage.tenant, usage.prompt_tokens, usage.output_tokens) == (
        "r1",
        "t1",
        11,
        22,
    )
    assert (usage.cost, usage.finalized_s) == (0.25, 2.0)
    assert await store.usage_totals("t1") == (11, 22, 0.25)

    with pytest.raises(ValueError):
        await store.finalize("r2", record, None, now=4.0)  # ids must match


async def test_finalize_replaces_a_record_written_before(store: MetadataStore) -> None:
    """A record already there (``write_record``) does not stop the settlement: the
    finalized record replaces it (DuckDB's plain inserts fail, and the batch is
    decided again with the upsert)."""
    await store.reserve(_job("r1"), now=1.0)
    await store.write_record(_record("r1", 1.0, status="failed"))
    record = _record("r1", 1.0, prompt=4, output=6)
    assert await store.finalize("r1", record, b"result", now=2.0)
    assert await store.records() == [record]
    assert [(u.request_id, u.output_tokens) for u in await store.list_usage()] == [("r1", 6)]


async def test_finalize_without_job_row(store: MetadataStore) -> None:
    record = _record("lone", 1.0, status="timeout", prompt=3, output=0, cost=0.0)
    assert await store.finalize("lone", record, None, now=2.0)
    assert not await store.finalize("lone", record, None, now=3.0)
    assert await store.get_job("lone") is None
    assert await store.records() == [record]
    assert [u.request_id for u in await store.list_usage("t1")] == ["lone"]


async def test_concurrent_finalize_settles_once(store: MetadataStore) -> None:
    await store.reserve(_job("r1"), now=1.0)
    records = [_record("r1", 1.0, prompt=i, output=i, cost=float(i)) for i in range(1, 11)]
    outcomes = await asyncio.gather(
        *(store.finalize("r1", rec, f"res-{i}".encode(), now=2.0) for i, rec in enumerate(records))
    )
    assert outcomes.count(True) == 1
    won = outcomes.index(True)
    usage = await store.list_usage()
    assert len(usage) == 1 and usage[0].prompt_tokens == records[won].prompt_tokens
    assert await store.records() == [records[won]]
    job = await store.get_job("r1")
    assert job is not None and job.result == f"res-{won}".encode()
    assert await store.usage_totals("t1") == (won + 1, won + 1, float(won + 1))


# ------------------------------------------------------------ group commit

_DB_ERRORS = (asyncpg.PostgresError, duckdb.Error)


def _stats(store: MetadataStore) -> BatchStats:
    assert isinstance(store, SqlStore)
    return dataclasses.replace(store.batch_stats)  # a snapshot


async def test_concurrent_writes_commit_in_batches(store: MetadataStore) -> None:
    """Many concurrent reserves, status changes and finalizes share transactions and
    still give every caller its own, correct result."""
    before = _stats(store)
    keyed = [_job(f"r{i}", key=f"k{i}") for i in range(40)]
    resends = [_job(f"dup{i}", key="k7") for i in range(5)]  # same key and body as r7
    clashes = [_job(f"x{i}", key="k8", body="other") for i in range(3)]
    keyless = [_job(f"n{i}", key=None) for i in range(10)]
    taken_id = [_job("r3", key="elsewhere")]  # request id r3 is taken by another key
    jobs = keyed + resends + clashes + keyless + taken_id
    results = await asyncio.gather(*(store.reserve(job, now=1.0) for job in jobs))
    after_reserve = _stats(store)
    assert after_reserve.operations - before.operations == len(jobs)
    assert after_reserve.largest > 1 and after_reserve.batches - before.batches < len(jobs)

    # Concurrent callers: either r7 or one resend won the key; the same for r8 and the clashes.
    assert all(r.created for r in results[:3] + results[4:7] + results[9:40] + results[48:58])
    r3 = [results[3], results[58]]  # two jobs with request id r3 (different keys)
    assert sorted(r.outcome for r in r3) == ["conflict", "created"]
    assert all(r.job.request_id == "r3" for r in r3)
    k7 = [results[7], *results[40:45]]
    assert sum(r.created for r in k7) == 1
    assert all(r.outcome == "existing" for r in k7 if not r.created)
    assert len({r.job.request_id for r in k7}) == 1
    k8 = [results[8], *results[45:48]]
    assert sum(r.created for r in k8) == 1
    body = next(r.job.body_hash for r in k8 if r.created)
    for job, r in zip([keyed[8], *clashes], k8, strict=True):
        if not r.created:
            assert r.outcome == ("existing" if job.body_hash == body else "conflict")

    owners = sorted({r.job.request_id for r in results})
    moved = await asyncio.gather(
        *(store.set_job_status(rid, "running", now=2.0, worker_id="w1") for rid in owners),
        store.set_job_status("missing", "running", now=2.0),
    )
    assert moved == [True] * len(owners) + [False]

    records = {
        rid: _record(rid, 1.0, prompt=i + 1, output=2 * i, cost=0.5) for i, rid in enumerate(owners)
    }
    # A second, concurrent finalize of these: exactly one of the two settles. (With
    # several batches in flight, PostgreSQL, either may commit first, so both carry
    # the same settlement.)
    twice = owners[:5]
    settled = await asyncio.gather(
        *(store.finalize(rid, records[rid], rid.encode(), now=3.0) for rid in owners),
        *(store.finalize(rid, records[rid], rid.encode(), now=3.0) for rid in twice),
    )
    first, second = settled[: len(owners)], settled[len(owners) :]
    assert all(first[len(twice) :])
    assert [a + b for a, b in zip(first, second, strict=False)] == [1] * len(twice)
    assert _stats(store).largest > 1
    assert await store.records() == sorted(records.values(), key=lambda r: r.request_id)
    for rid in owners:
        settled_job = await store.get_job(rid)
        assert settled_job is not None
        assert (settled_job.status, settled_job.result, settled_job.worker_id) == (
            "done",
            rid.encode(),
            "w1",
        )
    totals = await store.usage_totals("t1")
    assert (totals.prompt_tokens, totals.output_tokens) == (
        sum(r.prompt_tokens for r in records.values()),
        sum(r.output_tokens for r in records.values()),
    )
    assert totals.cost == pytest.approx(0.5 * len(owners))


async def test_one_bad_write_does_not_poison_its_batch(store: MetadataStore) -> None:
    """A write the database refuses (here: a NULL in a NOT NULL column) fails alone;
    the rest of its batch commits."""
    bad_job = dataclasses.replace(_job("bad", key="kb"), body_hash=None)  # type: ignore[arg-type]
    # Many writes at once: the first few commit alone while the free slots last,
    # and the rest, the bad one among them, queue and share a batch.
    good = [_job(f"g{i}", key=f"kg{i}") for i in range(12)]
    before = _stats(store)
    outcomes = await asyncio.gather(
        *(store.reserve(job, now=1.0) for job in [*good[:8], bad_job, *good[8:]]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[8], _DB_ERRORS)
    assert all(isinstance(o, Reservation) and o.created for i, o in enumerate(outcomes) if i != 8)
    assert _stats(store).split == before.split + 1  # its batch failed and was split
    assert await store.get_job("bad") is None
    assert (await store.reserve(_job("bad2", key="kb"), now=2.0)).created  # nothing left over

    # requests.model is NOT NULL: the record fails in the database, after its usage row.
    bad_record = dataclasses.replace(_record("g8", 1.0), model=None)  # type: ignore[arg-type]
    fine = [f"g{i}" for i in range(8)]
    settled = await asyncio.gather(
        *(store.finalize(rid, _record(rid, 1.0), b"ok", now=2.0) for rid in fine),
        store.finalize("g8", bad_record, b"bad", now=2.0),
        store.write_record(_record("lone", 5.0)),
        store.set_job_status("g9", "running", now=2.0),
        return_exceptions=True,
    )
    assert settled[:8] == [True] * 8
    assert isinstance(settled[8], _DB_ERRORS)
    assert settled[9:] == [None, True]
    assert _stats(store).split == before.split + 2
    # The failed finalize left nothing behind (usage, job and record commit together).
    assert [u.request_id for u in await store.list_usage()] == fine
    job = await store.get_job("g8")
    assert job is not None and job.status == "reserved" and job.result is None
    assert [r.request_id for r in await store.records()] == [*fine, "lone"]
    assert await store.finalize("g8", _record("g8", 1.0), b"ok", now=3.0)  # can still settle

    # Bad input the store can see is refused before it is queued.
    with pytest.raises(ValueError, match="unknown job status"):
        await store.set_job_status("g10", "bogus", now=1.0)  # type: ignore[arg-type]


async def test_a_batch_of_keyless_reserves_with_a_taken_id(store: MetadataStore) -> None:
    """One taken id in a batch of keyless reserves (DuckDB inserts them with a plain
    INSERT first, which the taken id makes fail as a whole): the others are created
    all the same, and the taken one finds the job that holds its id."""
    await store.reserve(_job("taken", key=None), now=1.0)
    jobs = [_job(f"n{i}", key=None) for i in range(8)] + [_job("taken", key=None, body="h2")]
    results = await asyncio.gather(*(store.reserve(job, now=2.0) for job in jobs))
    expected = [dataclasses.replace(job, created_s=2.0, updated_s=2.0) for job in jobs[:8]]
    assert [(r.outcome, r.job) for r in results[:8]] == [("created", job) for job in expected]
    assert not results[8].created and results[8].job.created_s == 1.0
    assert [await store.get_job(job.request_id) for job in jobs[:8]] == expected
    assert _stats(store).largest > 1


async def test_a_large_batch_keeps_nulls_and_types_row_by_row(store: MetadataStore) -> None:
    """A batch big enough for DuckDB to pass its rows as an Arrow table (ARROW_MIN_ROWS)
    where a column is NULL in some rows only: each row reads back as it was written."""
    jobs = [
        dataclasses.replace(_job(f"m{i}", key=None), expires_s=None if i % 2 else 50.0 + i)
        for i in range(12)
    ]
    await asyncio.gather(*(store.reserve(job, now=1.0) for job in jobs))
    moved = await asyncio.gather(
        *(
            store.set_job_status(
                job.request_id, "running", now=2.0, worker_id=f"w{i}" if i % 3 else None
            )
            for i, job in enumerate(jobs)
        )
    )
    assert moved == [True] * len(jobs)
    records = [
        _record(job.request_id, float(i), status="ok" if i % 2 else "failed", cost=i / 3)
        for i, job in enumerate(jobs)
    ]
    settled = await asyncio.gather(
        *(
            store.finalize(r.request_id, r, None if i % 4 else b"x" * i, now=3.0)
            for i, r in enumerate(records)
        )
    )
    assert settled == [True] * len(jobs)
    if isinstance(store, DuckDBStore):  # the writes nobody waits for linger: one batch each
        assert _stats(store).largest >= ARROW_MIN_ROWS
    assert await store.records() == records
    for i, job in enumerate(jobs):
        stored = await store.get_job(job.request_id)
        assert stored is not None
        assert (stored.expires_s, stored.worker_id, stored.result, stored.status) == (
            job.expires_s,
            f"w{i}" if i % 3 else None,
            None if i % 4 else b"x" * i,
            "done" if i % 2 else "failed",
        )
    costs = {u.request_id: u.cost for u in await store.list_usage()}
    assert costs == pytest.approx({job.request_id: i / 3 for i, job in enumerate(jobs)})


async def test_batched_reserve_releases_an_expired_key(store: MetadataStore) -> None:
    await store.reserve(dataclasses.replace(_job("old", key="ka"), expires_s=1.0), now=0.0)
    assert await store.expire_reservations(now=5.0) == ["old"]
    results = await asyncio.gather(
        *(store.reserve(_job(f"new{i}", key="ka"), now=6.0) for i in range(4)),
        *(store.reserve(_job(f"other{i}", key=f"ko{i}"), now=6.0) for i in range(4)),
    )
    assert sum(r.created for r in results[:4]) == 1
    assert len({r.job.request_id for r in results[:4]}) == 1
    assert all(r.created for r in results[4:])
    old = await store.get_job("old")
    assert old is not None and old.status == "expired" and old.idempotency_key is None


async def test_queued_writes_commit_before_close(tmp_path: Path) -> None:
    path = tmp_path / "closing.duckdb"
    store = DuckDBStore(path)
    writes = [
        asyncio.create_task(store.finalize(f"c{i}", _record(f"c{i}", 1.0), None, now=1.0))
        for i in range(20)
    ]
    await asyncio.sleep(0)  # queued, not committed yet
    await store.close()
    assert [w.result() for w in writes] == [True] * 20
    with pytest.raises(RuntimeError, match="closed"):
        await store.finalize("late", _record("late", 1.0), None, now=2.0)
    async with DuckDBStore(path) as reopened:
        assert len(await reopened.list_usage()) == 20


# -------------------------------------------------------------------- usage


async def test_usage_totals_never_negative(store: MetadataStore) -> None:
    assert await store.usage_totals("nobody") == (0, 0, 0.0)
    assert await store.finalize("n1", _record("n1", 1.0, prompt=-5, output=-1, cost=-2.0), None, 1)
    assert await store.finalize("n2", _record("n2", 1.0, prompt=4, output=6, cost=0.5), None, 1)
    assert await store.finalize("x", _record("x", 1.0, tenant="t2", prompt=100), None, 1)
    assert await store.usage_totals("t1") == (4, 6, 0.5)
    assert await store.usage_totals("t2") == (100, 5, 0.5)


@pytest.mark.slow
async def test_usage_totals_equal_sum_of_finalized_rows(eager_store: MetadataStore) -> None:
    """Property (seeded, Hypothesis-free): totals == sum of the first finalize per request."""
    store = eager_store
    tenants = ("a", "b", "c")
    expected: dict[str, tuple[str, int, int, float]] = {}
    for seed in range(4):
        rng = random.Random(seed)
        for step in range(40):
            rid = f"s{seed}-r{rng.randrange(25)}"
            tenant = tenants[int(rid.rsplit("r", 1)[1]) % len(tenants)]
            record = _record(
                rid,
                float(step),
                tenant=tenant,
                prompt=rng.randint(-5, 500),
                output=rng.randint(-5, 500),
                cost=rng.uniform(-1.0, 3.0),
            )
            settled = await store.finalize(rid, record, None, now=float(step))
            assert settled == (rid not in expected)
            if settled:
                expected[rid] = (
                    tenant,
                    max(0, record.prompt_tokens),
                    max(0, record.output_tokens),
                    max(0.0, record.cost),
                )
    rows = await store.list_usage()
    assert len(rows) == len(expected)
    assert {r.request_id: (r.tenant, r.prompt_tokens, r.output_tokens) for r in rows} == {
        rid: (tenant, prompt, output) for rid, (tenant, prompt, output, _) in expected.items()
    }
    for tenant in tenants:
        mine = await store.list_usage(tenant)
        assert all(r.tenant == tenant for r in mine)
        totals = await store.usage_totals(tenant)
        assert totals.prompt_tokens == sum(r.prompt_tokens for r in mine)
        assert totals.output_tokens == sum(r.output_tokens for r in mine)
        assert totals.cost == pytest.approx(sum(r.cost for r in mine))
        assert min(totals) >= 0
        assert all(min(r.prompt_tokens, r.output_tokens, r.cost) >= 0 for r in mine)
        mine_expected = [e for e in expected.values() if e[0] == tenant]
        assert totals.prompt_tokens == sum(e[1] for e in mine_expected)
        assert totals.output_tokens == sum(e[2] for e in mine_expected)
        assert totals.cost == pytest.approx(sum(e[3] for e in mine_expected))


# -------------------------------------------------------------- dead letters


async def test_dead_letters(store: MetadataStore) -> None:
    request = Request(
        request_id="d1",
        tenant="t1",
        model="llama-3-8b",
        prompt_tokens=12,
        max_tokens=34,
        arrival_s=1.5,
        origin_region="eu",
        deadline_s=9.0,
        idempotency_key="key",
        prompt="hello",
        prefix_hashes=(1, 2, 3),
    )
    other = dataclasses.replace(request, request_id="d0", prefix_hashes=())
    await store.add_dead_letter(DeadLetter("d1", "retries_exhausted", 3), request, now=5.0)
    await store.add_dead_letter(DeadLetter("d0", "worker_crashed", 1), other, now=4.0)
    listed = await store.list_dead_letters()
    assert [(d.request_id, d.reason, d.attempts, d.created_s) for d in listed] == [
        ("d0", "worker_crashed", 1, 4.0),
        ("d1", "retries_exhausted", 3, 5.0),
    ]
    got = await store.get_dead_letter("d1")
    assert got is not None and got.request == request
    await store.add_dead_letter(DeadLetter("d1", "again", 4), request, now=6.0)  # upsert
    got = await store.get_dead_letter("d1")
    assert got is not None and (got.reason, got.attempts) == ("again", 4)
    assert await store.remove_dead_letter("d1")
    assert not await store.remove_dead_letter("d1")
    assert await store.get_dead_letter("d1") is None
    assert [d.request_id for d in await store.list_dead_letters()] == ["d0"]


# ----------------------------------------------------------------- api keys


async def test_api_keys(store: MetadataStore) -> None:
    assert await store.tenant_for_key("h1") is None
    assert await store.add_api_key("h1", "t1", "ci key", now=1.0)
    assert await store.add_api_key("h2", "t2", "other", now=1.0)
    assert not await store.add_api_key("h1", "evil", "hijack", now=2.0)  # no takeover
    assert await store.tenant_for_key("h1") == "t1"
    assert await store.revoke_api_key("h1")
    assert not await store.revoke_api_key("h1")
    assert not await store.revoke_api_key("unknown")
    assert await store.tenant_for_key("h1") is None
    assert not await store.add_api_key("h1", "t1", "re-add", now=3.0)  # revoked stays revoked
    assert await store.tenant_for_key("h1") is None
    assert await store.tenant_for_key("h2") == "t2"


# ------------------------------------------------------------------ workers


async def test_workers_upsert(store: MetadataStore) -> None:
    w1 = WorkerSnapshot(
        "w1", "eu", "a100", vram_gb=80.0, models_warm=("llama-3-8b",), capacity=4, healthy=True
    )
    w0 = WorkerSnapshot("w0", "us", "h100")
    await store.upsert_worker(w1, "http://127.0.0.1:9001", now=1.0)
    await store.upsert_worker(w0, "http://127.0.0.1:9000", now=2.0)
    w1b = dataclasses.replace(w1, queue_depth=3, running=2, healthy=False)
    await store.upsert_worker(w1b, "http://127.0.0.1:9101", now=3.0)
    assert await store.list_workers() == [
        (w0, "http://127.0.0.1:9000", 2.0),
        (w1b, "http://127.0.0.1:9101", 3.0),
    ]


# ------------------------------------------------------------------- quotas


async def test_quotas(store: MetadataStore) -> None:
    assert await store.quotas() == {}
    await store.set_quota("t2", 60, None, 4)
    await store.set_quota("t1", None, None, None)
    await store.set_quota("t2", 120, 10_000, None)
    quotas = await store.quotas()
    assert quotas == {"t1": Quota(None, None, None), "t2": Quota(120, 10_000, None)}
    assert quotas["t2"].requests_per_min == 120
    with pytest.raises(ValueError, match=">= 0"):
        await store.set_quota("t3", -1, None, None)


# -------------------------------------------------------- backend selection


def test_store_urls() -> None:
    assert store_backend(":memory:") == ("duckdb", ":memory:")
    assert store_backend("duckdb://:memory:") == ("duckdb", ":memory:")
    assert store_backend("data/store.duckdb") == ("duckdb", "data/store.duckdb")
    assert store_backend("duckdb:///var/lib/haif.duckdb") == ("duckdb", "/var/lib/haif.duckdb")
    assert store_backend("duckdb://rel/haif.duckdb") == ("duckdb", "rel/haif.duckdb")
    dsn = "postgresql://postgres@127.0.0.1:5432/test"
    assert store_backend(dsn) == ("postgres", dsn)
    assert store_backend("postgres://u@h/db") == ("postgres", "postgres://u@h/db")
    for bad in ("mysql://u@h/db", "sqlite:///x.db", "", "duckdb://"):
        with pytest.raises(ValueError, match=r"duckdb:///.*postgresql://"):
            store_backend(bad)


async def test_open_store_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported store URL scheme 'mysql'"):
        await open_store("mysql://root@localhost/haif")


async def test_duckdb_upgrades_a_legacy_file_and_persists(tmp_path: Path) -> None:
    """A file written by the pre-migration store (no schema_version) keeps its rows."""
    path = tmp_path / "legacy.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE requests (request_id VARCHAR PRIMARY KEY, tenant VARCHAR, model VARCHAR,"
        " origin_region VARCHAR, served_region VARCHAR, worker_id VARCHAR, gpu_class VARCHAR,"
        " arrival_s DOUBLE, admitted_s DOUBLE, first_token_s DOUBLE, finish_s DOUBLE,"
        " prompt_tokens BIGINT, output_tokens BIGINT, attempts BIGINT, status VARCHAR,"
        " reason VARCHAR, cold_start BOOLEAN, cost DOUBLE)"
    )
    con.execute(
        "CREATE TABLE dead_letters (request_id VARCHAR PRIMARY KEY, reason VARCHAR,"
        " attempts BIGINT, request BLOB, created_s DOUBLE)"
    )
    legacy = _record("old", 1.0)
    con.execute(
        f"INSERT INTO requests VALUES ({', '.join('?' * 18)})", list(dataclasses.astuple(legacy))
    )
    con.close()

    store = DuckDBStore(path)  # the orchestrator's way: constructor migrates
    try:
        assert await store.schema_version() == LATEST_VERSION
        assert await store.records() == [legacy]
        assert (await store.reserve(_job("new"), now=1.0)).created
    finally:
        await store.close()
    await store.close()  # idempotent

    async with await open_store(str(path)) as reopened:
        assert await reopened.records() == [legacy]
        assert (await reopened.reserve(_job("again"), now=2.0)).outcome == "existing"


@pytest.mark.postgres
async def test_linger_is_set_per_store_and_by_the_cluster_yaml(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """``open_store(linger_s=)`` and the cluster YAML's ``orchestrator.store_linger_ms``."""
    duck = await open_store(f"duckdb://{tmp_path / 'a.duckdb'}")
    tuned = await open_store(f"duckdb://{tmp_path / 'b.duckdb'}", linger_s=0.05)
    assert isinstance(duck, SqlStore) and isinstance(tuned, SqlStore)
    assert (duck.linger_s, tuned.linger_s) == (DEFAULT_LINGER_S, 0.05)
    await duck.close()
    await tuned.close()
    if pg_server.dsn is None:
        pg_unavailable(pg_server.error or "unknown error")
    pg = await open_store(pg_server.dsn)
    pg_tuned = await open_store(pg_server.dsn, linger_s=0.05)
    assert isinstance(pg, SqlStore) and isinstance(pg_tuned, SqlStore)
    assert (pg.linger_s, pg_tuned.linger_s) == (0.0, 0.05)
    await pg.close()
    await pg_tuned.close()

    from haif.runtime.orchestrator import ORCHESTRATOR
    from haif.runtime.services import _orchestrator_app

    config = tmp_path / "cluster.yaml"
    config.write_text("orchestrator: {store_linger_ms: 120}\n")
    cluster = load_cluster(config)
    args = argparse.Namespace(store=str(tmp_path / "c.duckdb"), seed=0, idle_timeout_s=5.0)
    app = await _orchestrator_app(cluster, args)
    store = app[ORCHESTRATOR].store
    assert isinstance(store, SqlStore) and store.linger_s == pytest.approx(0.12)
    await store.close()
    config.write_text("orchestrator: {store_linger_ms: -1}\n")
    with pytest.raises(ConfigError, match="store_linger_ms"):
        load_cluster(config)


# -------------------------------------------------------------- leadership


async def test_leadership_lease_and_epochs(store: MetadataStore) -> None:
    assert await store.leadership("orch") is None
    assert await store.acquire_leadership("orch", "a", now=0.0, expires_s=2.0) == 1
    assert await store.acquire_leadership("orch", "b", now=1.0, expires_s=3.0) is None  # a's
    assert await store.acquire_leadership("orch", "a", now=1.5, expires_s=3.5) == 1  # renewed
    assert await store.leadership("orch") == ("a", 1, 3.5)
    assert await store.acquire_leadership("orch", "b", now=3.5, expires_s=5.5) == 2  # lapsed
    assert await store.acquire_leadership("orch", "a", now=4.0, expires_s=6.0) is None
    # A clean stop hands over at once, under the next epoch.
    assert not await store.release_leadership("orch", "a", now=4.0)  # not a's any more
    assert await store.release_leadership("orch", "b", now=4.0)
    assert await store.acquire_leadership("orch", "a", now=4.0, expires_s=6.0) == 3
    assert await store.acquire_leadership("other", "b", now=4.0, expires_s=6.0) == 1


async def test_only_one_of_concurrent_claimants_leads(store: MetadataStore) -> None:
    epochs = await asyncio.gather(
        *(store.acquire_leadership("orch", f"h{i}", now=0.0, expires_s=5.0) for i in range(6))
    )
    assert sorted(e for e in epochs if e is not None) == [1]


async def test_a_new_leader_expires_the_open_jobs_of_older_epochs(store: MetadataStore) -> None:
    await store.reserve(dataclasses.replace(_job("old", key="k1"), epoch=1), now=0.0)
    await store.reserve(dataclasses.replace(_job("none", key=None), epoch=None), now=0.0)
    await store.reserve(dataclasses.replace(_job("done", key="k2"), epoch=1), now=0.0)
    await store.reserve(dataclasses.replace(_job("mine", key="k3"), epoch=2), now=0.0)
    assert await store.finalize("done", _record("done", 0.0), b"ok", now=0.5)
    assert await store.expire_jobs_before_epoch(2, now=1.0) == ["none", "old"]
    assert await store.expire_jobs_before_epoch(2, now=1.0) == []
    mine = await store.get_job("mine")
    assert mine is not None and (mine.status, mine.epoch) == ("reserved", 2)


async def test_a_resend_takes_its_expired_job_over_under_the_same_id(
    store: MetadataStore,
) -> None:
    """Same id, key and body after an expiry: the job is reserved again (its usage stays
    unique by its id); another id with the key gets a new row, the old one its key released."""
    await store.reserve(dataclasses.replace(_job("r", key="k1"), epoch=1), now=0.0)
    assert await store.set_job_status("r", "running", now=0.5, worker_id="w1")
    assert await store.expire_jobs_before_epoch(2, now=1.0) == ["r"]
    again = await store.reserve(dataclasses.replace(_job("r", key="k1"), epoch=2), now=2.0)
    assert again.outcome == "created"
    job = again.job
    assert (job.request_id, job.status, job.epoch, job.worker_id) == ("r", "reserved", 2, None)
    assert (job.updated_s, job.expires_s) == (2.0, 100.0)
    assert (await store.reserve(_job("r", key="k1"), now=3.0)).outcome == "existing"
    # A different body under the key is still a conflict, expired or not.
    await store.expire_jobs_before_epoch(3, now=4.0)
    assert (await store.reserve(_job("r", key="k1", body="h2"), now=5.0)).outcome == "conflict"
    # Settling the revived job bills it once.
    assert await store.finalize("r", _record("r", 0.0, output=7), b"ok", now=6.0)
    assert not await store.finalize("r", _record("r", 0.0, output=7), b"ok", now=6.0)
    assert [u.output_tokens for u in await store.list_usage()] == [7]
