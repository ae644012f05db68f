"""The PostgreSQL backend (production), on an asyncpg connection pool.

Same migrations and statements as DuckDB (see :mod:`haif.runtime.store.base`);
blobs are ``BYTEA``, times ``DOUBLE PRECISION``, counts ``BIGINT``.

Race safety comes from the database, not from this process, so several
gateways / orchestrators can share one server:

- ``migrate`` runs in one transaction holding a transaction-scoped advisory
  lock, so concurrent starters apply each migration once.
- ``reserve`` runs ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` in a
  transaction (READ COMMITTED). A concurrent insert of the same
  ``(tenant, idempotency_key)`` makes the second insert wait for the first
  to commit and then insert nothing; the loser reads the winner's row back
  (a new statement, so it sees the commit) and reports existing/conflict.
- ``finalize`` inserts the usage row with ``ON CONFLICT (request_id) DO
  NOTHING RETURNING`` first; only the transaction whose insert returned a row
  goes on to mark the job and upsert the record, and all three commit
  together. A concurrent second finalize blocks on the first's uncommitted
  key and then inserts nothing, so usage is finalized exactly once.
- ``expire_reservations`` is one ``UPDATE ... RETURNING`` (row locks make a
  concurrent reconciler skip rows another one already expired).
"""

from __future__ import annotations

import zlib
from typing import Any

import asyncpg

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

#: Key of the advisory lock that serialises concurrent ``migrate()`` calls.
MIGRATION_LOCK_KEY = zlib.crc32(b"haif.runtime.store.migrate")
_RESERVE_TRIES = 5


class PostgresStore(MetadataStore):
    """Store on a PostgreSQL server; build it with :meth:`connect`."""

    def __init__(self, pool: Any, *, owns_pool: bool = True) -> None:
        self._pool = pool
        self._owns_pool = owns_pool
        self._closed = False

    @classmethod
    async def connect(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, **pool_kwargs: Any
    ) -> PostgresStore:
        """Open an asyncpg pool on ``dsn`` (``postgresql://user@host:port/db``)."""
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, **pool_kwargs)
        return cls(pool)

    async def _one(self, sql: str, *args: Any) -> Any:
        return await self._pool.fetchrow(sql, *args)

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._pool.fetch(sql, *args)
        return rows

    # ---------------------------------------------------------- lifecycle

    async def migrate(self) -> int:
        async with self._pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await con.execute(base.SCHEMA_VERSION_DDL)
            current = int(await con.fetchval(base.SELECT_SCHEMA_VERSION))
            for migration in base.MIGRATIONS:
                if migration.version > current:
                    for statement in migration.statements:
                        await con.execute(statement)
                    await con.execute(base.INSERT_SCHEMA_VERSION, migration.version, migration.name)
                    current = migration.version
        return current

    async def schema_version(self) -> int:
        async with self._pool.acquire() as con:
            exists = await con.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            if not exists:
                return 0
            return int(await con.fetchval(base.SELECT_SCHEMA_VERSION))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_pool:
            await self._pool.close()

    # ------------------------------------------------------------ records

    async def write_record(self, record: RequestRecord) -> None:
        await self._pool.execute(base.UPSERT_RECORD, *base.record_params(record))

    async def records(self) -> list[RequestRecord]:
        return [base.record_from_row(tuple(row)) for row in await self._all(base.SELECT_RECORDS)]

    # --------------------------------------------------------------- jobs

    async def reserve(self, job: JobRow, now: float) -> Reservation:
        params = base.job_params(job, now)
        for _ in range(_RESERVE_TRIES):
            async with self._pool.acquire() as con, con.transaction():
                if job.idempotency_key is not None:
                    await con.execute(base.RELEASE_EXPIRED_KEY, job.tenant, job.idempotency_key)
                inserted = await con.fetchrow(base.INSERT_JOB_IF_ABSENT, *params)
                if inserted is not None:
                    return Reservation("created", base.job_from_row(tuple(inserted)))
                existing = None
                if job.idempotency_key is not None:
                    existing = await con.fetchrow(
                        base.SELECT_JOB_BY_KEY, job.tenant, job.idempotency_key
                    )
                if existing is None:
                    existing = await con.fetchrow(base.SELECT_JOB, job.request_id)
            if existing is not None:
                return base.classify(job, base.job_from_row(tuple(existing)))
            # The row that blocked us vanished before we read it: try again.
        raise RuntimeError(f"could not reserve job {job.request_id!r}")

    async def set_job_status(
        self,
        request_id: str,
        status: JobStatus,
        now: float,
        worker_id: str | None = None,
        *,
        expires_s: float | None = None,
    ) -> bool:
        row = await self._one(
            base.SET_JOB_STATUS,
            request_id,
            base.check_status(status),
            float(now),
            worker_id,
            None if expires_s is None else float(expires_s),
        )
        return row is not None

    async def get_job(self, request_id: str) -> JobRow | None:
        row = await self._one(base.SELECT_JOB, request_id)
        return None if row is None else base.job_from_row(tuple(row))

    async def finalize(
        self, request_id: str, record: RequestRecord, result: bytes | None, now: float
    ) -> bool:
        usage = base.usage_params(request_id, record, now)
        async with self._pool.acquire() as con, con.transaction():
            if await con.fetchrow(base.INSERT_USAGE_ONCE, *usage) is None:
                return False  # already finalized; nothing was written
            await con.execute(
                base.FINISH_JOB, request_id, base.final_job_status(record), result, float(now)
            )
            await con.execute(base.UPSERT_RECORD, *base.record_params(record))
        return True

    async def expire_reservations(self, now: float) -> list[str]:
        rows = await self._all(base.EXPIRE_JOBS, float(now))
        return sorted(str(row[0]) for row in rows)

    # -------------------------------------------------------------- usage

    async def usage_totals(self, tenant: str) -> UsageTotals:
        row = await self._one(base.USAGE_TOTALS, tenant)
        return base.totals_from_row(None if row is None else tuple(row))

    async def list_usage(self, tenant: str | None = None) -> list[UsageRow]:
        if tenant is None:
            rows = await self._all(base.SELECT_USAGE)
        else:
            rows = await self._all(base.SELECT_USAGE_OF, tenant)
        return [base.usage_from_row(tuple(row)) for row in rows]

    # ------------------------------------------------------- dead letters

    async def add_dead_letter(self, dead: DeadLetter, request: Request, now: float) -> None:
        await self._pool.execute(
            base.UPSERT_DEAD_LETTER,
            dead.request_id,
            dead.reason,
            int(dead.attempts),
            encode(request),
            float(now),
        )

    async def list_dead_letters(self) -> list[DeadLetterRow]:
        rows = await self._all(base.SELECT_DEAD_LETTERS)
        return [base.dead_letter_from_row(tuple(row)) for row in rows]

    async def get_dead_letter(self, request_id: str) -> DeadLetterRow | None:
        row = await self._one(base.SELECT_DEAD_LETTER, request_id)
        return None if row is None else base.dead_letter_from_row(tuple(row))

    async def remove_dead_letter(self, request_id: str) -> bool:
        return await self._one(base.DELETE_DEAD_LETTER, request_id) is not None

    # ----------------------------------------------------------- api keys

    async def add_api_key(self, key_hash: str, tenant: str, name: str, now: float) -> bool:
        row = await self._one(base.INSERT_API_KEY, key_hash, tenant, name, float(now))
        return row is not None

    async def tenant_for_key(self, key_hash: str) -> str | None:
        row = await self._one(base.SELECT_TENANT_FOR_KEY, key_hash)
        return None if row is None else str(row[0])

    async def revoke_api_key(self, key_hash: str) -> bool:
        return await self._one(base.REVOKE_API_KEY, key_hash) is not None

    # ------------------------------------------------------------ workers

    async def upsert_worker(self, snapshot: WorkerSnapshot, url: str, now: float) -> None:
        await self._pool.execute(base.UPSERT_WORKER, *base.worker_params(snapshot, url, now))

    async def list_workers(self) -> list[tuple[WorkerSnapshot, str, float]]:
        return [base.worker_from_row(tuple(row)) for row in await self._all(base.SELECT_WORKERS)]

    # ------------------------------------------------------------- quotas

    async def set_quota(
        self,
        tenant: str,
        requests_per_min: int | None,
        tokens_per_min: int | None,
        max_concurrency: int | None,
    ) -> None:
        params = base.quota_params(tenant, requests_per_min, tokens_per_min, max_concurrency)
        await self._pool.execute(base.UPSERT_QUOTA, *params)

    async def quotas(self) -> dict[str, Quota]:
        return dict(base.quota_from_row(tuple(row)) for row in await self._all(base.SELECT_QUOTAS))
