"""What authenticating RPC costs: one hop, plain, sealed, mutual TLS, both.

Serves a bare ``echo`` RPC on loopback four times: plain; checking seals
(:class:`~haif.runtime.rpc.EnvelopeAuth`); over mutual TLS 1.3 checking the
caller's certificate (:class:`~haif.runtime.rpc.PeerAuth`, connections kept
open as the services keep them); and both. Calls each sequentially with a
request-sized body (an ``InferCall`` with a 1 kB prompt); reports the
per-call latency percentiles, the CPU time per call (client and server
together: they share this process), and the CPU time of sealing and opening
one envelope alone.

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
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
from aiohttp import web

from haif.contracts import Request
from haif.runtime.cluster_tls import ServiceTls, ensure_cluster_certs
from haif.runtime.messages import InferCall
from haif.runtime.roles import Role
from haif.runtime.rpc import EnvelopeAuth, PeerAuth, RpcClient, add_rpc_routes
from haif.runtime.security import Keyring, Signer, generate_keypair


async def _echo(body: object) -> object:
    return body


async def _serve(
    auth: EnvelopeAuth | None, tls: ServiceTls | None = None
) -> tuple[web.AppRunner, str]:
    app = web.Application()
    peer_auth = PeerAuth({"echo": frozenset({Role.GATEWAY})}) if tls is not None else None
    add_rpc_routes(app, {"echo": _echo}, auth=auth, peer_auth=peer_auth)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=tls.server if tls else None).start()
    host, port = sock.getsockname()[:2]
    return runner, f"{'https' if tls else 'http'}://{host}:{port}"


async def _latencies(
    client: RpcClient, body: object, calls: int
) -> tuple[np.ndarray[Any, Any], float]:
    """Each call's latency (s), and the CPU seconds per call (this process: both ends)."""
    for _ in range(50):  # warm up connections and code paths
        await client.call("echo", body)
    out = np.empty(calls)
    cpu = time.process_time()
    for i in range(calls):
        start = time.perf_counter()
        await client.call("echo", body)
        out[i] = time.perf_counter() - start
    return out, (time.process_time() - cpu) / calls


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
    with tempfile.TemporaryDirectory() as tmp:
        files = ensure_cluster_certs(Path(tmp), ["srv", "gateway"])
        server_tls = ServiceTls(files["srv"].cert, files["srv"].key, files["srv"].ca)
        client_tls = ServiceTls(files["gateway"].cert, files["gateway"].key, files["gateway"].ca)
    runners = {
        "plain": await _serve(None),
        "sealed": await _serve(EnvelopeAuth(Keyring([public]), "srv")),
        "mtls": await _serve(None, server_tls),
        "mtls+sealed": await _serve(EnvelopeAuth(Keyring([public]), "srv"), server_tls),
    }
    results: dict[str, tuple[np.ndarray[Any, Any], float]] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for name, (_, url) in runners.items():
                client = RpcClient(
                    http,
                    url,
                    10.0,
                    signer=signer if "sealed" in name else None,
                    audience="srv",
                    tls=client_tls if name.startswith("mtls") else None,
                )
                results[name] = await _latencies(client, body, calls)
            sealed_client = RpcClient(
                http, runners["sealed"][1], 10.0, signer=signer, audience="srv"
            )
            fresh = EnvelopeAuth(Keyring([public]), "srv")
            seal_s, open_s = _crypto_cost(sealed_client, fresh, body, 2000)
    finally:
        for runner, _ in runners.values():
            await runner.cleanup()
    ms = {
        name: {f"p{q}": float(np.percentile(values, q) * 1e3) for q in (50, 99)}
        for name, (values, _) in results.items()
    }
    return {
        "calls": calls,
        "python": platform.python_version(),
        "latency_ms": ms,
        "cpu_us_per_call": {name: cpu * 1e6 for name, (_, cpu) in results.items()},
        "added_p50_ms": {name: ms[name]["p50"] - ms["plain"]["p50"] for name in ms},
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
        print(
            f"{name:>11}: p50 {p['p50']:.3f} ms  p99 {p['p99']:.3f} ms  "
            f"CPU {figures['cpu_us_per_call'][name]:.0f} us/call (both ends)  "
            f"added p50 {figures['added_p50_ms'][name]:+.3f} ms"
        )
    print(f"seal one envelope: {figures['seal_us']:.0f} us; open one: {figures['open_us']:.0f} us")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
