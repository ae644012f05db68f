"""Smoke tests of benchmarks on tiny runs: the simulator's speed (bench/sim_speed.py)
and the store's CPU per request (bench/store_writes.py).

Checks the figures are there and sane; no timing assertions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from harness.bench import load_bench

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "sim_speed.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("sim_speed")


def test_scenario_is_the_benchmark_fleet(bench: ModuleType) -> None:
    sc = bench.build_scenario("iteration", 3600.0, 42)
    assert sum(g.count for g in sc.workers) == 48
    assert {g.region for g in sc.workers} == {"us-east", "us-west", "eu-west"}
    assert all(g.models == ("llama-3-8b",) for g in sc.workers)
    assert {g.gpu for g in sc.workers} == {"H100-80G", "A100-80G", "RTX4090-24G"}
    assert sc.faults == ()
    assert sc.workload.kind == "azure" and sc.workload.models == {"llama-3-8b": 1.0}
    assert (Path(sc.base_dir) / str(sc.workload.path)).resolve() == (
        ROOT / "traces" / "azure_llm_2023_conv.csv"
    )
    loaded = bench.build_scenario("request", 3600.0, 42, 4.0)
    assert loaded.fidelity == "request"
    assert loaded.workload.rate_scale == 4.0 and loaded.duration_s == 900.0


def test_main_reports_speed_results_and_disagreement(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    report: dict[str, Any] = bench.main(
        ["--duration", "60", "--repeat", "2", "--seed", "7", "--json", str(out)]
    )
    printed = capsys.readouterr().out

    assert "bench/sim_speed.py --duration 60" in report["command"]
    assert report["machine"]["cpu_count"] >= 1
    assert report["config"]["gpus"] == 48
    for level in ("iteration", "request"):
        lv = report["levels"][level]
        sp = lv["speed"]
        assert sp["repeats"] == 2 and len(sp["wall_s"]) == 2
        assert sp["requests"] > 50
        assert sp["deterministic"]
        assert 0 < sp["wall_best_s"] <= sp["wall_median_s"]
        assert sp["total_best_s"] >= sp["wall_best_s"]
        assert sp["req_per_s_best"] == pytest.approx(sp["requests"] / sp["wall_best_s"])
        assert sp["events_per_request"] > 1
        assert lv["bar_req_per_s"] == {"iteration": 10000.0, "request": 20000.0}[level]
        res = lv["results"]
        assert res["requests"] == sp["requests"]
        assert 0.9 <= res["success_rate"] <= 1.0
        for key in ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s"):
            assert res[key] > 0
        assert res["ttft_p50_s"] <= res["ttft_p99_s"] and res["e2e_p50_s"] <= res["e2e_p99_s"]

    # Both levels replay the same requests.
    assert (
        report["levels"]["iteration"]["speed"]["requests"]
        == (report["levels"]["request"]["speed"]["requests"])
    )
    assert set(report["disagreement"]) == {"x1", "x4"}
    for entry in report["disagreement"].values():
        metrics = entry["metrics"]
        for key in (
            "ttft_p50_s",
            "ttft_p90_s",
            "ttft_p99_s",
            "e2e_p50_s",
            "e2e_p90_s",
            "e2e_p99_s",
            "gpu_utilization",
            "goodput_tokens_per_s",
            "goodput_slo_req_per_s",
        ):
            cell = metrics[key]
            assert cell["iteration"] is not None and cell["request"] is not None
            assert cell["rel_diff"] == pytest.approx(
                (cell["request"] - cell["iteration"]) / abs(cell["iteration"])
            )
    assert set(report["loaded_runs"]) == {"iteration", "request"}

    for text in ("req/s", "events / request", "TTFT p90", "E2E p99", "4x the trace rate"):
        assert text in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def test_single_level_skips_the_comparison(bench: ModuleType) -> None:
    report = bench.main(["--fidelity", "request", "--duration", "30", "--repeat", "1"])
    assert set(report["levels"]) == {"request"}
    assert report["disagreement"] == {} and report["loaded_runs"] == {}


def test_store_writes_reports_cpu_and_batches(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("store_writes")
    bench.main(["--rate", "100", "--seconds", "0.5", "--linger-ms", "20"])
    printed = capsys.readouterr().out
    assert "DuckDB, linger 20 ms; 100 requests/s" in printed
    assert "CPU per request (this process):" in printed
    # 50 requests (and 20 to warm up), three writes each, fewer transactions than writes.
    writes, transactions = (
        int(w) for w in re.findall(r"(\d+) writes in (\d+) transactions", printed)[0]
    )
    assert writes == 3 * 70 and transactions < writes
