"""SSH to the hosts with asyncssh: host keys checked, nothing secret printed.

*Host keys.* A connection is made only to a host whose key is in the deploy
YAML's ``known_hosts`` file for that address and port; there is no
trust-on-first-use and no way to turn the check off. A key that differs from
the one recorded (the host was reinstalled, or someone is in the middle)
stops the deploy with :class:`HostKeyChanged`; a host missing from the file
with :class:`HostKeyUnknown`. Neither the SSH agent nor ``~/.ssh/config`` is
consulted: what the YAML says is what is used.

*Secrets.* The private key file is read by asyncssh and never printed or
logged (asyncssh's own log is kept at WARNING). Files are written with their
mode set when created (:meth:`Host.write`), then renamed into place, so a
key is never readable by others, not even for a moment.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from haif.configfile import ConfigError
from haif.deploy.config import HostConfig, Plan

with warnings.catch_warnings():  # asyncssh still imports DSA, which cryptography deprecates
    warnings.simplefilter("ignore")
    import asyncssh

if TYPE_CHECKING:
    from collections.abc import Sequence

logging.getLogger("asyncssh").setLevel(logging.WARNING)
CONNECT_TIMEOUT_S = 20.0


class DeployError(ConfigError):
    """A step on a host failed; the message names the host and the step."""


class HostKeyUnknown(DeployError):
    """The known-hosts file has no key for the host."""


class HostKeyChanged(DeployError):
    """The host presented a key other than the one the known-hosts file holds."""


def _known_keys(known_hosts: Path, host: HostConfig) -> int:
    """How many keys ``known_hosts`` trusts for ``host`` (its address and port)."""
    try:
        known = asyncssh.read_known_hosts(str(known_hosts))
    except (OSError, ValueError, asyncssh.Error):
        return 0
    # (trusted host keys, CA keys, revoked, ...): the tuple's length varies by release.
    trusted = known.match(host.address, host.address, host.port)[0]
    return len(trusted)


async def connect(plan: Plan, host: HostConfig) -> Host:
    """Connect to ``host`` as the deploy YAML says; ``DeployError`` says why not."""
    known = plan.local_path(host.known_hosts)
    key = plan.local_path(host.key_file)
    where = f"host {host.name} ({host.destination()})"
    for what, path in (("key_file", key), ("known_hosts", known)):
        if not path.is_file():
            raise DeployError(f"{where}: {what} {path}: no such file")
    try:
        conn = await asyncssh.connect(
            host.address,
            port=host.port,
            username=host.user or None,
            client_keys=[str(key)],
            known_hosts=str(known),
            agent_path=None,
            config=[],
            connect_timeout=CONNECT_TIMEOUT_S,
        )
    except asyncssh.HostKeyNotVerifiable:
        if _known_keys(known, host):
            raise HostKeyChanged(
                f"{where}: HOST KEY CHANGED: the key it presents is not the one {known} "
                "holds for it. The host may have been reinstalled, or someone may be "
                "intercepting the connection: check the new key out of band (ssh-keyscan "
                f"on the host's console) before replacing the entry in {known}. "
                "Nothing was deployed."
            ) from None
        raise HostKeyUnknown(
            f"{where}: no key for it in {known} (port {host.port}); add the host's key "
            "(checked out of band) to that file. haif deploy never trusts a key it cannot "
            "check."
        ) from None
    except asyncssh.PermissionDenied:
        raise DeployError(f"{where}: the key {key} was refused") from None
    except (OSError, asyncssh.Error) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise DeployError(f"{where}: cannot connect: {reason}") from None
    return Host(host, conn)


@dataclass
class Host:
    """An SSH connection to one host, with the few operations the deploy needs."""

    config: HostConfig
    conn: asyncssh.SSHClientConnection
    #: The install directory, absolute (:meth:`resolve_dir`).
    dir: str = ""

    async def resolve_dir(self) -> str:
        """The install directory as an absolute path (relative: to the user's home)."""
        if posixpath.isabs(self.config.dir):
            self.dir = self.config.dir
        else:
            home = (await self.run('printf %s "$HOME"')).strip()
            self.dir = posixpath.join(home, self.config.dir)
        return self.dir

    def path(self, *parts: str) -> str:
        return posixpath.join(self.dir, *parts)

    async def run(self, command: str, *, what: str | None = None, timeout_s: float = 600) -> str:
        """Run ``command`` (a shell line); its stdout. ``DeployError`` names the host,
        the step and the end of stderr when it fails."""
        try:
            done = await self.conn.run(command, check=False, timeout=timeout_s)
        except (OSError, asyncssh.Error) as exc:
            raise DeployError(f"host {self.config.name}: {what or command}: {exc}") from None
        if done.exit_status != 0:
            err = str(done.stderr or "").strip() or str(done.stdout or "").strip()
            tail = "\n".join(err.splitlines()[-20:])
            raise DeployError(
                f"host {self.config.name}: {what or command} failed "
                f"(exit {done.exit_status}):\n{tail}"
            )
        return str(done.stdout or "")

    async def run_args(self, args: Sequence[str], *, what: str | None = None) -> str:
        return await self.run(shlex.join(args), what=what)

    async def write(self, remote: str, data: bytes, mode: int) -> None:
        """Write ``data`` to ``remote`` with ``mode`` from the first byte (then rename)."""
        tmp = f"{remote}.tmp"
        async with self.conn.start_sftp_client() as sftp:
            attrs = asyncssh.SFTPAttrs(permissions=mode)
            async with sftp.open(tmp, "wb", attrs) as f:
                await f.write(data)
            await sftp.chmod(tmp, mode)  # an old tmp file kept its mode
            await sftp.posix_rename(tmp, remote)

    async def put(self, local: Path, remote: str, mode: int = 0o644) -> None:
        """Copy a (large, not secret) file, then set its mode."""
        async with self.conn.start_sftp_client() as sftp:
            await sftp.put(str(local), f"{remote}.tmp")
            await sftp.chmod(f"{remote}.tmp", mode)
            await sftp.posix_rename(f"{remote}.tmp", remote)

    async def listdir(self, remote: str) -> dict[str, int]:
        """File name -> size in ``remote`` (empty when it does not exist)."""
        async with self.conn.start_sftp_client() as sftp:
            try:
                names = await sftp.readdir(remote)
            except asyncssh.SFTPNoSuchFile:
                return {}
            return {
                str(n.filename): int(n.attrs.size or 0)
                for n in names
                if n.filename not in (".", "..")
            }

    def close(self) -> None:
        self.conn.close()
