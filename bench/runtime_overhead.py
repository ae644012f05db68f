"""What the runtime adds: gateway -> orchestrator -> worker vs calling the worker directly.

Starts ``haif up`` with one synthetic worker whose service time is ~0, then
drives an open-loop load (requests sent on a fixed schedule, not waiting for
answers) at a fixed rate, first straight at the worker's msgpack ``infer``
RPC, then through the gateway's ``/v1/completions`` (JSON), and reports the
latency percentiles of both and their difference — the overhead of the
gateway, the orchestrator's control core and two extra hops. Then it raises
the rate step by step to find the highest rate the cluster sustains (every
request answered, p99 under ``--max-p99-ms``).

    .venv/bin/python bench/runtime_overhead.py [--rate 200] [--seconds 10]

A script, not a test: it prints figures (and ``--json PATH`` writes them).
The load generator runs in this process, on the same 2-core machine as the
cluster, so the figures include its own cost. Latency on a shared machine
moves with whatever else runs; the CPU time each service spends per request
through the gateway (also printed) moves much less, so compare changes by it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from haif.contracts import Request
from haif.runtime.cluster import free_port
from haif.runtime.cluster_tls import ServiceTls
from haif.runtime.gc_pauses import freeze_heap
from haif.runtime.messages import InferCall
from haif.runtime.rpc import RpcClient
from haif.runtime.security import Signer

MODEL = "llama-3-8b"
#: Why requests failed, with how many (printed when any did).
ERROR_KINDS: collections.Counter[str] = collections.Counter()
WORKER_ID = "w1"


def _cluster_yaml(
    worker_port: int,
    gateway_port: int,
    store: str | None,
    colocate: bool = False,
    fsync: bool = True,
    linger_ms: float | None = None,
    internal_tls: bool = True,
) -> str:
    orchestrator = {
        **({} if fsync else {"journal_fsync": "false"}),
        **({} if linger_ms is None else {"store_linger_ms": f"{linger_ms:g}"}),
    }
    return (
        (f"store: {store}\n" if store else "")
        + ("colocate_gateway: true\n" if colocate else "")
        + f"internal_tls: {str(internal_tls).lower()}\n"
        + (
            "orchestrator: {" + ", ".join(f"{k}: {v}" for k, v in orchestrator.items()) + "}\n"
            if orchestrator
            else ""
        )
        + f"gateway_port: {gateway_port}\n"
        "workers:\n"
        f"  - {{id: {WORKER_ID}, region: local, capacity: 64, mean_s: 0.000001, ttft_s: 0.0,"
        f" port: {worker_port}}}\n"
    )


async def _open_loop(rate: float, seconds: float, send: Any) -> tuple[list[float], int]:
    """Send at ``rate`` per second for ``seconds``; return latencies (s) and errors."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0

    async def one(at: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, at - loop.time()))
        t0 = loop.time()
        try:
            await send()
        except Exception as exc:
            errors += 1
            ERROR_KINDS[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            return
        latencies.append(loop.time() - t0)

    await asyncio.gather(*(one(start + i / rate) for i in range(n)))
    return latencies, errors


def _pcts(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1000.0
    if arr.size == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


def _orchestrator_signer(data_dir: Path) -> Signer | None:
    """The orchestrator's cluster key, when ``haif up`` made one (``internal_tls: false``):
    workers then refuse unsealed calls."""
    key = data_dir / "keys" / "orchestrator.key"
    return Signer.from_file(key) if key.exists() else None


def _orchestrator_tls(data_dir: Path) -> ServiceTls | None:
    """The orchestrator's certificate, when ``haif up`` made one (mutual TLS, the default):
    workers then accept only the orchestrator's certificate."""
    tls = data_dir / "tls"
    if not (tls / "orchestrator.pem").exists():
        return None
    return ServiceTls(tls / "orchestrator.pem", tls / "orchestrator.key", tls / "ca.pem")


def _services(up: subprocess.Popen[str]) -> dict[str, psutil.Process]:
    """The cluster's service processes by role (gateway, orchestrator, worker)."""
    found = {}
    for child in psutil.Process(up.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            args = child.cmdline()
            role = next((a for a in args if a in ("gateway", "orchestrator", "worker")), None)
            if role is not None:
                found[role] = child
    return found


def _cpu_s(processes: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for role, process in processes.items():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            out[role] = times.user + times.system
    return out


async def _measure(
    args: argparse.Namespace,
    gateway: str,
    worker: str,
    signer: Signer | None,
    services: dict[str, psutil.Process],
    tls: ServiceTls | None = None,
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Sealed / over mTLS like the orchestrator's own calls: the direct path pays that too.
        rpc = RpcClient(session, worker, timeout_s=30.0, signer=signer, audience=WORKER_ID, tls=tls)
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 1, "ignore_eos": True}

        async def direct() -> None:
            req = Request(f"b-{uuid.uuid4().hex}", "bench", MODEL, 1, 1, 0.0)
            await rpc.call("infer", InferCall(req, 0, 1))

        async def via_gateway() -> None:
            async with session.post(f"{gateway}/v1/completions", json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")

        # Warm up both paths (connections, first heartbeats).
        await _open_loop(50, 1.0, direct)
        await _open_loop(50, 1.0, via_gateway)
        d_lat, d_err = await _open_loop(args.rate, args.seconds, direct)
        cpu_before = _cpu_s(services)
        g_lat, g_err = await _open_loop(args.rate, args.seconds, via_gateway)
        cpu_after = _cpu_s(services)
        d, g = _pcts(d_lat), _pcts(g_lat)
        result: dict[str, Any] = {
            "rate": args.rate,
            "seconds": args.seconds,
            "direct": {**d, "errors": d_err, "n": len(d_lat)},
            "gateway": {**g, "errors": g_err, "n": len(g_lat)},
            "added_p50_ms": g["p50_ms"] - d["p50_ms"],
            "added_p99_ms": g["p99_ms"] - d["p99_ms"],
            "cpu_ms_per_request": {
                role: (cpu_after[role] - cpu_before[role]) * 1000 / max(1, len(g_lat))
                for role in sorted(cpu_before.keys() & cpu_after.keys())
            },
        }
        sustained = 0.0
        steps = []
        rate = args.ramp_start
        while rate <= args.ramp_max:
            lat, err = await _open_loop(rate, args.ramp_seconds, via_gateway)
            p = _pcts(lat)
            ok = err == 0 and p["p99_ms"] <= args.max_p99_ms
            steps.append({"rate": rate, **p, "errors": err, "ok": ok})
            print(
                f"  ramp {rate:6.0f} req/s: p50 {p['p50_ms']:7.2f} ms, "
                f"p99 {p['p99_ms']:8.2f} ms, errors {err} {'ok' if ok else 'NOT sustained'}",
                flush=True,
            )
            if not ok:
                break
            sustained = rate
            rate *= args.ramp_factor
        result["ramp"] = steps
        result["max_sustained_rate"] = sustained
        return result


def _load(averages: Any) -> str:
    return " ".join(f"{x:.2f}" for x in averages)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="offered load (req/s)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ramp-start", type=float, default=100.0)
    parser.add_argument("--ramp-factor", type=float, default=1.5)
    parser.add_argument("--ramp-max", type=float, default=3000.0)
    parser.add_argument("--ramp-seconds", type=float, default=5.0)
    parser.add_argument("--max-p99-ms", type=float, default=100.0)
    parser.add_argument(
        "--store",
        help="metadata store URL (default: the embedded DuckDB file of haif up); a "
        "postgresql://... database must exist already and is used as it is",
    )
    parser.add_argument(
        "--colocate",
        action="store_true",
        help="run the gateway in the orchestrator's process (colocate_gateway: true)",
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="the usage journal written but not fsynced (orchestrator.journal_fsync: false)",
    )
    parser.add_argument(
        "--store-linger-ms",
        type=float,
        help="orchestrator.store_linger_ms (default: the store's own)",
    )
    parser.add_argument(
        "--internal-tls",
        choices=("on", "off"),
        default="off",
        help="on (haif up's default): internal_tls: true, mutual TLS between the "
        "services; off (the default here, as the figures in docs/benchmarks.md were "
        "taken): plain HTTP with sealed envelopes",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    gw_port, w_port = free_port(), free_port()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cluster.yaml"
        cfg.write_text(
            _cluster_yaml(
                w_port,
                gw_port,
                args.store,
                args.colocate,
                not args.no_fsync,
                args.store_linger_ms,
                args.internal_tls == "on",
            )
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "haif", "up", str(cfg), "--data-dir", str(Path(tmp) / "d")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "haif cluster up" not in line:
                raise SystemExit(f"cluster did not start: {line}{proc.stdout.read()}")
            time.sleep(1.5)  # first heartbeats
            print(f"command: {' '.join([sys.executable, *sys.argv])}")
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}, load average {_load(load_before)}"
            )
            print(
                f"store: {args.store or 'embedded DuckDB (haif up default)'}; "
                f"gateway {'in the orchestrator process' if args.colocate else 'separate'}; "
                f"internal TLS {args.internal_tls}; "
                f"HAIF_OTEL_EXPORTER={os.environ.get('HAIF_OTEL_EXPORTER', '(unset)')}"
            )
            tls = _orchestrator_tls(Path(tmp) / "d")
            scheme = "https" if tls is not None else "http"
            gateway, worker = f"http://127.0.0.1:{gw_port}", f"{scheme}://127.0.0.1:{w_port}"
            signer = _orchestrator_signer(Path(tmp) / "d")
            freeze_heap()  # the load generator too
            result = asyncio.run(_measure(args, gateway, worker, signer, _services(proc), tls))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["store"] = args.store or "duckdb"
    result["colocate_gateway"] = args.colocate
    result["internal_tls"] = args.internal_tls
    result["load_average_before"] = list(load_before)
    result["load_average_after"] = list(os.getloadavg())
    d, g = result["direct"], result["gateway"]
    print(f"offered load {args.rate:.0f} req/s for {args.seconds:.0f} s (open loop):")
    print(
        f"  worker directly:     p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, "
        f"errors {d['errors']}"
    )
    print(
        f"  through the gateway: p50 {g['p50_ms']:.2f} ms, p99 {g['p99_ms']:.2f} ms, "
        f"errors {g['errors']}"
    )
    print(
        f"  added by gateway + orchestrator: p50 {result['added_p50_ms']:.2f} ms, "
        f"p99 {result['added_p99_ms']:.2f} ms"
    )
    cpu = result["cpu_ms_per_request"]
    print(
        "  CPU per request through the gateway: "
        + ", ".join(f"{role} {ms:.2f} ms" for role, ms in cpu.items())
        + f" (total {sum(cpu.values()):.2f} ms)"
    )
    print(
        f"highest sustained rate (p99 <= {args.max_p99_ms:.0f} ms, no errors): "
        f"{result['max_sustained_rate']:.0f} req/s"
    )
    if ERROR_KINDS:
        print("errors: " + "; ".join(f"{n} x {kind}" for kind, n in ERROR_KINDS.most_common(5)))
    print(f"load average after: {_load(result['load_average_after'])} (other work on the machine)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
