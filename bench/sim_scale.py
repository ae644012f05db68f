"""The simulator at fleet scale: ``scenarios/scale_10k.yaml`` on one core.

10,000 GPUs in 10 regions, every region's orchestrator hearing every worker
once a second, and the Azure conversation trace replayed 54 times and run
1,600 times faster (1,045,764 requests in the first 118 simulated seconds;
see the scenario's header). Runs it once and reports:

- setup time (loading the scenario, the trace and building the fleet), the
  event loop's wall time and CPU time, and the whole run's;
- simulated requests per wall-second of the event loop and of the whole run;
- peak memory (``ru_maxrss`` of this process) and SimPy events per request;
- the headline results (success rate, TTFT and end-to-end percentiles, mean
  GPU utilization over the arrival window).

A progress line every ``--every`` percent of simulated time shows how far it
got (requests finished, wall time, memory). ``--slice N`` runs 1/N of every
worker group (at least one worker each) at 1/N of the rate, for a quick look.

Run from the repository root::

    .venv/bin/python bench/sim_scale.py --json scale.json
    .venv/bin/python bench/sim_scale.py --slice 100 --set duration_s=30

Single process, single core (no multiprocessing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import simpy

from haif.fleet.scenario import Scenario, load_scenario
from haif.records import summarize
from haif.sim.driver import SimCluster, SimResult

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "scenarios" / "scale_10k.yaml"


def slice_overrides(path: Path, n: int) -> list[str]:
    """``--set`` overrides that make 1/``n`` of the scenario: every worker group's
    count divided by ``n`` (at least 1) and the workload's rate too."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if n == 1:
        return []
    full = load_scenario(path)
    out = [f"workers.{i}.count={max(1, g.count // n)}" for i, g in enumerate(full.workers)]
    out.append(f"workload.rate_scale={full.workload.rate_scale / n!r}")
    return out


def build_scenario(path: Path = SCENARIO, n: int = 1, overrides: Sequence[str] = ()) -> Scenario:
    """The scale scenario, or 1/``n`` of it, with ``overrides`` applied after the slice."""
    return load_scenario(path, [*slice_overrides(path, n), *overrides])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def machine_info() -> dict[str, Any]:
    return {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "simpy": simpy.__version__,
    }


def headline(result: SimResult) -> dict[str, Any]:
    sc = result.scenario
    s = summarize(result.records)
    util = [u[4] for u in result.utilization if u[0] < sc.duration_s]
    return {
        "requests": s["requests"],
        "by_status": s["by_status"],
        "success_rate": s["success_rate"],
        "ttft_p50_s": s["ttft_p50_s"],
        "ttft_p99_s": s["ttft_p99_s"],
        "e2e_p50_s": s["latency_p50_s"],
        "e2e_p99_s": s["latency_p99_s"],
        "retried": s["retried"],
        "unfinished": result.unfinished,
        "gpu_utilization": sum(util) / len(util) if util else None,
        "simulated_s": result.end_s,
    }


def run(scenario: Scenario, every: float = 10.0, quiet: bool = False) -> dict[str, Any]:
    """Run ``scenario`` once; its speed, memory and results."""
    gc.collect()
    start = time.perf_counter()
    cluster = SimCluster(scenario)
    setup_s = time.perf_counter() - start
    workers = len(cluster.workers)
    arrivals = len(cluster._arrivals)
    end = scenario.duration_s + scenario.drain_s
    next_report = [every]

    def progress(t: float, _end: float) -> None:
        if quiet or 100 * t / end + 1e-9 < next_report[0]:
            return
        next_report[0] += every
        wall = time.perf_counter() - start
        print(
            f"  {t:7.1f} / {end:g} s simulated, {len(cluster.records):>9,} requests finished,"
            f" {wall:7.1f} s wall, peak RSS {peak_rss_mb():,.0f} MiB",
            flush=True,
        )

    cpu = time.process_time()
    result = cluster.run(progress)
    loop_cpu_s = time.process_time() - cpu
    total_s = time.perf_counter() - start
    n = len(result.records)
    return {
        "workers": workers,
        "regions": len(scenario.regions),
        "arrivals": arrivals,
        "requests": n,
        "setup_s": setup_s,
        "loop_wall_s": result.wall_s,
        "loop_cpu_s": loop_cpu_s,
        "total_s": total_s,
        "req_per_s_loop": n / result.wall_s if result.wall_s > 0 else None,
        "req_per_s_total": n / total_s,
        "peak_rss_mib": peak_rss_mb(),
        "sim_events": result.sim_events,
        "events_per_request": result.sim_events / n if n else None,
        "results": headline(result),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/sim_scale.py",
        description="The 10,000-GPU scale scenario on one core: time, speed and peak memory.",
    )
    p.add_argument("--scenario", type=Path, default=SCENARIO, help="default: %(default)s")
    p.add_argument(
        "--slice", type=int, default=1, metavar="N", help="run 1/N of the fleet and the rate"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a scenario field after slicing, e.g. fidelity=request (repeatable)",
    )
    p.add_argument("--every", type=float, default=10.0, help="progress every this %% (default 10)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.slice < 1:
        p.error("--slice must be >= 1")
    if args.every <= 0:
        p.error("--every must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(args_list)
    command = shlex.join([sys.executable, "bench/sim_scale.py", *args_list])
    machine = machine_info()
    scenario = build_scenario(args.scenario, args.slice, args.overrides)
    print(f"command: {command}")
    print(
        f"machine: {machine['processor']} | {machine['cpu_count']} CPUs (uses one) | "
        f"{machine['platform']} | Python {machine['python']} | simpy {machine['simpy']}"
    )
    gpus = sum(g.count for g in scenario.workers)
    print(
        f"scenario: {scenario.name}"
        + (f" (1/{args.slice} slice)" if args.slice > 1 else "")
        + f", {gpus:,} workers in {len(scenario.regions)} regions, {scenario.fidelity} level, "
        f"rate x{scenario.workload.rate_scale:g}, {scenario.duration_s:g} s + "
        f"{scenario.drain_s:g} s drain"
        + (f", overrides {args.overrides}" if args.overrides else "")
    )
    figures = run(scenario, args.every, args.quiet)
    res = figures["results"]
    util = res["gpu_utilization"]
    print(
        f"requests {figures['requests']:,} of {figures['arrivals']:,} arrivals | "
        f"setup {figures['setup_s']:.1f} s | event loop {figures['loop_wall_s']:.1f} s wall "
        f"({figures['loop_cpu_s']:.1f} s CPU) | total {figures['total_s']:.1f} s"
    )
    print(
        f"simulated requests per wall-second: {figures['req_per_s_loop']:,.0f} (event loop), "
        f"{figures['req_per_s_total']:,.0f} (with setup) | peak RSS "
        f"{figures['peak_rss_mib']:,.0f} MiB | {figures['events_per_request']:.1f} SimPy "
        "events per request"
    )
    print(
        f"results: success {res['success_rate'] * 100:.2f} %, TTFT p50 {res['ttft_p50_s']:.3f} s "
        f"p99 {res['ttft_p99_s']:.3f} s, E2E p50 {res['e2e_p50_s']:.3f} s "
        f"p99 {res['e2e_p99_s']:.3f} s, GPU utilization "
        + ("-" if util is None else f"{util * 100:.1f} %")
        + f", simulated {res['simulated_s']:.1f} s"
    )
    report = {
        "command": command,
        "machine": machine,
        "scenario": str(args.scenario),
        "slice": args.slice,
        "overrides": args.overrides,
        "gpus": gpus,
        **figures,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
