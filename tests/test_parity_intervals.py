"""`haif parity`'s errors with their uncertainty: bootstrap intervals of quantile errors
(over requests, and over runs with ``--repeat``), the verdict on a bound, the
Kolmogorov-Smirnov distance, and how the table, parity.md, parity.json and the CLI carry
them. No live cluster: records are synthetic, or the simulator's with a stand-in live run.

Sign convention (the module's): error = live / sim - 1, so live = 1.1 x sim is +10 %.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness.records import timed_record

from haif.analysis import parity
from haif.analysis.parity import (
    COLUMNS,
    DEFAULT_BOUNDS,
    compare,
    compare_runs,
    table_rows,
    write_report,
)
from haif.analysis.stats import (
    DEFAULT_RESAMPLES,
    bound_verdict,
    ks_critical_95,
    ks_distance,
    quantile_error,
    quantile_errors,
    resampled_percentiles,
    row_percentiles,
)
from haif.cli import build_parser, main
from haif.contracts import RequestRecord
from haif.fleet.scenario import Scenario, load_scenario
from haif.runtime.supervisor import STATE_FILE, read_state
from haif.sim.driver import run_scenario

ROOT = Path(__file__).resolve().parents[1]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ the bootstrap


@pytest.mark.parametrize("paired", [False, True])
def test_identical_constants_give_a_zero_error_and_a_zero_width_interval(paired: bool) -> None:
    e = quantile_error(np.full(50, 0.1), np.full(50, 0.1), 90, _rng(), paired=paired)
    assert (e.error, e.low, e.high) == (0.0, 0.0, 0.0)
    assert (e.sim, e.live, e.n_sim, e.n_live, e.level) == (0.1, 0.1, 50, 50, 0.95)


def test_live_ten_percent_slower_is_plus_ten_percent() -> None:
    """live = 1.1 x sim: every quantile's error is live / sim - 1 = +0.1. Paired, every
    resample scales by 1.1 too, so the interval is [0.1, 0.1]; independent, it is an
    interval around 0.1."""
    sim = _rng(1).lognormal(-2.0, 0.5, 300)
    live = sim * 1.1
    for q in (50, 90, 99):
        e = quantile_error(sim, live, q, _rng(), paired=True)
        assert e.error == pytest.approx(0.1)
        assert [e.low, e.high] == pytest.approx([0.1, 0.1])
        ind = quantile_error(sim, live, q, _rng())
        assert ind.error == pytest.approx(0.1)
        assert ind.low < 0.1 < ind.high


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_interval_contains_the_point_estimate(paired: bool, seed: int) -> None:
    data = _rng(seed)
    sim = data.lognormal(-2.0, 0.6, 200)
    live = sim * data.lognormal(0.02, 0.1, 200)  # per request, 2 % slower give or take 10 %
    for e in quantile_errors([sim], [live], (50, 90, 99), _rng(seed), paired=paired):
        assert e.low <= e.error <= e.high, e
        assert e.high - e.low > 0


def test_a_seeded_generator_gives_the_same_interval() -> None:
    data = _rng(4)
    sim, live = data.lognormal(-2.0, 0.5, 250), data.lognormal(-1.95, 0.5, 250)
    first = quantile_errors([sim], [live], (50, 90, 99), _rng(7))
    assert quantile_errors([sim], [live], (50, 90, 99), _rng(7)) == first
    assert quantile_errors([sim], [live], (50, 90, 99), _rng(8)) != first


def test_a_larger_sample_gives_a_narrower_interval() -> None:
    data = _rng(5)
    widths = []
    for n in (50, 500, 5000):
        e = quantile_error(data.lognormal(-2, 0.5, n), data.lognormal(-2, 0.5, n), 90, _rng())
        widths.append(e.high - e.low)
    assert widths[0] > widths[1] > widths[2] > 0


def test_pairing_narrows_the_interval_where_the_shells_agree_request_by_request() -> None:
    """The same requests in both shells, live within about 1 % of sim per request: the
    paired interval is the error's, the independent one also how far each quantile of 300
    heavy-tailed values would move with other requests."""
    data = _rng(6)
    sim = data.lognormal(-2.0, 0.8, 300)
    live = sim * data.normal(1.0, 0.01, 300)
    p = quantile_error(sim, live, 99, _rng(), paired=True)
    i = quantile_error(sim, live, 99, _rng(), paired=False)
    assert p.error == i.error
    assert (p.high - p.low) * 10 < i.high - i.low


def test_paired_disagreement_request_by_request_widens_the_interval() -> None:
    """The same values, but on other requests (live shuffled): the point error is 0, the
    KS distance 0, yet the paired interval is wide: the tails are different requests."""
    data = _rng(8)
    sim = data.lognormal(-2.0, 0.8, 100)
    live = data.permutation(sim)
    e = quantile_error(sim, live, 90, _rng(), paired=True)
    assert e.error == 0.0 and ks_distance(sim, live) == 0.0
    assert e.low < -0.1 and e.high > 0.1


def test_paired_values_a_side_lacks_count_on_the_other_side_only() -> None:
    sim = np.array([1.0, 2.0, 3.0, np.nan])
    live = np.array([1.0, 2.0, 3.0, 4.0])  # the 4th request failed in the simulation
    e = quantile_error(sim, live, 50, _rng(), paired=True)
    assert (e.sim, e.live, e.n_sim, e.n_live) == (2.0, 2.5, 3, 4)
    assert e.error == pytest.approx(0.25)
    with pytest.raises(ValueError, match="equally long"):
        quantile_errors([sim], [live[:3]], (50,), _rng(), paired=True)


def test_repeats_resample_the_runs_then_the_requests() -> None:
    """Hand-checked: two constant runs per side, paired. Sim 1.0 in both; live 1.0 in run
    1 and 1.2 in run 2. Pooled, live p50 is 1.1 (the mean of the middle two of 20 values),
    an error of +10 %. A resample draws runs (1, 1), (2, 2), or one of each, with
    probabilities 1/4, 1/4, 1/2, and within constant runs every draw is the run's value:
    the resampled errors are 0, +20 % and +10 %, so the 95 % interval is [0, +20 %].
    The minimum (p0) shows the runs are resampled: its error is 0, but a quarter of the
    resamples hold run 2 twice (error +20 %); over requests alone (the runs pooled as one)
    all 20 draws would have to come from run 2, so the interval is [0, 0]."""
    sim = [np.ones(10), np.ones(10)]
    live = [np.ones(10), np.full(10, 1.2)]
    p50, p0 = quantile_errors(sim, live, (50, 0), _rng(), paired=True)
    assert p50.error == pytest.approx(0.1)
    assert [p50.low, p50.high] == pytest.approx([0.0, 0.2])
    assert (p50.n_sim, p50.n_live) == (20, 20)
    assert (p0.error, p0.low) == (0.0, 0.0) and p0.high == pytest.approx(0.2)
    pooled = quantile_error(np.concatenate(sim), np.concatenate(live), 0, _rng(), paired=True)
    assert (pooled.error, pooled.low, pooled.high) == (0.0, 0.0, 0.0)
    # Independent sides may have runs of other lengths and counts.
    ind = quantile_errors(sim, [np.ones(7), np.full(13, 1.2), np.ones(5)], (50,), _rng())[0]
    assert ind.n_live == 25 and ind.low <= ind.error <= ind.high


def test_resampled_percentiles_draw_one_runs_values_only_from_that_run() -> None:
    # One run per side: every resample of a run of 3s has percentile 3.
    (only,) = resampled_percentiles([[np.full(5, 3.0)]], (0, 50, 100), _rng(), 10)
    assert only.shape == (3, 10) and (only == 3.0).all()
    # Two runs, 1s and 2s: a resample's min is 1 or 2, its max 1 or 2, never between.
    (two,) = resampled_percentiles([[np.ones(4), np.full(4, 2.0)]], (0, 100), _rng(), 400)
    assert set(np.unique(two)) == {1.0, 2.0}
    assert (two[0] == 2.0).any() and (two[1] == 1.0).any()  # some drew one run twice


def test_row_percentiles_are_numpys_linear_percentiles_of_each_rows_prefix() -> None:
    data = _rng(9)
    counts = data.integers(1, 31, size=40).astype(np.int64)
    rows = np.sort(data.random((40, 30)), axis=1)
    rows[np.arange(30)[None, :] >= counts[:, None]] = np.nan
    rows.sort(axis=1)
    qs = np.array([0.0, 13.3, 50.0, 90.0, 99.0, 100.0])
    got = row_percentiles(rows, counts, qs)
    expected = np.array([np.percentile(rows[i, : counts[i]], qs) for i in range(40)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_two_thousand_resamples_of_a_few_hundred_values_take_well_under_a_second() -> None:
    data = _rng(10)
    sim, live = data.lognormal(-2, 0.5, 400), data.lognormal(-2, 0.5, 400)
    quantile_errors([sim], [live], (50, 90, 99), _rng())  # warm up numpy
    start = time.perf_counter()
    for paired in (False, True):
        quantile_errors([sim], [live], (50, 90, 99), _rng(), paired=paired)
    assert time.perf_counter() - start < 1.0
    assert DEFAULT_RESAMPLES == 2000


def test_no_values_on_a_side_gives_nan() -> None:
    e = quantile_error(np.array([]), np.ones(3), 50, _rng())
    assert math.isnan(e.error) and math.isnan(e.low) and e.n_sim == 0
    assert bound_verdict(e.error, e.low, e.high, 0.05) == "no data"


@pytest.mark.parametrize(
    ("error", "low", "high", "verdict"),
    [
        (0.01, -0.02, 0.03, "supported"),
        (0.0, -0.05, 0.05, "supported"),  # the bound itself is within
        (0.01, -0.08, 0.03, "within, interval too wide"),
        (-0.04, -0.06, 0.0, "within, interval too wide"),
        (0.05, 0.04, 0.07, "within, interval too wide"),
        (0.06, 0.04, 0.07, "outside"),
        (-0.2, -0.3, -0.1, "outside"),
        (math.inf, math.inf, math.inf, "outside"),
    ],
)
def test_bound_verdict(error: float, low: float, high: float, verdict: str) -> None:
    assert bound_verdict(error, low, high, 0.05) == verdict


# ------------------------------------------------------------------ the KS distance


def test_ks_distance_hand_worked() -> None:
    """a = 1, 2, 3 and b = 2.5, 4, 5, 6. The empirical CDFs at each value:

    x     1    2    2.5  3    4    5    6
    F_a   1/3  2/3  2/3  1    1    1    1
    F_b   0    0    1/4  1/4  1/2  3/4  1

    The largest gap is at x = 3: 1 - 1/4 = 3/4. With ties (1, 1, 2 against 1, 2, 2) the
    CDFs step together: at 1, 2/3 against 1/3; at 2 both 1; D = 1/3."""
    assert ks_distance([1, 2, 3], [2.5, 4, 5, 6]) == pytest.approx(0.75)
    assert ks_distance([2.5, 4, 5, 6], [3, 1, 2]) == pytest.approx(0.75)  # symmetric, unsorted
    assert ks_distance([1, 1, 2], [1, 2, 2]) == pytest.approx(1 / 3)
    assert ks_distance([1, 2, 3], [3, 2, 1]) == 0.0
    assert ks_distance([1, 2], [3, 4]) == 1.0
    assert math.isnan(ks_distance([], [1.0]))


def test_ks_critical_value() -> None:
    # c(0.05) = sqrt(-ln(0.025) / 2) = 1.3581; for 100 and 100 values x sqrt(2 / 100).
    assert ks_critical_95(100, 100) == pytest.approx(1.35810 * math.sqrt(0.02), rel=1e-5)
    assert ks_critical_95(253, 253) == pytest.approx(0.12075, rel=1e-4)
    assert math.isnan(ks_critical_95(0, 10))


# ------------------------------------------------------------------ compare and the report


def _records(n: int, scale: float = 1.0, seed: int = 0) -> list[RequestRecord]:
    data = _rng(seed)
    ttft, e2e = data.lognormal(-2.5, 0.6, n), data.lognormal(0.0, 0.4, n)
    return [timed_record(i, ttft[i] * scale, (ttft[i] + e2e[i]) * scale) for i in range(n)]


def _by_metric(result: parity.Comparison) -> dict[str, dict[str, Any]]:
    return {m["metric"]: m for m in result.metrics}


def test_compare_keeps_the_point_estimates_and_adds_intervals_verdicts_and_ks() -> None:
    sim = _records(300)
    live = _records(300, scale=1.02)  # every request 2 % slower
    result = compare(sim, live, rng=_rng())
    metrics = _by_metric(result)
    ttft = np.array([r.first_token_s - r.arrival_s for r in sim if r.first_token_s])
    assert metrics["ttft p90"]["sim"] == float(np.percentile(ttft, 90))
    for name in ("ttft", "e2e"):
        for q in (50, 90, 99):
            m = metrics[f"{name} p{q}"]
            assert m["error"] == pytest.approx(0.02)
            assert m["interval"] == [pytest.approx(0.02), pytest.approx(0.02)]
            assert m["verdict"] == "supported" and m["ok"]
            assert (m["n_sim"], m["n_live"]) == (300, 300)
    assert result.passed and result.repeats == 1 and result.too_wide() == []
    assert result.bootstrap == {"design": "paired", "resamples": 2000, "level": 0.95}
    ks = {d["metric"]: d for d in result.distances}
    assert set(ks) == {"ttft", "e2e"}
    assert 0 < ks["ttft"]["ks"] < ks["ttft"]["ks_critical_95"]
    assert ks["ttft"]["verdict"] == "none detected at 5 %"
    assert "repeat" not in result.outliers[0]  # one run: the outliers as before


@pytest.mark.parametrize("bootstrap", ["paired", "independent"])
def test_the_records_order_does_not_change_the_intervals(bootstrap: str) -> None:
    """parity.md from a run and a comparison of its parquet files (another order) agree."""
    sim, live = _records(120, seed=3), _records(120, scale=1.03, seed=4)
    shuffled_sim = [sim[i] for i in _rng(5).permutation(120)]
    shuffled_live = [live[i] for i in _rng(6).permutation(120)]
    first = compare(sim, live, rng=_rng(), bootstrap=bootstrap)
    again = compare(shuffled_sim, shuffled_live, rng=_rng(), bootstrap=bootstrap)
    assert again.metrics == first.metrics and again.distances == first.distances


def test_the_gate_reads_the_point_estimate_only() -> None:
    """Within the bound but on other requests (live a shuffle of sim's latencies over 40
    requests): the check passes, the verdicts say the interval cannot support it; 20 %
    slower is outside and fails, whatever the interval."""
    sim = _records(40, seed=1)
    shuffled = _rng(2).permutation(40)
    ttft = [r.first_token_s - r.arrival_s for r in sim if r.first_token_s is not None]
    e2e = [r.finish_s - r.arrival_s for r in sim]
    live = [timed_record(i, ttft[j], e2e[j]) for i, j in enumerate(shuffled)]
    result = compare(sim, live, rng=_rng())
    assert result.passed
    assert all(abs(m["error"]) < 1e-9 for m in result.metrics if "interval" in m)
    assert "within, interval too wide" in {m["verdict"] for m in result.metrics if "verdict" in m}
    assert result.too_wide() and set(result.too_wide()) <= {
        f"{m} p{q}" for m in ("ttft", "e2e") for q in (50, 90, 99)
    }
    slower = compare(sim, _records(40, scale=1.2, seed=1), rng=_rng())
    assert not slower.passed
    assert {m["verdict"] for m in slower.metrics if "interval" in m} == {"outside"}
    assert {d["verdict"] for d in slower.distances} <= {"differ at 5 %", "none detected at 5 %"}
    # The same comparison with each side resampled on its own: same points, wider intervals.
    ind = compare(sim, _records(40, scale=1.02, seed=1), rng=_rng(), bootstrap="independent")
    assert ind.bootstrap["design"] == "independent"
    assert {m["verdict"] for m in ind.metrics if "interval" in m} == {"within, interval too wide"}
    assert ind.passed


def test_compare_runs_pools_the_requests_and_tags_outliers_with_their_repeat() -> None:
    sims = [_records(100, seed=s) for s in (1, 2)]
    lives = [_records(100, scale=1.0, seed=1), _records(100, scale=1.04, seed=2)]
    result = compare_runs(sims, lives, rng=_rng())
    ttft_all = np.concatenate(
        [[r.first_token_s - r.arrival_s for r in run if r.first_token_s] for run in lives]
    )
    assert _by_metric(result)["ttft p50"]["live"] == float(np.percentile(ttft_all, 50))
    assert _by_metric(result)["ttft p50"]["n_live"] == 200
    assert result.repeats == 2 and result.to_json()["repeats"] == 2
    assert {o["repeat"] for o in result.outliers} == {2}  # only repeat 2's requests moved
    interval = _by_metric(result)["e2e p50"]["interval"]
    assert interval[0] == pytest.approx(0.0, abs=1e-9) and 0.03 < interval[1] < 0.05
    assert result.same_worker == 1.0
    with pytest.raises(ValueError, match="one live run per simulated run"):
        compare_runs(sims, lives[:1])
    with pytest.raises(ValueError, match="bootstrap"):
        compare_runs(sims, lives, bootstrap="bayesian")


def _scenario() -> Scenario:
    return load_scenario(ROOT / "scenarios/parity_heldout.yaml")


def test_table_report_and_json_carry_intervals_verdicts_and_ks(tmp_path: Path) -> None:
    sim, live = _records(200), _records(200, scale=1.03)
    live[5] = timed_record(5, 2.0, 3.0)  # one request much slower live
    result = compare(sim, live, rng=_rng())
    rows = table_rows(result)
    assert all(len(cells) == len(COLUMNS) for cells, _ in rows)
    assert [cells[0] for cells, _ in rows] == [
        "ttft p50",
        "ttft p90",
        "ttft p99",
        "ttft KS distance",
        "e2e p50",
        "e2e p90",
        "e2e p99",
        "e2e KS distance",
        "success rate",
        "retried",
    ]
    first = rows[0][0]
    m = result.metrics[0]
    assert first[3] == f"{m['error']:+.1%}"
    assert first[4] == f"{m['interval'][0]:+.1%} .. {m['interval'][1]:+.1%}"
    assert first[5] == "5%" and first[6] == m["verdict"]
    ks_row = rows[3][0]
    assert ks_row[1:4] == ("n=200", "n=200", f"{result.distances[0]['ks']:.3f}")
    assert ks_row[5] == f"{ks_critical_95(200, 200):.3f}"
    styles = {cells[0]: style for cells, style in rows}
    verdicts = {cells[0]: cells[6] for cells, _ in rows}
    assert all(
        styles[name] == {"outside": "red", "within, interval too wide": "yellow"}.get(v)
        for name, v in verdicts.items()
        if " p" in name
    )

    scenario = _scenario()
    write_report(result, scenario, tmp_path, seeds=[scenario.seed])
    md = (tmp_path / "parity.md").read_text()
    assert "| metric | sim | live | error | 95 % interval | bound | verdict |" in md
    assert (
        "95 % bootstrap percentile interval of the error, 2000 resamples of the requests "
        "(the same requests drawn from both sides)" in md
    )
    assert "| ttft KS distance | n=200 | n=200 |" in md
    for cells, _ in rows:
        assert "| " + " | ".join(cells) + " |" in md
    wide = result.too_wide()
    if wide:
        assert f"interval too wide to support it: {', '.join(wide)}." in md
    data = json.loads((tmp_path / "parity.json").read_text())
    assert data["seeds"] == [scenario.seed] and data["repeats"] == 1
    assert data["bootstrap"] == {"design": "paired", "resamples": 2000, "level": 0.95}
    p50 = data["metrics"][0]
    assert p50["interval"] == pytest.approx(m["interval"]) and p50["verdict"] == m["verdict"]
    assert [d["metric"] for d in data["distances"]] == ["ttft", "e2e"]
    assert data["distances"][0]["ks"] == pytest.approx(result.distances[0]["ks"])
    assert data["passed"] == result.passed


# ------------------------------------------------------------------ the command line


def test_repeat_and_bootstrap_flags_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["parity", "scenarios/parity.yaml"])
    assert (args.repeat, args.bootstrap) == (1, "paired")
    args = parser.parse_args(
        ["parity", "scenarios/parity.yaml", "--repeat", "3", "--bootstrap", "independent"]
    )
    assert (args.repeat, args.bootstrap) == (3, "independent")
    for bad in (["--repeat", "0"], ["--repeat", "x"], ["--bootstrap", "bayes"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["parity", "scenarios/parity.yaml", *bad])


@pytest.mark.slow
def test_cli_repeats_both_shells_per_seed_with_a_stand_in_live_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--repeat 2 with the live cluster replaced by the simulator (same seed, so an
    exact match): both shells run at seed and seed + 1, each repeat in its folder, with
    a progress line per repeat; the report pools both and passes."""
    played: list[tuple[int, Path]] = []

    def fake_live(
        scenario: Scenario, out: Path, *, timing: str, on_event: Any, engines: Any
    ) -> Any:
        assert engines is None  # no --engines: synthetic workers
        played.append((scenario.seed, out))
        records = run_scenario(scenario).records
        for r in records:
            on_event(r)
        return records

    monkeypatch.setattr(parity, "run_live", fake_live)
    monkeypatch.setenv("COLUMNS", "200")  # the table unwrapped
    out = tmp_path / "parity"
    seed = _scenario().seed
    code = main(["parity", "scenarios/parity_heldout.yaml", "--out", str(out), "--repeat", "2"])
    assert code == 0
    assert played == [(seed, out / "repeat-1"), (seed + 1, out / "repeat-2")]
    for i in (1, 2):
        assert (out / f"repeat-{i}" / "sim.parquet").exists()
        assert (out / f"repeat-{i}" / "live.parquet").exists()
    data = json.loads((out / "parity.json").read_text())
    assert data["seeds"] == [seed, seed + 1] and data["repeats"] == 2
    assert data["passed"] and {m["verdict"] for m in data["metrics"] if "interval" in m} == {
        "supported"
    }
    assert all(d["ks"] == 0 for d in data["distances"])
    err = capsys.readouterr().err
    assert f"repeat 1/2 (seed {seed}): simulating" in err
    assert f"repeat 2/2 (seed {seed + 1}): p50 / p90 / p99 error ttft +0.0 / +0.0 / +0.0 %" in err
    assert "95 % interval" in err and "e2e KS distance" in err
    assert "seeds" in (out / "parity.md").read_text()


def test_default_bounds_unchanged() -> None:
    """The CI gate's rule and bounds are what they were: 5 % at p50 and p90, 10 % at p99."""
    assert {
        f"{m}.p{q}": b for m in ("ttft", "e2e") for q, b in ((50, 0.05), (90, 0.05), (99, 0.10))
    } == DEFAULT_BOUNDS


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_sigterm_stops_the_live_cluster_parity_started(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) on ``haif parity`` while its live run plays: the command exits
    with 143 and every service of the cluster it started is gone, as after Ctrl-C."""
    out = tmp_path / "parity"
    command = ["parity", "scenarios/parity_heldout.yaml", "-q", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "haif", *command],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = out / "live" / STATE_FILE
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(), proc.communicate()[1]
    pids = [s["pid"] for s in read_state(out / "live")["services"] if s.get("pid")]
    pids.append(read_state(out / "live")["pid"])
    assert len(pids) >= 3
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not alive, [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()) for pid in alive]
