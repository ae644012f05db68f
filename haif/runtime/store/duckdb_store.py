"""The embedded DuckDB backend (the zero-setup default).

DuckDB calls block, so every one of them (connect, migrate, queries, close)
runs on one dedicated thread. That thread also serialises them: a DuckDB
connection is not meant to be used from several threads at once, and since
only this process can open the file for writing, the thread is the only
writer. Multi-statement operations still run in explicit transactions
(``BEGIN`` ... ``COMMIT``, ``ROLLBACK`` on error) and rely on the same unique
constraints as PostgreSQL, so their semantics do not depend on the
serialisation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import duckdb

from haif.contracts import DeadLetter, Request, RequestRecord, WorkerSnapshot
from haif.runtime.store import base
from haif.runtime.store.base import (
    DeadLetterRow,
    JobRow,
    JobStatus,
    MetadataStore,
    Quota,
    Reservation,
    UsageRow,
    UsageTotals,
)
from haif.wire import encode

T = TypeVar("T")
P = ParamSpec("P")

_RESERVE_TRIES = 5


class DuckDBStore(MetadataStore):
    """Embedded store in one DuckDB file (or ``:memory:``).

    The constructor connects and applies the migrations, so
    ``DuckDBStore(path)`` is ready to use (as the orchestrator expects).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._closed = False
        try:
            self._con: duckdb.DuckDBPyConnection = self._pool.submit(
                duckdb.connect, self.path
            ).result()
            self._pool.submit(self._migrate).result()
        except BaseException:
            self._pool.shutdown(wait=True)
            raise

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._closed:
            raise RuntimeError(f"DuckDB store {self.path!r} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._con
        con.begin()
        try:
            yield con
        except BaseException:
            con.rollback()
            raise
        con.commit()

    def _one(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._con.execute(sql, params or []).fetchone()
        return row

    def _all(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._con.execute(sql, params or []).fetchall()
        return rows

    # ---------------------------------------------------------- lifecycle

    def _migrate(self) -> int:
        with self._transaction() as con:
            con.execute(base.SCHEMA_VERSION_DDL)
            row = con.execute(base.SELECT_SCHEMA_VERSION).fetchone()
            current = int(row[0]) if row else 0
            for migration in base.MIGRATIONS:
                if migration.version > current:
                    for statement in migration.statements:
                        con.execute(statement)
                    con.execute(base.INSERT_SCHEMA_VERSION, [migration.version, migration.name])
                    current = migration.version
        return current

    async def migrate(self) -> int:
        return await self._run(self._migrate)

    def _schema_version(self) -> int:
        row = self._one(base.SELECT_SCHEMA_VERSION)
        return int(row[0]) if row else 0

    async def schema_version(self) -> int:
        return await self._run(self._schema_version)

    async def close(self) -> None:
        if self._closed:
            return
        await self._run(self._con.close)
        self._closed = True
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ records

    def _write_record(self, record: RequestRecord) -> None:
        self._con.execute(base.UPSERT_RECORD, base.record_params(record))

    async def write_record(self, record: RequestRecord) -> None:
        await self._run(self._write_record, record)

    def _records(self) -> list[RequestRecord]:
        return [base.record_from_row(row) for row in self._all(base.SELECT_RECORDS)]

    async def records(self) -> list[RequestRecord]:
        return await self._run(self._records)

    # --------------------------------------------------------------- jobs

    def _reserve(self, job: JobRow, now: float) -> Reservation:
        params = base.job_params(job, now)
        for _ in range(_RESERVE_TRIES):
            with self._transaction() as con:
                if job.idempotency_key is not None:
                    con.execute(base.RELEASE_EXPIRED_KEY, [job.tenant, job.idempotency_key])
                inserted = con.execute(base.INSERT_JOB_IF_ABSENT, params).fetchone()
                if inserted is not None:
                    return Reservation("created", base.job_from_row(inserted))
                existing = None
                if job.idempotency_key is not None:
                    existing = con.execute(
                        base.SELECT_JOB_BY_KEY, [job.tenant, job.idempotency_key]
                    ).fetchone()
                if existing is None:
                    existing = con.execute(base.SELECT_JOB, [job.request_id]).fetchone()
            if existing is not None:
                return base.classify(job, base.job_from_row(existing))
        raise RuntimeError(f"could not reserve job {job.request_id!r}")

    async def reserve(self, job: JobRow, now: float) -> Reservation:
        return await self._run(self._reserve, job, now)

    def _set_job_status(
        self,
        request_id: str,
        status: JobStatus,
        now: float,
        worker_id: str | None,
        expires_s: float | None,
    ) -> bool:
        row = self._one(
            base.SET_JOB_STATUS,
            [
                request_id,
                base.check_status(status),
                float(now),
                worker_id,
                None if expires_s is None else float(expires_s),
            ],
        )
        return row is not None

    async def set_job_status(
        self,
        request_id: str,
        status: JobStatus,
        now: float,
        worker_id: str | None = None,
        *,
        expires_s: float | None = None,
    ) -> bool:
        return await self._run(self._set_job_status, request_id, status, now, worker_id, expires_s)

    def _get_job(self, request_id: str) -> JobRow | None:
        row = self._one(base.SELECT_JOB, [request_id])
        return None if row is None else base.job_from_row(row)

    async def get_job(self, request_id: str) -> JobRow | None:
        return await self._run(self._get_job, request_id)

    def _finalize(
        self, request_id: str, record: RequestRecord, result: bytes | None, now: float
    ) -> bool:
        usage = base.usage_params(request_id, record, now)
        with self._transaction() as con:
            if con.execute(base.INSERT_USAGE_ONCE, usage).fetchone() is None:
                return False  # already finalized: the (empty) transaction commits nothing
            con.execute(
                base.FINISH_JOB, [request_id, base.final_job_status(record), result, float(now)]
            )
            con.execute(base.UPSERT_RECORD, base.record_params(record))
        return True

    async def finalize(
        self, request_id: str, record: RequestRecord, result: bytes | None, now: float
    ) -> bool:
        return await self._run(self._finalize, request_id, record, result, now)

    def _expire(self, now: float) -> list[str]:
        with self._transaction() as con:
            rows = con.execute(base.EXPIRE_JOBS, [float(now)]).fetchall()
        return sorted(str(row[0]) for row in rows)

    async def expire_reservations(self, now: float) -> list[str]:
        return await self._run(self._expire, now)

    # -------------------------------------------------------------- usage

    def _usage_totals(self, tenant: str) -> UsageTotals:
        return base.totals_from_row(self._one(base.USAGE_TOTALS, [tenant]))

    async def usage_totals(self, tenant: str) -> UsageTotals:
        return await self._run(self._usage_totals, tenant)

    def _list_usage(self, tenant: str | None) -> list[UsageRow]:
        if tenant is None:
            rows = self._all(base.SELECT_USAGE)
        else:
            rows = self._all(base.SELECT_USAGE_OF, [tenant])
        return [base.usage_from_row(row) for row in rows]

    async def list_usage(self, tenant: str | None = None) -> list[UsageRow]:
        return await self._run(self._list_usage, tenant)

    # ------------------------------------------------------- dead letters

    def _add_dead_letter(self, dead: DeadLetter, request: Request, now: float) -> None:
        self._con.execute(
            base.UPSERT_DEAD_LETTER,
            [dead.request_id, dead.reason, int(dead.attempts), encode(request), float(now)],
        )

    async def add_dead_letter(self, dead: DeadLetter, request: Request, now: float) -> None:
        await self._run(self._add_dead_letter, dead, request, now)

    def _list_dead_letters(self) -> list[DeadLetterRow]:
        return [base.dead_letter_from_row(row) for row in self._all(base.SELECT_DEAD_LETTERS)]

    async def list_dead_letters(self) -> list[DeadLetterRow]:
        return await self._run(self._list_dead_letters)

    def _get_dead_letter(self, request_id: str) -> DeadLetterRow | None:
        row = self._one(base.SELECT_DEAD_LETTER, [request_id])
        return None if row is None else base.dead_letter_from_row(row)

    async def get_dead_letter(self, request_id: str) -> DeadLetterRow | None:
        return await self._run(self._get_dead_letter, request_id)

    def _remove_dead_letter(self, request_id: str) -> bool:
        return self._one(base.DELETE_DEAD_LETTER, [request_id]) is not None

    async def remove_dead_letter(self, request_id: str) -> bool:
        return await self._run(self._remove_dead_letter, request_id)

    # ----------------------------------------------------------- api keys

    def _add_api_key(self, key_hash: str, tenant: str, name: str, now: float) -> bool:
        return self._one(base.INSERT_API_KEY, [key_hash, tenant, name, float(now)]) is not None

    async def add_api_key(self, key_hash: str, tenant: str, name: str, now: float) -> bool:
        return await self._run(self._add_api_key, key_hash, tenant, name, now)

    def _tenant_for_key(self, key_hash: str) -> str | None:
        row = self._one(base.SELECT_TENANT_FOR_KEY, [key_hash])
        return None if row is None else str(row[0])

    async def tenant_for_key(self, key_hash: str) -> str | None:
        return await self._run(self._tenant_for_key, key_hash)

    def _revoke_api_key(self, key_hash: str) -> bool:
        return self._one(base.REVOKE_API_KEY, [key_hash]) is not None

    async def revoke_api_key(self, key_hash: str) -> bool:
        return await self._run(self._revoke_api_key, key_hash)

    # ------------------------------------------------------------ workers

    def _upsert_worker(self, snapshot: WorkerSnapshot, url: str, now: float) -> None:
        self._con.execute(base.UPSERT_WORKER, base.worker_params(snapshot, url, now))

    async def upsert_worker(self, snapshot: WorkerSnapshot, url: str, now: float) -> None:
        await self._run(self._upsert_worker, snapshot, url, now)

    def _list_workers(self) -> list[tuple[WorkerSnapshot, str, float]]:
        return [base.worker_from_row(row) for row in self._all(base.SELECT_WORKERS)]

    async def list_workers(self) -> list[tuple[WorkerSnapshot, str, float]]:
        return await self._run(self._list_workers)

    # ------------------------------------------------------------- quotas

    def _set_quota(self, params: list[Any]) -> None:
        self._con.execute(base.UPSERT_QUOTA, params)

    async def set_quota(
        self,
        tenant: str,
        requests_per_min: int | None,
        tokens_per_min: int | None,
        max_concurrency: int | None,
    ) -> None:
        params = base.quota_params(tenant, requests_per_min, tokens_per_min, max_concurrency)
        await self._run(self._set_quota, params)

    def _quotas(self) -> dict[str, Quota]:
        return dict(base.quota_from_row(row) for row in self._all(base.SELECT_QUOTAS))

    async def quotas(self) -> dict[str, Quota]:
        return await self._run(self._quotas)
