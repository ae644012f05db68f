"""The metadata store: request records and dead letters (embedded DuckDB).

One async interface (:class:`MetadataStore`); the embedded DuckDB backend is
the zero-setup default. DuckDB calls block, so they run on one dedicated
thread, which also serialises them (a DuckDB connection is not meant to be
used from several threads at once). The PostgreSQL backend and the other
tables (jobs, workers, quotas, API keys, usage) come with the runtime issue.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import duckdb

from haif.contracts import DeadLetter, Request, RequestRecord
from haif.records import write_parquet
from haif.wire import encode

T = TypeVar("T")

_MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS requests (
        request_id VARCHAR PRIMARY KEY, tenant VARCHAR, model VARCHAR,
        origin_region VARCHAR, served_region VARCHAR, worker_id VARCHAR,
        gpu_class VARCHAR, arrival_s DOUBLE, admitted_s DOUBLE,
        first_token_s DOUBLE, finish_s DOUBLE, prompt_tokens BIGINT,
        output_tokens BIGINT, attempts BIGINT, status VARCHAR, reason VARCHAR,
        cold_start BOOLEAN, cost DOUBLE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS dead_letters (
        request_id VARCHAR PRIMARY KEY, reason VARCHAR, attempts BIGINT,
        request BLOB, created_s DOUBLE
    )
    """,
)
_FIELDS = [f.name for f in dataclasses.fields(RequestRecord)]


class MetadataStore(Protocol):
    async def write_record(self, record: RequestRecord) -> None: ...
    async def add_dead_letter(self, dead: DeadLetter, request: Request, now: float) -> None: ...
    async def records(self) -> list[RequestRecord]: ...
    async def close(self) -> None: ...


class DuckDBStore:
    """Embedded store in one DuckDB file (or ``:memory:``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._con = duckdb.connect(self.path)
        for sql in _MIGRATIONS:
            self._con.execute(sql)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _insert_record(self, record: RequestRecord) -> None:
        placeholders = ", ".join("?" for _ in _FIELDS)
        # Finalization is idempotent: a record written twice stays one row.
        self._con.execute(
            f"INSERT OR REPLACE INTO requests ({', '.join(_FIELDS)}) VALUES ({placeholders})",
            list(dataclasses.astuple(record)),
        )

    async def write_record(self, record: RequestRecord) -> None:
        await self._run(self._insert_record, record)

    async def add_dead_letter(self, dead: DeadLetter, request: Request, now: float) -> None:
        await self._run(
            self._con.execute,
            "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
            [dead.request_id, dead.reason, dead.attempts, encode(request), now],
        )

    def _select_records(self) -> list[RequestRecord]:
        rows = self._con.execute(
            f"SELECT {', '.join(_FIELDS)} FROM requests ORDER BY arrival_s, request_id"
        ).fetchall()
        return [RequestRecord(*row) for row in rows]

    async def records(self) -> list[RequestRecord]:
        result: list[RequestRecord] = await self._run(self._select_records)
        return result

    async def export_parquet(self, path: str | Path) -> Path:
        """Write the records in the simulator's Parquet schema."""
        return write_parquet(await self.records(), path)

    async def close(self) -> None:
        await self._run(self._con.close)
        self._pool.shutdown(wait=True)
