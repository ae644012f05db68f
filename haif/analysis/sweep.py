"""``haif sweep``: many scenario runs over a grid of overrides and seeds, aggregated.

A *sweep file* (YAML, validated by :class:`Sweep`; errors name the file, the
line and the field) lists scenarios, a grid of ``--set``-style overrides and
the seeds to run each grid point with::

    name: placement                       # default output: reports/sweep-<name>
    description: ...                      # optional
    scenarios:                            # paths relative to the sweep file
      - ../scenarios/burst.yaml           # a bare path, or:
      - path: ../scenarios/failover.yaml
        name: failover                    # label (default: the file's stem)
        overrides: [faults.0.start_s=100] # this scenario's own base overrides
    fixed_overrides: [duration_s=300]     # applied to every cell (first)
    grid:                                 # override path -> values (cartesian product)
      policy.placement: [p2c, jsq, round_robin]
      workload.rate_scale: [1, 2]
    seeds: [1, 2, 3]                      # or {count: 3, start: 1}
    metrics: [success_rate, ttft_p99_s]   # default: DEFAULT_METRICS

A *cell* is one scenario x grid point x seed. It runs
``load_scenario(path, [*fixed_overrides, *scenario overrides, *grid point,
f"seed={seed}"])`` (later overrides win), :func:`~haif.sim.driver.run_scenario`
and :func:`~haif.sim.report.write_report` (``plots=False``) into
``OUT/cells/<cell-id>/``, then writes ``cell.json`` (what the cell is: its
scenario, grid point, seed and overrides in order) as the completion marker.
The cell id is a readable slug plus a hash of (scenario path as written,
sorted overrides, seed), so it is stable across runs and machines.

Resuming (the default): a cell whose ``summary.json`` exists and whose
``cell.json`` records the same scenario, grid point, seed and overrides is
not run again; ``--no-resume`` reruns every cell. A cell that raises is
recorded in ``OUT/cells/<id>/error.txt`` (message and traceback) and reported
as failed; the other cells still run, and the command exits 1.

Executors run the same :func:`run_cell`: ``local`` a
:class:`concurrent.futures.ProcessPoolExecutor` (``spawn`` start method, so
worker processes never inherit the progress bar's thread), ``ray`` Ray tasks
(a local Ray instance with ``num_cpus=--workers``, or ``ray.init(address=...)``
with ``--address``; the nodes must then see the scenario files and ``OUT``
at the same paths, e.g. on one machine or a shared file system). The
simulator is deterministic, so the executor never changes a ``summary.json``.

Per-cell metrics are the numbers of the cell's ``summary.json``, completed by
:func:`haif.analysis.compare.run_metrics` of its folder (the function ``haif
compare`` and ``haif regress`` use) for those it lacks (the p90s). Across
seeds, per scenario and grid point, each chosen metric gets n (cells with a
value), mean, sample standard deviation and the half-width of a 95 %
confidence interval for the mean, ``t(0.975, n-1) * std / sqrt(n)`` (Student
t; :mod:`haif.analysis.stats`). With a single seed there is no spread to
estimate: std and half-width are reported as 0. A grid point is named the
winner of a metric only when its mean is the best and its interval overlaps
no other point's (:func:`haif.analysis.stats.clear_winner`); otherwise the
outputs say "no clear winner".

Outputs in ``OUT``: ``cells/<id>/`` (the runs), ``sweep.json`` (the cells),
``results.parquet`` (one row per cell: ids, scenario, one string column per
grid key holding the override value, seed, status, error, wall time, and
every metric of :data:`~haif.analysis.compare.METRICS`), ``aggregate.parquet``
(one row per scenario and grid point: cells, ok, failed, and per chosen metric
``<metric>_mean``, ``_std``, ``_n``, ``_ci95`` = the half-width) and
``sweep.md`` (a table per scenario, each metric as ``mean ± half-width``, a
clear winner in bold, then the verdict per metric).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import posixpath
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from haif.analysis.compare import (
    METRIC_BY_KEY,
    METRICS,
    SUMMARY,
    Metrics,
    MetricSpec,
    format_diff,
    format_value,
    load_run,
    run_metrics,
)
from haif.analysis.stats import RULE, Verdict, clear_winner
from haif.analysis.stats import Stat as Stat  # re-exported: the sweep's statistics
from haif.analysis.stats import describe as describe
from haif.analysis.stats import t_quantile_975 as t_quantile_975
from haif.configfile import ConfigError, _node_line, load_model

Executor = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")
Status = Literal["ok", "failed"]

CELLS = "cells"
CELL_FILE = "cell.json"
ERROR_FILE = "error.txt"
MANIFEST = "sweep.json"
RESULTS = "results.parquet"
AGGREGATE = "aggregate.parquet"
MARKDOWN = "sweep.md"

DEFAULT_METRICS: tuple[str, ...] = (
    "success_rate",
    "ttft_p50_s",
    "ttft_p99_s",
    "latency_p50_s",
    "latency_p99_s",
    "goodput_tokens_per_s",
    "slo_attainment",
    "retried",
    "dead_letters",
    "cost",
)
"""Metrics aggregated when the sweep file names none (keys of ``summary.json``)."""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_OVERRIDE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


# ------------------------------------------------------------------ the sweep file


def _check_override(item: str) -> str:
    path, sep, _value = item.partition("=")
    if not sep or not _OVERRIDE_PATH.match(path):
        raise ValueError(f"expected path=value, e.g. duration_s=300, got {item!r}")
    return item


Override = Annotated[str, AfterValidator(_check_override)]


def _check_metric(key: str) -> str:
    if key not in METRIC_BY_KEY:
        raise ValueError(f"unknown metric {key!r} (allowed: {', '.join(METRIC_BY_KEY)})")
    return key


MetricKey = Annotated[str, AfterValidator(_check_metric)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SweepScenario(_Strict):
    """A scenario file (relative to the sweep file), its label and base overrides."""

    path: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(pattern=_NAME)] | None = None
    overrides: tuple[Override, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem

    @property
    def ref(self) -> str:
        """The path as written, normalized (part of the cell id)."""
        return posixpath.normpath(self.path.replace("\\", "/"))


class Sweep(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    description: str = ""
    scenarios: Annotated[tuple[SweepScenario, ...], Field(min_length=1)]
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    seeds: Annotated[tuple[int, ...], Field(min_length=1)]
    metrics: Annotated[tuple[MetricKey, ...], Field(min_length=1)] = DEFAULT_METRICS
    fixed_overrides: tuple[Override, ...] = ()

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_range(cls, value: Any) -> Any:
        """``{count: N, start: S}`` -> ``[S, ..., S + N - 1]`` (start defaults to 0)."""
        if not isinstance(value, Mapping):
            return value
        for key in value:
            if key not in ("count", "start"):
                raise ValueError(f"{key}: unknown key of a seed range (allowed: count, start)")
        count, start = value.get("count"), value.get("start", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"count: the number of seeds, an integer >= 1 (got {count!r})")
        if not isinstance(start, int) or isinstance(start, bool):
            raise ValueError(f"start: the first seed, an integer (got {start!r})")
        return list(range(start, start + count))

    @model_validator(mode="after")
    def _check(self) -> Sweep:
        labels: set[str] = set()
        runs: set[tuple[str, tuple[str, ...]]] = set()
        for i, sc in enumerate(self.scenarios):
            if sc.label in labels:
                raise ValueError(
                    f"scenarios.{i}.name: duplicate scenario label {sc.label!r}; "
                    "give each entry a distinct name"
                )
            labels.add(sc.label)
            if (sc.ref, sc.overrides) in runs:
                raise ValueError(f"scenarios.{i}: the same file with the same overrides twice")
            runs.add((sc.ref, sc.overrides))
        for key, values in self.grid.items():
            if not _OVERRIDE_PATH.match(key):
                raise ValueError(f"grid: {key!r} is not an override path like policy.placement")
            if key == "seed":
                raise ValueError("grid.seed: give the seeds under seeds, not in the grid")
            raws = [override_value(v) for v in values]
            for j, raw in enumerate(raws):
                if raw in raws[:j]:
                    raise ValueError(f"grid.{key}.{j}: duplicate value {values[j]!r}")
        for i, key in enumerate(self.metrics):
            if key in self.metrics[:i]:
                raise ValueError(f"metrics.{i}: duplicate metric {key!r}")
        seeds = self.seed_list
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds: seeds must be distinct")
        return self

    @property
    def seed_list(self) -> tuple[int, ...]:
        return self.seeds

    def points(self) -> list[tuple[tuple[str, str], ...]]:
        """Grid points in order: ((override path, value as override text), ...)."""
        axes = [[(k, override_value(v)) for v in vs] for k, vs in self.grid.items()]
        return [tuple(p) for p in itertools.product(*axes)]


def override_value(value: Any) -> str:
    """A grid value as the text after ``path=`` (parsed back as YAML to the same value)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value, sort_keys=True)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; its scenario files must exist (ConfigError)."""
    path = Path(path)
    sweep = load_model(Sweep, path)
    root = yaml.compose(path.read_text(encoding="utf-8"))
    for i, sc in enumerate(sweep.scenarios):
        file = path.parent / sc.path
        if not file.is_file():
            line = _node_line(root, ["scenarios", i, "path"])
            where = f"{path}:{line}" if line else str(path)
            raise ConfigError(f"{where}: scenarios.{i}.path: no such scenario file: {file}")
    return sweep


# ------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Cell:
    """One run: a scenario, a grid point and a seed."""

    id: str
    scenario: str  # the label
    scenario_ref: str  # the path as written in the sweep file
    scenario_path: str  # absolute
    point: tuple[tuple[str, str], ...]
    seed: int
    overrides: tuple[str, ...]  # in the order applied; the seed comes last

    def manifest(self) -> dict[str, Any]:
        """What ``cell.json`` records (and resuming compares)."""
        return {
            "id": self.id,
            "scenario": self.scenario,
            "scenario_file": self.scenario_ref,
            "grid": dict(self.point),
            "seed": self.seed,
            "overrides": list(self.overrides),
        }


def cell_id(
    label: str, ref: str, point: Sequence[tuple[str, str]], seed: int, overrides: Iterable[str]
) -> str:
    """A readable slug plus a hash of (scenario, sorted overrides, seed)."""
    key = json.dumps({"scenario": ref, "overrides": sorted(overrides), "seed": seed})
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    parts = [label, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point), f"seed{seed}"]
    slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(parts))[:80].strip("_.-")
    return f"{slug}-{digest}"


def plan_cells(sweep: Sweep, sweep_path: str | Path) -> list[Cell]:
    """Every cell, scenario by scenario, grid point by grid point, seed by seed."""
    base = Path(sweep_path).resolve().parent
    cells: list[Cell] = []
    for sc in sweep.scenarios:
        for point in sweep.points():
            overrides = (
                *sweep.fixed_overrides,
                *sc.overrides,
                *(f"{k}={v}" for k, v in point),
            )
            for seed in sweep.seed_list:
                cells.append(
                    Cell(
                        id=cell_id(sc.label, sc.ref, point, seed, overrides),
                        scenario=sc.label,
                        scenario_ref=sc.ref,
                        scenario_path=str((base / sc.path).resolve()),
                        point=point,
                        seed=seed,
                        overrides=overrides,
                    )
                )
    return cells


@dataclass(frozen=True)
class CellOutcome:
    cell_id: str
    status: Status
    metrics: Metrics | None = None
    error: str | None = None
    wall_s: float | None = None
    resumed: bool = False


def cell_metrics(folder: Path) -> Metrics:
    """The metrics of a finished cell: :func:`~haif.analysis.compare.run_metrics` of its
    folder, with ``summary.json``'s own value wherever it has the key.

    The two agree except in the last bits of ``cost`` (a sum over the records
    in another order), and ``summary.json`` holds the numbers ``haif sim``
    reports; the p90s and ``requests`` only ``run_metrics`` gives.
    """
    run = load_run(folder)
    metrics = run_metrics(run)
    summary = run.summary or {}
    for key in metrics:
        value = summary.get(key, False)
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            metrics[key] = None if value is None else float(value)
    return metrics


def _error_message(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def record_failure(folder: Path, message: str, detail: str) -> None:
    """Write ``error.txt`` and remove what would make the cell look finished."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY, CELL_FILE):
        (folder / name).unlink(missing_ok=True)
    (folder / ERROR_FILE).write_text(f"{message}\n\n{detail}", encoding="utf-8")


def run_cell(cell: Cell, cells_dir: str) -> CellOutcome:
    """Run one cell into ``cells_dir/<id>/`` (both executors call this)."""
    from haif.fleet.scenario import load_scenario
    from haif.sim.driver import run_scenario
    from haif.sim.report import write_report

    folder = Path(cells_dir) / cell.id
    started = time.perf_counter()
    try:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        scenario = load_scenario(cell.scenario_path, [*cell.overrides, f"seed={cell.seed}"])
        write_report(run_scenario(scenario), folder, plots=False)
        metrics = cell_metrics(folder)
        wall = time.perf_counter() - started
        marker = {"cell": cell.manifest(), "wall_s": round(wall, 3)}
        (folder / CELL_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    except Exception as exc:
        message = _error_message(exc)
        with contextlib.suppress(OSError):  # the error still reaches the summary
            record_failure(folder, message, "".join(traceback.format_exception(exc)))
        return CellOutcome(cell.id, "failed", error=message, wall_s=time.perf_counter() - started)
    return CellOutcome(cell.id, "ok", metrics, wall_s=wall)


def finished(cell: Cell, cells_dir: Path) -> CellOutcome | None:
    """The outcome of a cell already run with the same settings, else None."""
    folder = cells_dir / cell.id
    if not (folder / SUMMARY).is_file():
        return None
    try:
        marker = json.loads((folder / CELL_FILE).read_text(encoding="utf-8"))
        if marker["cell"] != cell.manifest():
            return None
        metrics = cell_metrics(folder)
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None
    wall = marker.get("wall_s")
    return CellOutcome(
        cell.id,
        "ok",
        metrics,
        wall_s=float(wall) if isinstance(wall, int | float) else None,
        resumed=True,
    )


# ------------------------------------------------------------------ executors

OnDone = Callable[[CellOutcome], None]


def _execute_local(pending: Sequence[Cell], cells_dir: Path, workers: int, on_done: OnDone) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=context) as pool:
        futures = {pool.submit(run_cell, cell, str(cells_dir)): cell for cell in pending}
        for future in as_completed(futures):
            cell = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker process died (BrokenProcessPool, ...)
                outcome = _lost(cell, cells_dir, exc)
            on_done(outcome)


def _lost(cell: Cell, cells_dir: Path, exc: BaseException) -> CellOutcome:
    message = f"worker failed: {_error_message(exc)}"
    record_failure(cells_dir / cell.id, message, "".join(traceback.format_exception(exc)))
    return CellOutcome(cell.id, "failed", error=message)


def _execute_ray(
    pending: Sequence[Cell],
    cells_dir: Path,
    workers: int,
    address: str | None,
    on_done: OnDone,
) -> None:
    import logging

    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_cell)
        refs = {remote.remote(cell, str(cells_dir)): cell for cell in pending}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # the task's worker died
                    outcome = _lost(refs[ref], cells_dir, exc)
                on_done(outcome)
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------ aggregation


@dataclass(frozen=True)
class Group:
    """The cells of one scenario and grid point (one per seed) and their statistics."""

    scenario: str
    point: tuple[tuple[str, str], ...]
    cells: tuple[Cell, ...]
    ok: int
    failed: int
    stats: dict[str, Stat]


def aggregate(
    cells: Sequence[Cell], outcomes: Mapping[str, CellOutcome], metrics: Sequence[str]
) -> list[Group]:
    """Per scenario and grid point (in sweep order): statistics over the ok cells."""
    by_key: dict[tuple[str, tuple[tuple[str, str], ...]], list[Cell]] = {}
    for cell in cells:
        by_key.setdefault((cell.scenario, cell.point), []).append(cell)
    groups: list[Group] = []
    for (scenario, point), members in by_key.items():
        results = [outcomes[c.id] for c in members if c.id in outcomes]
        ok = [r for r in results if r.status == "ok" and r.metrics is not None]
        stats: dict[str, Stat] = {}
        for key in metrics:
            values = [v for r in ok if r.metrics is not None and (v := r.metrics[key]) is not None]
            stats[key] = describe([float(v) for v in values if not math.isnan(v)])
        failed = sum(1 for r in results if r.status == "failed")
        groups.append(Group(scenario, point, tuple(members), len(ok), failed, stats))
    return groups


def results_frame(
    cells: Sequence[Cell], outcomes: Mapping[str, CellOutcome], grid_keys: Sequence[str]
) -> pd.DataFrame:
    """One row per cell (the contents of ``results.parquet``)."""
    rows: list[dict[str, Any]] = []
    for cell in cells:
        outcome = outcomes.get(cell.id)
        point = dict(cell.point)
        row: dict[str, Any] = {"cell_id": cell.id, "scenario": cell.scenario}
        row.update({key: point.get(key) for key in grid_keys})
        row.update(
            seed=cell.seed,
            status=outcome.status if outcome else "failed",
            resumed=bool(outcome and outcome.resumed),
            error=outcome.error if outcome else "not run",
            wall_s=outcome.wall_s if outcome else None,
            overrides="; ".join(cell.overrides),
        )
        values = (outcome.metrics if outcome else None) or {}
        row.update({m.key: values.get(m.key) for m in METRICS})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for m in METRICS:
        frame[m.key] = frame[m.key].astype("float64")
    frame["wall_s"] = frame["wall_s"].astype("float64")
    return frame


def aggregate_frame(
    groups: Sequence[Group], metrics: Sequence[str], grid_keys: Sequence[str]
) -> pd.DataFrame:
    """One row per scenario and grid point (the contents of ``aggregate.parquet``)."""
    rows: list[dict[str, Any]] = []
    for g in groups:
        point = dict(g.point)
        row: dict[str, Any] = {"scenario": g.scenario}
        row.update({key: point.get(key) for key in grid_keys})
        row.update(cells=len(g.cells), ok=g.ok, failed=g.failed)
        for key in metrics:
            s = g.stats[key]
            row.update(
                {
                    f"{key}_mean": s.mean,
                    f"{key}_std": s.std,
                    f"{key}_n": s.n,
                    f"{key}_ci95": s.ci95,
                }
            )
        rows.append(row)
    frame = pd.DataFrame(rows)
    for key in metrics:
        for suffix in ("mean", "std", "ci95"):
            frame[f"{key}_{suffix}"] = frame[f"{key}_{suffix}"].astype("float64")
    return frame


# ------------------------------------------------------------------ presentation


def format_stat(spec: MetricSpec, stat: Stat) -> str:
    """``mean ± half-width`` in the metric's unit: ``99.52% ± 0.31 pp``, ``144.2 ms ± 3.1 ms``.

    Counts are averaged over seeds, so they get one decimal (``4.3 ± 1.2``).
    """
    if stat.mean is None:
        return "n/a"
    unit = "rate" if spec.unit == "count" else spec.unit
    mean = format_value(unit, stat.mean)
    if stat.ci95 is None:
        return mean
    return f"{mean} ± {format_diff(unit, stat.ci95).lstrip('+')}"


def point_label(point: Sequence[tuple[str, str]]) -> str:
    """A grid point for people: ``jsq``, or ``placement=jsq, rate_scale=2``."""
    if len(point) == 1:
        return point[0][1]
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point) or "(no grid)"


def verdict(groups: Sequence[Group], key: str) -> Verdict:
    """:func:`~haif.analysis.stats.clear_winner` over the grid points of one scenario;
    the labels in the verdict are indexes into ``groups`` as strings."""
    stats = {str(i): g.stats[key] for i, g in enumerate(groups)}
    return clear_winner(stats, METRIC_BY_KEY[key].better)


def best_points(groups: Sequence[Group], key: str) -> set[int]:
    """Indexes (into ``groups``) of the clear winner of ``key``: the best mean, and only
    when its confidence interval overlaps no other point's (else the empty set)."""
    won = verdict(groups, key).winner
    return set() if won is None else {int(won)}


def verdict_text(groups: Sequence[Group], key: str) -> str:
    """One metric's verdict in words: ``jsq`` or ``no clear winner (...)``."""
    v = verdict(groups, key)

    def name(index: str) -> str:
        return point_label(groups[int(index)].point)

    if v.winner is not None:
        return name(v.winner)
    if v.reason == "no direction":
        return "not ranked (neither higher nor lower is better)"
    if v.reason == "no data":
        return "no clear winner (fewer than two grid points have a value)"
    assert v.best is not None
    if v.reason == "tie":
        return "no clear winner (every grid point has the same mean)"
    if v.reason == "one seed":
        return f"no clear winner (one seed: no interval; best mean {name(v.best)})"
    others = ", ".join(name(c) for c in v.contenders if c != v.best)
    return f"no clear winner (best mean {name(v.best)}; its interval overlaps {others})"


def _seeds_text(g: Group) -> str:
    text = f"{g.ok}/{len(g.cells)}"
    return f"{text} ({g.failed} failed)" if g.failed else text


def _by_scenario(groups: Sequence[Group]) -> dict[str, list[Group]]:
    table: dict[str, list[Group]] = {}
    for g in groups:
        table.setdefault(g.scenario, []).append(g)
    return table


def render_markdown(result: SweepResult) -> str:
    """``sweep.md``: a table per scenario, then the failed cells."""
    sweep = result.sweep
    keys = list(sweep.grid)
    seeds = ", ".join(str(s) for s in sweep.seed_list)
    lines = [f"# HAIF sweep: {sweep.name}", ""]
    if sweep.description:
        lines += [sweep.description.strip(), ""]
    lines += [
        f"- scenarios: {', '.join(f'{s.label} (`{s.ref}`)' for s in sweep.scenarios)}",
        "- grid: "
        + (
            "; ".join(f"`{k}` in {', '.join(v for _, v in axis)}" for k, axis in _axes(sweep))
            or "(none)"
        ),
        f"- seeds: {seeds}",
        "- fixed overrides: " + (", ".join(f"`{o}`" for o in sweep.fixed_overrides) or "(none)"),
        f"- cells: {len(result.cells)} ({result.failed} failed)",
        "",
        "Each metric is the mean over the seeds ± the half-width of its 95 % confidence "
        "interval (Student t; ± 0 with one seed). `seeds` counts the cells that finished. "
        f"A winner is named per metric by one rule: {RULE}. A clear winner is in bold.",
    ]
    for scenario, groups in _by_scenario(result.groups).items():
        specs = [METRIC_BY_KEY[k] for k in sweep.metrics]
        best = {s.key: best_points(groups, s.key) for s in specs}
        ref = next(s.ref for s in sweep.scenarios if s.label == scenario)
        lines += ["", f"## {scenario} (`{ref}`)", ""]
        header = [*(f"`{k}`" for k in keys), "seeds", *(s.label for s in specs)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(keys) + "---:|" + "---:|" * len(specs))
        for i, g in enumerate(groups):
            point = dict(g.point)
            cells = [point[k] for k in keys] + [_seeds_text(g)]
            for s in specs:
                text = format_stat(s, g.stats[s.key])
                cells.append(f"**{text}**" if i in best[s.key] else text)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines += ["", "Winners:", ""]
        lines += [f"- {s.label}: {verdict_text(groups, s.key)}" for s in specs if s.better]
    failures = [(c, result.outcomes.get(c.id)) for c in result.cells]
    failures = [(c, o) for c, o in failures if o is None or o.status == "failed"]
    if failures:
        lines += ["", "## Failed cells", "", "| cell | error |", "|---|---|"]
        for c, o in failures:
            error = ((o.error if o else None) or "not run").replace("|", "\\|")
            lines.append(f"| `{c.id}` | {error} |")
    lines.append("")
    return "\n".join(lines)


def _axes(sweep: Sweep) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(k, [(k, override_value(v)) for v in vs]) for k, vs in sweep.grid.items()]


def sweep_tables(result: SweepResult) -> list[Table]:
    """The rich tables printed at the end: one per scenario, like ``sweep.md``."""
    sweep = result.sweep
    keys = list(sweep.grid)
    specs = [METRIC_BY_KEY[k] for k in sweep.metrics]
    tables: list[Table] = []
    for scenario, groups in _by_scenario(result.groups).items():
        best = {s.key: best_points(groups, s.key) for s in specs}
        table = Table(
            title=f"sweep {sweep.name}: {scenario} (mean ± 95% CI half-width; "
            "* = clear winner: its interval overlaps no other)",
            caption="\n".join(
                [
                    "winner per metric (named only where the intervals separate):",
                    *(
                        f"  {s.short_label}: {verdict_text(groups, s.key)}"
                        for s in specs
                        if s.better
                    ),
                ]
            ),
            caption_justify="left",
        )
        for k in keys:
            table.add_column(k.rsplit(".", 1)[-1], no_wrap=True)
        table.add_column("seeds", justify="right")
        for s in specs:
            table.add_column(s.short_label, justify="right")
        for i, g in enumerate(groups):
            point = dict(g.point)
            style = "red" if g.failed else ""
            cells: list[str | Text] = [point[k] for k in keys]
            cells.append(Text(_seeds_text(g), style=style))
            for s in specs:
                text = format_stat(s, g.stats[s.key])
                if i in best[s.key]:
                    cells.append(Text(f"*{text}", style="bold green"))
                else:
                    cells.append(Text(text))
            table.add_row(*cells)
        tables.append(table)
    return tables


def print_sweep(result: SweepResult, console: Console) -> None:
    for table in sweep_tables(result):
        console.print(table)
    for cell in result.cells:
        outcome = result.outcomes.get(cell.id)
        if outcome is None or outcome.status == "failed":
            error = (outcome.error if outcome else None) or "not run"
            console.print(
                f"[bold red]failed[/] {cell.id}: {error[:300]} "
                f"({result.out / CELLS / cell.id / ERROR_FILE})",
                highlight=False,
            )
    console.print(
        f"{len(result.cells)} cells: {result.ran} run, {result.skipped} skipped (already "
        f"done), {result.failed} failed; {result.wall_s:.1f} s with executor "
        f"{result.executor} -> {result.out / MARKDOWN}",
        highlight=False,
    )


# ------------------------------------------------------------------ running a sweep


@dataclass
class SweepResult:
    sweep: Sweep
    out: Path
    executor: Executor
    cells: list[Cell]
    outcomes: dict[str, CellOutcome]
    groups: list[Group] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        return sum(
            1 for c in self.cells if (o := self.outcomes.get(c.id)) is None or o.status == "failed"
        )

    @property
    def skipped(self) -> int:
        return sum(1 for o in self.outcomes.values() if o.resumed)

    @property
    def ran(self) -> int:
        return sum(1 for o in self.outcomes.values() if not o.resumed)


def default_out(sweep: Sweep) -> Path:
    return Path("reports") / f"sweep-{sweep.name}"


def run_sweep(
    sweep_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    executor: Executor = "local",
    workers: int | None = None,
    address: str | None = None,
    resume: bool = True,
    console: Console | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run (or resume) every cell of a sweep, aggregate, and write the outputs."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: unknown executor {executor!r} (allowed: local, ray)")
    if address is not None and executor != "ray":
        raise ConfigError("--address only goes with --executor ray")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--executor ray needs Ray: pip install 'haif[sweep]' (or 'ray>=2.9')"
            ) from None

    started = time.perf_counter()
    sweep_path = Path(sweep_path)
    sweep = load_sweep(sweep_path)
    _check_scenarios(sweep, sweep_path)
    out = Path(out_dir) if out_dir is not None else default_out(sweep)
    cells_dir = out / CELLS
    try:
        cells_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the output folder: {exc.strerror}") from None
    cells = plan_cells(sweep, sweep_path)
    manifest = {
        "name": sweep.name,
        "sweep_file": str(sweep_path),
        "metrics": list(sweep.metrics),
        "cells": [c.manifest() for c in cells],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    outcomes: dict[str, CellOutcome] = {}
    pending: list[Cell] = []
    for cell in cells:
        done = finished(cell, cells_dir) if resume else None
        if done is not None:
            outcomes[cell.id] = done
        else:
            pending.append(cell)

    console = console or Console(stderr=True)
    counts: dict[str, Any] = {"ok": 0, "failed": 0, "skipped": len(cells) - len(pending)}
    with Progress(
        TextColumn(f"[bold]sweep {sweep.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "{task.fields[ok]} done, [red]{task.fields[failed]} failed[/], "
            "{task.fields[skipped]} skipped (resumed)"
        ),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    ) as bar:
        task = bar.add_task("cells", total=len(cells), completed=counts["skipped"], **counts)

        def on_done(outcome: CellOutcome) -> None:
            outcomes[outcome.cell_id] = outcome
            counts[outcome.status] += 1
            bar.update(task, advance=1, **counts)

        if pending:
            if executor == "ray":
                _execute_ray(pending, cells_dir, workers, address, on_done)
            else:
                _execute_local(pending, cells_dir, workers, on_done)

    result = SweepResult(sweep, out, executor, cells, outcomes)
    result.groups = aggregate(cells, outcomes, sweep.metrics)
    grid_keys = list(sweep.grid)
    results_frame(cells, outcomes, grid_keys).to_parquet(out / RESULTS, index=False)
    aggregate_frame(result.groups, sweep.metrics, grid_keys).to_parquet(
        out / AGGREGATE, index=False
    )
    (out / MARKDOWN).write_text(render_markdown(result), encoding="utf-8")
    result.wall_s = time.perf_counter() - started
    return result


def _check_scenarios(sweep: Sweep, sweep_path: Path) -> None:
    """Fail early when a scenario does not load with its fixed and own overrides."""
    from haif.fleet.scenario import load_scenario

    for i, sc in enumerate(sweep.scenarios):
        try:
            load_scenario(sweep_path.parent / sc.path, [*sweep.fixed_overrides, *sc.overrides])
        except ConfigError as exc:
            raise ConfigError(
                f"{sweep_path}: scenarios.{i} ({sc.label}) with fixed_overrides and its "
                f"overrides: {exc}"
            ) from None
