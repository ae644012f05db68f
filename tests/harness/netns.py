"""Hosts for ``haif deploy`` tests: Linux network namespaces, each with a real sshd.

:class:`Lab` makes ``n`` namespaces named ``<tag>-h<i>`` (the tag is unique per
run), each joined to a bridge in the root namespace by a veth pair, on a
private /24 (10.<a>.<b>.0, drawn at random, the bridge at .1, host ``i`` at
.(10 + i)): traffic only among them and the root namespace, which is the
operator (``haif deploy``) and the client. Each namespace runs OpenSSH's
``sshd`` (its own config, host key and pid file in the lab's temporary
directory; ``ListenAddress`` its veth address; the lab's client key
authorized), and :attr:`Lab.known_hosts` holds the host keys. Namespaces share
the file system: each host gets its own install directory (:meth:`Lab.dir`).

:meth:`Lab.close` kills every process left in the namespaces (sshd and the
deployed services), deletes them, the veths and the bridge, even after a
failed test. Without root, ``ip netns`` or ``sshd`` the test is skipped with
the reason, or fails under ``CI=true`` (:func:`lab_unavailable`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def lab_unavailable(reason: str) -> NoReturn:
    message = f"no SSH hosts for the deploy test: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: apt-get install openssh-server, run as root)")
    pytest.skip(message)


def _ip(*args: str, ns: str | None = None, check: bool = True) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class Lab:
    """``n`` SSH hosts in network namespaces (see the module's docstring)."""

    def __init__(self, n: int) -> None:
        if os.geteuid() != 0:
            lab_unavailable("network namespaces need root")
        if not shutil.which("ip"):
            lab_unavailable("no ip command (iproute2)")
        if not Path(SSHD).exists() or not shutil.which("ssh-keygen"):
            lab_unavailable("no sshd (apt-get install openssh-server)")
        rng = random.Random()
        self.tag = f"hd{os.getpid() % 1000}{rng.randrange(100):02d}"
        self.subnet = f"10.{rng.randrange(100, 250)}.{rng.randrange(1, 250)}"
        self.root = Path(tempfile.mkdtemp(prefix=f"haif-{self.tag}-"))
        self.root.chmod(0o700)
        self.bridge = f"{self.tag}br"
        self.namespaces: list[str] = []
        self.addresses: list[str] = []
        self.sshd: list[subprocess.Popen[bytes]] = []
        try:
            self._network(n)
            self._keys()
            for i in range(n):
                self._start_sshd(i)
            for address in self.addresses:
                self._wait_port(address, 22)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _network(self, n: int) -> None:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
        except RuntimeError as exc:
            lab_unavailable(f"cannot make a bridge: {exc}")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(n):
            ns, outside, inside = f"{self.tag}-h{i}", f"{self.tag}v{i}", f"{self.tag}p{i}"
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            address = f"{self.subnet}.{10 + i}"
            _ip("addr", "add", f"{address}/24", "dev", inside, ns=ns)
            _ip("link", "set", inside, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            self.addresses.append(address)

    def _keygen(self, path: Path) -> str:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.tag, "-f", str(path)],
            check=True,
            capture_output=True,
        )
        return path.with_suffix(".pub").read_text().strip()

    def _keys(self) -> None:
        self.client_key = self.root / "client_key"
        self.authorized = self.root / "authorized_keys"
        self.authorized.write_text(self._keygen(self.client_key) + "\n")
        self.known_hosts = self.root / "known_hosts"
        self.host_keys: list[str] = []
        lines = []
        for i, address in enumerate(self.addresses):
            public = self._keygen(self.root / f"host{i}_key")
            kind, blob = public.split()[:2]
            self.host_keys.append(f"{kind} {blob}")
            lines.append(f"{address} {kind} {blob}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def _start_sshd(self, i: int) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        config = self.root / f"sshd{i}.conf"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.addresses[i]}",
                    "Port 22",
                    f"HostKey {self.root / f'host{i}_key'}",
                    f"PidFile {self.root / f'sshd{i}.pid'}",
                    f"AuthorizedKeysFile {self.authorized}",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 50",
                    "MaxSessions 50",
                    "",
                ]
            )
        )
        log = (self.root / f"sshd{i}.log").open("ab")
        with log:
            self.sshd.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        self.namespaces[i],
                        SSHD,
                        "-D",
                        "-e",
                        "-f",
                        str(config),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def _wait_port(self, address: str, port: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((address, port), 0.5):
                return
            if any(p.poll() is not None for p in self.sshd):
                break
            time.sleep(0.05)
        logs = "\n".join(p.read_text() for p in sorted(self.root.glob("sshd*.log")))
        raise RuntimeError(f"sshd on {address}:{port} did not come up:\n{logs[-2000:]}")

    # ------------------------------------------------------------------ use

    def dir(self, i: int) -> Path:
        """Host ``i``'s install directory (the hosts share this machine's files)."""
        return self.root / "hosts" / f"h{i}"

    def pids(self, i: int) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.namespaces[i]], capture_output=True, text=True, check=False
        )
        return [int(p) for p in done.stdout.split()]

    def kill_host(self, i: int, keep_sshd: bool = True) -> list[int]:
        """SIGKILL every process of host ``i`` (but its sshd): a crash of its services."""
        sshd = {p.pid for p in self.sshd}
        killed = []
        for pid in self.pids(i):
            if keep_sshd and (pid in sshd or _is_sshd(pid)):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return killed

    def close(self) -> None:
        for i, _ns in enumerate(self.namespaces):
            for pid in self.pids(i):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.sshd:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for i, ns in enumerate(self.namespaces):
            _ip("link", "del", f"{self.tag}v{i}", check=False)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)
        # The hosts' virtualenvs are thousands of files: removed in the background,
        # not on the test's time.
        subprocess.Popen(
            ["rm", "-rf", str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def _is_sshd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"
    except OSError:
        return False
