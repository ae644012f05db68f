"""``haif compare``: two or more runs side by side.

A *run folder* is what ``haif sim`` writes (``records.parquet``,
``timeseries.parquet``, ``utilization.parquet``, ``summary.json``, ...) or
what a live cluster exports: only ``records.parquet`` is required, because
that is the one schema both shells write (:mod:`haif.records`).
:func:`load_run` checks a folder and raises :class:`~haif.configfile.ConfigError`
naming the folder and what is missing or malformed.

:func:`run_metrics` computes the headline figures of a run (:data:`METRICS`):

* from ``records.parquet``: requests, success rate, TTFT and end-to-end
  p50 / p90 / p99 of ok requests (linear interpolation, the same numbers
  :func:`haif.records.summarize` gives for p50 / p99), requests retried,
  cost attributed to requests;
* from ``summary.json`` when the folder has one: goodput (ok output tokens
  per second of the scenario's duration), SLO attainment, dead-lettered
  requests, provisioned cost, mean GPU utilization.

Without ``summary.json`` goodput is taken over the span of the arrivals,
dead-lettered requests are the records with status ``dead_lettered``, GPU
utilization comes from ``utilization.parquet`` if present, and what cannot
be known (SLO attainment, provisioned cost) is ``None``, shown as ``n/a``.

:func:`compare_runs` lines runs up against the first one (absolute and
relative deltas); :func:`print_comparison` prints a rich table, and
:func:`write_comparison` writes ``compare.md`` with two figures:

``compare_latency_cdf.png``
    TTFT and end-to-end latency CDFs of ok requests, one line per run.
``compare_timeseries.png``
    Throughput (ok completions/s), error rate and end-to-end p99 per second,
    one line per run, each run's fault windows (``summary.json``
    ``fault_windows``) shaded in its colour. A run without
    ``timeseries.parquet`` is binned from its records
    (:func:`haif.sim.timeseries.per_second`); without ``summary.json`` its
    time axis starts at its first arrival.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.patches import Patch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from haif.configfile import ConfigError
from haif.contracts import RequestRecord
from haif.records import SCHEMA
from haif.sim.plots import (
    FAULT_COLOR,
    MIN_LOG_S,
    REGION_PALETTE,
    TALL,
    WIDE,
    _figure,
    _no_data,
    _save,
)
from haif.sim.timeseries import per_second

FloatArray = npt.NDArray[np.float64]
Fault = tuple[float, float, str]
Unit = Literal["ratio", "seconds", "count", "rate", "dollars"]
Better = Literal["higher", "lower"]

RECORDS = "records.parquet"
TIMESERIES = "timeseries.parquet"
UTILIZATION = "utilization.parquet"
SUMMARY = "summary.json"
RUN_FILES: tuple[str, ...] = (RECORDS, TIMESERIES, UTILIZATION, SUMMARY)
"""The files of a run folder; only ``records.parquet`` is required."""

TIMESERIES_COLUMNS: tuple[str, ...] = ("t", "completed_ok", "errors", "e2e_p99_s")
"""Columns ``timeseries.parquet`` must have for the comparison figures."""

CDF_FIGURE = "compare_latency_cdf.png"
TIMESERIES_FIGURE = "compare_timeseries.png"
MARKDOWN = "compare.md"


@dataclass(frozen=True)
class MetricSpec:
    """One row of the comparison: its key, how to print it, which way is better."""

    key: str
    label: str
    unit: Unit
    better: Better | None
    short: str = ""

    @property
    def short_label(self) -> str:
        """A compact label for the terminal table."""
        return self.short or self.label


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("requests", "requests", "count", None),
    MetricSpec("success_rate", "success rate", "ratio", "higher"),
    MetricSpec(
        "goodput_tokens_per_s", "goodput (ok output tokens/s)", "rate", "higher", "goodput tok/s"
    ),
    MetricSpec("ttft_p50_s", "TTFT p50", "seconds", "lower"),
    MetricSpec("ttft_p90_s", "TTFT p90", "seconds", "lower"),
    MetricSpec("ttft_p99_s", "TTFT p99", "seconds", "lower"),
    MetricSpec("latency_p50_s", "end-to-end p50", "seconds", "lower", "E2E p50"),
    MetricSpec("latency_p90_s", "end-to-end p90", "seconds", "lower", "E2E p90"),
    MetricSpec("latency_p99_s", "end-to-end p99", "seconds", "lower", "E2E p99"),
    MetricSpec("slo_attainment", "SLO attainment", "ratio", "higher", "SLO met"),
    MetricSpec("retried", "requests retried", "count", "lower", "retried"),
    MetricSpec("dead_letters", "dead-lettered", "count", "lower"),
    MetricSpec("cost", "cost attributed to requests", "dollars", "lower", "cost (requests)"),
    MetricSpec("provisioned_cost", "cost provisioned", "dollars", "lower", "cost (fleet)"),
    MetricSpec("gpu_utilization", "mean GPU utilization", "ratio", None, "GPU util"),
)
"""Every metric :func:`run_metrics` returns, in table order (keys as in ``summary.json``)."""

METRIC_BY_KEY: dict[str, MetricSpec] = {m.key: m for m in METRICS}

Metrics = dict[str, float | None]


# ------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Run:
    """A loaded run folder. ``summary`` / ``timeseries`` / ``utilization`` may be absent."""

    path: Path
    records: pa.Table
    summary: Mapping[str, Any] | None = None
    timeseries: pd.DataFrame | None = None
    utilization: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        """The folder's name (the ``run`` column of ``haif query``)."""
        return self.path.resolve().name

    @property
    def missing(self) -> list[str]:
        """Optional files of a ``haif sim`` run this folder does not have."""
        have = {
            TIMESERIES: self.timeseries is not None,
            UTILIZATION: self.utilization is not None,
            SUMMARY: self.summary is not None,
        }
        return [name for name, present in have.items() if not present]

    @property
    def fault_windows(self) -> list[Fault]:
        """``(start_s, end_s, label)`` of each fault window in ``summary.json``."""
        raw = (self.summary or {}).get("fault_windows") or []
        windows: list[Fault] = []
        for item in raw:
            if isinstance(item, list | tuple) and len(item) >= 2:
                label = str(item[2]) if len(item) > 2 else "fault"
                windows.append((float(item[0]), float(item[1]), label))
        return windows


def _read_parquet(path: Path, what: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{path}: cannot read {what} as Parquet: {exc}") from None


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``records.parquet``."""
    return (path / RECORDS).is_file()


def load_run(path: str | Path) -> Run:
    """Load and check a run folder; raise ConfigError naming the folder and the problem."""
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (a run is a folder holding {RECORDS})")
    if not is_run_folder(folder):
        present = sorted(p.name for p in folder.iterdir())[:8]
        listing = ", ".join(present) if present else "nothing"
        raise ConfigError(
            f"{folder}: not a HAIF run folder: {RECORDS} is missing (found {listing}); "
            f"a run folder is what `haif sim --out` writes or a live cluster's {RECORDS}"
        )
    records = _read_parquet(folder / RECORDS, "request records")
    missing_cols = [c for c in SCHEMA.names if c not in records.schema.names]
    if missing_cols:
        raise ConfigError(
            f"{folder / RECORDS}: not a HAIF request-record file: missing column(s) "
            + ", ".join(missing_cols)
        )
    records = records.select(SCHEMA.names)

    summary: dict[str, Any] | None = None
    if (folder / SUMMARY).is_file():
        try:
            loaded = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{folder / SUMMARY}: not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{folder / SUMMARY}: expected a JSON object")
        summary = loaded

    timeseries: pd.DataFrame | None = None
    if (folder / TIMESERIES).is_file():
        timeseries = _read_parquet(folder / TIMESERIES, "the time series").to_pandas()
        lacking = [c for c in TIMESERIES_COLUMNS if c not in timeseries.columns]
        if lacking:
            raise ConfigError(
                f"{folder / TIMESERIES}: not a HAIF time series: missing column(s) "
                + ", ".join(lacking)
            )

    utilization: pd.DataFrame | None = None
    if (folder / UTILIZATION).is_file():
        utilization = _read_parquet(folder / UTILIZATION, "utilization").to_pandas()
        if "busy_fraction" not in utilization.columns:
            raise ConfigError(f"{folder / UTILIZATION}: missing column busy_fraction")
    return Run(folder, records, summary, timeseries, utilization)


# ------------------------------------------------------------------ metrics


def _floats(table: pa.Table, column: str) -> FloatArray:
    """A float column as numpy, nulls as NaN."""
    return np.asarray(table.column(column).to_numpy(), dtype=np.float64)


def _percentile(values: FloatArray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def _summary_number(summary: Mapping[str, Any] | None, key: str) -> float | None:
    if summary is None:
        return None
    value = summary.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def latencies(records: pa.Table) -> tuple[FloatArray, FloatArray]:
    """(TTFT, end-to-end latency) of the ok requests, in file order, seconds."""
    status = np.asarray(records.column("status").to_numpy(zero_copy_only=False), dtype=object)
    ok = status == "ok"
    arrival = _floats(records, "arrival_s")
    finish = _floats(records, "finish_s")
    first = _floats(records, "first_token_s")
    e2e = finish[ok] - arrival[ok]
    has_first = ok & ~np.isnan(first)
    ttft = first[has_first] - arrival[has_first]
    return ttft[np.isfinite(ttft)], e2e[np.isfinite(e2e)]


def run_metrics(run: Run) -> Metrics:
    """Every metric of :data:`METRICS` for ``run`` (``None`` where it cannot be known)."""
    records = run.records
    summary = run.summary
    n = records.num_rows
    status = np.asarray(records.column("status").to_numpy(zero_copy_only=False), dtype=object)
    ok = status == "ok"
    ttft, e2e = latencies(records)
    attempts = np.asarray(records.column("attempts").to_numpy(), dtype=np.float64)
    # Python's sum in file order, exactly as haif.records.summarize adds costs.
    cost = float(sum(float(c) for c in records.column("cost").to_pylist() if c is not None))

    goodput = _summary_number(summary, "goodput_tokens_per_s")
    if goodput is None and n:
        tokens = np.asarray(records.column("output_tokens").to_numpy(), dtype=np.float64)
        arrival = _floats(records, "arrival_s")
        span = float(np.nanmax(arrival) - np.nanmin(arrival))
        goodput = float(tokens[ok].sum()) / span if span > 0 else None

    dead = _summary_number(summary, "dead_letters")
    if dead is None:
        dead = float(np.count_nonzero(status == "dead_lettered"))

    util = _summary_number(summary, "gpu_utilization")
    if util is None and run.utilization is not None and len(run.utilization):
        util = float(run.utilization["busy_fraction"].mean())

    metrics: Metrics = {
        "requests": float(n),
        "success_rate": float(np.count_nonzero(ok)) / n if n else None,
        "goodput_tokens_per_s": goodput,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p90_s": _percentile(ttft, 90),
        "ttft_p99_s": _percentile(ttft, 99),
        "latency_p50_s": _percentile(e2e, 50),
        "latency_p90_s": _percentile(e2e, 90),
        "latency_p99_s": _percentile(e2e, 99),
        "slo_attainment": _summary_number(summary, "slo_attainment"),
        "retried": float(np.count_nonzero(attempts > 1)),
        "dead_letters": dead,
        "cost": cost,
        "provisioned_cost": _summary_number(summary, "provisioned_cost"),
        "gpu_utilization": util,
    }
    assert list(metrics) == [m.key for m in METRICS]
    return metrics


# ------------------------------------------------------------------ deltas and formatting


def delta(base: float | None, value: float | None) -> tuple[float | None, float | None]:
    """(absolute, relative) change from ``base`` to ``value``; relative is None when base is 0."""
    if base is None or value is None:
        return None, None
    diff = value - base
    rel = diff / abs(base) if base != 0 else (0.0 if diff == 0 else None)
    return diff, rel


def verdict(spec: MetricSpec, diff: float | None) -> Literal["better", "worse", "same", "n/a"]:
    """Whether a change is an improvement for ``spec`` (``same`` for no direction)."""
    if diff is None:
        return "n/a"
    if diff == 0 or spec.better is None:
        return "same"
    improved = diff > 0 if spec.better == "higher" else diff < 0
    return "better" if improved else "worse"


def format_value(unit: Unit, value: float | None) -> str:
    """A metric value for people: 99.76%, 144.2 ms, 1.550 s, 19,366, $15.5172."""
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "ratio":
        return f"{value:.2%}"
    if unit == "seconds":
        return f"{value * 1000:.1f} ms" if abs(value) < 1.0 else f"{value:.3f} s"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "rate":
        return f"{value:,.1f}"
    return f"${value:,.4f}"


def format_diff(unit: Unit, diff: float | None) -> str:
    """A signed absolute change: +0.31 pp, -12.0 ms, +3, +$0.0123."""
    if diff is None:
        return "n/a"
    if unit == "ratio":
        return f"{diff * 100:+.2f} pp"
    if unit == "seconds":
        return f"{diff * 1000:+.1f} ms" if abs(diff) < 1.0 else f"{diff:+.3f} s"
    if unit == "count":
        return f"{diff:+,.0f}"
    if unit == "rate":
        return f"{diff:+,.1f}"
    sign = "-" if diff < 0 else "+"
    return f"{sign}${abs(diff):,.4f}"


def format_delta(unit: Unit, diff: float | None, rel: float | None) -> str:
    """``+12.0 ms (+8.3%)``; ``n/a`` when either side is unknown."""
    if diff is None:
        return "n/a"
    return f"{format_diff(unit, diff)} ({'n/a' if rel is None else f'{rel:+.1%}'})"


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class Comparison:
    """Runs, their labels and metrics; deltas are against ``runs[0]``."""

    runs: tuple[Run, ...]
    labels: tuple[str, ...]
    metrics: tuple[Metrics, ...]
    notes: tuple[str, ...] = field(default=())

    def deltas(self, index: int) -> dict[str, tuple[float | None, float | None]]:
        """(absolute, relative) change of every metric of run ``index`` vs the first run."""
        base = self.metrics[0]
        return {m.key: delta(base[m.key], self.metrics[index][m.key]) for m in METRICS}


def parse_labels(text: str | None, count: int) -> list[str] | None:
    """``a,b`` -> ``["a", "b"]``; ConfigError unless there is one unique label per run."""
    if text is None:
        return None
    labels = [s.strip() for s in text.split(",")]
    if len(labels) != count:
        raise ConfigError(f"--labels: got {len(labels)} label(s) for {count} run(s)")
    if any(not s for s in labels):
        raise ConfigError("--labels: empty label")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--labels: labels must be distinct, got {text!r}")
    return labels


def default_labels(runs: Sequence[Run]) -> list[str]:
    """Folder names, made distinct with the parent folder (or a #n suffix) where needed."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    longer = [f"{r.path.resolve().parent.name}/{r.name}" for r in runs]
    if len(set(longer)) == len(longer):
        return longer
    return [f"{name}#{i + 1}" for i, name in enumerate(names)]


def compare_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> Comparison:
    """Load every run folder and compute its metrics."""
    if not paths:
        raise ConfigError("compare: give at least one run folder")
    runs = tuple(load_run(p) for p in paths)
    names = list(labels) if labels is not None else default_labels(runs)
    if len(names) != len(runs):
        raise ConfigError(f"labels: got {len(names)} for {len(runs)} run(s)")
    notes: list[str] = []
    for label, run in zip(names, runs, strict=True):
        if run.missing:
            notes.append(
                f"{label} ({run.path}) has no {', '.join(run.missing)}: "
                "metrics that need them are n/a or estimated from the records"
            )
        if run.summary is None and run.records.num_rows:
            notes.append(f"{label}: goodput is taken over the span of its arrivals")
    metrics = tuple(run_metrics(r) for r in runs)
    return Comparison(runs, tuple(names), metrics, tuple(notes))


_STYLE = {"better": "green", "worse": "red", "same": "dim", "n/a": "dim"}


def comparison_table(comparison: Comparison) -> Table:
    """The rich table: metric, then per run its value and (after the first) its delta."""
    labels = comparison.labels
    table = Table(title="HAIF run comparison (deltas vs " + labels[0] + ")")
    table.add_column("metric", no_wrap=True)
    for i, label in enumerate(labels):
        table.add_column(label, justify="right")
        if i:
            table.add_column(f"Δ {label}", justify="right")
    deltas = [comparison.deltas(i) for i in range(len(labels))]
    for spec in METRICS:
        cells: list[str | Text] = [spec.short_label]
        for i, metrics in enumerate(comparison.metrics):
            cells.append(format_value(spec.unit, metrics[spec.key]))
            if i:
                diff, rel = deltas[i][spec.key]
                style = _STYLE[verdict(spec, diff)]
                cells.append(Text(format_delta(spec.unit, diff, rel), style=style))
        table.add_row(*cells)
    return table


def print_comparison(comparison: Comparison, console: Console) -> None:
    console.print(comparison_table(comparison))
    for note in comparison.notes:
        console.print(f"note: {note}", highlight=False)


def render_markdown(comparison: Comparison, figures: Sequence[str]) -> str:
    """``compare.md``: the runs, the table with deltas, fault windows and figures."""
    labels = comparison.labels
    lines = ["# HAIF run comparison", "", "| run | folder | scenario | seed | placement |"]
    lines.append("|---|---|---|---|---|")
    for label, run in zip(labels, comparison.runs, strict=True):
        s = run.summary or {}
        lines.append(
            f"| {label} | `{run.path}` | {s.get('scenario', 'n/a')} | {s.get('seed', 'n/a')} "
            f"| {s.get('placement', 'n/a')} |"
        )
    header = ["metric"]
    for i, label in enumerate(labels):
        header.append(label)
        if i:
            header.append(f"Δ {label} vs {labels[0]}")
    lines += ["", "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    deltas = [comparison.deltas(i) for i in range(len(labels))]
    for spec in METRICS:
        cells = [spec.label]
        for i, metrics in enumerate(comparison.metrics):
            cells.append(format_value(spec.unit, metrics[spec.key]))
            if i:
                diff, rel = deltas[i][spec.key]
                mark = {"better": " ✓", "worse": " ✗"}.get(verdict(spec, diff), "")
                cells.append(format_delta(spec.unit, diff, rel) + mark)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Percentiles are over ok requests, from each run's `records.parquet`; ✓ / ✗ mark "
        "changes for the better / worse. n/a: the run folder lacks what the metric needs.",
    ]
    faults = [
        (label, w)
        for label, run in zip(labels, comparison.runs, strict=True)
        for w in run.fault_windows
    ]
    if faults:
        lines += ["", "## Fault windows", "", "| run | from | to | what |", "|---|---|---|---|"]
        lines += [f"| {label} | {a:.0f} s | {b:.0f} s | {what} |" for label, (a, b, what) in faults]
    if comparison.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in comparison.notes]
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ figures


_LINE_STYLES: tuple[str, ...] = ("-", "--", "-.", ":")


def _color(i: int) -> str:
    return REGION_PALETTE[i % len(REGION_PALETTE)]


def _style(i: int) -> str:
    """A line style per run, so identical runs stay visible on top of each other."""
    return _LINE_STYLES[i % len(_LINE_STYLES)]


def _fmt_latency(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def _cdf_panel(ax: Axes, series: Sequence[tuple[str, FloatArray]], what: str) -> None:
    ax.set_title(f"{what} (ok requests)")
    if not any(values.size for _, values in series):
        _no_data(ax)
        return
    for i, (label, values) in enumerate(series):
        if not values.size:
            continue
        x = np.sort(np.maximum(values, MIN_LOG_S))
        y = np.arange(1, x.size + 1, dtype=np.float64) / x.size
        p50 = float(np.percentile(values, 50))
        p99 = float(np.percentile(values, 99))
        text = f"{label}: p50 {_fmt_latency(p50)}, p99 {_fmt_latency(p99)}"
        ax.step(x, y, where="post", color=_color(i), ls=_style(i), lw=1.5, label=text)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"{what} (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def plot_latency_cdfs(comparison: Comparison, path: str | Path) -> Path:
    """TTFT (left) and end-to-end (right) CDFs, one line per run."""
    both = [latencies(run.records) for run in comparison.runs]
    fig = _figure(WIDE)
    left, right = fig.subplots(1, 2)
    labels = comparison.labels
    _cdf_panel(left, [(lab, t) for lab, (t, _) in zip(labels, both, strict=True)], "TTFT")
    _cdf_panel(right, [(lab, e) for lab, (_, e) in zip(labels, both, strict=True)], "end-to-end")
    fig.suptitle("Latency distribution of successful requests")
    return _save(fig, path)


def run_series(run: Run) -> pd.DataFrame:
    """Per-second ``t, completed_ok, errors, e2e_p99_s`` of a run.

    From ``timeseries.parquet`` when present; otherwise binned from the
    records, with time 0 at the simulation's start when there is a summary
    and at the first arrival (whole second) when there is none.
    """
    if run.timeseries is not None:
        return run.timeseries.loc[:, list(TIMESERIES_COLUMNS)].copy()
    table = run.records
    if table.num_rows == 0:
        return pd.DataFrame({c: np.zeros(0) for c in TIMESERIES_COLUMNS})
    records = [RequestRecord(**row) for row in table.to_pylist()]
    t0 = 0.0 if run.summary is not None else math.floor(min(r.arrival_s for r in records))
    if t0:
        records = [
            replace(
                r,
                arrival_s=r.arrival_s - t0,
                admitted_s=None if r.admitted_s is None else r.admitted_s - t0,
                first_token_s=None if r.first_token_s is None else r.first_token_s - t0,
                finish_s=r.finish_s - t0,
            )
            for r in records
        ]
    end = _summary_number(run.summary, "simulated_s") or max(r.finish_s for r in records)
    frame = per_second(records, end)
    return frame.loc[:, list(TIMESERIES_COLUMNS)]


def _rolling(values: FloatArray, window: int) -> FloatArray:
    if window <= 1:
        return values
    series = pd.Series(values).rolling(window, center=True, min_periods=1).mean()
    return series.to_numpy(dtype=np.float64)


def _rolling_sum(values: FloatArray, window: int) -> FloatArray:
    if window <= 1:
        return values
    series = pd.Series(values).rolling(window, center=True, min_periods=1).sum()
    return series.to_numpy(dtype=np.float64)


def plot_timeseries(comparison: Comparison, path: str | Path) -> Path:
    """Throughput, error rate and end-to-end p99 over time, faults shaded per run."""
    title = "Throughput, errors and latency over time"
    frames = [run_series(run) for run in comparison.runs]
    longest = max((len(f) for f in frames), default=0)
    fig = _figure(TALL)
    top, mid, bottom = fig.subplots(3, 1, sharex=True)
    if longest == 0:
        for ax in (top, mid, bottom):
            _no_data(ax)
        fig.suptitle(title)
        return _save(fig, path)
    window = max(1, longest // 100)
    smooth = f" ({window} s rolling mean)" if window > 1 else ""
    positive = False
    for i, (label, frame) in enumerate(zip(comparison.labels, frames, strict=True)):
        if frame.empty:
            continue
        t = frame["t"].to_numpy(dtype=np.float64) + 0.5
        ok = frame["completed_ok"].to_numpy(dtype=np.float64)
        err = frame["errors"].to_numpy(dtype=np.float64)
        p99 = frame["e2e_p99_s"].to_numpy(dtype=np.float64, na_value=np.nan)
        finished = _rolling_sum(ok + err, window)
        errors = _rolling_sum(err, window)
        rate = np.zeros_like(finished)
        np.divide(errors, finished, out=rate, where=finished > 0)
        line = {"color": _color(i), "ls": _style(i), "lw": 1.3, "label": label}
        top.plot(t, _rolling(ok, window), **line)
        mid.plot(t, rate * 100.0, **line)
        p99_line = _rolling(p99, window)
        positive |= bool((p99_line > 0).any())
        bottom.plot(t, p99_line, **line)
    top.set_ylabel("ok completions / s")
    top.set_ylim(bottom=0.0)
    top.set_title("throughput" + smooth)
    mid.set_ylabel("errors (% of finished)")
    mid.set_ylim(bottom=0.0, top=max(1.0, float(mid.get_ylim()[1])))
    mid.set_title("error rate" + smooth)
    if positive:
        bottom.set_yscale("log")
    bottom.set_ylabel("latency (s)")
    bottom.set_title("end-to-end p99 of ok requests finishing each second" + smooth)
    bottom.set_xlabel("time (s)")

    shade = _shade_faults((top, mid, bottom), comparison)
    for ax in (top, mid, bottom):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0.0, float(longest))
    handles, names = top.get_legend_handles_labels()
    top.legend(
        handles=[*handles, *shade],
        labels=[*names, *(p.get_label() for p in shade)],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title)
    return _save(fig, path)


def _shade_faults(axes: Sequence[Axes], comparison: Comparison) -> list[Patch]:
    """Shade fault windows: grey when every run has it, else in the run's colour."""
    per_run = [run.fault_windows for run in comparison.runs]
    shared = [w for w in per_run[0] if all(w in other for other in per_run[1:])]
    many = len(per_run) > 1
    bands: list[tuple[Fault, str, str]] = [
        (w, FAULT_COLOR, "all runs" if many else comparison.labels[0]) for w in shared
    ]
    for i, (label, windows) in enumerate(zip(comparison.labels, per_run, strict=True)):
        bands += [(w, _color(i), label) for w in windows if w not in shared]
    handles: list[Patch] = []
    for (start, end, what), color, who in bands:
        for ax in axes:
            ax.axvspan(start, end, color=color, alpha=0.15, lw=0, zorder=0)
        text = f"{who}: {what} ({start:.0f}-{end:.0f} s)"
        handles.append(Patch(fc=color, alpha=0.3, label=text))
    return handles


def write_comparison(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """Write ``compare.md`` and the two figures into ``out_dir``; return their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the output folder: {exc.strerror}") from None
    cdf = plot_latency_cdfs(comparison, out / CDF_FIGURE)
    series = plot_timeseries(comparison, out / TIMESERIES_FIGURE)
    md = out / MARKDOWN
    md.write_text(render_markdown(comparison, [cdf.name, series.name]), encoding="utf-8")
    return [md, cdf, series]
