"""Decision benchmark: microseconds of the pure control core per request, by fleet size.

Why: the core decides for every request in both shells, so its cost caps
the simulator's speed and a live orchestrator's throughput. A placement
must not cost more on a larger fleet (issue 19).

Set-up, per placement strategy and fleet size: one :class:`ControlCore`
knows ``N`` workers (spread over four regions and three GPU classes, all
serving one model, all eligible). Each request is a ``Submit`` and, once 20
are in flight, a successful ``AttemptResult`` for the oldest one; the
core's timers are fired as a driver would (``next_deadline`` /
``on_timer``). The clock advances 1 ms per request and every worker's
heartbeat is refreshed every 1,000 requests (so none goes stale). Reported:

- ``µs/request``: Submit + AttemptResult + timers, heartbeats excluded;
- ``µs/heartbeat``: one ``Heartbeat`` event (a refresh of an unchanged worker).

Each figure is the best of ``--repeat`` runs (the machine may be busy).

Run from the repository root::

    .venv/bin/python bench/core_decisions.py --repeat 3
    .venv/bin/python bench/core_decisions.py --sizes 48 10000 --placements p2c --json out.json

Goals (issue 19): at most 20 µs per request at 48 workers and at most 40 µs
at 10,000 for random, round_robin, p2c and least_outstanding.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from haif.contracts import (
    AttemptResult,
    Decision,
    Dispatch,
    Heartbeat,
    Request,
    Submit,
    WorkerSnapshot,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore
from haif.policy.placement import placement_names

MODEL = "llama-3-8b"
REGIONS: tuple[str, ...] = ("us-east", "us-west", "eu-west", "ap-south")
GPUS: tuple[str, ...] = ("H100-80G", "A100-80G", "RTX4090-24G")
SIZES: tuple[int, ...] = (12, 48, 768, 10_000)
IN_FLIGHT = 20
HEARTBEAT_EVERY = 1_000  # requests
STEP_S = 0.001  # simulated seconds per request
# µs per request the issue asks for, by fleet size, for these strategies.
GOALS: dict[int, float] = {48: 20.0, 10_000: 40.0}
GOAL_STRATEGIES: tuple[str, ...] = ("random", "round_robin", "p2c", "least_outstanding")


def fleet(n: int) -> list[WorkerSnapshot]:
    """``n`` idle workers of one model, round-robin over the regions and GPU classes."""
    return [
        WorkerSnapshot(
            worker_id=f"w{i:05d}",
            region=REGIONS[i % len(REGIONS)],
            gpu_class=GPUS[i % len(GPUS)],
            models_warm=(MODEL,),
            models_loadable=(MODEL,),
            capacity=8,
        )
        for i in range(n)
    ]


def config(placement: str) -> CoreConfig:
    rtt = {"us-east": {"us-west": 65.0, "eu-west": 80.0, "ap-south": 200.0}}
    return CoreConfig(placement=placement, rtt_ms=rtt)


@dataclass(frozen=True)
class Run:
    us_per_request: float
    us_per_heartbeat: float
    dispatches: int


def run_once(placement: str, n: int, requests: int, warmup: int, seed: int) -> Run:
    """Drive one core with ``warmup`` + ``requests`` requests; time the last ``requests``."""
    core = ControlCore(config(placement), random.Random(seed))
    workers = fleet(n)
    beats = [Heartbeat(w) for w in workers]
    now = 0.0
    for beat in beats:
        core.handle(beat, now)
    in_flight: deque[Dispatch] = deque()
    dispatches = 0
    decide_s = beat_s = 0.0
    heartbeats = 0
    clock = time.perf_counter
    handle, next_deadline, on_timer = core.handle, core.next_deadline, core.on_timer
    gc.collect()
    for i in range(warmup + requests):
        timed = i >= warmup
        if i and i % HEARTBEAT_EVERY == 0:
            start = clock()
            for beat in beats:
                handle(beat, now)
            if timed:
                beat_s += clock() - start
                heartbeats += len(beats)
        # The events are the driver's to build; the core's time starts at handle().
        submit = Submit(
            Request(
                request_id=f"r{i}",
                tenant="acme",
                model=MODEL,
                prompt_tokens=100,
                max_tokens=10,
                arrival_s=now,
                origin_region=REGIONS[i % len(REGIONS)],
            )
        )
        result = None
        if len(in_flight) >= IN_FLIGHT:
            oldest = in_flight.popleft()
            result = AttemptResult(
                oldest.request_id,
                oldest.attempt,
                oldest.worker_id,
                True,
                now - 0.02,
                now,
                now - 0.01,
                10,
            )
        start = clock()
        decisions: list[Decision] = handle(submit, now)
        if result is not None:
            decisions = decisions + handle(result, now)
        deadline = next_deadline()
        while deadline is not None and deadline <= now:
            decisions.extend(on_timer(deadline))
            deadline = next_deadline()
        if timed:
            decide_s += clock() - start
        for d in decisions:
            if isinstance(d, Dispatch):
                in_flight.append(d)
                dispatches += 1
        now += STEP_S
    return Run(
        us_per_request=decide_s / requests * 1e6,
        us_per_heartbeat=beat_s / heartbeats * 1e6 if heartbeats else float("nan"),
        dispatches=dispatches,
    )


def best_of(placement: str, n: int, requests: int, warmup: int, repeat: int, seed: int) -> Run:
    runs = [run_once(placement, n, requests, warmup, seed) for _ in range(repeat)]
    for r in runs:
        if r.dispatches != warmup + requests:
            raise SystemExit(f"{placement} @ {n}: only {r.dispatches} dispatches")
    return Run(
        min(r.us_per_request for r in runs),
        min(r.us_per_heartbeat for r in runs),
        runs[0].dispatches,
    )


def _cell(us: float, goal: float | None) -> str:
    text = f"{us:,.1f}"
    if goal is None:
        return text
    return f"[green]{text}[/]" if us <= goal else f"[red]{text}[/]"


def table(results: dict[str, dict[int, Run]], sizes: Sequence[int]) -> Table:
    t = Table(title="ControlCore µs per request (Submit + AttemptResult + timers), best of runs")
    t.add_column("placement")
    for n in sizes:
        goal = GOALS.get(n)
        t.add_column(f"{n:,} workers" + (f" (goal ≤{goal:g})" if goal else ""), justify="right")
    t.add_column("µs/heartbeat @ largest", justify="right")
    for name, by_size in results.items():
        cells = [
            _cell(by_size[n].us_per_request, GOALS.get(n) if name in GOAL_STRATEGIES else None)
            for n in sizes
        ]
        t.add_row(name, *cells, f"{by_size[sizes[-1]].us_per_heartbeat:.2f}")
    return t


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--placements", nargs="+", default=list(placement_names()))
    p.add_argument("--requests", type=int, default=5_000, help="timed requests per run")
    p.add_argument("--warmup", type=int, default=500, help="untimed requests first")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; the best is reported")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(
        f"[bold]machine[/]: {platform.processor() or platform.machine()} | "
        f"{platform.python_implementation()} {platform.python_version()} | one core"
    )
    results: dict[str, dict[int, Run]] = {}
    for name in args.placements:
        results[name] = {}
        for n in args.sizes:
            run = best_of(name, n, args.requests, args.warmup, args.repeat, args.seed)
            results[name][n] = run
            console.print(
                f"  {name:18s} {n:>6,} workers: {run.us_per_request:8.1f} µs/request, "
                f"{run.us_per_heartbeat:6.2f} µs/heartbeat"
            )
    console.print(table(results, args.sizes))
    report: dict[str, Any] = {
        "sizes": list(args.sizes),
        "requests": args.requests,
        "repeat": args.repeat,
        "results": {
            name: {
                str(n): {"us_per_request": r.us_per_request, "us_per_heartbeat": r.us_per_heartbeat}
                for n, r in by_size.items()
            }
            for name, by_size in results.items()
        },
        "goals": {str(n): g for n, g in GOALS.items()},
        "goal_strategies": list(GOAL_STRATEGIES),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
