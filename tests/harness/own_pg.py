"""A PostgreSQL server of the test's own, to stop and start (never the shared one).

``initdb`` and ``pg_ctl`` from the machine's PostgreSQL, a data directory in
a fresh temporary directory, a free port, trust auth on loopback. PostgreSQL
refuses to run as root, so as root the binaries run as the ``postgres``
user (``runuser``). Missing binaries skip the test, or fail it under
``CI=true``, like the shared server (:mod:`harness.pg`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from haif.runtime.cluster import free_port
from harness.pg import pg_unavailable


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class OwnPostgres:
    """One PostgreSQL instance in a temporary directory: start, stop, start again.

    ``tls``: (certificate PEM, key PEM) to serve with ``ssl=on``; then loopback
    clients must use TLS (``hostssl`` only in ``pg_hba.conf``, plain connections
    are rejected). ``listen``: the address it listens on; ``allow``: a network
    (CIDR) whose clients are trusted besides loopback.
    """

    def __init__(
        self,
        tls: tuple[bytes, bytes] | None = None,
        listen: str = "127.0.0.1",
        allow: str | None = None,
    ) -> None:
        bindir = _bindir()
        if bindir is None:
            pg_unavailable("no initdb/pg_ctl on this machine")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="haif-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self.root.chmod(0o700)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.tls = tls
        self.listen = listen
        if allow is not None:  # clients of another network (haif deploy's hosts)
            with (self.data / "pg_hba.conf").open("a") as rules:
                rules.write(f"host all all {allow} trust\n")
        if tls is not None:
            cert, key = self.root / "server.crt", self.root / "server.key"
            cert.write_bytes(tls[0])
            key.write_bytes(tls[1])
            key.chmod(0o600)
            if self.as_user:
                shutil.chown(cert, "postgres")
                shutil.chown(key, "postgres")
            hba = self.data / "pg_hba.conf"
            hba.write_text(
                "local all all trust\n"
                "hostssl all all 127.0.0.1/32 trust\n"
                "hostnossl all all 0.0.0.0/0 reject\n"
            )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.listen}:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.as_user, str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses={self.listen} -c fsync=off"
        if self.tls is not None:
            options += f" -c ssl=on -c ssl_cert_file={self.root / 'server.crt'}"
            options += f" -c ssl_key_file={self.root / 'server.key'}"
            options += " -c ssl_min_protocol_version=TLSv1.3"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as a crash would, no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
