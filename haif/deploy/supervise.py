"""``haif supervise``: keep one service running on a host, after SSH has gone.

Theory of operation
===================

``haif deploy`` writes, for each service of a host, a *spec*
``<dir>/run/<name>.json`` (the Python to run, the ``haif`` command line, its
health URL) and asks ``haif supervise start --dir DIR NAME`` to run it. The
supervisor is one small process per service (:func:`supervise`), started

- as a systemd user unit (``haif-<cluster>-<name>.service``) where
  ``systemctl --user`` works: systemd restarts the supervisor itself, and
  ``loginctl enable-linger`` keeps it running without a login; or
- detached: its own session (``setsid``), stdin from ``/dev/null``, output to
  ``<dir>/logs/<name>.supervise.log``, its pid in ``<dir>/run/<name>.pid``.
  Closing the SSH session sends it nothing.

Either way the same loop runs: it starts the service (output appended to
``<dir>/logs/<name>.log``), waits for its ``/healthz`` and records what it
sees in ``<dir>/run/<name>.state.json`` (``starting``, ``running``,
``restarting``, ``failed``, ``stopping``; the service's pid and a
*generation* counted up at each replacement), which ``status`` and the
waiting commands read.

*Restarts* (a service that exits on its own): again after 1, 2, 4 ... 30 s;
after :data:`MAX_RESTARTS` restarts within :data:`RESTART_WINDOW_S` it is
left down in state ``failed`` until the next ``reload`` or ``start``.

*SIGTERM* (``stop``): the service is stopped gracefully, then the supervisor
exits. A worker is drained first: SIGUSR1 (it leaves placement, see
:meth:`haif.runtime.worker.Worker.drain`), then the supervisor waits until its
``/healthz`` reports nothing in flight (at most ``drain_s``), then SIGTERM;
gateways and orchestrators finish their in-flight requests on SIGTERM
themselves. Anything still running ``drain_s`` + 15 s later is killed.

*SIGHUP* (``reload``, a rolling upgrade): the spec is read again and the
service replaced. A gateway overlaps: the supervisor itself holds the
gateway's listening socket (``bind_host``/``bind_port`` in the spec) and
hands it to each gateway it starts (``--listen-fd``), so connections queue
there while a gateway restarts instead of being refused. On a reload the new
gateway starts beside the old one on that socket; once it answers
``/healthz`` (it reports its pid), the old one gets SIGUSR1 (each of its
responses now closes its connection, so clients reconnect, to either),
:data:`HANDOFF_S` later SIGTERM (it finishes its streams). Any other service
is stopped gracefully first, then started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from haif.configfile import ConfigError
from haif.runtime.supervisor import log_name, wait_healthy

MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
MAX_BACKOFF_S = 30.0
#: How long past ``drain_s`` a stopping service may take before it is killed.
STOP_GRACE_S = 15.0
#: Gateway hand-off: how long the old gateway answers with ``Connection: close`` before
#: its SIGTERM, so that the clients' kept-alive connections move to the new one.
HANDOFF_S = 2.0
RUN_DIR = "run"
LOG_DIR = "logs"


@dataclass(frozen=True)
class Spec:
    """How to run one service (``<dir>/run/<name>.json``, written by ``haif deploy``)."""

    name: str
    kind: str
    #: The virtualenv's Python the service runs under.
    python: str
    #: ``haif`` arguments (``["worker", "--port", ...]``).
    args: list[str]
    #: The service's URL; ``/healthz`` is checked there.
    url: str
    start_timeout_s: float = 60.0
    drain_s: float = 30.0
    #: Appended when the service is started again after a crash.
    restart_args: list[str] = field(default_factory=list)
    #: A client certificate and key for health checks of an internal port (mutual TLS).
    monitor_cert: str | None = None
    monitor_key: str | None = None
    #: The cluster's name (the systemd unit is ``haif-<cluster>-<name>``).
    cluster: str = "haif"
    #: A gateway's address and port: the supervisor listens and hands the socket over.
    bind_host: str | None = None
    bind_port: int | None = None

    @classmethod
    def read(cls, directory: Path, name: str) -> Spec:
        path = spec_path(directory, name)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such service spec") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        return cls(**data)

    def write(self, directory: Path) -> None:
        _write_private(spec_path(directory, self.name), json.dumps(asdict(self), indent=2))

    def health_tls(self) -> ssl.SSLContext | None:
        """The client context of the health checks (none needed for plain HTTP)."""
        if not self.url.startswith("https:"):
            return None
        context = ssl.create_default_context()
        context.check_hostname = False  # our own child, asked whether it answers
        context.verify_mode = ssl.CERT_NONE
        if self.monitor_cert and self.monitor_key:
            context.load_cert_chain(self.monitor_cert, self.monitor_key)
        return context

    def command(self, restarted: bool = False) -> list[str]:
        return [self.python, "-m", "haif", *self.args, *(self.restart_args if restarted else [])]


def spec_path(directory: Path, name: str) -> Path:
    return directory / RUN_DIR / f"{log_name(name)}.json"


def state_path(directory: Path, name: str) -> Path:
    return directory / RUN_DIR / f"{log_name(name)}.state.json"


def pid_path(directory: Path, name: str) -> Path:
    return directory / RUN_DIR / f"{log_name(name)}.pid"


def log_path(directory: Path, name: str) -> Path:
    return directory / LOG_DIR / f"{log_name(name)}.log"


def unit_name(cluster: str, name: str) -> str:
    return f"haif-{cluster}-{log_name(name)}.service"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600) atomically: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def read_state(directory: Path, name: str) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(state_path(directory, name).read_text())
    except (OSError, ValueError):
        return {}
    return state


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def _health(spec: Spec, timeout_s: float = 2.0, path: str = "/healthz") -> dict[str, Any] | None:
    """The service's ``/healthz`` JSON, or None when it does not answer 200."""
    context = spec.health_tls()
    try:
        with urllib.request.urlopen(
            f"{spec.url}{path}", timeout=timeout_s, context=context
        ) as resp:
            if resp.status != 200:
                return None
            body = json.loads(resp.read() or b"{}")
            return body if isinstance(body, dict) else {}
    except (OSError, ValueError):
        return None


def _readiness(spec: Spec) -> dict[str, Any]:
    """``/readyz``: ``ready``, and for an orchestrator whether it is the ``leader``."""
    body: Any
    try:
        url = f"{spec.url}/readyz"
        with urllib.request.urlopen(url, timeout=2.0, context=spec.health_tls()) as resp:
            body, ready = json.loads(resp.read() or b"{}"), resp.status == 200
    except urllib.error.HTTPError as exc:  # 503: not ready, and it says why
        try:
            body, ready = json.loads(exc.read() or b"{}"), False
        except ValueError:
            body, ready = {}, False
    except (OSError, ValueError):
        return {"ready": False, "leader": None}
    return {"ready": ready, "leader": body.get("leader") if isinstance(body, dict) else None}


# ------------------------------------------------------------------ the supervisor loop


class _Loop:
    """One service under supervision (see the module's docstring)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.spec = Spec.read(directory, name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.restarts: list[float] = []
        self.state = "starting"
        self.stop_asked = False
        self.reload_asked = False
        self.sock: socket.socket | None = None
        if self.spec.bind_port is not None:
            host = self.spec.bind_host or "0.0.0.0"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.create_server(
                (host, self.spec.bind_port), family=family, backlog=1024
            )

    def _say(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.name}: {message}", flush=True)

    def _record(self, state: str, **more: Any) -> None:
        self.state = state
        body = {
            "name": self.name,
            "state": state,
            "supervisor_pid": os.getpid(),
            "pid": self.proc.pid if self.proc is not None else None,
            "generation": self.generation,
            "restarts": len(self.restarts),
            "since": time.time(),
            **more,
        }
        _write_private(state_path(self.directory, self.name), json.dumps(body))

    def _spawn(self, restarted: bool) -> subprocess.Popen[bytes]:
        log = log_path(self.directory, self.name)
        command = self.spec.command(restarted)
        fds: tuple[int, ...] = ()
        if self.sock is not None:
            fds = (self.sock.fileno(),)
            command += ["--listen-fd", str(fds[0])]
        with log.open("ab") as out:
            os.chmod(log, 0o600)
            return subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                pass_fds=fds,
            )

    def _start(self, restarted: bool = False) -> bool:
        """Start the service and wait until it is healthy (False: it is not)."""
        self._record("starting")
        self.proc = self._spawn(restarted)
        return self._await_healthy(self.proc)

    def _await_healthy(self, proc: subprocess.Popen[bytes]) -> bool:
        try:
            if self.sock is None:
                tls = self.spec.health_tls()
                wait_healthy(self.spec.url, proc, self.spec.start_timeout_s, tls)
            else:
                self._await_pid(proc)
        except ConfigError as exc:
            self._say(f"not healthy: {exc}")
            return False
        self._record("running")
        self._say(f"running (pid {proc.pid}, generation {self.generation})")
        return True

    def _await_pid(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait until ``proc`` itself answers ``/healthz`` on the shared socket (another
        gateway may answer there too: the answer names its pid)."""
        deadline = time.monotonic() + self.spec.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ConfigError(f"{self.spec.url}: exited with code {proc.returncode}")
            body = _health(self.spec, timeout_s=1.0)
            if body is not None and body.get("pid") == proc.pid:
                return
            time.sleep(0.05)
        raise ConfigError(f"{self.spec.url}: not healthy after {self.spec.start_timeout_s:.0f} s")

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop ``proc`` gracefully (a worker drained first), killing it if it lingers."""
        if proc.poll() is not None:
            return
        deadline = time.monotonic() + self.spec.drain_s
        if self.spec.kind == "worker":
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.3)  # a placement decided just before the drain arrives
            while time.monotonic() < deadline and proc.poll() is None:
                health = _health(self.spec, timeout_s=1.0)
                if health is None or not health.get("in_flight"):
                    break
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()) + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._say(f"pid {proc.pid} still running; killed")
            proc.kill()
            proc.wait()

    def _replace(self) -> None:
        """SIGHUP: the spec again, and the service replaced by one started from it."""
        try:
            self.spec = Spec.read(self.directory, self.name)
        except ConfigError as exc:
            self._say(f"reload refused: {exc}")
            return
        old = self.proc
        self.generation += 1
        self.restarts = []
        if self.sock is not None and old is not None and old.poll() is None:
            self._record("starting")
            new = self._spawn(False)
            self.proc = new
            if self._await_healthy(new):
                old.send_signal(signal.SIGUSR1)  # its responses close their connections
                time.sleep(HANDOFF_S)
                self._stop(old)
                return
            self._stop(new)  # the old one keeps serving
            self.proc = old
            self._record("running", reload_failed=True)
            return
        self._record("stopping")
        if old is not None:
            self._stop(old)
        if not self._start():
            self._record("failed")

    def _crashed(self) -> None:
        assert self.proc is not None
        code = self.proc.returncode
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
        if len(self.restarts) >= MAX_RESTARTS:
            self._say(f"exited with code {code}; {MAX_RESTARTS} restarts already: left down")
            self._record("failed", exit_code=code)
            return
        backoff = min(MAX_BACKOFF_S, 2.0 ** len(self.restarts))
        self.restarts.append(now)
        self._say(f"exited with code {code}; restarting in {backoff:.0f} s")
        self._record("restarting", exit_code=code)
        end = time.monotonic() + backoff
        while time.monotonic() < end and not (self.stop_asked or self.reload_asked):
            time.sleep(0.1)
        if not (self.stop_asked or self.reload_asked) and not self._start(restarted=True):
            self._record("restarting", exit_code=self.proc.returncode)

    def run(self) -> int:
        def on_term(_sig: int, _frame: object) -> None:
            self.stop_asked = True

        def on_hup(_sig: int, _frame: object) -> None:
            self.reload_asked = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        _write_private(pid_path(self.directory, self.name), f"{os.getpid()}\n")
        try:
            if not self._start() and self.proc is not None and self.proc.poll() is None:
                self._record("failed")
            while not self.stop_asked:
                if self.reload_asked:
                    self.reload_asked = False
                    self._replace()
                elif (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and self.state != "failed"
                ):
                    self._crashed()
                time.sleep(0.1)
            self._record("stopping")
            if self.proc is not None:
                self._stop(self.proc)
            self._record("stopped", exit_code=self.proc.returncode if self.proc else None)
            self._say("stopped")
            return 0
        finally:
            pid_path(self.directory, self.name).unlink(missing_ok=True)


def supervise(directory: Path, name: str) -> int:
    """Run the supervisor loop of service ``name`` in the foreground (until SIGTERM)."""
    return _Loop(directory, name).run()


# ------------------------------------------------------------------ starting and stopping


def systemd_available() -> bool:
    """Whether ``systemctl --user`` works here (a user manager runs)."""
    try:
        done = subprocess.run(
            ["systemctl", "--user", "show-environment"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def unit_text(directory: Path, spec: Spec) -> str:
    """The systemd user unit that runs the supervisor of ``spec``."""
    run = [spec.python, "-m", "haif.deploy.supervise", "run", spec.name, "--dir", str(directory)]
    return "\n".join(
        [
            "[Unit]",
            f"Description=HAIF {spec.kind} {spec.name} (cluster {spec.cluster})",
            "After=network-online.target",
            "",
            "[Service]",
            f"ExecStart={shlex.join(run)}",
            "ExecReload=/bin/kill -HUP $MAINPID",
            # Only the supervisor is signalled: it drains and stops the service itself.
            "KillMode=mixed",
            f"TimeoutStopSec={spec.drain_s + STOP_GRACE_S + 10:.0f}",
            "Restart=on-failure",
            "RestartSec=2",
            f"WorkingDirectory={directory}",
            "UMask=0077",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def _systemctl(*args: str) -> None:
    done = subprocess.run(
        ["systemctl", "--user", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise ConfigError(f"systemctl --user {' '.join(args)}: {done.stderr.strip()}")


def _unit_file(spec: Spec) -> Path:
    config = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return config / "systemd" / "user" / unit_name(spec.cluster, spec.name)


def _uses_systemd(directory: Path, spec: Spec) -> bool:
    return (directory / RUN_DIR / f"{log_name(spec.name)}.systemd").exists()


#: The detached supervisors this process started (to notice one that dies at once).
_detached: dict[str, subprocess.Popen[bytes]] = {}


def start(directory: Path, name: str, via: str = "auto") -> str:
    """Start the supervisor of ``name`` (already running: nothing); how it runs."""
    spec = Spec.read(directory, name)
    for sub in (RUN_DIR, LOG_DIR):
        (directory / sub).mkdir(mode=0o700, exist_ok=True)
    state = read_state(directory, name)
    if _alive(state.get("supervisor_pid")) and state.get("state") != "stopped":
        return "already running"
    state_path(directory, name).unlink(missing_ok=True)
    marker = directory / RUN_DIR / f"{log_name(name)}.systemd"
    if via == "systemd" or (via == "auto" and systemd_available()):
        unit = _unit_file(spec)
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(unit_text(directory, spec))
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # best effort
            subprocess.run(["loginctl", "enable-linger"], capture_output=True, timeout=10)
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", unit.name)
        marker.touch(mode=0o600)
        return f"systemd user unit {unit.name}"
    marker.unlink(missing_ok=True)
    out = (directory / LOG_DIR / f"{log_name(name)}.supervise.log").open("ab")
    with out:
        _detached[name] = subprocess.Popen(
            [sys.executable, "-m", "haif.deploy.supervise", "run", name, "--dir", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,  # setsid: no SIGHUP when the SSH session ends
        )
    return "detached haif supervise"


def wait_for(directory: Path, name: str, generation: int, timeout_s: float) -> dict[str, Any]:
    """Wait until the service runs at ``generation`` or later; ``ConfigError`` with the
    log's tail when it fails or the time is up."""
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = read_state(directory, name)
        if state.get("generation", -1) >= generation:
            if state.get("state") == "running" and not state.get("reload_failed"):
                return state
            if state.get("state") == "failed" or state.get("reload_failed"):
                break
        launched = _detached.get(name)
        if launched is not None and launched.poll() is not None:
            tail = _tail(directory / LOG_DIR / f"{log_name(name)}.supervise.log", 15)
            raise ConfigError(f"{name}: its supervisor exited at once:\n{tail}")
        time.sleep(0.1)
    tail = _tail(log_path(directory, name), 15)
    raise ConfigError(
        f"{name}: not running (state {state.get('state', 'unknown')}); the end of its log:\n{tail}"
    )


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(directory: Path, name: str) -> bool:
    """Stop the service and its supervisor (False: it was not running)."""
    spec = Spec.read(directory, name)
    if _uses_systemd(directory, spec):
        _systemctl("disable", "--now", unit_name(spec.cluster, name))
        return True
    state = read_state(directory, name)
    pid = state.get("supervisor_pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + spec.drain_s + STOP_GRACE_S + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        raise ConfigError(f"{name}: supervisor pid {pid} did not stop")
    return True


def reload(directory: Path, name: str) -> dict[str, Any]:
    """Replace the service by one started from its spec as it is now (rolling upgrade)."""
    spec = Spec.read(directory, name)
    state = read_state(directory, name)
    pid = state.get("supervisor_pid")
    if not isinstance(pid, int) or not _alive(pid) or state.get("state") == "stopped":
        start(directory, name)
        return wait_for(directory, name, 0, spec.start_timeout_s + 5)
    generation = int(state.get("generation", 0)) + 1
    os.kill(pid, signal.SIGHUP)
    return wait_for(directory, name, generation, spec.drain_s + spec.start_timeout_s + 30)


def status(directory: Path) -> list[dict[str, Any]]:
    """One row per service spec in ``directory``: its state and whether it answers."""
    rows = []
    for path in sorted((directory / RUN_DIR).glob("*.json")):
        if path.name.endswith(".state.json"):
            continue
        try:
            spec = Spec(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        state = read_state(directory, spec.name)
        alive = _alive(state.get("supervisor_pid"))
        health = _health(spec) if alive else None
        readiness = _readiness(spec) if health is not None else {"ready": False, "leader": None}
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "url": spec.url,
                "state": state.get("state", "never started") if alive else "down",
                "pid": state.get("pid") if alive else None,
                "generation": state.get("generation"),
                "restarts": state.get("restarts", 0),
                "healthy": health is not None,
                "in_flight": (health or {}).get("in_flight"),
                **readiness,
            }
        )
    return rows


# ------------------------------------------------------------------ the command


def add_supervise_command(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "supervise",
        help="keep services running on this host (haif deploy starts it)",
        description="Run, start, stop, reload or list the supervised services of an install "
        "directory that haif deploy wrote (DIR/run/NAME.json). A supervisor restarts its "
        "service when it crashes, drains it before it stops, and outlives the SSH session "
        "(a systemd user unit, or a detached process with a pid file).",
    )
    p.add_argument(
        "action",
        choices=("run", "start", "stop", "reload", "status"),
        help="run: the supervisor in the foreground; start: in the background (a systemd "
        "user unit or detached) and wait until the service is healthy; stop: drain and "
        "stop; reload: replace the service from its spec; status: every service as JSON",
    )
    p.add_argument("name", nargs="?", help="the service (all but status)")
    p.add_argument("--dir", required=True, help="the install directory haif deploy made")
    p.add_argument(
        "--via",
        choices=("auto", "systemd", "detached"),
        default="auto",
        help="start: a systemd user unit, a detached process, or auto (systemd where "
        "systemctl --user works)",
    )
    p.set_defaults(func=_cmd_supervise)


def _cmd_supervise(args: argparse.Namespace) -> int:
    directory = Path(args.dir).expanduser().resolve()
    if args.action == "status":
        print(json.dumps(status(directory)))
        return 0
    if not args.name:
        raise ConfigError(f"haif supervise {args.action}: name the service")
    name = args.name
    if args.action == "run":
        return supervise(directory, name)
    if args.action == "start":
        how = start(directory, name, args.via)
        spec = Spec.read(directory, name)
        state = wait_for(directory, name, 0, spec.start_timeout_s + 10)
        print(json.dumps({"name": name, "how": how, **state}))
        return 0
    if args.action == "stop":
        print(json.dumps({"name": name, "stopped": stop(directory, name)}))
        return 0
    state = reload(directory, name)
    print(json.dumps({"name": name, **state}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m haif.deploy.supervise ACTION ...``: ``haif supervise`` without importing
    the whole command line (what ``haif deploy`` runs on the hosts: it starts quicker)."""
    parser = argparse.ArgumentParser(prog="python -m haif.deploy.supervise")
    add_supervise_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["supervise", *(sys.argv[1:] if argv is None else argv)])
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
