"""The PostgreSQL backend (production), on an asyncpg connection pool.

Same migrations, statements and method bodies as DuckDB (see
:mod:`haif.runtime.store.base` and :mod:`haif.runtime.store.sql_store`);
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
  NOTHING RETURNING`` first; only a request whose insert returned a row
  goes on to mark the job and upsert the record, and all three commit
  together. A concurrent second finalize blocks on the first's uncommitted
  key and then inserts nothing, so usage is finalized exactly once.
- ``expire_reservations`` is one ``UPDATE ... RETURNING`` (row locks make a
  concurrent reconciler skip rows another one already expired).

Request-path writes are group-committed (several batches may be in flight,
each on its own pooled connection); a batch that hits a deadlock with
another orchestrator's batch is retried one write at a time.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from haif.runtime.store.sql_store import Row, SqlStore, Tx

#: Key of the advisory lock that serialises concurrent ``migrate()`` calls.
MIGRATION_LOCK_KEY = zlib.crc32(b"haif.runtime.store.migrate")
#: Write batches committed at once per lane (reserves, other writes), each on
#: one pooled connection.
BATCHES_IN_FLIGHT = 4


class _PgTx(Tx):
    def __init__(self, con: Any) -> None:
        self._con = con

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(row) for row in await self._con.fetch(sql, *params)]


class PostgresStore(SqlStore):
    """Store on a PostgreSQL server; build it with :meth:`connect`."""

    def __init__(
        self,
        pool: Any,
        *,
        owns_pool: bool = True,
        max_batch: int = 128,
        batches_in_flight: int = BATCHES_IN_FLIGHT,
        linger_s: float = 0.0,
    ) -> None:
        super().__init__(
            max_batch=max_batch,
            max_in_flight=batches_in_flight,
            per_lane=True,
            linger_s=linger_s,
        )
        self._pool = pool
        self._owns_pool = owns_pool

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        linger_s: float = 0.0,
        **pool_kwargs: Any,
    ) -> PostgresStore:
        """Open an asyncpg pool on ``dsn`` (``postgresql://user@host:port/db``)."""
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, **pool_kwargs)
        in_flight = max(1, min(BATCHES_IN_FLIGHT, (max_size - 1) // 2))  # a connection for reads
        return cls(pool, batches_in_flight=in_flight, linger_s=linger_s)

    @asynccontextmanager
    async def _transaction(self, *, reserves: bool = False) -> AsyncIterator[Tx]:
        async with self._pool.acquire() as con, con.transaction():
            yield _PgTx(con)

    @asynccontextmanager
    async def _connection(self, *, reserves: bool = False) -> AsyncIterator[Tx]:
        async with self._pool.acquire() as con:
            yield _PgTx(con)

    async def _lock_migrations(self, tx: Tx) -> None:
        await tx.fetch("SELECT pg_advisory_xact_lock($1)", [MIGRATION_LOCK_KEY])

    async def _close_backend(self) -> None:
        if self._owns_pool:
            await self._pool.close()
