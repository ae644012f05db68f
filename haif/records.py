"""The request-record table both shells write (Parquet), and its summary.

One Arrow schema, derived from :class:`haif.contracts.RequestRecord`, so a
report, a notebook or a comparison reads a simulated run and a live run the
same way. Latency is ``finish_s - arrival_s`` (what the client waited).

The file (:data:`FILE_SCHEMA`) has the record's columns (:data:`SCHEMA`)
and then columns a shell fills where it knows them and leaves null
otherwise:

``prefix_hit_tokens``
    prompt tokens (with the response tokens a resumed attempt recomputes)
    that the serving attempt found in its worker's prefix cache and did not
    prefill, counted at its last admission to the batch (a preempted
    sequence is looked up again). Null where unknown: a worker without a
    prefix cache, a request no worker ran, a live cluster's records.

Files written before a column existed are read as well (it is then absent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from haif.contracts import RequestRecord

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("origin_region", pa.string()),
        ("served_region", pa.string()),
        ("worker_id", pa.string()),
        ("gpu_class", pa.string()),
        ("arrival_s", pa.float64()),
        ("admitted_s", pa.float64()),
        ("first_token_s", pa.float64()),
        ("finish_s", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("attempts", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("cold_start", pa.bool_()),
        ("cost", pa.float64()),
    ]
)
assert SCHEMA.names == [f.name for f in dataclasses.fields(RequestRecord)]

PREFIX_HIT_TOKENS = "prefix_hit_tokens"
EXTRA_COLUMNS = pa.schema([(PREFIX_HIT_TOKENS, pa.int64())])
"""Columns after the record's own, null where a shell does not know them (module docstring)."""

FILE_SCHEMA = pa.schema([*SCHEMA, *EXTRA_COLUMNS])
"""The columns of ``records.parquet``."""


def to_table(
    records: Iterable[RequestRecord], prefix_hit_tokens: Mapping[str, int | None] | None = None
) -> pa.Table:
    """The records as a table of :data:`FILE_SCHEMA`; ``prefix_hit_tokens`` maps request
    ids to their hit tokens (absent ids, or no mapping: null)."""
    listed = list(records)
    rows = [dataclasses.astuple(r) for r in listed]
    columns = [[row[i] for row in rows] for i in range(len(SCHEMA.names))]
    hits = prefix_hit_tokens or {}
    columns.append([hits.get(r.request_id) for r in listed])
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, FILE_SCHEMA, strict=True)],
        schema=FILE_SCHEMA,
    )


def write_parquet(
    records: Iterable[RequestRecord],
    path: str | Path,
    *,
    prefix_hit_tokens: Mapping[str, int | None] | None = None,
) -> Path:
    """Write records sorted by (arrival, id) so the same run gives the same bytes."""
    ordered = sorted(records, key=lambda r: (r.arrival_s, r.request_id))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(ordered, prefix_hit_tokens), path, compression="zstd")
    return path


def read_parquet(path: str | Path) -> list[RequestRecord]:
    """The records of a file of :data:`FILE_SCHEMA` (or of an older one, with fewer
    extra columns); the extra columns are not part of a record."""
    table = pq.read_table(path)
    names = table.schema.names
    known = FILE_SCHEMA.names
    if names[: len(SCHEMA.names)] != SCHEMA.names or names != known[: len(names)]:
        raise ValueError(f"{path}: not a HAIF request-record file (columns {names})")
    return [RequestRecord(**row) for row in table.select(SCHEMA.names).to_pylist()]


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Headline figures: counts by status, success rate, latency percentiles."""
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    ok = [r for r in records if r.status == "ok"]
    latency = [r.finish_s - r.arrival_s for r in ok]
    ttft = [r.first_token_s - r.arrival_s for r in ok if r.first_token_s is not None]
    return {
        "requests": len(records),
        "by_status": dict(sorted(by_status.items())),
        "success_rate": len(ok) / len(records) if records else None,
        "latency_p50_s": _pct(latency, 50),
        "latency_p99_s": _pct(latency, 99),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "retried": sum(1 for r in records if r.attempts > 1),
        "cost": float(sum(r.cost for r in records)),
    }
