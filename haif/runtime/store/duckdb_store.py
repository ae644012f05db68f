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

The cost is per statement, not per row, as long as the rows do not come as
parameters (binding one costs ~10 us, ~0.2 ms for a record): a batch of
``ARROW_MIN_ROWS`` or more goes in as an Arrow table, so a statement of 50
rows costs about what one of 1 costs. The writes nobody waits for (all but
keyed reserves) therefore linger (``linger_s``, default
``DEFAULT_LINGER_S``) to share one transaction: ``bench/store_writes.py``
at 150 requests/s on 2 cores measured 6.2 ms of CPU per request without
lingering, 1.4 ms at 50 ms and 0.9 ms at 100 ms; at 200 requests/s, 1.6-1.7
ms at 50 ms and 0.7 ms at 200 ms. Those rows land up to ``linger_s`` later.
Nothing billed is lost meanwhile: a request's settlement (usage, record,
stored reply) is in the usage journal before its answer leaves
(:mod:`haif.runtime.journal`), and an orchestrator killed with ``-9``
writes it again when it starts; what a crash loses is the job rows and
status changes of requests still running, which the reconciler's lease
expiry covers as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from haif.runtime.store.sql_store import Row, SqlStore, Tx

T = TypeVar("T")

#: How long the writes after a request wait to share a transaction.
DEFAULT_LINGER_S = 0.2
#: From this many rows on, a multi-row write passes them as an Arrow table.
ARROW_MIN_ROWS = 8


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

    async def fetch_rows(
        self,
        statement: Callable[[str], str],
        rows: Sequence[Sequence[Any]],
        casts: tuple[str, ...] = (),
    ) -> list[Row]:
        if len(rows) < ARROW_MIN_ROWS:
            return await super().fetch_rows(statement, rows, casts)
        con = self._store._con
        sql = statement("SELECT * FROM haif_batch_rows")
        table = pa.table({f"c{i}": [row[i] for row in rows] for i in range(len(rows[0]))})

        def run() -> list[Row]:
            # DuckDB finds the table by this local's name (a replacement scan):
            # half the cost of register() + unregister().
            haif_batch_rows = table  # noqa: F841
            found: list[Row] = con.execute(sql).fetchall()
            return found

        return await self._store._run(run)


class DuckDBStore(SqlStore):
    """Embedded store in one DuckDB file (or ``:memory:``).

    The constructor connects and applies the migrations, so
    ``DuckDBStore(path)`` is ready to use (as the orchestrator expects).
    """

    plain_insert_first = True  # its ON CONFLICT ... RETURNING doubles an insert's cost

    def __init__(
        self,
        path: str | Path,
        *,
        max_batch: int = 128,
        linger_s: float = DEFAULT_LINGER_S,
        threads: int = 1,
    ) -> None:
        super().__init__(max_batch=max_batch, max_in_flight=1, linger_s=linger_s)  # one connection
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._tx = _DuckTx(self)
        self._lock = asyncio.Lock()
        try:
            # One thread: its statements are small, and DuckDB's worker
            # threads would only contend with the event loop for the cores.
            self._con: duckdb.DuckDBPyConnection = self._pool.submit(
                duckdb.connect, self.path, config={"threads": threads}
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
