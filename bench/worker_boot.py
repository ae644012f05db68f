"""How long a restarted worker takes to announce itself: the simulator's ``heartbeat.boot_s``.

Starts the live cluster ``haif parity`` would start for a scenario (default
``scenarios/parity_ci.yaml``: synthetic workers timed by the GPU profiles,
heartbeating every 0.5 s), then restarts one worker several times the way
``haif replay --faults`` does (kill -9 through ``haif up``'s control
endpoint, wait, start) and measures, at the gateway's ``/readyz``, the time
from the start command until the orchestrator counts the worker fresh
again: Python start-up, imports, keys, the first sealed heartbeat. That is
the ``heartbeat.boot_s`` a scenario that should predict this runtime on this
machine gives (``scenarios/parity.yaml`` does); the weights then load in the
background (``--cold-start``), which the simulator models as a reload from
the restart on. A script, not a test: it prints figures (``--json PATH``
writes them).

    .venv/bin/python bench/worker_boot.py [--restarts 5] [--at-once 1] [--scenario ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

from haif.analysis.parity import _start_cluster, _stop_cluster, cluster_config, wait_all_fresh
from haif.fleet.scenario import load_scenario
from haif.fleet.targets import scenario_workers
from haif.runtime.faults import ClusterControl
from haif.runtime.supervisor import read_state


async def _fresh(session: aiohttp.ClientSession, gateway: str) -> int:
    try:
        async with session.get(f"{gateway}/readyz") as resp:
            return int((await resp.json(content_type=None)).get("fresh_workers", 0))
    except (aiohttp.ClientError, ValueError):
        return -1


async def _until(session: aiohttp.ClientSession, gateway: str, want: int, limit_s: float) -> float:
    """Seconds until ``/readyz`` counts ``want`` fresh workers (polled every 5 ms)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if await _fresh(session, gateway) == want:
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    raise SystemExit(f"/readyz did not count {want} fresh workers within {limit_s:.0f} s")


async def _measure(state: dict[str, Any], workers: int, restarts: int, at_once: int) -> list[float]:
    gateway = state["gateway_url"]
    async with aiohttp.ClientSession() as session:
        control = ClusterControl(session, state["control_url"], state["control_token"])
        names = [s["name"] for s in await control.services() if s["kind"] == "worker"]
        victims = names[:at_once]

        async def each(action: str) -> None:
            await asyncio.gather(*(control.act(name, action) for name in victims))

        boots = []
        for i in range(restarts):
            await each("kill")
            await _until(session, gateway, workers - len(victims), 30.0)  # evicted: stale
            await asyncio.sleep(1.0)
            started = time.monotonic()
            await each("start")
            await _until(session, gateway, workers, 60.0)
            boots.append(time.monotonic() - started)
            print(f"  restart {i + 1}: announced {boots[-1] * 1000:.0f} ms after the start")
    return boots


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="scenarios/parity_ci.yaml")
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument(
        "--at-once", type=int, default=1, help="workers restarted together (a region outage: 2)"
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    workers = len(scenario_workers(scenario))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        config = out / "cluster.yaml"
        config.write_text(yaml.safe_dump(cluster_config(scenario), sort_keys=False))
        proc = _start_cluster(config, out / "d", out / "haif-up.log")
        try:
            state = read_state(out / "d")
            wait_all_fresh(state["gateway_url"], workers, proc)
            boots = asyncio.run(_measure(state, workers, args.restarts, args.at_once))
        finally:
            _stop_cluster(proc)
    result = {
        "scenario": scenario.name,
        "restarts": len(boots),
        "at_once": args.at_once,
        "boot_ms": [b * 1000 for b in boots],
        "median_ms": float(np.median(boots) * 1000),
    }
    print(
        f"worker boot (start -> fresh at the orchestrator): median {result['median_ms']:.0f} ms, "
        f"min {min(boots) * 1000:.0f} ms, max {max(boots) * 1000:.0f} ms "
        f"({len(boots)} restarts of {args.at_once} at once); "
        f"heartbeat.boot_s = {result['median_ms'] / 1000:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
