"""``haif regress``: catch a change that makes the canonical scenarios worse.

The *canonical set* (``regress/canonical.yaml``, :class:`CanonicalSet`) lists
small scenarios, each shortened with ``--set``-style overrides so it runs in
about a second::

    scenarios:
      - name: failover                       # folder name of the run
        scenario: ../scenarios/failover.yaml # relative to canonical.yaml
        seed: 42
        overrides: [duration_s=300, faults.0.start_s=100, faults.0.end_s=200]

:func:`run_canonical` runs every entry with
:func:`haif.fleet.scenario.load_scenario` + :func:`haif.sim.driver.run_scenario`
+ :func:`haif.sim.report.write_report` (``plots=False``) into
``OUT/<name>/`` and writes ``OUT/canonical.json`` (the entries it ran). The
simulator is deterministic, so the same code gives the same
``summary.json`` bytes.

:func:`refresh_baseline` does the same into the committed baseline
(``reports/baseline`` by default), keeping only ``summary.json`` and
``records.parquet`` per scenario plus ``canonical.json`` and a README. Do it
deliberately, when a change is *meant* to move the numbers, and commit the
result with that change.

:func:`compare_sets` pairs the runs of a baseline and a current folder by
name (either may also be a single run folder), computes the metrics of
:func:`haif.analysis.compare.run_metrics` for both and checks each against
its threshold (``regress/thresholds.yaml``, :class:`Thresholds`)::

    metrics:
      - {metric: ttft_p99_s, direction: lower_is_better, max_relative: 0.15, max_absolute: 0.02}
    scenarios:            # optional per-scenario replacements
      burst:
        - {metric: ttft_p99_s, direction: lower_is_better, max_relative: 0.25}

A metric *regresses* when it moved the wrong way by more than every limit
given: more than ``max_absolute`` (the metric's unit: seconds, a fraction,
a count, dollars) and more than ``max_relative`` times the baseline value.
With only one of the two, that one decides. Metrics without a threshold are
reported, never failed. With ``--exact`` every ``summary.json`` must also
equal the baseline's, key for key (the determinism check CI can use).

:func:`render_markdown` writes the report (a table per scenario: baseline,
current, delta, threshold, PASS / FAIL); the command exits 1 on any
regression, 2 on a user error (:class:`~haif.configfile.ConfigError`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table
from rich.text import Text

from haif.analysis.compare import (
    METRIC_BY_KEY,
    METRICS,
    RECORDS,
    SUMMARY,
    Metrics,
    MetricSpec,
    Unit,
    delta,
    format_delta,
    format_diff,
    format_value,
    is_run_folder,
    load_run,
    run_metrics,
)
from haif.configfile import ConfigError, load_model

DEFAULT_BASELINE = Path("reports/baseline")
DEFAULT_THRESHOLDS = Path("regress/thresholds.yaml")
DEFAULT_CANONICAL = Path("regress/canonical.yaml")
MANIFEST = "canonical.json"
BASELINE_FILES: tuple[str, ...] = (SUMMARY, RECORDS)
"""What the committed baseline keeps of each canonical run."""

Direction = Literal["higher_is_better", "lower_is_better"]
Status = Literal["PASS", "FAIL", "info"]
_DIRECTION_OF: dict[str, Direction] = {"higher": "higher_is_better", "lower": "lower_is_better"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------ the canonical set


class CanonicalRun(_Strict):
    """One canonical scenario: a scenario file, its overrides and seed."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    scenario: Annotated[str, Field(min_length=1)]
    overrides: tuple[str, ...] = ()
    seed: int


class CanonicalSet(_Strict):
    scenarios: Annotated[tuple[CanonicalRun, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> CanonicalSet:
        seen: set[str] = set()
        for i, entry in enumerate(self.scenarios):
            if entry.name in seen:
                raise ValueError(f"scenarios.{i}.name: duplicate name {entry.name!r}")
            seen.add(entry.name)
        return self


def load_canonical(path: str | Path = DEFAULT_CANONICAL) -> CanonicalSet:
    """Read and validate the canonical set (ConfigError names file, line and field)."""
    return load_model(CanonicalSet, path)


def entry_manifest(entry: CanonicalRun) -> dict[str, Any]:
    """What ``canonical.json`` records of an entry (as written in the YAML)."""
    return {
        "name": entry.name,
        "scenario": entry.scenario,
        "overrides": list(entry.overrides),
        "seed": entry.seed,
    }


Progress = Callable[[CanonicalRun, int, int, float], None]


def run_canonical(
    canonical_path: str | Path,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every canonical scenario into ``out_dir/<name>/``; return the summaries by name."""
    from haif.fleet.scenario import load_scenario
    from haif.sim.driver import run_scenario
    from haif.sim.report import write_report

    canonical_path = Path(canonical_path)
    canonical = load_canonical(canonical_path)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the output folder: {exc.strerror}") from None
    summaries: dict[str, dict[str, Any]] = {}
    total = len(canonical.scenarios)
    for i, entry in enumerate(canonical.scenarios):
        scenario_path = (canonical_path.parent / entry.scenario).resolve()
        try:
            scenario = load_scenario(scenario_path, [*entry.overrides, f"seed={entry.seed}"])
        except ConfigError as exc:
            raise ConfigError(f"{canonical_path}: scenarios.{i} ({entry.name}): {exc}") from None
        started = time.perf_counter()
        result = run_scenario(scenario)
        summaries[entry.name] = write_report(result, out / entry.name, plots=False)
        if progress is not None:
            progress(entry, i, total, time.perf_counter() - started)
    manifest = {"canonical": [entry_manifest(e) for e in canonical.scenarios]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return summaries


def _baseline_readme(canonical: CanonicalSet) -> str:
    lines = [
        "# Regression baseline (generated: do not edit)",
        "",
        "Written by `haif regress --refresh-baseline` from `regress/canonical.yaml`.",
        "Each folder holds the `summary.json` and `records.parquet` of one canonical",
        "scenario; `canonical.json` lists the entries that produced them.",
        "Check a change with `haif regress --run-canonical --out reports/regress`",
        "and refresh (then commit) this folder only when a change is meant to move",
        "the numbers.",
        "",
        "| name | scenario | seed | overrides |",
        "|---|---|---|---|",
    ]
    for e in canonical.scenarios:
        lines.append(
            f"| {e.name} | `{e.scenario}` | {e.seed} | "
            + (", ".join(f"`{o}`" for o in e.overrides) or "none")
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


def _replaceable(folder: Path) -> bool:
    """Whether ``folder`` may be replaced by a refresh: missing, empty, a baseline or a run."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    return not any(folder.iterdir()) or (folder / MANIFEST).is_file() or is_run_folder(folder)


def refresh_baseline(
    canonical_path: str | Path,
    baseline_dir: str | Path = DEFAULT_BASELINE,
    *,
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Rerun the canonical set and replace ``baseline_dir`` with its summaries and records."""
    target = Path(baseline_dir)
    if not _replaceable(target):
        raise ConfigError(
            f"{target}: refusing to replace it: it is not a HAIF baseline "
            f"(no {MANIFEST}) nor a run folder; give another --baseline"
        )
    staging = target.parent / f".{target.name}.refresh"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        summaries = run_canonical(canonical_path, staging, progress=progress)
        for run_dir in (p for p in staging.iterdir() if p.is_dir()):
            for item in run_dir.iterdir():
                if item.name not in BASELINE_FILES:
                    item.unlink()
        canonical = load_canonical(canonical_path)
        (staging / "README.md").write_text(_baseline_readme(canonical), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return summaries


# ------------------------------------------------------------------ thresholds


class Threshold(_Strict):
    """How far one metric may move the wrong way before it is a regression."""

    metric: str
    direction: Direction
    max_relative: Annotated[float, Field(ge=0)] | None = None
    max_absolute: Annotated[float, Field(ge=0)] | None = None

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METRIC_BY_KEY:
            raise ValueError(f"unknown metric {value!r} (known: {', '.join(METRIC_BY_KEY)})")
        return value

    @model_validator(mode="after")
    def _check(self) -> Threshold:
        if self.max_relative is None and self.max_absolute is None:
            raise ValueError("max_relative: give max_relative and/or max_absolute")
        better = METRIC_BY_KEY[self.metric].better
        if better is not None and _DIRECTION_OF[better] != self.direction:
            raise ValueError(f"direction: {self.metric} is {_DIRECTION_OF[better]}")
        return self

    def allowed(self, base: float) -> float:
        """How much worse than ``base`` the metric may get (the loosest limit given)."""
        limits = [self.max_absolute] if self.max_absolute is not None else []
        if self.max_relative is not None:
            limits.append(self.max_relative * abs(base))
        return max(limits)

    def describe(self, unit: Unit) -> str:
        parts = []
        if self.max_relative is not None:
            parts.append(f"{self.max_relative:.1%}")
        if self.max_absolute is not None:
            parts.append(format_diff(unit, self.max_absolute).lstrip("+"))
        limit = parts[0] if len(parts) == 1 else f"max({', '.join(parts)})"
        arrow = "↑" if self.direction == "higher_is_better" else "↓"
        return f"{arrow} better; worse by ≤ {limit}"


class Thresholds(_Strict):
    metrics: tuple[Threshold, ...]
    scenarios: dict[str, tuple[Threshold, ...]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> Thresholds:
        groups: list[tuple[str, Sequence[Threshold]]] = [("metrics", self.metrics)]
        groups += [(f"scenarios.{k}", v) for k, v in self.scenarios.items()]
        for where, items in groups:
            seen: set[str] = set()
            for i, th in enumerate(items):
                if th.metric in seen:
                    raise ValueError(f"{where}.{i}.metric: duplicate metric {th.metric!r}")
                seen.add(th.metric)
        return self

    def for_scenario(self, name: str) -> dict[str, Threshold]:
        table = {th.metric: th for th in self.metrics}
        table.update({th.metric: th for th in self.scenarios.get(name, ())})
        return table


def load_thresholds(path: str | Path = DEFAULT_THRESHOLDS) -> Thresholds:
    """Read and validate the thresholds YAML (ConfigError names file, line and field)."""
    return load_model(Thresholds, path)


# ------------------------------------------------------------------ comparing


@dataclass(frozen=True)
class MetricResult:
    spec: MetricSpec
    baseline: float | None
    current: float | None
    threshold: Threshold | None
    status: Status
    allowed: float | None = None

    @property
    def delta(self) -> tuple[float | None, float | None]:
        return delta(self.baseline, self.current)


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    baseline_path: Path | None
    current_path: Path | None
    metrics: tuple[MetricResult, ...] = ()
    problem: str | None = None  # e.g. "missing in current"
    summary_diff: tuple[str, ...] | None = None  # with --exact: differing keys

    @property
    def regressions(self) -> list[str]:
        return [m.spec.key for m in self.metrics if m.status == "FAIL"]

    @property
    def failed(self) -> bool:
        return bool(self.problem or self.regressions or self.summary_diff)


@dataclass(frozen=True)
class RegressReport:
    baseline: Path
    current: Path
    thresholds: Path | None
    scenarios: tuple[ScenarioResult, ...]
    exact: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def failed(self) -> bool:
        return any(s.failed for s in self.scenarios)


def check_metric(
    spec: MetricSpec, base: float | None, cur: float | None, th: Threshold | None
) -> MetricResult:
    """PASS / FAIL one metric against its threshold (``info`` without one)."""
    if th is None:
        return MetricResult(spec, base, cur, None, "info")
    if cur is None:
        status: Status = "PASS" if base is None else "FAIL"
        return MetricResult(spec, base, cur, th, status)
    if base is None:
        return MetricResult(spec, base, cur, th, "PASS")
    worse = cur - base if th.direction == "lower_is_better" else base - cur
    allowed = th.allowed(base)
    return MetricResult(spec, base, cur, th, "FAIL" if worse > allowed else "PASS", allowed)


def run_set(path: str | Path) -> tuple[dict[str, Path], bool]:
    """Runs under ``path`` by name, and whether ``path`` is itself a single run folder.

    A folder with ``canonical.json`` is always a folder of runs, even if a
    stray ``records.parquet`` was written next to it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    if is_run_folder(folder) and not (folder / MANIFEST).is_file():
        return {folder.resolve().name: folder}, True
    runs = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and is_run_folder(p)}
    if not runs:
        raise ConfigError(
            f"{folder}: neither a HAIF run folder nor a folder of runs "
            f"(no {RECORDS} in it or in its subfolders)"
        )
    return runs, False


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(e["name"]): dict(e) for e in data["canonical"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a valid {MANIFEST}: {exc}") from None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def summary_diff(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Dotted keys where two summaries differ (``summary.json`` when one is missing)."""
    if a is None or b is None:
        return () if a is b else (SUMMARY,)
    fa, fb = _flatten(a), _flatten(b)
    return tuple(sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)))


def compare_sets(
    baseline: str | Path,
    current: str | Path,
    thresholds: Thresholds,
    *,
    thresholds_path: Path | None = None,
    exact: bool = False,
) -> RegressReport:
    """Check every baseline run against the current run of the same name."""
    base_runs, base_single = run_set(baseline)
    cur_runs, cur_single = run_set(current)
    notes: list[str] = []
    if base_single != cur_single:
        kind = {True: "a single run folder", False: "a folder of runs"}
        raise ConfigError(
            f"cannot pair runs: baseline {baseline} is {kind[base_single]} "
            f"but current {current} is {kind[cur_single]}"
        )
    if base_single:
        # One run each: pair them whatever their folder names.
        cur_runs = {next(iter(base_runs)): next(iter(cur_runs.values()))}
    else:
        base_manifest = _manifest(Path(baseline))
        cur_manifest = _manifest(Path(current))
        for name in sorted(base_runs.keys() & cur_runs.keys()):
            a, b = base_manifest.get(name), cur_manifest.get(name)
            if a is not None and b is not None and a != b:
                raise ConfigError(
                    f"scenario {name!r} was run with different settings in the baseline "
                    f"({baseline}/{MANIFEST}: {a}) and now ({current}/{MANIFEST}: {b}); "
                    "if the canonical set changed on purpose, refresh the baseline "
                    "with `haif regress --refresh-baseline`"
                )
        extra = sorted(cur_runs.keys() - base_runs.keys())
        if extra:
            notes.append("not in the baseline (refresh it to include them): " + ", ".join(extra))
        unknown = sorted(thresholds.scenarios.keys() - base_runs.keys())
        if unknown:
            notes.append("thresholds for scenarios not compared: " + ", ".join(unknown))
        # The canonical order when the baseline says it, else by name.
        order = {name: i for i, name in enumerate(base_manifest)}
        base_runs = dict(
            sorted(base_runs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
        )

    results: list[ScenarioResult] = []
    for name, base_path in base_runs.items():
        cur_path = cur_runs.get(name)
        if cur_path is None:
            results.append(ScenarioResult(name, base_path, None, problem=f"missing in {current}"))
            continue
        base_run, cur_run = load_run(base_path), load_run(cur_path)
        base_m: Metrics = run_metrics(base_run)
        cur_m: Metrics = run_metrics(cur_run)
        table = thresholds.for_scenario(name)
        checks = tuple(
            check_metric(spec, base_m[spec.key], cur_m[spec.key], table.get(spec.key))
            for spec in METRICS
        )
        diff = summary_diff(base_run.summary, cur_run.summary) if exact else None
        results.append(ScenarioResult(name, base_path, cur_path, checks, summary_diff=diff))
    return RegressReport(
        Path(baseline), Path(current), thresholds_path, tuple(results), exact, tuple(notes)
    )


# ------------------------------------------------------------------ reporting


def _threshold_text(m: MetricResult) -> str:
    if m.threshold is None:
        return "—"
    text = m.threshold.describe(m.spec.unit)
    if m.allowed is not None and m.threshold.max_relative is not None:
        text += f" (= {format_diff(m.spec.unit, m.allowed).lstrip('+')})"
    return text


def _headline(report: RegressReport) -> str:
    failed = [s for s in report.scenarios if s.failed]
    if not failed:
        return f"PASS: {len(report.scenarios)} scenario(s), no regression beyond threshold"
    parts = []
    for s in failed:
        why = list(s.regressions)
        if s.problem:
            why.append(s.problem)
        if s.summary_diff:
            why.append("summary.json differs")
        parts.append(f"{s.name} ({', '.join(why)})")
    return f"FAIL: {len(failed)} of {len(report.scenarios)} scenario(s): " + "; ".join(parts)


def render_markdown(report: RegressReport) -> str:
    """The Markdown report: a headline, then a table per scenario."""
    lines = [
        "# HAIF regression report",
        "",
        f"- baseline: `{report.baseline}`",
        f"- current: `{report.current}`",
        f"- thresholds: `{report.thresholds}`" if report.thresholds else "- thresholds: (none)",
        f"- exact summaries required: {'yes' if report.exact else 'no'}",
        "",
        f"**{_headline(report)}**",
        "",
        "A metric fails when it got worse by more than its threshold (the looser of "
        "the relative and absolute limits); metrics without a threshold are shown "
        "for information.",
    ]
    for note in report.notes:
        lines += ["", f"Note: {note}"]
    for s in report.scenarios:
        lines += ["", f"## {s.name}: {'FAIL' if s.failed else 'PASS'}", ""]
        if s.problem:
            lines += [f"{s.problem}.", ""]
            continue
        lines += [
            "| metric | baseline | current | delta | threshold | result |",
            "|---|---:|---:|---:|---|---|",
        ]
        for m in s.metrics:
            diff, rel = m.delta
            result = {"PASS": "PASS", "FAIL": "**FAIL**", "info": ""}[m.status]
            lines.append(
                f"| {m.spec.key} | {format_value(m.spec.unit, m.baseline)} | "
                f"{format_value(m.spec.unit, m.current)} | "
                f"{format_delta(m.spec.unit, diff, rel)} | {_threshold_text(m)} | {result} |"
            )
        if s.summary_diff is not None:
            if s.summary_diff:
                keys = ", ".join(f"`{k}`" for k in s.summary_diff[:20])
                more = len(s.summary_diff) - 20
                lines += [
                    "",
                    f"summary.json differs from the baseline in: {keys}"
                    + (f" and {more} more" if more > 0 else ""),
                ]
            else:
                lines += ["", "summary.json is identical to the baseline."]
    lines.append("")
    return "\n".join(lines)


def print_report(report: RegressReport, console: Console, *, verbose: bool = True) -> None:
    """Per scenario a rich table (or only failures when not verbose), then the headline."""
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    for s in report.scenarios:
        if s.problem:
            console.print(f"[bold red]FAIL[/] {s.name}: {s.problem}", highlight=False)
            continue
        rows = [m for m in s.metrics if verbose or m.status == "FAIL"]
        if rows:
            status = "[red]FAIL[/]" if s.failed else "[green]PASS[/]"
            table = Table(title=f"{s.name}: {status}")
            for col in ("metric", "baseline", "current", "delta", "threshold", "result"):
                table.add_column(col, justify="left" if col in {"metric", "threshold"} else "right")
            for m in rows:
                diff, rel = m.delta
                style = {"PASS": "green", "FAIL": "bold red", "info": "dim"}[m.status]
                table.add_row(
                    m.spec.key,
                    format_value(m.spec.unit, m.baseline),
                    format_value(m.spec.unit, m.current),
                    format_delta(m.spec.unit, diff, rel),
                    _threshold_text(m),
                    Text(m.status if m.status != "info" else "", style=style),
                )
            console.print(table)
        if s.summary_diff:
            console.print(
                f"[red]{s.name}: summary.json differs in[/] " + ", ".join(s.summary_diff[:20]),
                highlight=False,
            )
    style = "bold red" if report.failed else "bold green"
    console.print(Text(_headline(report), style=style))


def write_markdown(report: RegressReport, path: str | Path) -> Path:
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(report), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the report: {exc.strerror}") from None
    return out
