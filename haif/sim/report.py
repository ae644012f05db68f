"""A simulation run's report folder.

``records.parquet`` (one row per request, the schema both shells write),
``timeseries.parquet`` (per second), ``utilization.parquet`` (per worker and
second), ``summary.json`` (headline figures), ``report.md`` (the same, for a
person, with the PNG figures next to it). Same scenario and seed, same bytes.

Prefix cache: the records' ``prefix_hit_tokens`` column holds, for a request
whose serving worker has a prefix cache, the prompt tokens that cache held
for it (:mod:`haif.records`); ``summary.json``'s ``prefix_cache`` sums it
(:func:`prefix_cache_summary`: hit tokens over prompt tokens, overall, per
worker and per tenant; ``null`` when no worker has a prefix cache), and
``report.md`` has a line and a table for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from haif.records import summarize, write_parquet
from haif.sim.driver import SimResult
from haif.sim.plots import plot_all
from haif.sim.timeseries import per_second, utilization_frame, write_timeseries


def _phases(result: SimResult) -> list[tuple[str, float, float]]:
    """Before / during / after the scheduled fault windows (or one phase if none)."""
    faults = [w for w in result.fault_windows if w[1] - w[0] < result.scenario.duration_s]
    if not faults:
        return [("whole run", 0.0, float("inf"))]
    start = min(f[0] for f in faults)
    end = max(f[1] for f in faults)
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


def latency_by_phase(result: SimResult) -> dict[str, dict[str, float | None]]:
    """Success rate and latency percentiles per phase (by arrival time)."""
    table: dict[str, dict[str, float | None]] = {}
    for name, lo, hi in _phases(result):
        records = [r for r in result.records if lo <= r.arrival_s < hi]
        s = summarize(records)
        table[name] = {
            k: s[k]
            for k in ("success_rate", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s")
        }
    return table


def _slo_attainment(result: SimResult) -> float | None:
    sc = result.scenario
    if (sc.slo_ttft_s is None and sc.slo_e2e_s is None) or not result.records:
        return None
    met = 0
    for r in result.records:
        if r.status != "ok":
            continue
        ttft = r.first_token_s - r.arrival_s if r.first_token_s is not None else None
        if sc.slo_ttft_s is not None and (ttft is None or ttft > sc.slo_ttft_s):
            continue
        if sc.slo_e2e_s is not None and r.finish_s - r.arrival_s > sc.slo_e2e_s:
            continue
        met += 1
    return met / len(result.records)


def prefix_hit_tokens(result: SimResult) -> dict[str, int | None]:
    """Request id -> the prompt tokens the serving worker's prefix cache held for the
    attempt the record describes (its last; ``None`` if that attempt was never
    admitted to a batch). Only records served by a worker with a prefix cache."""
    hits: dict[str, int | None] = {}
    caches = result.prefix_hits
    for r in result.records:
        if r.worker_id is not None and r.worker_id in caches:
            hits[r.request_id] = caches[r.worker_id].get((r.request_id, r.attempts))
    return hits


def _hit_stats(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """{requests, prompt_tokens, hit_tokens, hit_ratio} of (prompt, hit) pairs."""
    prompt = sum(p for p, _ in pairs)
    hit = sum(h for _, h in pairs)
    return {
        "requests": len(pairs),
        "prompt_tokens": prompt,
        "hit_tokens": hit,
        "hit_ratio": hit / prompt if prompt else None,
    }


def prefix_cache_summary(result: SimResult) -> dict[str, Any] | None:
    """Prefix-cache hits over the requests whose hit tokens are known (``None``: no
    worker has a prefix cache): overall, ``by_worker`` (every worker with a cache)
    and ``by_tenant``. ``hit_ratio`` is hit tokens over prompt tokens."""
    if not result.prefix_hits:
        return None
    hits = prefix_hit_tokens(result)
    overall: list[tuple[int, int]] = []
    by_worker: dict[str, list[tuple[int, int]]] = {w: [] for w in sorted(result.prefix_hits)}
    by_tenant: dict[str, list[tuple[int, int]]] = {}
    for r in result.records:
        hit = hits.get(r.request_id)
        if hit is None or r.worker_id is None:
            continue
        pair = (r.prompt_tokens, hit)
        overall.append(pair)
        by_worker[r.worker_id].append(pair)
        by_tenant.setdefault(r.tenant, []).append(pair)
    return {
        **_hit_stats(overall),
        "by_worker": {w: _hit_stats(p) for w, p in by_worker.items()},
        "by_tenant": {t: _hit_stats(p) for t, p in sorted(by_tenant.items())},
    }


def build_summary(result: SimResult) -> dict[str, Any]:
    sc = result.scenario
    summary = summarize(result.records)
    ok_tokens = sum(r.output_tokens for r in result.records if r.status == "ok")
    util = [u[4] for u in result.utilization]
    summary.update(
        scenario=sc.name,
        seed=sc.seed,
        fidelity=sc.fidelity,
        placement=sc.policy.placement,
        simulated_s=round(result.end_s, 6),
        dead_letters=len(result.dead_letters),
        unfinished=result.unfinished,
        goodput_tokens_per_s=ok_tokens / sc.duration_s,
        slo_attainment=_slo_attainment(result),
        gpu_utilization=sum(util) / len(util) if util else None,
        provisioned_cost=result.provisioned_cost,
        served_by_region=served_by_region(result),
        latency_by_phase=latency_by_phase(result),
        served_by_worker=dict(sorted(result.served_by_worker.items())),
        fault_windows=[list(w) for w in result.fault_windows],
        prefix_cache=prefix_cache_summary(result),
    )
    return summary


def _fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _hits(stats: dict[str, Any]) -> str:
    """``36.52% of prompt tokens (1,234 of 3,379) over 12 requests``."""
    return (
        f"{_pct(stats['hit_ratio'])} of prompt tokens ({stats['hit_tokens']:,} of "
        f"{stats['prompt_tokens']:,}) over {stats['requests']:,} requests"
    )


def _prefix_cache_lines(prefix: dict[str, Any] | None) -> list[str]:
    """The prefix-cache section of ``report.md`` (none without a prefix cache)."""
    if prefix is None:
        return []
    lines = [
        "",
        "## Prefix cache",
        "",
        "Prompt tokens the serving worker's prefix cache held (not prefilled), per "
        "request served by a worker with a prefix cache.",
        "",
        "| by | hits | hit tokens / prompt tokens | requests |",
        "|---|---|---|---|",
    ]
    groups = [("worker", prefix["by_worker"]), ("tenant", prefix["by_tenant"])]
    for kind, table in groups:
        for name, stats in table.items():
            lines.append(
                f"| {kind} {name} | {_pct(stats['hit_ratio'])} | {stats['hit_tokens']:,} / "
                f"{stats['prompt_tokens']:,} | {stats['requests']:,} |"
            )
    return lines


def render_markdown(summary: dict[str, Any], scenario_text: str, figures: list[str]) -> str:
    prefix: dict[str, Any] | None = summary.get("prefix_cache")
    prefix_text = "no prefix cache" if prefix is None else _hits(prefix)
    lines = [
        f"# HAIF simulation: {summary['scenario']}",
        "",
        scenario_text,
        "",
        f"Seed {summary['seed']}, {summary['fidelity']}-level worker model, placement "
        f"`{summary['placement']}`, {summary['simulated_s']:.0f} s simulated.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests | {summary['requests']} |",
        f"| success rate | {_pct(summary['success_rate'])} |",
        f"| SLO attainment | {_pct(summary['slo_attainment'])} |",
        f"| end-to-end latency p50 / p99 | {_fmt_s(summary['latency_p50_s'])} / "
        f"{_fmt_s(summary['latency_p99_s'])} |",
        f"| time to first token p50 / p99 | {_fmt_s(summary['ttft_p50_s'])} / "
        f"{_fmt_s(summary['ttft_p99_s'])} |",
        f"| goodput | {summary['goodput_tokens_per_s']:.0f} output tokens/s |",
        f"| requests retried | {summary['retried']} |",
        f"| dead-lettered | {summary['dead_letters']} |",
        f"| unfinished at end | {summary['unfinished']} |",
        f"| mean GPU utilization | {_pct(summary['gpu_utilization'])} |",
        f"| cost: provisioned / attributed to requests | ${summary['provisioned_cost']:.2f} / "
        f"${summary['cost']:.2f} |",
        f"| prefix-cache hits | {prefix_text} |",
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
    lines += [
        "",
        "## Latency by phase (by arrival time)",
        "",
        "| phase | success | TTFT p50 / p99 | end-to-end p50 / p99 |",
        "|---|---|---|---|",
    ]
    for phase, row in summary["latency_by_phase"].items():
        lines.append(
            f"| {phase} | {_pct(row['success_rate'])} | {_fmt_s(row['ttft_p50_s'])} / "
            f"{_fmt_s(row['ttft_p99_s'])} | {_fmt_s(row['latency_p50_s'])} / "
            f"{_fmt_s(row['latency_p99_s'])} |"
        )
    lines += _prefix_cache_lines(prefix)
    if summary["fault_windows"]:
        lines += ["", "## Faults", "", "| from | to | what |", "|---|---|---|"]
        lines += [f"| {a:.0f} s | {b:.0f} s | {what} |" for a, b, what in summary["fault_windows"]]
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    lines.append("")
    return "\n".join(lines)


def write_report(result: SimResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write the run's files into ``out_dir``; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sc = result.scenario
    write_parquet(
        result.records, out / "records.parquet", prefix_hit_tokens=prefix_hit_tokens(result)
    )
    series = per_second(result.records, result.end_s, sc.regions, sc.slo_ttft_s, sc.slo_e2e_s)
    write_timeseries(series, out / "timeseries.parquet")
    util = utilization_frame(result.utilization)
    write_timeseries(util, out / "utilization.parquet")
    summary = build_summary(result)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    figures: list[str] = []
    if plots:
        paths = plot_all(result.records, series, util, sc.regions, result.fault_windows, out)
        figures = [p.name for p in paths.values()]
    text = sc.description or ""
    (out / "report.md").write_text(render_markdown(summary, text, figures))
    return summary
