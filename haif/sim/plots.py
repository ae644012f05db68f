"""PNG figures of a simulation run, for the report folder.

Each figure answers one question about a run:

``latency_cdf.png`` (:func:`plot_latency_cdfs`)
    How long did successful requests wait? TTFT and end-to-end latency
    CDFs of ok requests, log-x, with p50 / p99 marked.
``timeseries.png`` (:func:`plot_timeseries`)
    What happened when? Throughput (ok completions/s vs arrivals/s), error
    rate and latency p50 / p99 per second, fault windows shaded.
``region_load.png`` (:func:`plot_region_load`)
    Where was traffic served? Ok completions per served region (stacked),
    so failover away from and back to a region is visible.
``utilization.png`` (:func:`plot_utilization`)
    How busy was the fleet? Mean busy fraction per GPU class and per region.
``slo.png`` (:func:`plot_slo`)
    Did we keep our promise? SLO attainment per second and its 10 s
    rolling mean.
``cost.png`` (:func:`plot_cost`)
    What did it cost and where? Cost by served region and by GPU class,
    split into ok requests and requests that did not succeed.

:func:`plot_all` writes all six into a folder. Functions take plain data
(records, the :func:`haif.sim.timeseries.per_second` frame, the
:func:`haif.sim.timeseries.utilization_frame` frame and fault windows as
``(start_s, end_s, label)``) and return the path written. Empty inputs give a
figure saying "no data" instead of an exception.

The figures are built with matplotlib's object-oriented API on an Agg canvas
(:class:`~matplotlib.figure.Figure` + ``FigureCanvasAgg``), never through
``pyplot``: nothing opens a window, no global backend is switched, and no
figure is kept in pyplot's registry, so many calls leak nothing. Figure size,
dpi and fonts are fixed and the PNG "Software" tag is dropped, so the same
inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from haif.contracts import RequestRecord
from haif.sim.timeseries import served_column

Fault = tuple[float, float, str]
FloatArray = npt.NDArray[np.float64]

DPI = 110
WIDE = (11.0, 4.2)
TALL = (11.0, 8.5)
MEDIUM = (11.0, 6.4)

FILE_NAMES: dict[str, str] = {
    "latency_cdf": "latency_cdf.png",
    "timeseries": "timeseries.png",
    "region_load": "region_load.png",
    "utilization": "utilization.png",
    "slo": "slo.png",
    "cost": "cost.png",
}
"""``plot_all``'s keys and the fixed file name of each figure."""

# Tableau 10: regions get these in order; GPU classes get Dark2 so the two
# are not confused when both appear.
REGION_PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
CLASS_PALETTE: tuple[str, ...] = (
    "#1b9e77",
    "#d95f02",
    "#7570b3",
    "#e7298a",
    "#66a61e",
    "#e6ab02",
    "#a6761d",
    "#666666",
)
NONE_COLOR = "#9e9e9e"
FAULT_COLOR = "#7f7f7f"
MIN_LOG_S = 1e-4
"""Latencies below this (0.1 ms) are drawn at it on log axes."""


# ------------------------------------------------------------------ helpers


def region_colors(regions: Sequence[str], extra: Sequence[str] = ()) -> dict[str, str]:
    """A colour per region: ``regions`` in their order, then ``extra`` sorted.

    Pass the scenario's region list so every figure of a report agrees.
    """
    names = list(dict.fromkeys(regions))
    names += sorted(set(extra) - set(names))
    return {name: REGION_PALETTE[i % len(REGION_PALETTE)] for i, name in enumerate(names)}


def class_colors(classes: Sequence[str]) -> dict[str, str]:
    """A colour per GPU class, by sorted name."""
    names = sorted(set(classes))
    return {name: CLASS_PALETTE[i % len(CLASS_PALETTE)] for i, name in enumerate(names)}


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    fig.clear()
    return path


def _no_data(ax: Axes, message: str = "no data") -> None:
    ax.text(
        0.5,
        0.5,
        message,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=14,
        color="#555555",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _no_data_figure(title: str, path: str | Path, size: tuple[float, float] = WIDE) -> Path:
    fig = _figure(size)
    ax = fig.subplots()
    ax.set_title(title)
    _no_data(ax)
    return _save(fig, path)


def _shade_faults(ax: Axes, faults: Sequence[Fault]) -> None:
    """Grey band per fault window, its label at the top-left of the band."""
    for i, (start, end, label) in enumerate(faults):
        ax.axvspan(start, end, color=FAULT_COLOR, alpha=0.18, lw=0, zorder=0)
        if label:
            ax.text(
                start,
                0.97 - 0.11 * (i % 3),
                f" {label}",
                transform=ax.get_xaxis_transform(),
                ha="left",
                va="top",
                fontsize=8,
                color="#404040",
                zorder=5,
            )


def _steps(t: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Points for a ``steps-post`` line that also draws the last second."""
    if t.size == 0:
        return t, y
    return np.append(t, t[-1] + 1.0), np.append(y, y[-1])


def _legend_right(ax: Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _time_axis(ax: Axes, t: FloatArray) -> None:
    if t.size:
        ax.set_xlim(float(t[0]), float(t[-1]) + 1.0)
    ax.grid(True, alpha=0.3)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def _col(df: pd.DataFrame, name: str) -> FloatArray:
    return df[name].to_numpy(dtype=np.float64, na_value=np.nan)


# ------------------------------------------------------------------ figures


def _cdf_panel(ax: Axes, values: FloatArray, what: str, color: str) -> None:
    ax.set_title(f"{what} (ok requests, n={values.size})")
    if values.size == 0:
        _no_data(ax)
        return
    x = np.sort(np.maximum(values, MIN_LOG_S))
    y = np.arange(1, x.size + 1, dtype=np.float64) / x.size
    ax.step(x, y, where="post", color=color, lw=1.6, label="CDF")
    for q, style in ((50, "--"), (99, ":")):
        v = max(float(np.percentile(values, q)), MIN_LOG_S)
        ax.axvline(v, color="#333333", ls=style, lw=1.1, label=f"p{q} = {_fmt_s(v)}")
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"{what} (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def plot_latency_cdfs(records: Sequence[RequestRecord], path: str | Path) -> Path:
    """TTFT and end-to-end latency CDFs of ok requests, side by side."""
    ok = [r for r in records if r.status == "ok"]
    e2e = np.array([r.finish_s - r.arrival_s for r in ok], dtype=np.float64)
    ttft = np.array(
        [r.first_token_s - r.arrival_s for r in ok if r.first_token_s is not None],
        dtype=np.float64,
    )
    fig = _figure(WIDE)
    left, right = fig.subplots(1, 2)
    _cdf_panel(left, ttft, "time to first token", REGION_PALETTE[0])
    _cdf_panel(right, e2e, "end-to-end latency", REGION_PALETTE[1])
    fig.suptitle("Latency distribution of successful requests")
    return _save(fig, path)


def plot_timeseries(df: pd.DataFrame, faults: Sequence[Fault], path: str | Path) -> Path:
    """Throughput, error rate and latency per second, sharing the time axis."""
    title = "Throughput, errors and latency per second"
    if df.empty:
        return _no_data_figure(title, path, TALL)
    t = _col(df, "t")
    fig = _figure(TALL)
    top, mid, bottom = fig.subplots(3, 1, sharex=True)

    for column, label, color in (
        ("arrivals", "arrivals / s", "#9e9e9e"),
        ("completed_ok", "ok completions / s", REGION_PALETTE[0]),
    ):
        top.plot(*_steps(t, _col(df, column)), drawstyle="steps-post", color=color, label=label)
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0.0)
    top.set_title("throughput")

    rate = _col(df, "error_rate") * 100.0
    mid.plot(*_steps(t, rate), drawstyle="steps-post", color=REGION_PALETTE[3], label="error rate")
    peak = float(np.nanmax(rate)) if np.isfinite(rate).any() else 0.0
    mid.set_ylim(0.0, max(1.0, min(100.0, peak) * 1.15))
    mid.set_ylabel("errors (% of finished)")
    mid.set_title("error rate")

    lines = (
        ("e2e_p50_s", "end-to-end p50", REGION_PALETTE[0], "-"),
        ("e2e_p99_s", "end-to-end p99", REGION_PALETTE[1], "-"),
        ("ttft_p50_s", "TTFT p50", REGION_PALETTE[2], "--"),
    )
    positive = False
    for column, label, color, style in lines:
        y = _col(df, column)
        positive |= bool((y > 0).any())
        bottom.plot(*_steps(t, y), drawstyle="steps-post", color=color, ls=style, label=label)
    if positive:
        bottom.set_yscale("log")
    else:
        bottom.set_ylim(0.0, 1.0)
        bottom.text(
            0.5, 0.5, "no ok requests", transform=bottom.transAxes, ha="center", color="#555555"
        )
    bottom.set_ylabel("latency (s)")
    bottom.set_title("latency of ok requests finishing each second")
    bottom.set_xlabel("simulated time (s)")

    for ax in (top, mid, bottom):
        _shade_faults(ax, faults)
        _time_axis(ax, t)
        _legend_right(ax)
    fig.suptitle(title)
    return _save(fig, path)


def plot_region_load(
    df: pd.DataFrame, regions: Sequence[str], faults: Sequence[Fault], path: str | Path
) -> Path:
    """Ok completions per served region per second, stacked."""
    title = "Ok completions per served region"
    present = [r for r in dict.fromkeys(regions) if served_column(r) in df.columns]
    if df.empty or not present:
        return _no_data_figure(title, path)
    colors = region_colors(regions)
    t = _col(df, "t")
    fig = _figure(WIDE)
    ax = fig.subplots()
    base = np.zeros(t.size)
    for region in present:
        top = base + _col(df, served_column(region))
        xs, lo = _steps(t, base)
        _, hi = _steps(t, top)
        ax.fill_between(
            xs, lo, hi, step="post", color=colors[region], alpha=0.85, lw=0, label=region
        )
        base = top
    _shade_faults(ax, faults)
    _time_axis(ax, t)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("ok completions / s (stacked)")
    ax.set_title(title)
    _legend_right(ax)
    return _save(fig, path)


def _utilization_panel(
    ax: Axes, util_df: pd.DataFrame, key: str, colors: dict[str, str], what: str
) -> None:
    mean = util_df.groupby([key, "t"], sort=True)["busy_fraction"].mean()
    present = set(mean.index.get_level_values(0))
    for name in colors:
        if name not in present:
            continue
        series = mean.xs(name, level=0)
        x = series.index.to_numpy(dtype=np.float64)
        y = series.to_numpy(dtype=np.float64) * 100.0
        ax.plot(x, y, drawstyle="steps-post", color=colors[name], lw=1.3, label=name)
    ax.set_ylim(0.0, 105.0)
    ax.set_ylabel("mean busy (%)")
    ax.set_title(f"mean busy fraction per {what}")
    ax.grid(True, alpha=0.3)
    _legend_right(ax)


def plot_utilization(
    util_df: pd.DataFrame | None,
    faults: Sequence[Fault],
    path: str | Path,
    *,
    regions: Sequence[str] = (),
) -> Path:
    """Mean busy fraction of the workers per GPU class (top) and per region (bottom)."""
    title = "Worker utilization"
    if util_df is None or util_df.empty:
        return _no_data_figure(title, path, MEDIUM)
    fig = _figure(MEDIUM)
    top, bottom = fig.subplots(2, 1, sharex=True)
    classes = class_colors(util_df["gpu_class"].astype(str).tolist())
    seen = util_df["region"].astype(str).tolist()
    by_region = region_colors(regions, seen)
    _utilization_panel(top, util_df, "gpu_class", classes, "GPU class")
    _utilization_panel(bottom, util_df, "region", by_region, "region")
    t = util_df["t"].to_numpy(dtype=np.float64)
    for ax in (top, bottom):
        _shade_faults(ax, faults)
        ax.set_xlim(float(t.min()), float(t.max()) + 1.0)
    bottom.set_xlabel("simulated time (s)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_slo(
    df: pd.DataFrame, faults: Sequence[Fault], path: str | Path, *, slo_desc: str = ""
) -> Path:
    """SLO attainment per second (thin) and its 10 s rolling mean (bold).

    The rolling mean is centred and weighted by the requests finishing in
    each second (attained / finished over the window), so a quiet second
    does not count as much as a busy one; it is NaN over windows where
    nothing finished.
    """
    title = "SLO attainment" + (f" ({slo_desc})" if slo_desc else "")
    attain = _col(df, "slo_attainment") if "slo_attainment" in df.columns else np.zeros(0)
    if df.empty or not np.isfinite(attain).any():
        return _no_data_figure(title, path)
    t = _col(df, "t")
    finished = _col(df, "completed_ok") + _col(df, "errors")
    met = pd.Series(np.nan_to_num(attain * finished, nan=0.0))
    met_sum = met.rolling(10, center=True, min_periods=1).sum().to_numpy(dtype=np.float64)
    fin = pd.Series(finished).rolling(10, center=True, min_periods=1).sum()
    fin_sum = fin.to_numpy(dtype=np.float64)
    rolling = np.full(t.size, np.nan)
    np.divide(met_sum, fin_sum, out=rolling, where=fin_sum > 0)

    fig = _figure(WIDE)
    ax = fig.subplots()
    ax.plot(
        *_steps(t, attain * 100.0),
        drawstyle="steps-post",
        color="#9e9e9e",
        lw=0.8,
        label="per second",
    )
    ax.plot(t + 0.5, rolling * 100.0, color=REGION_PALETTE[0], lw=2.0, label="10 s rolling mean")
    _shade_faults(ax, faults)
    _time_axis(ax, t)
    ax.set_ylim(0.0, 105.0)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("requests within SLO (%)")
    ax.set_title(title)
    _legend_right(ax)
    return _save(fig, path)


def _cost_panel(
    ax: Axes,
    keys: list[str],
    ok_cost: dict[str, float],
    other_cost: dict[str, float],
    colors: dict[str, str],
    what: str,
) -> None:
    x = np.arange(len(keys), dtype=np.float64)
    ok = np.array([ok_cost.get(k, 0.0) for k in keys])
    other = np.array([other_cost.get(k, 0.0) for k in keys])
    face = [colors.get(k, NONE_COLOR) for k in keys]
    ax.bar(x, ok, color=face, width=0.6)
    ax.bar(x, other, bottom=ok, color=face, width=0.6, alpha=0.4, hatch="//", ec="#333333", lw=0.5)
    total = ok + other
    for xi, value in zip(x, total, strict=True):
        ax.text(xi, value, f"\\${value:,.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, keys)
    ax.set_ylim(0.0, float(total.max()) * 1.35 if total.size and total.max() > 0 else 1.0)
    ax.set_xlabel(what)
    ax.set_ylabel("cost (\\$)")
    ax.set_title(f"cost by {what}")
    ax.grid(True, axis="y", alpha=0.3)
    handles = [
        Patch(fc=NONE_COLOR, label="ok requests"),
        Patch(fc=NONE_COLOR, alpha=0.4, hatch="//", ec="#333333", lw=0.5, label="not ok (wasted)"),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=8)


def plot_cost(
    records: Sequence[RequestRecord], path: str | Path, *, regions: Sequence[str] = ()
) -> Path:
    """Cost by served region (left) and GPU class (right), ok vs not-ok requests.

    Requests never placed are grouped under ``(none)``.
    """
    title = "Cost of the run"
    if not records or sum(r.cost for r in records) <= 0:
        return _no_data_figure(title, path)
    by: dict[str, tuple[dict[str, float], dict[str, float]]] = {
        "region": ({}, {}),
        "gpu_class": ({}, {}),
    }
    for r in records:
        for what, key in (
            ("region", r.served_region or "(none)"),
            ("gpu_class", r.gpu_class or "(none)"),
        ):
            bucket = by[what][0 if r.status == "ok" else 1]
            bucket[key] = bucket.get(key, 0.0) + r.cost

    def keys(what: str, first: Sequence[str] = ()) -> list[str]:
        seen = set(by[what][0]) | set(by[what][1])
        known = [k for k in dict.fromkeys(first) if k in seen]
        rest = sorted(seen - set(known) - {"(none)"})
        return known + rest + (["(none)"] if "(none)" in seen else [])

    region_keys = keys("region", regions)
    class_keys = keys("gpu_class")
    fig = _figure(WIDE)
    left, right = fig.subplots(1, 2)
    placed = [k for k in region_keys if k != "(none)"]
    _cost_panel(left, region_keys, *by["region"], region_colors(regions, placed), "served region")
    _cost_panel(right, class_keys, *by["gpu_class"], class_colors(class_keys), "GPU class")
    total = sum(r.cost for r in records)
    fig.suptitle(f"{title}: \\${total:,.2f} in all")
    return _save(fig, path)


def plot_all(
    records: Sequence[RequestRecord],
    df: pd.DataFrame,
    util_df: pd.DataFrame | None,
    regions: Sequence[str],
    faults: Sequence[Fault],
    out_dir: str | Path,
    *,
    slo_desc: str = "",
) -> dict[str, Path]:
    """Write every figure into ``out_dir`` under :data:`FILE_NAMES`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "latency_cdf": plot_latency_cdfs(records, out / FILE_NAMES["latency_cdf"]),
        "timeseries": plot_timeseries(df, faults, out / FILE_NAMES["timeseries"]),
        "region_load": plot_region_load(df, regions, faults, out / FILE_NAMES["region_load"]),
        "utilization": plot_utilization(
            util_df, faults, out / FILE_NAMES["utilization"], regions=regions
        ),
        "slo": plot_slo(df, faults, out / FILE_NAMES["slo"], slo_desc=slo_desc),
        "cost": plot_cost(records, out / FILE_NAMES["cost"], regions=regions),
    }
