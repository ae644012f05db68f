"""The embedded DuckDB backend (the zero-setup default).

DuckDB calls block, so every one of them (connect, statements, close) runs
on one dedicated thread. That thread also serialises them: a DuckDB
connection is not meant to be used from several threads at once, and since
only this process can open the file for writing, the thread is the only
writer. An ``asyncio.Lock`` keeps a transaction's statements together (no
other statement runs on the connection between its ``BEGIN`` and
``COMMIT``), so multi-statement operations are atomic and rely on the same
unique constraints as PostgreSQL; their semantics do not depend on the
serialisation.

DuckDB pays milliseconds per statement and per commit, so the request-path
writes are group-committed (:mod:`~haif.runtime.store.sql_store`): one
transaction and one multi-row statement per kind of write per batch. (A
second connection for the reserves, so that they would not queue behind
finalizes, was measured and dropped: two DuckDB connections writing side by
side on two cores made the reserve p99 several times worse.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from haif.runtime.store.sql_store import Row, SqlStore, Tx

T = TypeVar("T")


class _DuckTx(Tx):
    def __init__(self, store: DuckDBStore) -> None:
        self._store = store

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        con = self._store._con
        values = list(params)

        def run() -> list[Row]:
            rows: list[Row] = con.execute(sql, values).fetchall()
            return rows

        return await self._store._run(run)


class DuckDBStore(SqlStore):
    """Embedded store in one DuckDB file (or ``:memory:``).

    The constructor connects and applies the migrations, so
    ``DuckDBStore(path)`` is ready to use (as the orchestrator expects).
    """

    plain_insert_first = True  # its ON CONFLICT ... RETURNING doubles an insert's cost

    def __init__(self, path: str | Path, *, max_batch: int = 128) -> None:
        super().__init__(max_batch=max_batch, max_in_flight=1)  # one connection
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._tx = _DuckTx(self)
        self._lock = asyncio.Lock()
        try:
            self._con: duckdb.DuckDBPyConnection = self._pool.submit(
                duckdb.connect, self.path
            ).result()
            # The shared async migrate(), on its own loop: the caller may be in one.
            with ThreadPoolExecutor(max_workers=1) as once:
                once.submit(asyncio.run, self.migrate()).result()
        except BaseException:
            self._pool.shutdown(wait=True)
            raise
        self._lock = asyncio.Lock()  # a fresh one for the caller's loop

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError(f"DuckDB store {self.path!r} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    @asynccontextmanager
    async def _transaction(self, *, reserves: bool = False) -> AsyncIterator[Tx]:
        async with self._lock:
            await self._run(self._con.begin)
            try:
                yield self._tx
            except BaseException:
                await self._run(self._con.rollback)
                raise
            await self._run(self._con.commit)

    @asynccontextmanager
    async def _connection(self, *, reserves: bool = False) -> AsyncIterator[Tx]:
        async with self._lock:
            yield self._tx

    async def _close_backend(self) -> None:
        await self._run(self._con.close)
        self._pool.shutdown(wait=True)
