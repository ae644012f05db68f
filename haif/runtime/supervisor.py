"""The processes of a local cluster, and a control endpoint to fault them.

``haif up`` starts every service as its own process (``python -m haif
<service> ...``) and keeps the command line of each, so a service can be
killed (SIGKILL, as a crash), frozen (SIGSTOP, a hung or gray process),
thawed (SIGCONT) and started again exactly as it was. ``haif replay
--faults`` executes a scenario's fault schedule through the control
endpoint: plain HTTP on 127.0.0.1, guarded by a random bearer token that
``haif up`` writes with the service table to ``<data-dir>/cluster.json``
(mode 0600)::

    GET  /services                    -> {"services": [{name, kind, region, url, pid, state}]}
    POST /services/<name>/<action>    action: kill | stop | cont | start

A worker that dies outside the control endpoint is reported and left down
(the orchestrator evicts it, as in production); the cluster stops only when
the gateway or the orchestrator dies unexpectedly.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from haif.configfile import ConfigError

ServiceKind = Literal["gateway", "orchestrator", "worker"]
ACTIONS = ("kill", "stop", "cont", "start")
STATE_FILE = "cluster.json"
SPAWNED_AT_ENV = "HAIF_SPAWNED_AT"


@dataclass
class Service:
    """One service process and how to start it again."""

    name: str
    kind: ServiceKind
    region: str
    url: str
    args: list[str]
    # Appended when the service is started again (e.g. a worker's --cold-start).
    restart_args: list[str] = field(default_factory=list)
    # Seconds to wait for it to answer /healthz after a start (a model load included).
    start_timeout_s: float = 30.0
    proc: subprocess.Popen[bytes] | None = None
    state: Literal["running", "stopped", "down"] = "down"
    # Set when the control endpoint took it down: its exit is not a failure.
    expected_down: bool = field(default=False)

    def row(self) -> dict[str, Any]:
        pid = self.proc.pid if self.proc is not None and self.proc.poll() is None else None
        return {
            "name": self.name,
            "kind": self.kind,
            "region": self.region,
            "url": self.url,
            "pid": pid,
            "state": self.state,
        }


def log_name(name: str) -> str:
    """A file name for a service name (worker ids may contain ``/``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# Our own child on loopback, asked for liveness only: its certificate is the clients' to trust.
_LIVENESS_TLS = ssl.create_default_context()
_LIVENESS_TLS.check_hostname = False
_LIVENESS_TLS.verify_mode = ssl.CERT_NONE


def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout_s: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Wait until ``url`` answers ``/healthz`` (``tls``: the context for https, which
    presents a client certificate where internal ports demand one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"{url}: service exited with code {proc.returncode}")
        try:
            context = (tls or _LIVENESS_TLS) if url.startswith("https:") else None
            with urllib.request.urlopen(f"{url}/healthz", timeout=1.0, context=context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            # HTTPException: e.g. BadStatusLine "GET /healthz", our own request read
            # back when, nothing listening yet, the connect met itself (the port is
            # in the ephemeral range), which long waits (a model load) do meet.
            pass
        time.sleep(0.05)
    raise ConfigError(f"{url}: not healthy after {timeout_s:.0f} s")


class Supervisor:
    """Starts, faults and stops the services of one cluster (thread-safe)."""

    def __init__(self, logs: Path, liveness_tls: ssl.SSLContext | None = None) -> None:
        self.logs = logs
        self.liveness_tls = liveness_tls
        self.services: dict[str, Service] = {}
        self._lock = threading.RLock()

    def add(self, service: Service) -> None:
        """Register and start ``service``; wait until it answers ``/healthz``."""
        with self._lock:
            if service.name in self.services:
                raise ConfigError(f"two services are named {service.name!r}")
            self.services[service.name] = service
        self.start(service.name)

    def _get(self, name: str) -> Service:
        service = self.services.get(name)
        if service is None:
            raise KeyError(f"no service {name!r}; services are {sorted(self.services)}")
        return service

    def start(self, name: str) -> None:
        with self._lock:
            service = self._get(name)
            if service.proc is not None and service.proc.poll() is None:
                if service.state == "stopped":
                    self.cont(name)
                return
            args = service.args if service.proc is None else service.args + service.restart_args
            out = (self.logs / f"{log_name(name)}.log").open("ab")
            # Own process group: a Ctrl-C in the terminal reaches only `haif up`,
            # which then stops the services in order.
            service.proc = subprocess.Popen(
                [sys.executable, "-m", "haif", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                # When the (re)start was asked for: a restarted worker's weight
                # load counts from here, its process start-up included.
                env={**os.environ, SPAWNED_AT_ENV: repr(time.time())},
            )
            out.close()
            service.state = "running"
            service.expected_down = False
            proc = service.proc
        wait_healthy(service.url, proc, service.start_timeout_s, tls=self.liveness_tls)

    def kill(self, name: str) -> None:
        with self._lock:
            service = self._get(name)
            service.expected_down = True
            if service.proc is not None and service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait()
            service.state = "down"

    def stop(self, name: str) -> None:
        self._signal(name, signal.SIGSTOP, "stopped")

    def cont(self, name: str) -> None:
        self._signal(name, signal.SIGCONT, "running")

    def _signal(self, name: str, sig: int, state: Literal["running", "stopped"]) -> None:
        with self._lock:
            service = self._get(name)
            if service.proc is None or service.proc.poll() is not None:
                raise ValueError(f"{name} is not running")
            service.proc.send_signal(sig)
            service.state = state

    def act(self, name: str, action: str) -> dict[str, Any]:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; actions are {', '.join(ACTIONS)}")
        getattr(self, action)(name)
        return self._get(name).row()

    def unexpected_exits(self) -> list[Service]:
        """Services that died on their own since the last call (now marked down)."""
        died = []
        with self._lock:
            for service in self.services.values():
                proc = service.proc
                if service.state != "down" and proc is not None and proc.poll() is not None:
                    service.state = "down"
                    if not service.expected_down:
                        died.append(service)
        return died

    def table(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.row() for s in self.services.values()]

    def shutdown(self, order: Sequence[ServiceKind], timeout_s: float) -> None:
        """SIGTERM the services kind by kind (``order``), each waited for up to ``timeout_s``."""
        for kind in order:
            for service in reversed(list(self.services.values())):
                proc = service.proc
                if service.kind != kind or proc is None or proc.poll() is not None:
                    continue
                if service.state == "stopped":
                    proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                service.state = "down"


class ControlServer:
    """The control endpoint of :class:`Supervisor` (a thread serving 127.0.0.1).

    It binds ``port`` (0: a free one) when made (``OSError`` if it cannot) and
    serves from ``with`` (or :meth:`start`) until :meth:`close`.
    """

    def __init__(self, supervisor: Supervisor, token: str | None = None, port: int = 0) -> None:
        self.supervisor = supervisor
        self.token = token or secrets.token_urlsafe(24)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                given = self.headers.get("Authorization", "")
                if secrets.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                    return True
                self._reply(401, {"error": "missing or wrong control token"})
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if self.path.rstrip("/") != "/services":
                    self._reply(404, {"error": f"no route {self.path}"})
                    return
                self._reply(200, {"services": server.supervisor.table()})

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                parts = self.path.strip("/").split("/")
                if len(parts) < 3 or parts[0] != "services":
                    self._reply(404, {"error": f"no route {self.path}"})
                    return
                name, action = "/".join(parts[1:-1]), parts[-1]
                try:
                    row = server.supervisor.act(name, action)
                except KeyError as exc:
                    self._reply(404, {"error": str(exc.args[0])})
                except (ValueError, ConfigError) as exc:
                    self._reply(409, {"error": str(exc)})
                else:
                    self._reply(200, row)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._closed = False

    def start(self) -> None:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port (again: nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_state(path: Path, *, gateway_url: str, control: ControlServer, **more: str) -> None:
    """``cluster.json``: where the gateway and the control endpoint are, and its token;
    ``more``: what else tools need to find (``haif up`` adds ``orchestrator_url``,
    ``store``, ``data_dir``, ``keys`` and ``prometheus_targets``)."""
    state = {
        "gateway_url": gateway_url,
        "control_url": control.url,
        "control_token": control.token,
        "pid": os.getpid(),
        "services": control.supervisor.table(),
        **more,
    }
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(json.dumps(state, indent=2) + "\n")


def read_state(data_dir: str | Path) -> dict[str, Any]:
    """The ``cluster.json`` of a running ``haif up --data-dir DATA_DIR``."""
    path = Path(data_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no cluster state; is `haif up --data-dir {data_dir}` running?"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the cluster state: {exc}") from None
    if not isinstance(state, dict) or "control_url" not in state:
        raise ConfigError(f"{path}: not a haif cluster state file")
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def running_state(data_dir: str | Path) -> dict[str, Any] | None:
    """The ``cluster.json`` of a ``haif up --data-dir DATA_DIR`` still running, or None
    (no file, an unreadable one, or one left behind by a ``haif up`` that died)."""
    if not (Path(data_dir) / STATE_FILE).exists():
        return None
    try:
        state = read_state(data_dir)
    except ConfigError:
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return state
