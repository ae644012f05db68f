"""`haif compare`, `haif query` and `haif regress` on tiny simulated runs.

The runs are short versions of ``scenarios/failover.yaml`` (120 s of trace,
us-east out from 40 s to 80 s) written once per module; the canonical set is
rerun once to check the committed ``reports/baseline`` exactly.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from harness.analysis import cli
from harness.records import ok_record

from haif.analysis import compare as cmp
from haif.analysis import regress
from haif.analysis.query import discover_runs, resolve_runs, run_query, view_name
from haif.configfile import ConfigError
from haif.fleet.scenario import load_scenario
from haif.records import FILE_SCHEMA, read_parquet, summarize, write_parquet
from haif.sim.driver import run_scenario
from haif.sim.report import write_report

ROOT = Path(__file__).resolve().parent.parent
FAILOVER = ROOT / "scenarios" / "failover.yaml"
BASELINE = ROOT / "reports" / "baseline"
CANONICAL = ROOT / "regress" / "canonical.yaml"
THRESHOLDS = ROOT / "regress" / "thresholds.yaml"
TINY = ["duration_s=120", "drain_s=60", "faults.0.start_s=40", "faults.0.end_s=80"]
PNG = b"\x89PNG\r\n\x1a\n"


def _sim(out: Path, extra: list[str]) -> Path:
    write_report(run_scenario(load_scenario(FAILOVER, [*TINY, *extra])), out, plots=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    a = _sim(base / "run-p2c", [])
    b = _sim(base / "run-rr", ["policy.placement=round_robin"])
    worse = _sim(base / "worse", ["workers.3.count=1", "workers.5.count=1"])
    live = base / "live"
    live.mkdir()
    shutil.copy(a / "records.parquet", live / "records.parquet")
    return {"a": a, "b": b, "worse": worse, "live": live}


# ------------------------------------------------------------------ compare


def test_summarize_and_run_metrics_match_hand_computed_values(tmp_path: Path) -> None:
    """Five records whose figures are worked out by hand (numpy's default
    linear interpolation: the q-th percentile of n sorted values sits at
    position q/100 * (n - 1))."""
    rows = [  # id, arrival, first token, finish, output tokens, cost, attempts, status
        ("r1", 0.0, 0.1, 1.0, 10, 0.5, 1, "ok"),
        ("r2", 1.0, 1.3, 3.0, 20, 0.25, 2, "ok"),
        ("r3", 2.0, 2.2, 5.0, 30, 0.25, 1, "ok"),
        ("r4", 3.0, 3.4, 7.0, 40, 1.0, 1, "ok"),
        ("r5", 4.0, None, 4.5, 0, 0.0, 3, "failed"),
    ]
    records = [
        ok_record(
            rid,
            arrival_s=arrival,
            first_token_s=first,
            finish_s=finish,
            output_tokens=tokens,
            cost=cost,
            attempts=attempts,
            status=status,
            reason=None if status == "ok" else "x",
        )
        for rid, arrival, first, finish, tokens, cost, attempts, status in rows
    ]
    # ok end-to-end latencies 1, 2, 3, 4 s; TTFTs 0.1, 0.3, 0.2, 0.4 s.
    hand = {
        "requests": 5,
        "success_rate": 0.8,
        "latency_p50_s": 2.5,  # halfway between 2 and 3
        "latency_p90_s": 3.7,  # position 2.7: 3 + 0.7 x (4 - 3)
        "latency_p99_s": 3.97,  # position 2.97
        "ttft_p50_s": 0.25,
        "ttft_p90_s": 0.37,
        "ttft_p99_s": 0.397,
        "retried": 2,  # r2 and r5
        "cost": 2.0,
    }
    summary = summarize(records)
    assert summary["by_status"] == {"failed": 1, "ok": 4}
    for name, value in hand.items():
        if name in summary:
            assert summary[name] == pytest.approx(value, abs=1e-12), name
    folder = tmp_path / "run"
    folder.mkdir()
    write_parquet(records, folder / "records.parquet")
    metrics = cmp.run_metrics(cmp.load_run(folder))  # records only: no summary.json
    for name, value in hand.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    # Goodput without a summary: 100 tokens served over the 4 s of arrivals.
    assert metrics["goodput_tokens_per_s"] == pytest.approx(25.0, abs=1e-12)
    assert metrics["dead_letters"] == 0


def test_metrics_equal_summarize_and_summary(runs: dict[str, Path]) -> None:
    for key in ("a", "b", "worse"):
        folder = runs[key]
        metrics = cmp.run_metrics(cmp.load_run(folder))
        records = read_parquet(folder / "records.parquet")
        expected = summarize(records)
        for name in (
            "success_rate",
            "latency_p50_s",
            "latency_p99_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "retried",
            "cost",
            "requests",
        ):
            assert metrics[name] == expected[name], name
        ok = [r for r in records if r.status == "ok"]
        e2e = [r.finish_s - r.arrival_s for r in ok]
        ttft = [r.first_token_s - r.arrival_s for r in ok if r.first_token_s is not None]
        assert metrics["latency_p90_s"] == float(np.percentile(e2e, 90))
        assert metrics["ttft_p90_s"] == float(np.percentile(ttft, 90))
        summary = json.loads((folder / "summary.json").read_text())
        for name in (
            "goodput_tokens_per_s",
            "slo_attainment",
            "dead_letters",
            "gpu_utilization",
            "provisioned_cost",
        ):
            assert metrics[name] == summary[name], name
        assert set(metrics) == {m.key for m in cmp.METRICS}


def test_compare_deltas_table_and_files(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    rc = cli(["compare", str(runs["a"]), str(runs["b"]), "--out", str(out), "--labels", "p2c,rr"])
    assert rc == 0
    printed = capsys.readouterr().out

    comparison = cmp.compare_runs([runs["a"], runs["b"]], ["p2c", "rr"])
    a, b = comparison.metrics
    deltas = comparison.deltas(1)
    for spec in cmp.METRICS:
        diff, rel = deltas[spec.key]
        before, after = a[spec.key], b[spec.key]
        if before is None or after is None:
            assert diff is None
            continue
        assert diff == pytest.approx(after - before)
        if before:
            assert rel == pytest.approx((after - before) / abs(before))
    assert comparison.deltas(0)["ttft_p99_s"] == (0.0, 0.0)

    # The printed table and compare.md carry the values and the deltas.
    p99 = cmp.format_value("seconds", b["ttft_p99_s"])
    assert "p2c" in printed and "rr" in printed and p99 in printed
    md = (out / "compare.md").read_text()
    d, r = deltas["latency_p99_s"]
    assert cmp.format_delta("seconds", d, r) in md
    assert cmp.format_value("ratio", a["success_rate"]) in md
    assert "| rr | `" in md and "us-east out" in md  # runs and fault windows
    for name in (cmp.CDF_FIGURE, cmp.TIMESERIES_FIGURE):
        assert (out / name).read_bytes().startswith(PNG)
        assert f"![{name}]({name})" in md


def test_delta_and_formatting() -> None:
    assert cmp.delta(2.0, 3.0) == (1.0, 0.5)
    assert cmp.delta(0.0, 1.0) == (1.0, None)
    assert cmp.delta(None, 1.0) == (None, None)
    assert cmp.format_delta("seconds", 0.012, 0.083) == "+12.0 ms (+8.3%)"
    assert cmp.format_delta("ratio", -0.0031, None) == "-0.31 pp (n/a)"
    assert cmp.format_value("ratio", None) == "n/a"
    assert cmp.format_diff("dollars", -0.5) == "-$0.5000"
    spec = cmp.METRIC_BY_KEY["ttft_p99_s"]
    assert cmp.verdict(spec, -1.0) == "better"
    assert cmp.verdict(spec, 1.0) == "worse"


def test_records_only_folder_is_accepted(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rc = cli(["compare", str(runs["a"]), str(runs["live"]), "--out", str(out)])
    assert rc == 0
    comparison = cmp.compare_runs([runs["a"], runs["live"]])
    full, live = comparison.metrics
    for name in ("slo_attainment", "provisioned_cost", "gpu_utilization"):
        assert live[name] is None
    for name in ("ttft_p50_s", "ttft_p90_s", "latency_p99_s", "retried", "dead_letters"):
        assert live[name] == full[name]
    assert live["goodput_tokens_per_s"] is not None
    md = (out / "compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| SLO attainment"))
    assert row.count("n/a") == 2  # the live value and its delta
    assert "live" in md and "summary.json" in md  # the note says what is missing
    assert (out / cmp.TIMESERIES_FIGURE).read_bytes().startswith(PNG)
    series = cmp.run_series(comparison.runs[1])
    assert int(series["completed_ok"].sum()) + int(series["errors"].sum()) == live["requests"]


def test_not_a_run_folder_is_a_clear_error(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"empty: not a HAIF run folder: records.parquet"):
        cmp.load_run(empty)
    assert cli(["compare", str(runs["a"]), str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "records.parquet is missing" in err and "notes.txt" in err
    with pytest.raises(ConfigError, match="no such run folder"):
        cmp.load_run(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"request_id": ["x"], "status": ["ok"]}), bad / "records.parquet")
    with pytest.raises(ConfigError, match=r"missing column\(s\) tenant, model"):
        cmp.load_run(bad)
    with pytest.raises(ConfigError, match="got 1 label"):
        cmp.parse_labels("a", 2)
    with pytest.raises(ConfigError, match="distinct"):
        cmp.parse_labels("a,a", 2)


# ------------------------------------------------------------------ query


def test_query_union_and_per_run_views(runs: dict[str, Path]) -> None:
    folders = [runs["a"], runs["b"]]
    counts = {f.name: pq.read_metadata(f / "records.parquet").num_rows for f in folders}
    result = run_query("SELECT run, count(*) FROM records GROUP BY run ORDER BY run", folders)
    assert result.columns[0] == "run"
    assert dict(result.rows) == counts
    total = run_query("SELECT count(*) FROM records", folders).rows[0][0]
    assert total == sum(counts.values())
    assert view_name("run-p2c") == "run_p2c"
    one = run_query("SELECT * FROM run_p2c_records", folders)
    assert one.columns == list(FILE_SCHEMA.names)  # one run's file as written, no run column
    assert len(one.rows) == counts["run-p2c"]
    series = run_query("SELECT run, count(*) FROM timeseries GROUP BY run ORDER BY run", folders)
    for run, n in series.rows:
        assert (
            n == pq.read_metadata(Path(str(runs["a"].parent / run)) / "timeseries.parquet").num_rows
        )
    util = run_query("SELECT count(DISTINCT run) FROM utilization", folders)
    assert util.rows[0][0] == 2
    table = run_query("SELECT run, summary IS NOT NULL FROM runs ORDER BY run", folders)
    assert table.rows == [("run-p2c", True), ("run-rr", True)]
    # A folder of runs expands to its run folders; a records-only run has only records.
    assert resolve_runs([runs["a"].parent]) == sorted(runs.values())
    mixed = run_query("SELECT count(DISTINCT run) FROM records", [runs["a"], runs["live"]])
    assert mixed.rows[0][0] == 2


def test_query_output_formats(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sql = (
        "SELECT run, count(*) AS n, avg(finish_s - arrival_s) AS e2e "
        "FROM records GROUP BY run ORDER BY run"
    )
    args = ["query", sql, "--runs", str(runs["a"]), str(runs["b"])]
    assert cli([*args, "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["run", "n", "e2e"]
    assert [r[0] for r in rows[1:]] == ["run-p2c", "run-rr"]
    assert cli([*args, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["run"] for d in data] == ["run-p2c", "run-rr"]
    assert all(isinstance(d["n"], int) and isinstance(d["e2e"], float) for d in data)
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "run-rr" in out and "2 row(s)" in out


def test_query_errors_are_clear(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["query", "SELEC 1", "--runs", str(runs["a"])]) == 2
    err = capsys.readouterr().err
    assert "query failed" in err and "syntax error" in err and "Traceback" not in err
    assert cli(["query", "SELECT * FROM nope", "--runs", str(runs["a"])]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "run_p2c_records" in err
    twin = tmp_path / "run-p2c"
    shutil.copytree(runs["a"], twin)
    assert cli(["query", "SELECT 1", "--runs", str(runs["a"]), str(twin)]) == 2
    assert "two runs are named 'run-p2c'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["query", "SELECT 1", "--runs", str(empty)]) == 2
    assert "not a HAIF run folder" in capsys.readouterr().err


def test_query_default_runs_are_reports_subfolders(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = tmp_path / "reports"
    shutil.copytree(runs["a"], reports / "one")
    shutil.copytree(runs["live"], reports / "two")
    (reports / "compare").mkdir()  # no records.parquet: not a run
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in discover_runs()] == ["one", "two"]
    assert cli(["query", "SELECT count(DISTINCT run) AS n FROM records", "--format", "csv"]) == 0


# ------------------------------------------------------------------ regress


def _report(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.md"


def test_regress_identical_runs_pass(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(runs["a"], copy)
    report = _report(tmp_path, "same")
    argv = ["regress", "--baseline", str(runs["a"]), "--current", str(copy)]
    rc = cli([*argv, "--thresholds", str(THRESHOLDS), "--report", str(report), "--exact", "-q"])
    assert rc == 0
    text = report.read_text()
    assert "**PASS" in text and "FAIL" not in text
    assert "summary.json is identical to the baseline." in text


def test_regress_worse_run_fails_naming_the_metric(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _report(tmp_path, "worse")
    argv = ["regress", "--baseline", str(runs["a"]), "--current", str(runs["worse"])]
    assert cli([*argv, "--thresholds", str(THRESHOLDS), "--report", str(report)]) == 1
    text = report.read_text()
    assert "**FAIL: 1 of 1 scenario(s)" in text
    failing = [line for line in text.splitlines() if line.endswith("| **FAIL** |")]
    names = {line.split("|")[1].strip() for line in failing}
    assert {"latency_p90_s", "dead_letters", "success_rate"} <= names
    assert "latency_p90_s" in capsys.readouterr().out
    # The other way round latency and success improve; the bigger fleet's cost fails.
    back = regress.compare_sets(runs["worse"], runs["a"], regress.load_thresholds(THRESHOLDS))
    regressions = set(back.scenarios[0].regressions)
    assert {"cost", "provisioned_cost"} <= regressions
    assert not regressions & {"latency_p50_s", "latency_p90_s", "success_rate", "dead_letters"}


def test_threshold_semantics() -> None:
    spec = cmp.METRIC_BY_KEY["ttft_p99_s"]
    both = regress.Threshold(
        metric="ttft_p99_s", direction="lower_is_better", max_relative=0.1, max_absolute=0.05
    )
    assert both.allowed(1.0) == pytest.approx(0.1)  # the looser limit
    assert both.allowed(0.1) == 0.05
    assert regress.check_metric(spec, 1.0, 1.09, both).status == "PASS"
    assert regress.check_metric(spec, 1.0, 1.11, both).status == "FAIL"
    assert regress.check_metric(spec, 1.0, 0.5, both).status == "PASS"
    assert regress.check_metric(spec, 1.0, None, both).status == "FAIL"
    assert regress.check_metric(spec, None, None, both).status == "PASS"
    assert regress.check_metric(spec, 1.0, 9.0, None).status == "info"
    rate = regress.Threshold(metric="success_rate", direction="higher_is_better", max_absolute=0.01)
    ok = cmp.METRIC_BY_KEY["success_rate"]
    assert regress.check_metric(ok, 0.99, 0.985, rate).status == "PASS"
    assert regress.check_metric(ok, 0.99, 0.975, rate).status == "FAIL"


def test_thresholds_validation_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "thresholds.yaml"
    bad.write_text(
        "metrics:\n"
        "  - {metric: ttft_p99, direction: lower_is_better, max_relative: 0.1}\n"
        "  - {metric: success_rate, direction: lower_is_better, max_absolute: 0.1}\n"
        "  - {metric: cost, direction: lower_is_better}\n"
        "  - {metric: retried, direction: lower_is_better, max_relative: -1}\n"
        "  - {metric: retried, direction: sideways, max_relative: 1}\n"
    )
    with pytest.raises(ConfigError) as info:
        regress.load_thresholds(bad)
    message = str(info.value)
    assert f"{bad}:2: metrics.0.metric: unknown metric 'ttft_p99'" in message
    assert f"{bad}:3: metrics.1.direction: success_rate is higher_is_better" in message
    assert "metrics.2.max_relative: give max_relative and/or max_absolute" in message
    assert "metrics.3.max_relative" in message and "greater than or equal to 0" in message
    assert "metrics.4.direction" in message
    dup = tmp_path / "dup.yaml"
    dup.write_text(
        "metrics:\n"
        "  - {metric: cost, direction: lower_is_better, max_relative: 0.1}\n"
        "  - {metric: cost, direction: lower_is_better, max_relative: 0.2}\n"
    )
    with pytest.raises(ConfigError, match=r"metrics.1.metric: duplicate metric 'cost'"):
        regress.load_thresholds(dup)
    typo = tmp_path / "typo.yaml"
    typo.write_text("metrics: []\nscenario: {}\n")
    with pytest.raises(ConfigError, match="scenario: Extra inputs are not permitted"):
        regress.load_thresholds(typo)
    # The committed thresholds and canonical set are valid.
    assert regress.load_thresholds(THRESHOLDS).metrics
    assert len(regress.load_canonical(CANONICAL).scenarios) >= 2


def test_canonical_validation_and_mode_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "canonical.yaml"
    bad.write_text(
        "scenarios:\n"
        "  - {name: a, scenario: x.yaml, seed: 1}\n"
        "  - {name: a, scenario: y.yaml, seed: 2}\n"
    )
    with pytest.raises(ConfigError, match=r"scenarios.1.name: duplicate name 'a'"):
        regress.load_canonical(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("scenarios:\n  - {name: a, scenario: nope.yaml, seed: 1}\n")
    with pytest.raises(ConfigError, match=r"scenarios.0 \(a\): .*nope.yaml: no such file"):
        regress.run_canonical(missing, tmp_path / "out")
    assert cli(["regress"]) == 2
    assert "give exactly one of" in capsys.readouterr().err
    assert cli(["regress", "--run-canonical"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli(["regress", "--current", str(tmp_path), "--out", str(tmp_path)]) == 2


def _tiny_canonical(tmp_path: Path, seed: int = 1) -> Path:
    path = tmp_path / f"canonical{seed}.yaml"
    overrides = ", ".join(
        ["duration_s=60", "drain_s=30", "faults.0.start_s=20", "faults.0.end_s=40"]
    )
    path.write_text(
        "scenarios:\n"
        f"  - {{name: tiny, scenario: {FAILOVER}, seed: {seed}, overrides: [{overrides}]}}\n"
    )
    return path


def test_refresh_baseline_and_sets(runs: dict[str, Path], tmp_path: Path) -> None:
    canonical = _tiny_canonical(tmp_path)
    target = tmp_path / "baseline"
    shutil.copytree(runs["live"], target)  # an old run folder may be replaced
    assert (
        cli(
            [
                "regress",
                "--refresh-baseline",
                "--baseline",
                str(target),
                "--canonical",
                str(canonical),
                "-q",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "canonical.json", "tiny"]
    assert sorted(p.name for p in (target / "tiny").iterdir()) == [
        "records.parquet",
        "summary.json",
    ]

    current = tmp_path / "current"
    argv = ["regress", "--run-canonical", "--out", str(current), "--canonical", str(canonical)]
    tail = ["--baseline", str(target), "--thresholds", str(THRESHOLDS), "--exact", "-q"]
    assert cli([*argv, *tail]) == 0
    assert (current / "regress.md").is_file()
    # `haif sim scenarios/baseline.yaml` writes reports/baseline/records.parquet by default;
    # a folder with canonical.json stays a folder of runs all the same.
    shutil.copy(runs["a"] / "records.parquet", target / "records.parquet")
    assert list(regress.run_set(target)[0]) == ["tiny"]
    (target / "records.parquet").unlink()

    # A different canonical entry under the same name is a user error, not a pass.
    other = tmp_path / "other"
    assert (
        cli(
            [
                "regress",
                "--run-canonical",
                "--no-compare",
                "--out",
                str(other),
                "--canonical",
                str(_tiny_canonical(tmp_path, 2)),
            ]
        )
        == 0
    )
    with pytest.raises(ConfigError, match="refresh-baseline"):
        regress.compare_sets(target, other, regress.load_thresholds(THRESHOLDS))

    # A scenario missing from the current set fails.
    lacking = tmp_path / "lacking"
    (lacking / "else").mkdir(parents=True)
    shutil.copy(runs["a"] / "records.parquet", lacking / "else" / "records.parquet")
    report = regress.compare_sets(target, lacking, regress.load_thresholds(THRESHOLDS))
    assert report.failed and report.scenarios[0].problem is not None
    assert "not in the baseline" in report.notes[0]

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="refusing to replace"):
        regress.refresh_baseline(canonical, stranger)
    assert (stranger / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_committed_baseline_matches_a_fresh_canonical_run(tmp_path: Path) -> None:
    """Determinism: the same code gives the committed summaries byte for byte."""
    out = tmp_path / "canonical"
    argv = ["regress", "--run-canonical", "--out", str(out), "--canonical", str(CANONICAL)]
    tail = ["--baseline", str(BASELINE), "--thresholds", str(THRESHOLDS), "--exact", "-q"]
    assert cli([*argv, *tail]) == 0
    names = [e.name for e in regress.load_canonical(CANONICAL).scenarios]
    committed = sorted(p.name for p in BASELINE.iterdir() if p.is_dir())
    assert committed == sorted(names)
    assert (out / "canonical.json").read_bytes() == (BASELINE / "canonical.json").read_bytes()
    for name in names:
        assert sorted(p.name for p in (BASELINE / name).iterdir()) == [
            "records.parquet",
            "summary.json",
        ]
        fresh = (out / name / "summary.json").read_bytes()
        assert fresh == (BASELINE / name / "summary.json").read_bytes(), name
        assert pq.read_table(out / name / "records.parquet").equals(
            pq.read_table(BASELINE / name / "records.parquet")
        ), name
    assert "PASS" in (out / "regress.md").read_text()
