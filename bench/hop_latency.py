"""The latency the runtime's service hops add to a request, as the simulator's ``network.hop_ms``.

Starts ``haif up`` with synthetic workers of fixed timing (first token after
``--ttft-ms``, the whole response after ``--mean-ms``), sends streaming
completions one at a time (an idle cluster: no queueing anywhere) and
measures at the client how much later than the engine's own timing the
first token and the end arrive. The simulator models that path as four
one-way hops (client -> gateway -> orchestrator -> worker, worker ->
orchestrator -> client; the gateway and orchestrator of a region are one
node there) plus the store write a request waits for (``store.write_latency_ms``;
none since a request without an Idempotency-Key runs before its job row is
written, hence the default 0), so::

    hop_ms = (added TTFT - store write) / 4

is the figure a scenario that should predict this runtime on this machine
gives as ``network.hop_ms``. ``--out PATH`` writes the distribution instead:
each request's ``(added TTFT - store write) / 4`` as one measured hop, with the
run that measured them (command, date, machine, load) as the file's
``source``, for a scenario's ``network.hops: PATH`` (:mod:`haif.fleet.hops`;
``scenarios/parity*.yaml`` use ``scenarios/hops/local.yaml``). A script, not a
test: it prints figures (``--json PATH`` writes them).

    .venv/bin/python bench/hop_latency.py [--requests 200] [--store-write-ms 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from haif.analysis.parity import wait_all_fresh
from haif.fleet.hops import hops_document, load_hops
from haif.runtime.cluster import free_port
from haif.runtime.replay import prompt_text


async def _measure(gateway: str, n: int, prompt: int, tokens: int) -> np.ndarray:
    out = []
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            body = {
                "model": "llama-3-8b",
                "prompt": prompt_text(prompt),
                "max_tokens": tokens,
                "stream": True,
                "ignore_eos": True,  # exactly `tokens` tokens, as the trace replay
            }
            start = time.perf_counter()
            first = None
            # With an x-request-id, as `haif replay` sends them: the orchestrator then
            # reserves the job before it dispatches (a gateway-minted id skips that).
            headers = {"x-request-id": f"hop-{os.getpid()}-{i}"}
            async with session.post(
                f"{gateway}/v1/completions", json=body, headers=headers
            ) as resp:
                async for line in resp.content:
                    if first is None and line.startswith(b"data:") and b'"text"' in line:
                        first = time.perf_counter()
            end = time.perf_counter()
            assert first is not None, "no token streamed"
            out.append((first - start, end - start))
            await asyncio.sleep(0.02)  # idle between requests
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--mean-ms", type=float, default=100.0)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--output-tokens", type=int, default=50)
    parser.add_argument("--store-write-ms", type=float, default=0.0)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--out", metavar="YAML", help="write the measured hops here, for a scenario's network.hops"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "cluster.yaml"
        config.write_text(
            # Plain loopback HTTP, as haif parity runs the cluster these hops are for.
            "internal_tls: false\n"
            "workers:\n"
            + "".join(
                f"  - {{id: w{i}, region: local, mean_s: {args.mean_ms / 1000}, "
                f"ttft_s: {args.ttft_ms / 1000}}}\n"
                for i in (1, 2)
            )
        )
        port = free_port()
        gateway = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "haif", "up", str(config), "--port", str(port)]
        proc = subprocess.Popen(
            [*cmd, "--data-dir", str(Path(tmp) / "d")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_all_fresh(gateway, 2, proc)
            asyncio.run(_measure(gateway, 10, args.prompt_tokens, args.output_tokens))  # warm up
            got = asyncio.run(
                _measure(gateway, args.requests, args.prompt_tokens, args.output_tokens)
            )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    ttft = (got[:, 0] - args.ttft_ms / 1000) * 1000
    e2e = (got[:, 1] - args.mean_ms / 1000) * 1000
    figures: dict[str, Any] = {
        "requests": args.requests,
        "added_ttft_ms": {q: float(np.percentile(ttft, q)) for q in (50, 90, 99)},
        "added_e2e_ms": {q: float(np.percentile(e2e, q)) for q in (50, 90, 99)},
        "hop_ms": max(0.0, (float(np.median(ttft)) - args.store_write_ms) / 4),
        "load_average": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(f"added to the engine's timing by gateway + orchestrator + worker ({args.requests} idle")
    print("requests, streaming):")
    for name in ("added_ttft_ms", "added_e2e_ms"):
        q = figures[name]
        print(f"  {name:14s} p50 {q[50]:6.2f}  p90 {q[90]:6.2f}  p99 {q[99]:6.2f}")
    print(f"network.hop_ms for the simulator: {figures['hop_ms']:.2f}")
    print(f"load average {figures['load_average'][0]:.2f}; {figures['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if args.out:
        hops = np.maximum(0.0, (ttft - args.store_write_ms) / 4)
        write_hops(Path(args.out), [float(h) for h in hops], figures, sys.argv[1:], dt.date.today())
        print(f"measured hops: {args.out}")


def write_hops(
    path: Path, hops_ms: list[float], figures: dict[str, Any], argv: list[str], today: dt.date
) -> None:
    """The hops file, naming the run that measured it (a scenario checked on other runs)."""
    load = figures["load_average"][0]
    command = " ".join(["bench/hop_latency.py", *argv])
    source = (
        f"{command} on {today.isoformat()}: {figures['requests']} idle streaming requests, "
        f"{figures['machine']}, load average {load:.2f}"
    )
    q = figures["added_ttft_ms"]
    comment = [
        "Measured one-way cost of one service hop (ms), for a scenario's network.hops:",
        "each sample is a quarter of one request's added time to first token (the four",
        "hops the simulator models), measured on an idle `haif up` cluster of synthetic",
        f"workers. Added TTFT p50 {q[50]:.2f}, p90 {q[90]:.2f}, p99 {q[99]:.2f} ms.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hops_document(hops_ms, source, comment), encoding="utf-8")
    load_hops(path)  # what was written reads back


if __name__ == "__main__":
    main()
