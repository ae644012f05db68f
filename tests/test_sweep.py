"""`haif sweep` on a tiny sweep: one minute of the failover trace, 2 placements x 2 seeds.

The local executor's run is shared by the module (``local`` fixture); the
other tests resume from it, add a failing cell, check the sweep file's
validation, and compare the Ray executor's files with it byte for byte.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from harness.analysis import cli
from harness.require import require

from haif.analysis import sweep as sw
from haif.analysis.compare import METRIC_BY_KEY
from haif.analysis.query import discover_runs, resolve_runs, run_query
from haif.analysis.stats import Better, Stat, clear_winner
from haif.configfile import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FAILOVER = ROOT / "scenarios" / "failover.yaml"
FIXED = ["duration_s=60", "drain_s=30", "faults=[]"]
PLACEMENTS = ["p2c", "round_robin"]
SEEDS = [1, 2]
SUMMARY_METRICS = ("success_rate", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "retried", "cost")


def write_sweep(folder: Path, name: str = "tiny", **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": name,
        "scenarios": [{"path": str(FAILOVER), "name": "failover"}],
        "fixed_overrides": FIXED,
        "grid": {"policy.placement": PLACEMENTS},
        "seeds": SEEDS,
    }
    data.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def summaries(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((out / "cells").glob("*/summary.json"))}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, sw.SweepResult]:
    base = tmp_path_factory.mktemp("sweep")
    path = write_sweep(base)
    out = base / "out"
    result = sw.run_sweep(path, out, executor="local", workers=2, progress=False)
    return path, out, result


# ------------------------------------------------------------------ local executor


@pytest.mark.slow
def test_local_runs_every_cell_and_aggregates(
    local: tuple[Path, Path, sw.SweepResult],
) -> None:
    _path, out, result = local
    assert len(result.cells) == len(PLACEMENTS) * len(SEEDS)
    assert (result.ran, result.skipped, result.failed) == (4, 0, 0)
    ids = [c.id for c in result.cells]
    assert len(set(ids)) == 4
    assert ids[0].startswith("failover-placement=p2c-seed1-")
    for cell in result.cells:
        folder = out / "cells" / cell.id
        assert (folder / "summary.json").is_file()
        assert (folder / "records.parquet").is_file()
        assert not (folder / "error.txt").exists()
        marker = json.loads((folder / "cell.json").read_text())
        assert marker["cell"]["overrides"] == [*FIXED, f"policy.placement={cell.point[0][1]}"]

    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 4
    assert list(results["status"]) == ["ok"] * 4
    assert list(results["policy.placement"]) == ["p2c", "p2c", "round_robin", "round_robin"]

    agg = pd.read_parquet(out / "aggregate.parquet")
    assert list(agg["policy.placement"]) == PLACEMENTS
    assert list(agg["ok"]) == [2, 2]
    some_spread = False
    for placement, group in zip(PLACEMENTS, result.groups, strict=True):
        cells = [c for c in result.cells if dict(c.point)["policy.placement"] == placement]
        per_cell = [json.loads((out / "cells" / c.id / "summary.json").read_text()) for c in cells]
        row = agg[agg["policy.placement"] == placement].iloc[0]
        for key in SUMMARY_METRICS:
            values = [float(s[key]) for s in per_cell]
            assert row[f"{key}_n"] == 2
            assert row[f"{key}_mean"] == statistics.fmean(values), key
            assert group.stats[key].mean == statistics.fmean(values)
            std = statistics.stdev(values)
            assert row[f"{key}_std"] == pytest.approx(std, abs=1e-15)
            half = 12.706204736 * std / math.sqrt(2)
            assert row[f"{key}_ci95"] == pytest.approx(half, abs=1e-15)
            if values[0] != values[1]:
                assert row[f"{key}_ci95"] > 0
                some_spread = True
    assert some_spread, "two seeds should differ in some metric"

    md = (out / "sweep.md").read_text()
    assert "## failover" in md
    assert "| `policy.placement` | seeds | success rate |" in md
    assert " ± " in md
    # A grid point is in bold only where it is the clear winner (its interval apart).
    for spec in (METRIC_BY_KEY[k] for k in result.sweep.metrics):
        won = sw.best_points(result.groups, spec.key)
        line = f"- {spec.label}: {sw.verdict_text(result.groups, spec.key)}"
        if spec.better:
            assert line in md
        if won:
            (index,) = won
            assert f"**{sw.format_stat(spec, result.groups[index].stats[spec.key])}**" in md
    bold = md.count("**") // 2
    assert bold == sum(len(sw.best_points(result.groups, k)) for k in result.sweep.metrics)


@pytest.mark.slow
def test_query_sees_the_sweep_cells(
    local: tuple[Path, Path, sw.SweepResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _path, out, result = local
    runs = resolve_runs([out])
    assert len(runs) == len(result.cells)
    names = {f"{out.name}/{c.id}" for c in result.cells}
    counts = run_query("SELECT run, count(*) FROM records GROUP BY run", runs)
    assert {run for run, _n in counts.rows} == names
    for run, n in counts.rows:
        cell_id = run.split("/", 1)[1]
        assert n == len(pd.read_parquet(out / "cells" / cell_id / "records.parquet"))
    cells = run_query(
        'SELECT run, sweep, cell_id, scenario, seed, "policy.placement" FROM sweep_cells '
        "ORDER BY cell_id",
        runs,
    )
    expected = sorted(
        (
            f"{out.name}/{c.id}",
            out.name,
            c.id,
            c.scenario,
            c.seed,
            dict(c.point)["policy.placement"],
        )
        for c in result.cells
    )
    assert sorted(cells.rows) == expected
    joined = run_query(
        'SELECT c."policy.placement", count(*) FROM records r JOIN sweep_cells c USING (run) '
        "GROUP BY 1 ORDER BY 1",
        runs,
    )
    assert [row[0] for row in joined.rows] == sorted(PLACEMENTS)
    agg = run_query('SELECT sweep, "policy.placement", ok FROM sweep_aggregate', runs)
    assert sorted(agg.rows) == sorted((out.name, p, 2) for p in PLACEMENTS)
    table = run_query("SELECT DISTINCT sweep FROM runs", runs)
    assert table.rows == [(out.name,)]
    # Found by default under reports/, next to ordinary runs.
    reports = tmp_path / "reports"
    shutil.copytree(out, reports / "sweep-tiny")
    shutil.copytree(out / "cells" / result.cells[0].id, reports / "plain")
    monkeypatch.chdir(tmp_path)
    found = discover_runs()
    assert len(found) == len(result.cells) + 1
    assert cli(["query", "SELECT count(DISTINCT run) AS n FROM records", "--format", "csv"]) == 0


@pytest.mark.slow
def test_single_seed_has_zero_half_width_and_resumes_across_sweep_files(
    local: tuple[Path, Path, sw.SweepResult],
) -> None:
    path, out, _result = local
    one = write_sweep(path.parent, name="one-seed", seeds=[1])
    copy = path.parent / "one-seed-out"
    shutil.copytree(out / "cells", copy / "cells")
    out = copy
    result = sw.run_sweep(one, out, executor="local", workers=2, progress=False)
    # Seed 1 of both grid points is the same cell as in the 2-seed sweep.
    assert (result.ran, result.skipped, result.failed) == (0, 2, 0)
    for group in result.groups:
        for key in result.sweep.metrics:
            stat = group.stats[key]
            if stat.mean is not None:
                assert (stat.n, stat.std, stat.ci95) == (1, 0.0, 0.0), key
    agg = pd.read_parquet(out / "aggregate.parquet")
    assert (agg["success_rate_ci95"] == 0).all()


@pytest.mark.slow
def test_resume_skips_finished_cells(local: tuple[Path, Path, sw.SweepResult]) -> None:
    path, out, first = local
    files = sorted((out / "cells").glob("*/*"))
    before = {p: p.stat().st_mtime_ns for p in files}
    data = summaries(out)
    result = sw.run_sweep(path, out, executor="local", workers=2, progress=False)
    assert (result.ran, result.skipped, result.failed) == (0, 4, 0)
    assert all(o.resumed for o in result.outcomes.values())
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert summaries(out) == data
    # The same numbers as the run that produced them.
    for a, b in zip(first.groups, result.groups, strict=True):
        assert a.stats == b.stats
    # A cell whose recorded overrides differ is rerun, the others are not.
    cell = first.cells[0]
    marker_path = out / "cells" / cell.id / "cell.json"
    original = marker_path.read_text()
    marker = json.loads(original)
    marker["cell"]["overrides"] = list(reversed(marker["cell"]["overrides"]))
    marker_path.write_text(json.dumps(marker))
    try:
        assert sw.finished(cell, out / "cells") is None
        assert sw.finished(first.cells[1], out / "cells") is not None
    finally:
        marker_path.write_text(original)


@pytest.mark.slow
def test_no_resume_reruns_everything_with_the_same_bytes(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, seeds=[3], grid={"policy.placement": ["jsq"]})
    out = tmp_path / "out"
    first = sw.run_sweep(path, out, workers=1, progress=False)
    data = summaries(out)
    again = sw.run_sweep(path, out, workers=1, resume=False, progress=False)
    assert (first.ran, again.ran, again.skipped) == (1, 1, 0)
    assert summaries(out) == data


@pytest.mark.slow
def test_failed_cell_is_reported_and_the_others_succeed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(tmp_path, grid={"policy.placement": ["p2c", "no_such_policy"]}, seeds=[1])
    out = tmp_path / "out"
    assert cli(["sweep", str(path), "--out", str(out), "--workers", "2"]) == 1
    printed = capsys.readouterr().out
    assert "1 failed" in printed
    result = sw.run_sweep(path, out, workers=2, progress=False)  # resumes: reruns the failed one
    assert (result.ran, result.skipped, result.failed) == (1, 1, 1)
    bad = next(c for c in result.cells if dict(c.point)["policy.placement"] == "no_such_policy")
    good = next(c for c in result.cells if c is not bad)
    error = (out / "cells" / bad.id / "error.txt").read_text()
    assert "unknown placement strategy 'no_such_policy'" in error
    assert "policy" in error
    assert not (out / "cells" / bad.id / "summary.json").exists()
    assert (out / "cells" / good.id / "summary.json").is_file()
    outcome = result.outcomes[bad.id]
    assert outcome.status == "failed"
    assert outcome.error is not None and "no_such_policy" in outcome.error
    results = pd.read_parquet(out / "results.parquet").set_index("cell_id")
    assert results.loc[bad.id, "status"] == "failed"
    assert "no_such_policy" in str(results.loc[bad.id, "error"])
    assert results["success_rate"].isna().tolist() == [c is bad for c in result.cells]
    assert results.loc[good.id, "status"] == "ok"
    agg = pd.read_parquet(out / "aggregate.parquet").set_index("policy.placement")
    assert agg.loc["no_such_policy", "failed"] == 1
    assert agg.loc["no_such_policy", "success_rate_n"] == 0
    assert agg.loc["p2c", "success_rate_n"] == 1
    md = (out / "sweep.md").read_text()
    assert "0/1 (1 failed)" in md
    assert "## Failed cells" in md and bad.id in md


# ------------------------------------------------------------------ the sweep file


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"metrics": ["success_rate", "nope"]}, "metrics.1", "unknown metric 'nope'"),
        ({"metrics": ["cost", "cost"]}, "metrics.1", "duplicate metric"),
        ({"seeds": []}, "seeds", "at least 1"),
        ({"seeds": {"count": 0}}, "seeds.count", "an integer >= 1"),
        ({"seeds": {"count": 2, "stop": 3}}, "seeds.stop", "unknown key"),
        ({"seeds": ["a"]}, "seeds.0", "valid integer"),
        ({"seeds": [1, 1]}, "seeds", "distinct"),
        ({"grid": {"policy.placement": []}}, "grid.policy.placement", "at least 1"),
        ({"grid": {"seed": [1, 2]}}, "grid.seed", "under seeds"),
        ({"grid": {"policy.placement": ["p2c", "p2c"]}}, "grid.policy.placement.1", "duplicate"),
        ({"fixed_overrides": ["duration_s"]}, "fixed_overrides.0", "expected path=value"),
        ({"scenarios": []}, "scenarios", "at least 1"),
        ({"scenarios": [{"path": "x.yaml", "bogus": 1}]}, "scenarios.0.bogus", "Extra inputs"),
        ({"scenarios": ["missing.yaml"]}, "scenarios.0.path", "no such scenario file"),
        (
            {"scenarios": [str(FAILOVER), str(FAILOVER)]},
            "scenarios.1.name",
            "duplicate scenario label",
        ),
        ({"typo": 1}, "typo", "Extra inputs"),
    ],
)
def test_sweep_file_errors_name_the_field(
    tmp_path: Path, changes: dict[str, Any], field: str, message: str
) -> None:
    path = write_sweep(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        sw.load_sweep(path)
    text = str(info.value)
    assert f": {field}: " in text
    assert message in text
    assert str(path) in text


def test_sweep_file_error_has_line_and_cli_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nscenarios: [" + str(FAILOVER) + "]\nseeds: [1]\nmetrics: [nope]\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: metrics\.0: unknown metric"):
        sw.load_sweep(path)
    assert cli(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_base_overrides_are_checked_before_running(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, fixed_overrides=[*FIXED, "drain_s=-1"])
    with pytest.raises(ConfigError, match=r"(?s)scenarios\.0 \(failover\).*drain_s: "):
        sw.run_sweep(path, tmp_path / "out", progress=False)


def test_cli_argument_errors(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)
    assert cli(["sweep", str(path), "--address", "auto"]) == 2
    assert cli(["sweep", str(path), "--workers", "0"]) == 2


def test_seed_range_and_cell_ids_are_stable(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, seeds={"count": 3, "start": 5})
    sweep = sw.load_sweep(path)
    assert sweep.seed_list == (5, 6, 7)
    cells = sw.plan_cells(sweep, path)
    assert [c.seed for c in cells[:3]] == [5, 6, 7]
    assert cells == sw.plan_cells(sw.load_sweep(path), path)
    # The id hashes the sorted overrides: the order of the grid does not change it.
    a = sw.cell_id("s", "s.yaml", [("x", "1")], 1, ["a=1", "b=2"])
    assert a == sw.cell_id("s", "s.yaml", [("x", "1")], 1, ["b=2", "a=1"])
    assert a != sw.cell_id("s", "s.yaml", [("x", "1")], 2, ["a=1", "b=2"])
    assert sw.override_value("p2c") == "p2c"
    assert sw.override_value("2") == '"2"'
    assert sw.override_value(2) == "2"
    assert sw.override_value([]) == "[]"


# ------------------------------------------------------------------ statistics


def _t_cdf_above_zero(q: float, df: int, steps: int = 4000) -> float:
    """P(0 < T < q) for Student's t, by Simpson's rule on its density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(x: float) -> float:
        return float(c * (1 + x * x / df) ** (-(df + 1) / 2))

    h = q / steps
    total = pdf(0) + pdf(q)
    total += sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 29, 30, 31, 60, 200])
def test_t_quantile_is_the_975_quantile(df: int) -> None:
    q = sw.t_quantile_975(df)
    assert _t_cdf_above_zero(q, df) == pytest.approx(0.475, abs=2e-7)


def test_t_quantile_limits() -> None:
    assert sw.t_quantile_975(10**9) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError):
        sw.t_quantile_975(0)
    assert sw.describe([]) == sw.Stat(0, None, None, None)
    assert sw.describe([2.0]) == sw.Stat(1, 2.0, 0.0, 0.0)
    s = sw.describe([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert s.ci95 == pytest.approx(4.302652730 / math.sqrt(3))


# ------------------------------------------------------------------ naming a winner


def _stat(mean: float, half: float, n: int = 3) -> Stat:
    return Stat(n, mean, half, half)


@pytest.mark.parametrize(
    ("stats", "better", "winner", "reason", "contenders"),
    [
        # Apart: the best mean's interval overlaps no other.
        (
            {"a": _stat(1.0, 0.1), "b": _stat(2.0, 0.1), "c": _stat(3.0, 0.5)},
            "lower",
            "a",
            "separated",
            ("a",),
        ),
        ({"a": _stat(1.0, 0.1), "b": _stat(2.0, 0.1)}, "higher", "b", "separated", ("b",)),
        # Overlapping intervals (touching counts): no winner, the overlapping ones named.
        (
            {"a": _stat(1.0, 0.6), "b": _stat(2.0, 0.6), "c": _stat(5.0, 0.1)},
            "lower",
            None,
            "overlap",
            ("a", "b"),
        ),
        ({"a": _stat(1.0, 0.5), "b": _stat(2.0, 0.5)}, "lower", None, "overlap", ("a", "b")),
        # The same mean everywhere (zero-width intervals): a tie.
        ({"a": _stat(1.0, 0.0), "b": _stat(1.0, 0.0)}, "higher", None, "tie", ("a", "b")),
        # One seed: no interval, so no winner however far apart the means are.
        ({"a": _stat(1.0, 0.0, n=1), "b": _stat(9.0, 0.0, n=1)}, "lower", None, "one seed", ("a",)),
        # Without a direction, or with fewer than two values, nothing is ranked.
        ({"a": _stat(1.0, 0.1), "b": _stat(2.0, 0.1)}, None, None, "no direction", ()),
        ({"a": _stat(1.0, 0.1), "b": Stat(0, None, None, None)}, "lower", None, "no data", ()),
    ],
)
def test_clear_winner_rule(
    stats: dict[str, Stat],
    better: Better | None,
    winner: str | None,
    reason: str,
    contenders: tuple[str, ...],
) -> None:
    verdict = clear_winner(stats, better)
    assert (verdict.winner, verdict.reason, verdict.contenders) == (winner, reason, contenders)


def _group(placement: str, **stats: Stat) -> sw.Group:
    return sw.Group("s", (("policy.placement", placement),), (), 3, 0, stats)


def test_sweep_names_a_winner_only_when_the_intervals_separate() -> None:
    groups = [
        _group("p2c", ttft_p99_s=_stat(1.0, 0.05), success_rate=_stat(0.990, 0.004)),
        _group("jsq", ttft_p99_s=_stat(2.0, 0.05), success_rate=_stat(0.993, 0.004)),
        _group("random", ttft_p99_s=_stat(2.5, 0.05), success_rate=_stat(0.980, 0.001)),
    ]
    assert sw.best_points(groups, "ttft_p99_s") == {0}
    assert sw.verdict_text(groups, "ttft_p99_s") == "p2c"
    # jsq has the best mean success rate, but its interval overlaps p2c's.
    assert sw.best_points(groups, "success_rate") == set()
    assert sw.verdict_text(groups, "success_rate") == (
        "no clear winner (best mean jsq; its interval overlaps p2c)"
    )
    one = [_group("a", cost=_stat(1.0, 0.0, n=1)), _group("b", cost=_stat(2.0, 0.0, n=1))]
    assert sw.best_points(one, "cost") == set()
    assert "one seed" in sw.verdict_text(one, "cost")


# ------------------------------------------------------------------ Ray


@pytest.mark.slow
def test_ray_executor_gives_the_same_bytes(
    local: tuple[Path, Path, sw.SweepResult], tmp_path: Path
) -> None:
    require("ray", extra="sweep")
    path, out, first = local
    ray_out = tmp_path / "ray"
    result = sw.run_sweep(path, ray_out, executor="ray", workers=2, progress=False)
    assert (result.ran, result.skipped, result.failed) == (4, 0, 0)
    assert [c.id for c in result.cells] == [c.id for c in first.cells]
    local_files = summaries(out)
    ray_files = summaries(ray_out)
    assert set(ray_files) == {c.id for c in first.cells}
    assert all(ray_files[k] == local_files[k] for k in ray_files)
    assert (ray_out / "sweep.md").read_text() == sw.render_markdown(first)
    import ray

    assert not ray.is_initialized()  # the instance it started is shut down
