"""A simulation run's report folder: records.parquet, summary.json, report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from haif.contracts import RequestRecord
from haif.records import summarize, write_parquet
from haif.sim.driver import SimResult


def _phases(result: SimResult) -> list[tuple[str, float, float]]:
    """Before / during / after the first fault window (or one phase if none)."""
    faults = result.scenario.faults
    if not faults:
        return [("whole run", 0.0, float("inf"))]
    start = min(f.start_s for f in faults)
    end = max(f.end_s for f in faults)
    return [("before", 0.0, start), ("during", start, end), ("after", end, float("inf"))]


def served_by_region(result: SimResult) -> dict[str, dict[str, int]]:
    """Successful requests per phase and served region (by arrival time)."""
    table: dict[str, dict[str, int]] = {}
    for name, lo, hi in _phases(result):
        row = dict.fromkeys(result.scenario.regions, 0)
        for r in result.records:
            if r.status == "ok" and lo <= r.arrival_s < hi and r.served_region:
                row[r.served_region] = row.get(r.served_region, 0) + 1
        table[name] = row
    return table


def build_summary(result: SimResult) -> dict[str, Any]:
    sc = result.scenario
    summary = summarize(result.records)
    summary.update(
        scenario=sc.name,
        seed=sc.seed,
        placement=sc.policy.placement,
        simulated_s=round(result.end_s, 6),
        dead_letters=len(result.dead_letters),
        unfinished=result.unfinished,
        served_by_region=served_by_region(result),
        served_by_worker=dict(sorted(result.served_by_worker.items())),
    )
    return summary


def _fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def render_markdown(summary: dict[str, Any], records: list[RequestRecord]) -> str:
    rate = summary["success_rate"]
    lines = [
        f"# HAIF simulation: {summary['scenario']}",
        "",
        f"Seed {summary['seed']}, placement `{summary['placement']}`, "
        f"{summary['simulated_s']:.0f} s simulated.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests | {summary['requests']} |",
        f"| success rate | {'n/a' if rate is None else f'{rate:.2%}'} |",
        f"| latency p50 / p99 | {_fmt_s(summary['latency_p50_s'])} / "
        f"{_fmt_s(summary['latency_p99_s'])} |",
        f"| TTFT p50 / p99 | {_fmt_s(summary['ttft_p50_s'])} / {_fmt_s(summary['ttft_p99_s'])} |",
        f"| retried requests | {summary['retried']} |",
        f"| dead-lettered | {summary['dead_letters']} |",
        f"| unfinished at end | {summary['unfinished']} |",
        f"| cost | ${summary['cost']:.2f} |",
        "",
        "## Outcomes",
        "",
        "| status | requests |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary["by_status"].items()],
        "",
        "## Successful requests per served region (by arrival time)",
        "",
    ]
    by_phase: dict[str, dict[str, int]] = summary["served_by_region"]
    regions = sorted({r for row in by_phase.values() for r in row})
    lines.append("| phase | " + " | ".join(regions) + " |")
    lines.append("|---|" + "---|" * len(regions))
    for phase, row in by_phase.items():
        lines.append(f"| {phase} | " + " | ".join(str(row.get(r, 0)) for r in regions) + " |")
    lines.append("")
    return "\n".join(lines)


def write_report(result: SimResult, out_dir: str | Path) -> dict[str, Any]:
    """Write the run's files into ``out_dir``; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(result.records, out / "records.parquet")
    summary = build_summary(result)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(render_markdown(summary, result.records))
    return summary
