"""Per-second time series of a run, for plots and for the report's Parquet files.

:func:`per_second` bins a run's :class:`~haif.contracts.RequestRecord` list
into one row per whole second ``t`` of simulated time, covering the half-open
interval ``[t, t + 1)``; :func:`utilization_frame` turns the simulator's
per-worker busy samples into a table; :func:`write_timeseries` writes either
frame as Parquet with stable bytes.

Conventions (shared with :mod:`haif.records`):

* latency (``e2e``) is ``finish_s - arrival_s`` and TTFT is
  ``first_token_s - arrival_s``, both in seconds;
* an event at time ``x`` falls in second ``floor(x)``; events outside
  ``[0, ceil(end_s))`` are not counted in any row (``in_flight`` still counts
  a request that arrived before 0 or finishes after the frame ends);
* completions, errors, tokens, percentiles, SLO attainment and
  ``served_<region>`` are binned by ``finish_s``; ``arrivals`` by
  ``arrival_s``;
* percentiles use linear interpolation, identical to ``numpy.percentile``.

Everything is vectorised with numpy (one pass to pull the fields out of the
records, then ``bincount`` / ``lexsort``), so 20k records over an hour of
simulated time take a few milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from haif.contracts import RequestRecord

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

BASE_COLUMNS: tuple[str, ...] = (
    "t",
    "arrivals",
    "completed_ok",
    "errors",
    "error_rate",
    "output_tokens_per_s",
    "in_flight",
    "e2e_p50_s",
    "e2e_p99_s",
    "ttft_p50_s",
    "slo_attainment",
)
"""The per-second columns, in order; ``served_<region>`` columns follow."""

UTILIZATION_COLUMNS: tuple[str, ...] = ("t", "worker_id", "region", "gpu_class", "busy_fraction")

SERVED_PREFIX = "served_"


def served_column(region: str) -> str:
    """The per-second column holding ok completions served by ``region``."""
    return f"{SERVED_PREFIX}{region}"


def _unique(items: Sequence[str]) -> list[str]:
    """``items`` without repeats, first occurrence kept (a deterministic order)."""
    return list(dict.fromkeys(items))


def _group_quantile(bins: IntArray, values: FloatArray, n: int, q: float) -> FloatArray:
    """The ``q`` quantile (0..1) of ``values`` per bin in ``[0, n)``; NaN for empty bins.

    Sorts once by (bin, value) and interpolates linearly between order
    statistics exactly as ``numpy.percentile(..., method="linear")`` does.
    """
    out = np.full(n, np.nan)
    if bins.size == 0:
        return out
    order = np.lexsort((values, bins))
    v = values[order]
    groups, start, counts = np.unique(bins[order], return_index=True, return_counts=True)
    pos = q * (counts - 1).astype(np.float64)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    frac = pos - lo
    below = v[start + lo]
    above = v[start + hi]
    diff = above - below
    # numpy's _lerp: interpolate from the nearer end, for bit-identical results.
    out[groups] = np.where(frac >= 0.5, above - diff * (1.0 - frac), below + diff * frac)
    return out


def _empty_frame(regions: Sequence[str]) -> pd.DataFrame:
    columns = [*BASE_COLUMNS, *(served_column(r) for r in regions)]
    return pd.DataFrame({c: np.zeros(0, dtype=_dtype(c)) for c in columns})


def _dtype(column: str) -> type[np.generic]:
    floats = {"error_rate", "e2e_p50_s", "e2e_p99_s", "ttft_p50_s", "slo_attainment"}
    return np.float64 if column in floats else np.int64


def per_second(
    records: Sequence[RequestRecord],
    end_s: float,
    regions: Sequence[str] = (),
    slo_ttft_s: float | None = None,
    slo_e2e_s: float | None = None,
) -> pd.DataFrame:
    """One row per second ``t`` in ``[0, ceil(end_s))`` summarising ``records``.

    Columns, in this order (counts are int64, the rest float64):

    ``t``
        start of the second.
    ``arrivals``
        requests whose ``arrival_s`` falls in ``[t, t + 1)``.
    ``completed_ok`` / ``errors``
        requests finishing in the second with status ``ok`` / any other status.
    ``error_rate``
        ``errors / (completed_ok + errors)``; 0 when nothing finished.
    ``output_tokens_per_s``
        output tokens of the ok requests finishing in the second.
    ``in_flight``
        requests with ``arrival_s < t + 1 <= finish_s`` (arrived, not finished
        at the end of the second).
    ``e2e_p50_s`` / ``e2e_p99_s`` / ``ttft_p50_s``
        percentiles over the ok requests finishing in the second (TTFT only
        over those with a first token); NaN when there are none.
    ``slo_attainment``
        fraction of requests finishing in the second that are ok and meet
        ``ttft <= slo_ttft_s`` and ``e2e <= slo_e2e_s`` (each only when given;
        an ok request without a first token misses a TTFT SLO); NaN when
        nothing finished.
    ``served_<region>``
        ok completions served by ``region``, one column per entry of
        ``regions`` (order kept, repeats dropped); other regions are ignored.
    """
    regions = _unique(regions)
    n = max(0, math.ceil(end_s)) if math.isfinite(end_s) else 0
    if n == 0:
        return _empty_frame(regions)

    count = len(records)
    arrival = np.fromiter((r.arrival_s for r in records), np.float64, count)
    finish = np.fromiter((r.finish_s for r in records), np.float64, count)
    first = np.fromiter(
        (math.nan if r.first_token_s is None else r.first_token_s for r in records),
        np.float64,
        count,
    )
    ok = np.fromiter((r.status == "ok" for r in records), np.bool_, count)
    tokens = np.fromiter((r.output_tokens for r in records), np.int64, count)
    region_index = {region: i for i, region in enumerate(regions)}
    served = np.fromiter(
        (region_index.get(r.served_region or "", -1) for r in records), np.int64, count
    )

    arrival_bin = np.floor(arrival).astype(np.int64)
    finish_bin = np.floor(finish).astype(np.int64)
    a_in = (arrival_bin >= 0) & (arrival_bin < n)
    f_in = (finish_bin >= 0) & (finish_bin < n)
    ok_in = f_in & ok
    err_in = f_in & ~ok

    def counts(mask: BoolArray, weights: npt.NDArray[np.int64] | None = None) -> IntArray:
        bins = finish_bin[mask]
        if weights is None:
            return np.bincount(bins, minlength=n).astype(np.int64)
        return np.rint(np.bincount(bins, weights[mask], minlength=n)).astype(np.int64)

    arrivals = np.bincount(arrival_bin[a_in], minlength=n).astype(np.int64)
    completed_ok = counts(ok_in)
    errors = counts(err_in)
    finished = completed_ok + errors
    with np.errstate(divide="ignore", invalid="ignore"):
        error_rate = np.where(finished > 0, errors / np.maximum(finished, 1), 0.0)

    # in flight at the end of second t: arrived before t + 1, not finished before t + 1.
    edges = np.arange(1, n + 1, dtype=np.float64)
    in_flight = np.searchsorted(np.sort(arrival), edges, side="left") - np.searchsorted(
        np.sort(finish), edges, side="left"
    )

    e2e = finish - arrival
    ttft = first - arrival
    has_ttft = ok_in & ~np.isnan(ttft)

    met = ok_in.copy()
    if slo_ttft_s is not None:
        met &= ~np.isnan(ttft) & (ttft <= slo_ttft_s)
    if slo_e2e_s is not None:
        met &= e2e <= slo_e2e_s
    met_count = counts(met)
    with np.errstate(divide="ignore", invalid="ignore"):
        slo = np.where(finished > 0, met_count / np.maximum(finished, 1), np.nan)

    columns: dict[str, npt.NDArray[np.generic]] = {
        "t": np.arange(n, dtype=np.int64),
        "arrivals": arrivals,
        "completed_ok": completed_ok,
        "errors": errors,
        "error_rate": error_rate.astype(np.float64),
        "output_tokens_per_s": counts(ok_in, tokens),
        "in_flight": in_flight.astype(np.int64),
        "e2e_p50_s": _group_quantile(finish_bin[ok_in], e2e[ok_in], n, 0.5),
        "e2e_p99_s": _group_quantile(finish_bin[ok_in], e2e[ok_in], n, 0.99),
        "ttft_p50_s": _group_quantile(finish_bin[has_ttft], ttft[has_ttft], n, 0.5),
        "slo_attainment": slo.astype(np.float64),
    }
    for i, region in enumerate(regions):
        columns[served_column(region)] = counts(ok_in & (served == i))
    return pd.DataFrame(columns)


def utilization_frame(
    samples: Sequence[tuple[float, str, str, str, float]],
) -> pd.DataFrame:
    """Busy-fraction samples ``(t, worker_id, region, gpu_class, busy_fraction)`` as a table.

    Rows are sorted by ``(t, worker_id)`` (stable), so the frame does not
    depend on the order workers were sampled in; ``t`` and ``busy_fraction``
    are float64, the other columns strings.
    """
    frame = pd.DataFrame(
        {
            "t": np.fromiter((s[0] for s in samples), np.float64, len(samples)),
            "worker_id": pd.Series([s[1] for s in samples], dtype="str"),
            "region": pd.Series([s[2] for s in samples], dtype="str"),
            "gpu_class": pd.Series([s[3] for s in samples], dtype="str"),
            "busy_fraction": np.fromiter((s[4] for s in samples), np.float64, len(samples)),
        },
        columns=list(UTILIZATION_COLUMNS),
    )
    return frame.sort_values(["t", "worker_id"], kind="stable").reset_index(drop=True)


def write_timeseries(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as Parquet (zstd); the same data gives the same bytes.

    The index is dropped and the pandas schema metadata stripped, so the file
    depends only on the column names, types and values (and the pyarrow
    version that writes it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, path, compression="zstd")
    return path
