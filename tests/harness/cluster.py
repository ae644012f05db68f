"""Live clusters on loopback: ``haif up`` processes, in-process services, workers.

- :class:`Up`: a whole ``haif up`` cluster as a subprocess, stopped like Ctrl-C.
- :class:`LiveCluster`: an orchestrator and a gateway in the test's event
  loop, synthetic workers as ``python -m haif worker`` processes (so "a worker
  dies" is a SIGKILL).
- :func:`in_process_stack`: orchestrator, one worker and gateway, all in the
  test's event loop.
- :func:`serve`, :func:`running`, :func:`spawn_worker`, :func:`wait_fresh`,
  :func:`kill`, :func:`shut_down` and :func:`run_haif`: the pieces the
  tests' own stacks are built from.

Nothing of HAIF is mocked: real HTTP, msgpack RPC and stores.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web

from haif.contracts import RequestRecord
from haif.control.config import CoreConfig
from haif.runtime import gateway as gateway_mod
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime import worker as worker_mod
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.gateway import Gateway, GatewayAuth
from haif.runtime.journal import Journal
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.rpc import LocalClient
from haif.runtime.security import generate_api_key, hash_api_key
from haif.runtime.store import DuckDBStore
from haif.runtime.supervisor import read_state
from haif.runtime.worker import Worker, WorkerSpec
from harness.api import MODEL, post_json

# ------------------------------------------------------------------ building blocks


async def serve(
    app: web.Application,
    *,
    port: int = 0,
    sock: socket.socket | None = None,
    shutdown_timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on loopback (``port``, or the bound ``sock``): its runner and URL
    (``https://`` with ``ssl_context``)."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    if sock is not None:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        host, bound = sock.getsockname()[:2]
    else:
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
        host, bound = runner.addresses[0][:2]
    return runner, f"{'https' if ssl_context else 'http'}://{host}:{bound}"


class Startable(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


@asynccontextmanager
async def running(service: S) -> AsyncIterator[S]:
    """``service`` started, and stopped on the way out (also when starting failed)."""
    try:
        await service.start()
        yield service
    finally:
        await service.stop()


@asynccontextmanager
async def in_process_stack(
    where: Path, make_worker: Callable[[WorkerSpec], Worker]
) -> AsyncIterator[tuple[Orchestrator, str]]:
    """An orchestrator (DuckDB in ``where``), the worker ``make_worker`` builds for
    worker ``w`` serving ``MODEL``, and a gateway, served on loopback in this event
    loop; yields the orchestrator and the gateway's URL once the worker is fresh."""
    orch = Orchestrator(ClusterConfig().policy, DuckDBStore(where / "s.duckdb"))
    runners: list[web.AppRunner] = []
    try:
        runner, orch_url = await serve(orchestrator_mod.build_app(orch), shutdown_timeout=1.0)
        runners.append(runner)
        port = free_port()
        spec = WorkerSpec(
            "w", "local", f"http://127.0.0.1:{port}", orch_url, models=(MODEL,), heartbeat_s=0.1
        )
        runner, _ = await serve(
            worker_mod.build_app(make_worker(spec)), port=port, shutdown_timeout=1.0
        )
        runners.append(runner)
        runner, url = await serve(
            gateway_mod.build_app(Gateway(orch_url, "local")), shutdown_timeout=1.0
        )
        runners.append(runner)
        await wait_fresh(orch, {"w"}, {}, where)
        yield orch, url
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def wait_fresh(
    orch: Orchestrator,
    ids: set[str],
    procs: Mapping[str, subprocess.Popen[bytes]],
    where: Path,
    timeout_s: float = 30.0,
) -> None:
    """Until the orchestrator holds a fresh heartbeat of each of ``ids``; fails early when
    one of the worker ``procs`` exits (its log is in ``where``)."""
    deadline = time.monotonic() + timeout_s
    while not ids <= set(orch.status().fresh_workers):
        for wid, proc in procs.items():
            assert proc.poll() is None, f"worker {wid} exited; see {where}"
        assert time.monotonic() < deadline, f"workers {ids} never announced themselves"
        await asyncio.sleep(0.05)


def spawn_worker(
    tmp: Path,
    wid: str,
    orch_url: str,
    *,
    mean_s: float,
    ttft_s: float = 0.05,
    capacity: int | None = None,
) -> subprocess.Popen[bytes]:
    """A synthetic ``python -m haif worker`` process; its output goes to ``worker-<wid>.log``."""
    log = (tmp / f"worker-{wid}.log").open("ab")
    args = ["--port", str(free_port()), "--id", wid, "--region", "local"]
    args += ["--orchestrator", orch_url, "--mean-s", str(mean_s), "--ttft-s", str(ttft_s)]
    args += ["--heartbeat-s", "0.2"]
    if capacity is not None:
        args += ["--capacity", str(capacity)]
    return subprocess.Popen(
        [sys.executable, "-m", "haif", "worker", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def kill(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc`` unless it has exited, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def shut_down(procs: Iterable[subprocess.Popen[Any]], runners: list[web.AppRunner]) -> None:
    """Kill the processes, then clean up the servers, last started first."""
    for proc in procs:
        kill(proc)
    for runner in reversed(runners):
        with suppress(Exception):
            await runner.cleanup()


def run_haif(
    *args: str, module: str = "haif", timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m haif ARGS`` (or another ``module``) to its end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


# ------------------------------------------------------------------ haif up


def monitor_tls(data: Path) -> ssl.SSLContext | None:
    """A client context for a `haif up --data-dir DATA`'s internal ports when they are
    behind mutual TLS (``internal_tls: true``; else None: plain HTTP): the cluster CA and
    the ``monitor`` certificate, which may read ``/status``, ``/readyz`` and ``/metrics``
    but call no RPC. The URL's host is an address, not the name in the certificate, so
    the name is not checked (the CA is)."""
    tls = data / "tls"
    if not (tls / "monitor.pem").exists():
        return None
    context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(tls / "monitor.pem"), str(tls / "monitor.key"))
    return context


class Up:
    """A `haif up [CONFIG]` subprocess with its data dir; ``stop()`` interrupts it like Ctrl-C."""

    def __init__(self, data: Path, config: Path | None = None) -> None:
        self.data = data
        self.config = config
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "haif", "up", "--port", str(port), "--data-dir", str(data)]
        self.proc = subprocess.Popen(
            [*cmd, *([str(config)] if config else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        self.output = self.proc.stdout.readline()
        assert "haif cluster up" in self.output, self.output + self.proc.stdout.read()
        self.state = read_state(data)

    @property
    def internal_tls(self) -> ssl.SSLContext | None:
        """The context to call its internal ports with (see :func:`monitor_tls`)."""
        return monitor_tls(self.data)

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Until a completion succeeds: the workers' first heartbeats reached the orchestrator."""
        body = json.dumps({"model": MODEL, "prompt": "warm up", "max_tokens": 1}).encode()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, _, _ = post_json(f"{self.url}/v1/completions", body)
            if status == 200:
                break
            time.sleep(0.2)

    def control(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        """Call the cluster's control endpoint (its own token unless ``token``)."""
        token = self.state["control_token"] if token is None else token
        req = urllib.request.Request(
            self.state["control_url"] + path,
            method=method,
            headers={"Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> str:
        """Ctrl-C; everything the cluster printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            out, _ = self.proc.communicate(timeout=60)
            self.output += out
        return self.output


# ------------------------------------------------------------------ in process


class LiveCluster:
    """An in-process orchestrator and gateway with worker subprocesses."""

    def __init__(
        self,
        tmp: Path,
        *,
        workers: tuple[str, ...] = ("w1", "w2"),
        mean_s: float = 0.5,
        ttft_s: float = 0.05,
        capacity: int | None = None,
        policy: CoreConfig | None = None,
        auth: GatewayAuth | None = None,
        store_path: Path | None = None,
    ) -> None:
        self.tmp = tmp
        self.worker_ids = workers
        self.mean_s = mean_s
        self.ttft_s = ttft_s
        self.capacity = capacity
        self.policy = policy or ClusterConfig().policy
        self.auth = auth
        self.store_path = store_path or tmp / "store.duckdb"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.runners: list[web.AppRunner] = []
        self.orch: Orchestrator | None = None
        self.orch_url = ""
        self.url = ""
        self.gateway_runner: web.AppRunner | None = None
        self.gateway: Gateway | None = None  # the last one added

    async def _serve(self, app: web.Application, shutdown_timeout: float = 1.0) -> str:
        runner, url = await serve(app, shutdown_timeout=shutdown_timeout)
        self.runners.append(runner)
        return url

    async def start(self) -> LiveCluster:
        self.orch = Orchestrator(
            self.policy,
            DuckDBStore(self.store_path),
            idle_timeout_s=3.0,
            journal=Journal(self.tmp / "journal"),  # as `haif up` runs it
        )
        self.orch_url = await self._serve(orchestrator_mod.build_app(self.orch))
        for wid in self.worker_ids:
            self.spawn_worker(wid)
        self.url = await self.add_gateway()
        await self.wait_workers(set(self.worker_ids))
        return self

    def spawn_worker(self, wid: str) -> None:
        self.procs[wid] = spawn_worker(
            self.tmp,
            wid,
            self.orch_url,
            mean_s=self.mean_s,
            ttft_s=self.ttft_s,
            capacity=self.capacity,
        )

    async def add_gateway(self, shutdown_timeout: float = 1.0, *, colocated: bool = False) -> str:
        """A gateway calling the orchestrator over RPC, or (``colocated``) in-process."""
        local = None
        if colocated:
            assert self.orch is not None
            local = LocalClient(*orchestrator_mod.rpc_methods(self.orch), timeout_s=30.0)
        gw = Gateway(self.orch_url, "local", auth=self.auth, idle_timeout_s=5.0, local=local)
        self.gateway = gw
        url = await self._serve(gateway_mod.build_app(gw), shutdown_timeout)
        self.gateway_runner = self.runners[-1]
        return url

    async def wait_workers(self, ids: set[str], timeout_s: float = 30.0) -> None:
        assert self.orch is not None
        await wait_fresh(self.orch, ids, self.procs, self.tmp, timeout_s)

    def kill(self, wid: str, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.procs[wid]
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait()

    def serving(self) -> list[str]:
        """Workers with an attempt in flight (the core's view)."""
        assert self.orch is not None
        return [w for w, n in self.orch.status().outstanding.items() if n > 0]

    async def record(self, request_id: str, timeout_s: float = 10.0) -> RequestRecord:
        assert self.orch is not None
        deadline = time.monotonic() + timeout_s
        while True:
            records = {r.request_id: r for r in await self.orch.store.records()}
            if request_id in records:
                return records[request_id]
            assert time.monotonic() < deadline, f"no record for {request_id}"
            await asyncio.sleep(0.05)

    async def add_key(self, tenant: str) -> str:
        assert self.orch is not None
        key = generate_api_key()
        assert await self.orch.store.add_api_key(hash_api_key(key), tenant, "test", time.time())
        return key

    async def stop(self) -> None:
        await shut_down(self.procs.values(), self.runners)
