"""The metadata store: one async interface, two backends, the same migrations.

- :class:`DuckDBStore` — embedded DuckDB file (default, zero setup);
  ``DuckDBStore(path)`` connects and migrates on construction.
- :class:`PostgresStore` — PostgreSQL through an asyncpg pool.

Both are a :class:`~haif.runtime.store.sql_store.SqlStore`: the method bodies
and statements are shared, and the request-path writes (``reserve``,
``set_job_status``, ``finalize``, ``write_record``) are group-committed, one
transaction per batch of concurrent calls (``store.batch_stats`` counts them).

:func:`open_store` picks the backend from a URL and returns a migrated store::

    store = await open_store("duckdb:///var/lib/haif/store.duckdb")
    store = await open_store("postgresql://postgres@127.0.0.1:5432/haif")
"""

from __future__ import annotations

import re
from typing import Any

from haif.runtime.store.base import (
    JOB_STATUSES,
    LATEST_VERSION,
    MIGRATIONS,
    ApiKeyRow,
    DeadLetterRow,
    JobRow,
    JobStatus,
    MetadataStore,
    Migration,
    Quota,
    Reservation,
    ReserveOutcome,
    UsageRow,
    UsageTotals,
)
from haif.runtime.store.duckdb_store import DEFAULT_LINGER_S, DuckDBStore
from haif.runtime.store.group_commit import BatchStats
from haif.runtime.store.postgres_store import PostgresStore
from haif.runtime.store.sql_store import SqlStore

__all__ = [
    "JOB_STATUSES",
    "LATEST_VERSION",
    "MIGRATIONS",
    "ApiKeyRow",
    "BatchStats",
    "DeadLetterRow",
    "DuckDBStore",
    "JobRow",
    "JobStatus",
    "MetadataStore",
    "Migration",
    "PostgresStore",
    "Quota",
    "Reservation",
    "ReserveOutcome",
    "SqlStore",
    "UsageRow",
    "UsageTotals",
    "open_store",
    "store_backend",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_ALLOWED = "duckdb:///path/to/file.duckdb, a plain file path, ':memory:' or postgresql://..."


def store_backend(url: str) -> tuple[str, str]:
    """``(backend, target)`` for a store URL: ``("duckdb", path)`` or ``("postgres", dsn)``.

    ``duckdb://`` is followed by the path as written: ``duckdb:///abs/file.duckdb``
    is absolute, ``duckdb://rel/file.duckdb`` relative, ``duckdb://:memory:``
    in memory. Raises :class:`ValueError` for any other scheme.
    """
    if not url:
        raise ValueError(f"empty store URL; use {_ALLOWED}")
    match = _SCHEME.match(url)
    if match is None:
        return "duckdb", url
    scheme = match.group(1).lower()
    if scheme == "duckdb":
        path = url[match.end() :]
        if path in ("", "/"):
            raise ValueError(f"store URL {url!r} names no file; use {_ALLOWED}")
        return "duckdb", ":memory:" if path in (":memory:", "/:memory:") else path
    if scheme in ("postgresql", "postgres"):
        return "postgres", url
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use {_ALLOWED}")


async def open_store(url: str, *, linger_s: float | None = None, **options: Any) -> MetadataStore:
    """Open and migrate the store ``url`` names (see :func:`store_backend`).

    ``linger_s``: how long the writes nobody waits for gather before they
    commit (see :class:`~haif.runtime.store.group_commit.GroupCommit`);
    ``None`` is the backend's default (DuckDB ``DEFAULT_LINGER_S``,
    PostgreSQL 0). ``options`` go to :meth:`PostgresStore.connect` (pool
    sizes, timeouts).
    """
    backend, target = store_backend(url)
    store: MetadataStore
    if backend == "duckdb":
        if options:
            raise ValueError(f"DuckDB store takes no options, got {sorted(options)}")
        store = DuckDBStore(target, linger_s=DEFAULT_LINGER_S if linger_s is None else linger_s)
    else:
        store = await PostgresStore.connect(target, linger_s=linger_s or 0.0, **options)
    try:
        await store.migrate()
    except BaseException:
        await store.close()
        raise
    return store
