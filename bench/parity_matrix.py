"""The parity matrix: the simulator's error against a live cluster, placement x load x outage.

Plays ``scenarios/parity_matrix.yaml`` (an outage of every us-east worker in
the middle of a window of the Azure conversation trace) once per cell with
``haif parity``: each placement (``--placements``) at each load
(``--loads``, multiples of the scenario's ``workload.rate_scale``). Each cell
is then read twice, from the records ``haif parity`` kept: over all its
requests, and over those that arrived during the outage. Every quantile's
error has its paired 95 % bootstrap interval and verdict, as ``haif parity``
reports them.

While a cell plays, the machine's CPU use is sampled from ``/proc/stat``: a
cell whose busiest 10 s kept the CPUs more than 90 % busy measured the
machine's queues, not the model's (``keeps_up`` in matrix.json; the window is the
live gateway's first request to its last, from its request log), and the load
generator's lag (how late ``haif replay`` sent a request against its arrival
time) shows the same from the client's side.

    .venv/bin/python bench/parity_matrix.py                       # 12 cells, ~35 min on 2 cores
    .venv/bin/python bench/parity_matrix.py --placements jsq --loads 1
    .venv/bin/python bench/parity_matrix.py --summarize           # tables from kept cells

Writes ``OUT/<placement>-<load>x/`` (``haif parity``'s output: sim.parquet,
live.parquet, parity.json, parity.md), ``OUT/matrix.json`` and
``OUT/matrix.md``. A cell already played is not played again unless
``--replay`` is given, so an interrupted matrix resumes where it stopped.
``--summarize`` needs of a cell only its ``sim.parquet``, ``live.parquet`` and
``played.json`` (the CPU samples and the traffic window): docs/runs keeps those.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haif.analysis.parity import DEFAULT_BOUNDS, QUANTILES, compare_runs
from haif.contracts import RequestRecord
from haif.fleet.scenario import load_scenario
from haif.records import read_parquet

ROOT = Path(__file__).resolve().parent.parent
PLACEMENTS = ("p2c", "least_outstanding", "jsq", "weighted_score")
LOADS = (1.0, 1.5, 2.0)
#: A cell whose busiest 10 s kept the CPUs busier than this did not keep up.
SATURATED = 0.90
WINDOWS = ("all", "outage")


# --------------------------------------------------------------------- CPU use


Sample = tuple[float, int, int]  # wall time (s since the epoch), busy and total jiffies


def _cpu_sample() -> Sample:
    """Now, and the busy and total jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return time.time(), sum(fields) - idle, sum(fields)


@dataclass
class CpuSampler:
    """Samples /proc/stat every ``interval_s`` in a thread while it is entered."""

    interval_s: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> CpuSampler:
        self.samples.append(_cpu_sample())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(_cpu_sample())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(_cpu_sample())


def cpu_busy(
    samples: Sequence[Sequence[float]], start: float, end: float, window_s: float = 10.0
) -> tuple[float, float]:
    """The CPUs' busy share between ``start`` and ``end`` (wall times) and over the busiest
    ``window_s`` within, from samples taken in that span (nan where there are too few)."""
    inside = [s for s in samples if start <= s[0] <= end]

    def share(a: Sequence[float], b: Sequence[float]) -> float:
        return (b[1] - a[1]) / (b[2] - a[2]) if b[2] > a[2] else float("nan")

    if len(inside) < 2:
        return float("nan"), float("nan")
    spans = []  # from each sample to the first one window_s or more later
    for i, a in enumerate(inside):
        later = next((b for b in inside[i + 1 :] if b[0] - a[0] >= window_s), None)
        if later is not None:
            spans.append(share(a, later))
    return share(inside[0], inside[-1]), max(spans, default=share(inside[0], inside[-1]))


_LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


def traffic_window(folder: Path) -> tuple[float, float]:
    """Wall times of the first request's start and the last one's end at the live gateway,
    from its request log (``live/logs/gateway.log``: each line stamped when the request
    ended, with its ``latency_s``), over every run in ``folder``."""
    starts, ends = [], []
    for log in sorted(folder.glob("**/live/logs/gateway.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "haif.gateway.requests:" not in line or " latency_s=" not in line:
                continue
            stamp = datetime.datetime.strptime(line[:23], _LOG_TIME).timestamp()
            latency = float(line.split(" latency_s=", 1)[1].split(" ", 1)[0])
            starts.append(stamp - latency)
            ends.append(stamp)
    if not starts:
        raise SystemExit(f"{folder}: no request in the live gateway's log")
    return min(starts), max(ends)


# ----------------------------------------------------------------------- cells


def cell_name(placement: str, load: float) -> str:
    return f"{placement}-{load:g}x"


def _runs(folder: Path) -> list[tuple[list[RequestRecord], list[RequestRecord]]]:
    """The (sim, live) records ``haif parity`` kept in a cell's folder, one pair per run."""
    folders = sorted(folder.glob("repeat-*")) or [folder]
    return [(read_parquet(f / "sim.parquet"), read_parquet(f / "live.parquet")) for f in folders]


def outage_window(scenario_path: Path) -> tuple[float, float]:
    """Start and end of the scenario's first outage fault."""
    scenario = load_scenario(scenario_path)
    for fault in scenario.faults:
        start, end = getattr(fault, "start_s", None), getattr(fault, "end_s", None)
        if start is not None and end is not None:
            return float(start), float(end)
    raise SystemExit(f"{scenario_path}: the parity matrix needs a fault with start_s and end_s")


def _in_window(
    runs: list[tuple[list[RequestRecord], list[RequestRecord]]], start: float, end: float
) -> list[tuple[list[RequestRecord], list[RequestRecord]]]:
    """Each run's requests that arrived in [start, end) of the simulated run (the same
    requests on the live side, whose arrival is its send time)."""
    out = []
    for sim, live in runs:
        ids = {r.request_id for r in sim if start <= r.arrival_s < end}
        out.append(
            ([r for r in sim if r.request_id in ids], [r for r in live if r.request_id in ids])
        )
    return out


def _lag_ms(runs: list[tuple[list[RequestRecord], list[RequestRecord]]]) -> float:
    """p99 of how late the load generator sent a request against its arrival time."""
    lags = []
    for sim, live in runs:
        due = {r.request_id: r.arrival_s for r in sim}
        lags += [r.arrival_s - due[r.request_id] for r in live if r.request_id in due]
    return float(np.percentile(lags, 99) * 1000) if lags else float("nan")


def margin(records: Sequence[RequestRecord], metric: str, bound: float, error: float) -> int:
    """How many of the simulated requests lie between the quantile ``metric`` (``"ttft
    p50"``) and its bound on the side the live error went: about as many requests
    changing sides (served by another GPU class, or sooner, in the other shell) move the
    quantile past its bound. A few: the quantile cannot be held to the bound once the
    shells place requests differently."""
    name, q = metric.split(" p")
    values = np.array(
        [
            (r.first_token_s if name == "ttft" else r.finish_s) - r.arrival_s
            for r in records
            if r.status == "ok" and r.first_token_s is not None
        ]
    )
    if not values.size:
        return 0
    at = float(np.percentile(values, float(q)))
    if error < 0:
        return int(np.count_nonzero((values >= at * (1 - bound)) & (values < at)))
    return int(np.count_nonzero((values > at) & (values <= at * (1 + bound))))


def summarize_cell(
    folder: Path, placement: str, load: float, window: tuple[float, float], played: dict[str, Any]
) -> dict[str, Any]:
    """A cell's errors over both windows, the load generator's lag, and the CPUs' use while
    the live cluster served its requests (``played``: what :func:`play_cell` kept)."""
    runs = _runs(folder)
    mean, peak = cpu_busy(played["cpu_samples"], *played["traffic_window"])
    rows: dict[str, Any] = {}
    for name, part in (("all", runs), ("outage", _in_window(runs, *window))):
        comparison = compare_runs(
            [s for s, _ in part],
            [lv for _, lv in part],
            DEFAULT_BOUNDS,
            rng=np.random.default_rng(0),
        )
        sim = [r for s, _ in part for r in s]
        for m in comparison.metrics:
            if not m.get("ok") and m.get("error") is not None:
                m["margin"] = margin(sim, m["metric"], m["bound"], m["error"])
        rows[name] = {
            "requests": sum(len(s) for s, _ in part),
            "passed": comparison.passed,
            "same_worker": comparison.same_worker,
            "metrics": comparison.metrics,
            "distances": comparison.distances,
            "outliers": comparison.outliers,
        }
    return {
        "cell": cell_name(placement, load),
        "placement": placement,
        "load": load,
        "runs": len(runs),
        "send_lag_p99_ms": _lag_ms(runs),
        "wall_s": played["wall_s"],
        "cpu_busy_mean": mean,
        "cpu_busy_peak": peak,
        "keeps_up": bool(peak <= SATURATED),
        "windows": rows,
    }


def play_cell(
    scenario: Path, out: Path, placement: str, load: float, base_rate: float, repeat: int
) -> dict[str, Any]:
    """``haif parity`` on one cell, the CPUs' use sampled meanwhile (:class:`CpuSampler`)."""
    command = [
        sys.executable, "-m", "haif", "parity", str(scenario), "--quiet",
        "--out", str(out),
        "--set", f"policy.placement={placement}",
        "--set", f"workload.rate_scale={base_rate * load:g}",
        "--repeat", str(repeat),
    ]  # fmt: skip
    with CpuSampler() as sampler:
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode not in (0, 1):  # 1: a bound missed, the matrix's business
        raise SystemExit(f"{cell_name(placement, load)}: haif parity exited {result.returncode}")
    return {"wall_s": time.monotonic() - started, "cpu_samples": sampler.samples}


# ---------------------------------------------------------------------- tables


def _error(m: dict[str, Any]) -> str:
    if m.get("error") is None:
        return "n/a"
    low, high = m["interval"]
    flag = "" if m["ok"] else " ✗"
    return f"{m['error'] * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]{flag}"


METRICS = tuple(f"{m} p{q}" for m in ("ttft", "e2e") for q in QUANTILES)


def _missed(row: dict[str, Any]) -> str:
    """``yes``, or ``no:`` and the quantiles outside their target."""
    by_name = {m["metric"]: m for m in row["metrics"]}
    missed = [name for name in METRICS if not by_name[name].get("ok")]
    return "yes" if not missed else "no: " + ", ".join(missed)


def table(cells: Sequence[dict[str, Any]], *, outage_rows: bool = True) -> str:
    """The matrix as markdown: a row per cell (and, with ``outage_rows``, one more for the
    requests that arrived during the outage; without, a column saying whether those were
    within the targets): the share of requests on the same worker in both shells, each
    quantile's error in % with its 95 % interval (✗: outside the target), whether it is
    within the targets, the CPUs' busiest 10 s."""
    quantiles = [m.replace("ttft", "TTFT") for m in METRICS]
    head = ["placement", "load", "requests", "same worker", *quantiles]
    tail = ["within targets"] + ([] if outage_rows else ["during the outage"])
    lines = [
        "| " + " | ".join([*head, *tail, "CPU busiest 10 s"]) + " |",
        "|---|---|" + "---:|" * (len(head) - 2) + "---|" * len(tail) + "---:|",
    ]
    for cell in cells:
        for window in WINDOWS if outage_rows else WINDOWS[:1]:
            row = cell["windows"][window]
            by_name = {m["metric"]: m for m in row["metrics"]}
            first = window == "all"
            cells_ = [
                cell["placement"] if first else "  during the outage",
                f"{cell['load']:g}x" if first else "",
                str(row["requests"]),
                f"{row['same_worker']:.0%}",
                *(_error(by_name[name]) for name in METRICS),
                _missed(row),
            ]
            if not outage_rows:
                outage = cell["windows"]["outage"]
                cells_.append(f"{outage['requests']} requests: {_missed(outage)}")
            cells_.append(f"{cell['cpu_busy_peak']:.0%}" if first else "")
            lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def misses(cells: Sequence[dict[str, Any]]) -> str:
    """A line per quantile outside its target: its error, and what it rests on (its
    :func:`margin` and the share of requests placed alike)."""
    lines = []
    for cell in cells:
        for window in WINDOWS:
            row = cell["windows"][window]
            for m in row["metrics"]:
                if m.get("ok") or m.get("error") is None:
                    continue
                side = "below" if m["error"] < 0 else "above"
                where = " during the outage" if window == "outage" else ""
                lines.append(
                    f"- {cell['placement']} {cell['load']:g}x{where}: "
                    f"{m['metric'].replace('ttft', 'TTFT')} {m['error'] * 100:+.1f} %; "
                    f"{m['margin']} of {row['requests']} simulated requests lie within "
                    f"{m['bound'] * 100:.0f} % {side} the simulated {m['sim'] * 1000:,.0f} ms; "
                    f"{row['same_worker']:.0%} on the same worker"
                )
    return "\n".join(lines)


def tally(cells: Sequence[dict[str, Any]]) -> str:
    """How many cells are within every target, over all requests and during the outage,
    and which quantiles missed how often: the sentence the docs show under the table."""
    n = len(cells)
    parts = []
    for window, label in (("all", "over all their requests"), ("outage", "during the outage")):
        rows = [c["windows"][window] for c in cells]
        within = sum(r["passed"] for r in rows)
        e2e = sum(
            all(m.get("ok") for m in r["metrics"] if m["metric"].startswith("e2e")) for r in rows
        )
        missed = {
            name: sum(not {m["metric"]: m for m in r["metrics"]}[name].get("ok") for r in rows)
            for name in METRICS
        }
        which = ", ".join(f"{name.replace('ttft', 'TTFT')} {k}" for name, k in missed.items() if k)
        parts.append(
            f"{label}, {within} of {n} cells within every target and {e2e} of {n} "
            f"within the end-to-end targets (misses: {which or 'none'})"
        )
    keep_up = sum(c["keeps_up"] for c in cells)
    minutes = sum(c["wall_s"] for c in cells) / 60
    lag = max((c["send_lag_p99_ms"] for c in cells), default=float("nan"))
    return (
        f"{parts[0][0].upper()}{parts[0][1:]}; {parts[1]}. The machine kept up in "
        f"{keep_up} of {n} cells (the CPUs' busiest 10 s at most {SATURATED:.0%}), and "
        f"the load generator sent its requests at most {lag:.1f} ms late (p99); the cells "
        f"played in {minutes:.0f} minutes."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="scenarios/parity_matrix.yaml")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument(
        "--loads", default=",".join(f"{v:g}" for v in LOADS),
        help="multiples of the scenario's workload.rate_scale (default 1,1.5,2)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell (haif parity)")
    parser.add_argument("--out", default="reports/parity-matrix")
    parser.add_argument("--replay", action="store_true", help="play cells already played again")
    parser.add_argument(
        "--summarize", action="store_true", help="only the tables, from the cells already played"
    )
    args = parser.parse_args(argv)
    scenario = (ROOT / args.scenario).resolve()
    if not scenario.is_file():
        parser.error(f"--scenario: no such file: {args.scenario}")
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    try:
        loads = [float(v) for v in args.loads.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--loads: expected numbers separated by commas, got {args.loads!r}")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    base = load_scenario(scenario)
    window = outage_window(scenario)
    cells = []
    for placement in placements:
        for load in loads:
            name = cell_name(placement, load)
            folder = out / name
            played = folder / "played.json"
            if not args.summarize and (args.replay or not played.exists()):
                print(f"{name}: playing", file=sys.stderr, flush=True)
                kept = play_cell(scenario, folder, placement, load, base.workload.rate_scale,
                                 args.repeat)  # fmt: skip
                played.write_text(json.dumps(kept) + "\n")
            if not played.exists():
                print(f"{name}: not played yet, left out", file=sys.stderr)
                continue
            kept = json.loads(played.read_text())
            if "traffic_window" not in kept:  # read once, so a kept cell needs no logs
                kept["traffic_window"] = traffic_window(folder)
                played.write_text(json.dumps(kept) + "\n")
            cell = summarize_cell(folder, placement, load, window, kept)
            cells.append(cell)
            worst = table([cell]).splitlines()[2]
            print(f"{name}: {worst}", file=sys.stderr, flush=True)
    matrix = {
        "scenario": base.name,
        "outage_s": list(window),
        "base_rate_scale": base.workload.rate_scale,
        "targets": DEFAULT_BOUNDS,
        "saturated_above": SATURATED,
        "machine": _machine(),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cells": cells,
    }
    (out / "matrix.json").write_text(json.dumps(matrix, indent=1) + "\n")
    (out / "matrix.md").write_text(
        table(cells) + "\n\n" + tally(cells) + "\n\n" + misses(cells) + "\n"
    )
    print(table(cells, outage_rows=False) + "\n\n" + tally(cells))
    return 0


def _machine() -> str:
    """The CPU's model name and count, as /proc/cpuinfo gives them."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [
        line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")
    ]
    return f"{names[0] if names else platform.machine()}, {len(names) or os.cpu_count()} CPUs"


if __name__ == "__main__":
    raise SystemExit(main())
