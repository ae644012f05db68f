"""The scale scenario (scenarios/scale_10k.yaml), a slice of it, and its benchmark script.

The full scenario (10,000 GPUs, over a million requests) runs for minutes:
it is measured by ``bench/sim_scale.py``, never here. These tests check that
it loads and is the fleet and load it says, that 1/100 of it runs (and the
same way twice), and that the benchmark script reports its figures.
No timing assertions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from harness.bench import load_bench

from haif.configfile import ConfigError
from haif.fleet import traces
from haif.fleet.scenario import load_scenario
from haif.fleet.workload import build_requests
from haif.sim.driver import run_scenario

ROOT = Path(__file__).resolve().parent.parent
SCALE = ROOT / "scenarios" / "scale_10k.yaml"
SCRIPT = ROOT / "bench" / "sim_scale.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("sim_scale")


def test_scale_scenario_is_10k_gpus_in_10_regions_with_a_million_requests() -> None:
    sc = load_scenario(SCALE)
    assert len(sc.regions) == 10 and sc.control == sc.regions
    per_region = Counter[str]()
    for group in sc.workers:
        assert group.gpu is not None and group.models == ("llama-3-8b",)
        per_region[group.region] += group.count
    assert per_region == dict.fromkeys(sc.regions, 1000)
    assert sum(per_region.values()) == 10_000
    assert set(sc.workload.origins) == set(sc.regions)
    assert sc.faults == () and sc.random_failures is None
    # Every request of the repeated, compressed trace arrives within the window
    # (what build_requests keeps), and there are over a million of them.
    w = sc.workload
    assert w.kind == "azure" and w.path is not None
    rows = traces.load_azure(Path(sc.base_dir) / w.path)
    span = rows[-1].arrival_s
    period = span + span / (len(rows) - 1)
    assert (span + (w.repeat - 1) * period) / w.rate_scale < sc.duration_s
    assert w.repeat * len(rows) >= 1_000_000


def test_repeat_tiles_a_trace_back_to_back() -> None:
    rows = [traces.TraceRequest(t, 10 + i, 5) for i, t in enumerate((0.0, 1.0, 3.0))]
    out = traces.repeat(rows, 3)
    period = 3.0 + 1.5  # span plus the mean gap
    assert [r.arrival_s for r in out] == [
        0.0,
        1.0,
        3.0,
        period,
        period + 1.0,
        period + 3.0,
        2 * period,
        2 * period + 1.0,
        2 * period + 3.0,
    ]
    assert [r.prompt_tokens for r in out] == [10, 11, 12] * 3
    assert traces.repeat(rows, 1) == rows
    assert len(traces.repeat(rows, 3, until_s=period)) == 6  # copies starting later: not built
    with pytest.raises(ValueError):
        traces.repeat(rows, 0)


def test_repeat_keeps_the_window_and_needs_a_trace() -> None:
    base = ["duration_s=60", "workload.rate_scale=100"]
    once = build_requests(load_scenario(SCALE, [*base, "workload.repeat=1"]))
    twice = build_requests(load_scenario(SCALE, [*base, "workload.repeat=2"]))
    # One copy of the trace takes ~35 s at x100: the second starts within the minute.
    assert len(once) == 19_366
    assert len(once) < len(twice) < 2 * len(once)
    assert all(r.arrival_s < 60 for r in twice)
    assert [r.arrival_s for r in twice] == sorted(r.arrival_s for r in twice)
    with pytest.raises(ConfigError, match="repeat"):
        load_scenario(SCALE, ["workload.kind=poisson", "workload.repeat=2"])


def test_a_slice_of_the_scale_scenario_runs_and_repeats_itself(bench: ModuleType) -> None:
    sc = bench.build_scenario(n=100, overrides=["duration_s=12", "drain_s=30"])
    assert sum(g.count for g in sc.workers) == 100
    assert sc.workload.rate_scale == pytest.approx(16.0)
    first = run_scenario(sc)
    n = len(first.records)
    assert n > 500 and first.unfinished == 0
    ok = [r for r in first.records if r.status == "ok"]
    assert len(ok) / n > 0.99
    assert {r.served_region for r in ok} == set(sc.regions)
    samples = Counter(u[1] for u in first.utilization)  # each worker, each second
    assert len(samples) == 100 and set(samples.values()) == {math.floor(first.end_s) - 1}
    again = run_scenario(sc)
    assert again.records == first.records
    assert again.utilization == first.utilization
    assert again.evictions == first.evictions


def test_sim_scale_bench_reports_time_speed_and_memory(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scale.json"
    report = bench.main(["--slice", "1000", "--set", "duration_s=5", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "peak RSS" in printed and "simulated requests per wall-second" in printed
    assert json.loads(out.read_text()) == report
    assert report["gpus"] == 30 and report["workers"] == 30  # one of each group
    assert report["requests"] > 0 and report["requests"] == report["results"]["requests"]
    assert report["peak_rss_mib"] > 0 and report["sim_events"] > 0
    assert 0 < report["loop_wall_s"] <= report["total_s"]
    assert report["req_per_s_loop"] == pytest.approx(report["requests"] / report["loop_wall_s"])
