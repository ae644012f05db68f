"""The simulator guide's failover tables are what `make sim` computes.

The figures in "What the failover scenario shows" (docs/simulator.md) are typed in;
this test reruns the scenario (seed 42, the shipped file) and requires every
row to match, so a model change that moves them fails here until the page
is updated with the new figures (the failure message prints the rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from haif.fleet.scenario import load_scenario
from haif.sim.driver import run_scenario
from haif.sim.report import write_report

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms"


def _rows(summary: dict[str, Any]) -> list[str]:
    """The page's rows, formatted from a run's summary."""
    rows = [
        f"| requests / success rate | {summary['requests']:,} / "
        f"{summary['success_rate'] * 100:.2f} % |",
        "| SLO attainment (TTFT <= 2 s, end-to-end <= 60 s) | "
        f"{summary['slo_attainment'] * 100:.2f} % |",
        f"| TTFT p50 / p99 | {_ms(summary['ttft_p50_s'])} / {_ms(summary['ttft_p99_s'])} |",
        f"| end-to-end p50 / p99 | {summary['latency_p50_s']:.2f} s / "
        f"{summary['latency_p99_s']:.1f} s |",
        f"| retried / dead-lettered | {summary['retried']} / {summary['dead_letters']} |",
        f"| mean GPU utilization | {summary['gpu_utilization'] * 100:.0f} % |",
    ]
    dash = "\N{EN DASH}"  # as the page writes ranges
    spans = {"before": f"0{dash}1200 s", "during": f"1200{dash}2100 s", "after": f"2100 s{dash}"}
    for phase, span in spans.items():
        lat = summary["latency_by_phase"][phase]
        served = summary["served_by_region"][phase]
        regions = " / ".join(f"{served[r]:,}" for r in ("eu-west", "us-east", "us-west"))
        rows.append(
            f"| {phase} ({span}) | {_ms(lat['ttft_p50_s'])} / {_ms(lat['ttft_p99_s'])} "
            f"| {regions} |"
        )
    return rows


def test_the_failover_tables_match_a_fresh_run(tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "failover.yaml")
    summary = write_report(run_scenario(scenario), tmp_path, plots=False)
    page = (ROOT / "docs" / "simulator.md").read_text(encoding="utf-8")
    stale = [row for row in _rows(summary) if row not in page]
    assert not stale, "docs/simulator.md rows to update:\n" + "\n".join(stale)
