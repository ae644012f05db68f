"""How closely the live synthetic engine's profile timing follows the simulator, in real time.

Streams an open-loop Poisson load through one in-process
``SyntheticEngine(timing=...)`` on the real asyncio loop (real sleeps, the
machine's scheduling jitter included), records when each request reached the
engine and when its first and last tokens came out, then simulates one worker
(:mod:`haif.sim.engine`) with exactly those arrival times and reports the
error: per request (``|live - sim|`` of TTFT and end-to-end latency) and of
the distributions' p50 / p90 / p99 (the sim-to-real parity target is <= 5% at
p50 / p90 and <= 10% at p99).

    .venv/bin/python bench/batching_parity.py [--timing profile] [--rate 8] [--seconds 20]

A script, not a test: it prints figures (``--json PATH`` writes them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from haif.contracts import AttemptResult, Event, Request
from haif.fleet.profiles import PerfProfile, load_catalog
from haif.runtime.engines import SyntheticEngine
from haif.sim.engine import BatchingWorker, RequestLevelWorker
from haif.sim.fleet import Network

Row = tuple[str, float, float, float]  # request id, arrival, first token, finish


async def live_run(engine: SyntheticEngine, requests: list[tuple[float, Request]]) -> list[Row]:
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    rows: list[Row] = []

    async def consume(req: Request) -> None:
        arrived = loop.time() - t0
        first: float | None = None
        async for _chunk in engine.stream(req):
            if first is None:
                first = loop.time() - t0
        assert first is not None
        rows.append((req.request_id, arrived, first, loop.time() - t0))

    tasks = []
    for at, req in requests:
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(consume(req)))
    await asyncio.gather(*tasks)
    return rows


def simulate(
    timing: str,
    profile: PerfProfile,
    requests: dict[str, Request],
    arrivals: dict[str, float],
    max_batch: int | None,
) -> dict[str, AttemptResult]:
    env = simpy.Environment()
    results: dict[str, AttemptResult] = {}

    def send(_src: str, _dst: str, event: Event) -> None:
        assert isinstance(event, AttemptResult)
        results[event.request_id] = event

    profiles = {profile.model.name: profile}
    common: dict[str, Any] = {
        "models": tuple(profiles),
        "capacity": max_batch or profile.max_batch,
        "vram_gb": profile.gpu.vram_gb,
        "price_per_hour": 0.0,
        "net": Network(lambda _a, _b: 0.0, connect_timeout_s=1.0),
        "send": send,
        "rng": random.Random(0),
        "profiles": profiles,
        "warm": profile.model.name,
    }
    worker: BatchingWorker | RequestLevelWorker
    if timing == "profile":
        worker = BatchingWorker(env, "w", "r", "g", max_batch=max_batch, **common)
    else:
        worker = RequestLevelWorker(env, "w", "r", "g", **common)

    def arrive(at: float, req: Request) -> None:
        env.timeout(at).callbacks.append(lambda _ev: worker.dispatch(req, 1, "r"))

    for rid, at in arrivals.items():
        arrive(at, requests[rid])
    env.run()
    return results


def percentiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timing", choices=("profile", "profile-request"), default="profile")
    parser.add_argument("--gpu", default="A100-80G")
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    profile = load_catalog().get(args.gpu, args.model)
    rng = random.Random(args.seed)
    requests: list[tuple[float, Request]] = []
    t = 0.0
    while True:
        t += rng.expovariate(args.rate)
        if t >= args.seconds:
            break
        rid = f"r{len(requests)}"
        prompt, output = rng.randint(64, 2048), rng.randint(16, 256)
        requests.append((t, Request(rid, "t", args.model, prompt, output, t)))

    engine = SyntheticEngine(
        timing=args.timing, profiles={args.model: profile}, max_batch=args.max_batch
    )
    rows = asyncio.run(live_run(engine, requests))
    by_id = {req.request_id: req for _, req in requests}
    sim = simulate(args.timing, profile, by_id, {rid: at for rid, at, _, _ in rows}, args.max_batch)

    live_ttft = np.array([first - at for _, at, first, _ in rows])
    live_e2e = np.array([end - at for _, at, _, end in rows])
    sim_ttft = np.array([(sim[rid].first_token_s or 0.0) - at for rid, at, _, _ in rows])
    sim_e2e = np.array([sim[rid].finish_s - at for rid, at, _, _ in rows])
    report: dict[str, Any] = {
        "timing": args.timing,
        "profile": profile.name,
        "requests": len(rows),
        "rate": args.rate,
        "max_batch": args.max_batch or profile.max_batch,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    for name, live, simulated in (("ttft", live_ttft, sim_ttft), ("e2e", live_e2e, sim_e2e)):
        lp, sp = percentiles(live), percentiles(simulated)
        report[name] = {
            "live_s": lp,
            "sim_s": sp,
            "percentile_error": {k: abs(lp[k] - sp[k]) / sp[k] for k in lp},
            "per_request_abs_error_ms": {
                k: v * 1000 for k, v in percentiles(np.abs(live - simulated)).items()
            },
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
