"""The live orchestrator's CPU per request as the registered fleet grows (48 vs 1,000 workers).

Starts ``haif orchestrator`` (embedded DuckDB store and a usage journal, as
``haif up`` runs it; no cluster keys: loopback)
and one real synthetic worker with a service time of ~0, then announces
``size - 1`` more workers from this process: same model, same region, their
URL the real worker's (which serves any request it is sent), heartbeating
every ``--heartbeat-s``. So placement chooses among ``size`` eligible
workers and every request is served for real.

For each fleet size it measures the orchestrator's CPU (user + system,
psutil) twice: over ``--seconds`` of heartbeats alone (what the fleet
costs to watch), then over ``--seconds`` of ``submit`` RPCs sent open-loop at
``--rate`` (the requests plus the same heartbeats). CPU per request is the
difference divided by the requests: the cost of deciding, dispatching and
settling one request, apart from the fleet's heartbeats.

    .venv/bin/python bench/orchestrator_fleet.py [--sizes 48,1000] [--rate 200] [--seconds 10]

A script, not a test: it prints figures (``--json PATH`` writes them). The
load generator and the heartbeats run in this process, on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from haif.contracts import Request, WorkerSnapshot
from haif.runtime.cluster import free_port
from haif.runtime.messages import Announce, SubmitReply
from haif.runtime.rpc import RpcClient

MODEL = "llama-3-8b"


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "haif", *args], stdout=out, stderr=subprocess.STDOUT
        )


async def _wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f} s")


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _heartbeats(
    client: RpcClient, ids: list[str], worker_url: str, period_s: float, stop: asyncio.Event
) -> None:
    """Announce ``ids`` every ``period_s``, spread evenly over the period (each call on
    its own, so a slow answer delays no other worker's heartbeat)."""
    loop = asyncio.get_running_loop()
    gap = period_s / max(1, len(ids))
    calls: set[asyncio.Task[Any]] = set()

    async def beat(wid: str) -> None:
        snapshot = WorkerSnapshot(
            wid, "local", "A100-80G", models_warm=(MODEL,), capacity=64, healthy=True
        )
        with contextlib.suppress(Exception):
            await client.call("heartbeat", Announce(snapshot, worker_url))

    start, n = loop.time(), 0
    while not stop.is_set():
        task = asyncio.create_task(beat(ids[n % len(ids)]))
        calls.add(task)
        task.add_done_callback(calls.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n * gap - loop.time()))
    await asyncio.gather(*calls)


async def _load(
    client: RpcClient, rate: float, seconds: float, tag: str
) -> tuple[int, list[float]]:
    """``submit`` at ``rate`` for ``seconds``; (errors, latencies in s)."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    latencies: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        sent = loop.time()
        request = Request(f"{tag}-{i}", "bench", MODEL, 8, 4, 0.0, prompt="bench")
        try:
            reply = await client.call("submit", request)
        except Exception:
            errors += 1
            return
        if isinstance(reply, SubmitReply) and reply.record.status == "ok":
            latencies.append(loop.time() - sent)
        else:
            errors += 1

    await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
    return errors, latencies


async def _measure(size: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    orch_port, worker_port = free_port(), free_port()
    orch_url = f"http://127.0.0.1:{orch_port}"
    worker_url = f"http://127.0.0.1:{worker_port}"
    # The workers' heartbeat period, so the orchestrator expects it from the first one.
    config = root / f"cluster-{size}.yaml"
    config.write_text(f"workers: [{{id: w0, region: local, heartbeat_s: {args.heartbeat_s}}}]\n")
    orch = _spawn(
        [
            *("orchestrator", "--port", str(orch_port), "--config", str(config)),
            *("--store", str(root / f"s{size}.duckdb"), "--journal", str(root / f"j{size}")),
        ],
        root / f"orchestrator-{size}.log",
    )
    worker = _spawn(
        [
            *("worker", "--port", str(worker_port), "--id", "w0", "--region", "local"),
            *("--orchestrator", orch_url, "--capacity", "4096", "--models", MODEL),
            *("--mean-s", "0.000001", "--ttft-s", "0", "--heartbeat-s", str(args.heartbeat_s)),
        ],
        root / f"worker-{size}.log",
    )
    stop = asyncio.Event()
    try:
        await _wait_ready(orch_url)
        process = psutil.Process(orch.pid)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as http:
            client = RpcClient(http, orch_url, 60.0)
            ids = [f"idle-{i}" for i in range(size - 1)]
            beats = asyncio.create_task(
                _heartbeats(client, ids, worker_url, args.heartbeat_s, stop)
            )
            await asyncio.sleep(2 * args.heartbeat_s + 1)  # every worker known, intervals too
            status = await client.call("status", None)
            fresh = len(getattr(status, "fresh_workers", ()))
            await _load(client, args.rate, 2.0, f"warm{size}")  # warm up paths and caches
            cpu0, t0 = _cpu_s(process), time.monotonic()
            await asyncio.sleep(args.seconds)
            idle_cpu_per_s = (_cpu_s(process) - cpu0) / (time.monotonic() - t0)
            cpu1, t1 = _cpu_s(process), time.monotonic()
            errors, latencies = await _load(client, args.rate, args.seconds, f"r{size}")
            cpu, wall = _cpu_s(process) - cpu1, time.monotonic() - t1
            stop.set()
            await beats
        served = len(latencies)
        per_request_ms = 1000 * (cpu - idle_cpu_per_s * wall) / max(1, served)
        lat = np.asarray(latencies) * 1000
        return {
            "workers": size,
            "fresh_workers": fresh,
            "requests": served,
            "errors": errors,
            "heartbeats_per_s": size / args.heartbeat_s,
            "idle_cpu_percent": 100 * idle_cpu_per_s,
            "cpu_ms_per_request": per_request_ms,
            "p50_ms": float(np.percentile(lat, 50)) if served else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if served else float("nan"),
        }
    finally:
        stop.set()
        for proc in (worker, orch):
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="48,1000", help="registered workers, comma-separated")
    parser.add_argument("--rate", type=float, default=200.0, help="submits per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="each measuring window")
    parser.add_argument(
        "--heartbeat-s", type=float, default=2.0, help="each worker's heartbeat period"
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 1:
        parser.error("--sizes: positive integers, e.g. 48,1000")
    rows = []
    with tempfile.TemporaryDirectory(prefix="haif-orch-fleet-") as tmp:
        for size in sizes:
            print(f"measuring {size} workers ...", flush=True)
            rows.append(asyncio.run(_measure(size, args, Path(tmp))))
    print(
        f"\norchestrator CPU per request, {args.rate:.0f} req/s, heartbeats every "
        f"{args.heartbeat_s:g} s ({platform.machine()}, {psutil.cpu_count()} cores):"
    )
    print("| workers | fresh | served | errors | heartbeats/s | idle CPU % ", end="")
    print("| CPU ms/request | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']:,} | {r['fresh_workers']:,} | {r['requests']:,} | {r['errors']} | "
            f"{r['heartbeats_per_s']:.0f} | {r['idle_cpu_percent']:.1f} | "
            f"{r['cpu_ms_per_request']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    result = {"rate": args.rate, "heartbeat_s": args.heartbeat_s, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
