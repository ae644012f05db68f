"""What sealing RPC envelopes costs: one hop, sealed vs not.

Serves a bare ``echo`` RPC on loopback twice, once checking seals
(:class:`~haif.runtime.rpc.EnvelopeAuth`) and once not, and calls each
sequentially with a request-sized body (an ``InferCall`` with a 1 kB
prompt); reports the per-call latency percentiles of both, their
difference, and the CPU time of sealing and opening one envelope alone.

    .venv/bin/python bench/s2s_auth_overhead.py [--calls 2000]

A script, not a test: it prints figures (``--json PATH`` writes them).
Client and server share one process and one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
from aiohttp import web

from haif.contracts import Request
from haif.runtime.messages import InferCall
from haif.runtime.rpc import EnvelopeAuth, RpcClient, add_rpc_routes
from haif.runtime.security import Keyring, Signer, generate_keypair


async def _echo(body: object) -> object:
    return body


async def _serve(auth: EnvelopeAuth | None) -> tuple[web.AppRunner, str]:
    app = web.Application()
    add_rpc_routes(app, {"echo": _echo}, auth=auth)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    return runner, f"http://{host}:{port}"


async def _latencies(client: RpcClient, body: object, calls: int) -> np.ndarray[Any, Any]:
    for _ in range(50):  # warm up connections and code paths
        await client.call("echo", body)
    out = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter()
        await client.call("echo", body)
        out[i] = time.perf_counter() - start
    return out


def _crypto_cost(
    client: RpcClient, auth: EnvelopeAuth, body: object, n: int
) -> tuple[float, float]:
    """Seconds to seal one envelope, and to open one, without any I/O."""
    start = time.perf_counter()
    envelopes = [client.envelope("echo", body, trace="") for _ in range(n)]
    sealed = (time.perf_counter() - start) / n
    decoded = [msgpack.unpackb(e, raw=False) for e in envelopes]
    start = time.perf_counter()
    for envelope in decoded:
        auth.verify("echo", envelope)
    return sealed, (time.perf_counter() - start) / n


async def run(calls: int) -> dict[str, Any]:
    private, public = generate_keypair()
    signer = Signer(private)
    body = InferCall(Request("bench-1", "t", "llama-3-8b", 256, 64, 0.0, prompt="x" * 1024))
    plain_runner, plain_url = await _serve(None)
    sealed_runner, sealed_url = await _serve(EnvelopeAuth(Keyring([public]), "srv"))
    try:
        async with aiohttp.ClientSession() as http:
            plain = await _latencies(RpcClient(http, plain_url, 10.0), body, calls)
            sealed_client = RpcClient(http, sealed_url, 10.0, signer=signer, audience="srv")
            sealed = await _latencies(sealed_client, body, calls)
            fresh = EnvelopeAuth(Keyring([public]), "srv")
            seal_s, open_s = _crypto_cost(sealed_client, fresh, body, 2000)
    finally:
        await plain_runner.cleanup()
        await sealed_runner.cleanup()
    ms = {
        name: {f"p{q}": float(np.percentile(values, q) * 1e3) for q in (50, 99)}
        for name, values in (("plain", plain), ("sealed", sealed))
    }
    return {
        "calls": calls,
        "python": platform.python_version(),
        "latency_ms": ms,
        "added_p50_ms": ms["sealed"]["p50"] - ms["plain"]["p50"],
        "seal_us": seal_s * 1e6,
        "open_us": open_s * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = asyncio.run(run(args.calls))
    for name, p in figures["latency_ms"].items():
        print(f"{name:>7}: p50 {p['p50']:.3f} ms  p99 {p['p99']:.3f} ms")
    print(f"added p50: {figures['added_p50_ms']:.3f} ms")
    print(f"seal one envelope: {figures['seal_us']:.0f} us; open one: {figures['open_us']:.0f} us")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
