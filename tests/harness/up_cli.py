"""``haif up`` started as a user starts it: a cluster file, flags, and Ctrl-C to stop.

:class:`UpCli` runs ``python -m haif up [FILE] ARGS`` with every port given by
flag (so the example files' fixed ports never clash with another test), reads
its first line and ``cluster.json``, and stops it with SIGINT.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from haif.runtime.supervisor import read_state


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of ``n`` consecutive ports that are free now."""
    for _ in range(200):
        base = random.randrange(20_000, 60_000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"no {n} consecutive free ports")


class UpCli:
    """``haif up`` with a port block of its own: gateway, orchestrator, control, standby,
    workers."""

    def __init__(
        self,
        data: Path,
        config: Path | None = None,
        *,
        workers: int = 2,
        extra: tuple[str, ...] = (),
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.data = data
        base = free_ports(4 + workers)
        self.gateway_port, self.orchestrator_port, self.control_port = base, base + 1, base + 2
        self.standby_port, self.worker_port = base + 3, base + 4
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        args = ["--port", str(base), "--orchestrator-port", str(base + 1)]
        args += ["--control-port", str(base + 2), "--standby-port", str(base + 3)]
        args += ["--worker-port", str(base + 4)]
        cmd = [sys.executable, "-m", "haif", "up", *([str(config)] if config else [])]
        self.proc = subprocess.Popen(
            [*cmd, *args, "--data-dir", str(data), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        assert self.proc.stdout is not None
        self.output = self._first_line(timeout_s)
        assert "haif cluster up" in self.output, self.output + self.proc.stdout.read()
        self.state: dict[str, Any] = read_state(data)

    def _first_line(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = ""
        while not line and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
        return line

    def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stream(self, path: str, body: dict[str, Any]) -> list[str]:
        """A streamed request: the ``data:`` payloads of its server-sent events."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps({**body, "stream": True}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            text: str = resp.read().decode()
        return [line[6:] for line in text.splitlines() if line.startswith("data: ")]

    def complete(
        self,
        model: str = "llama-3-8b",
        headers: dict[str, str] | None = None,
        timeout_s: float = 60.0,
        **extra: Any,
    ) -> dict[str, Any]:
        """One completion, retried while the workers' first heartbeats are on their way."""
        body = {"model": model, "prompt": "hello there", "max_tokens": 4, **extra}
        deadline = time.monotonic() + timeout_s
        while True:
            status, answer = self.post("/v1/completions", body, headers)
            if status == 200 or time.monotonic() > deadline or status in (400, 401, 403):
                assert status == 200, answer
                return dict(answer)
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> str:
        """Ctrl-C; the rest of the output. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""
