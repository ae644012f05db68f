"""What ``haif deploy`` does on one host, over its SSH connection.

Layout of a host's install directory (mode 0700)::

    wheels/deps/*.whl             the dependencies' wheels (only those it lacked are sent)
    wheels/haif/<key>/haif-*.whl  haif's wheel of each deploy
    venvs/<key>/                  a virtualenv per deploy (pip install --no-index)
    current -> venvs/<key>        the one the services run now
    etc/cluster.yaml              the cluster YAML the orchestrator and gateway read (0600)
    etc/tls/ or etc/keys/         this host's service certificates or keys (0600)
    etc/files/                    files the cluster YAML names (gateway TLS, JWT key, ...)
    artifacts/<worker>/           the signed model artifacts a worker loads, and its keyring
    run/<service>.json            the supervisor's spec of each service (haif supervise)
    logs/<service>.log            each service's output
    data/                         the orchestrator's store and journal

The services of a host get only their own private keys (and the monitor's,
for health checks); the CA's key stays with the operator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import posixpath
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import yaml

from haif.configfile import ConfigError
from haif.deploy.config import Placed, Plan
from haif.deploy.ssh import DeployError, Host
from haif.deploy.supervise import Spec
from haif.deploy.wheels import Wheelhouse
from haif.runtime.cluster import (
    WorkerConfig,
    gateway_args,
    gateway_serving_args,
    orchestrator_args,
    store_url,
    worker_args,
)
from haif.runtime.cluster_keys import KEYRING_DIR, key_file_stem
from haif.runtime.cluster_tls import MONITOR, ServiceFiles

Say = Callable[[str], None]
# Where the remote pip finds nothing of the host's own configuration.
_PIP_ENV = "PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1"


@dataclass(frozen=True)
class Identities:
    """The operator's copy of the cluster's identities (see :func:`haif.deploy.cli`)."""

    #: Mutual TLS: every service's certificate files (and the monitor's).
    certs: dict[str, ServiceFiles]
    #: Plain HTTP (the opt-out): the cluster keys' directory.
    keys: Path | None = None


async def install(host: Host, house: Wheelhouse, say: Say) -> str:
    """The host's virtualenv for ``house`` (made once; only missing wheels are sent)."""
    d = await host.resolve_dir()
    dirs = ["", "wheels", "wheels/deps", "wheels/haif", "venvs", "etc", "run", "logs", "data"]
    await host.run_args(["mkdir", "-p", *(host.path(s) for s in dirs)], what="mkdir")
    await host.run_args(["chmod", "700", d], what="chmod")
    python = host.config.python
    version = await host.run(
        f"{python} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'",
        what=f"{python} --version",
    )
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version.strip() != local:
        raise DeployError(
            f"host {host.config.name}: {python} is Python {version.strip()}, the wheels are "
            f"built for {local} (the operator's); set hosts[].python to a Python {local}"
        )
    have = await host.listdir(host.path("wheels", "deps"))
    missing = [w for w in house.deps if have.get(w.name) != w.stat().st_size]
    if missing:
        say(f"{host.config.name}: sending {len(missing)} of {len(house.deps)} wheels")
        for wheel in missing:
            await host.put(wheel, host.path("wheels", "deps", wheel.name))
    haif_dir = host.path("wheels", "haif", house.key)
    haif_wheel = posixpath.join(haif_dir, house.haif.name)
    await host.run_args(["mkdir", "-p", haif_dir])
    await host.put(house.haif, haif_wheel)
    venv = host.path("venvs", house.key)
    done = posixpath.join(venv, ".haif-complete")
    q = shlex.quote
    present = await host.run(f"test -f {q(done)} && echo yes || true")
    if present.strip() != "yes":
        say(f"{host.config.name}: making the virtualenv {venv}")
        pip = posixpath.join(venv, "bin", "pip")
        await host.run(
            f"rm -rf {q(venv)} && {python} -m venv {q(venv)} && {_PIP_ENV} {q(pip)} install -q "
            f"--no-compile --no-index --find-links {q(host.path('wheels', 'deps'))} "
            f"{q(haif_wheel)} && touch {q(done)}",
            what="virtualenv",
        )
    return venv


def identity_name(s: Placed) -> str:
    """The identity a service runs as: every gateway is ``gateway``, both orchestrators
    ``orchestrator`` (as in ``haif up``), a worker its id."""
    return s.kind if s.kind != "worker" else s.name


async def push_identities(host: Host, placed: list[Placed], ids: Identities) -> list[str]:
    """Copy this host's certificates or keys (0600); the flags each service gets."""
    if ids.keys is not None:
        keys = host.path("etc", "keys")
        ring = posixpath.join(keys, KEYRING_DIR)
        await host.run_args(["mkdir", "-p", ring])
        await host.run_args(["chmod", "700", keys])
        for pub in sorted((ids.keys / KEYRING_DIR).glob("*.pub")):
            await host.write(posixpath.join(ring, pub.name), pub.read_bytes(), 0o644)
        for stem in sorted({key_file_stem(identity_name(s)) for s in placed}):
            private = (ids.keys / f"{stem}.key").read_bytes()
            await host.write(posixpath.join(keys, f"{stem}.key"), private, 0o600)
        return []
    tls = host.path("etc", "tls")
    await host.run_args(["mkdir", "-p", tls])
    await host.run_args(["chmod", "700", tls])
    names = {identity_name(s) for s in placed} | {MONITOR}
    ca = next(iter(ids.certs.values())).ca
    await host.write(posixpath.join(tls, "ca.pem"), ca.read_bytes(), 0o644)
    for name in sorted(names):
        files = ids.certs[name]
        await host.write(posixpath.join(tls, files.cert.name), files.cert.read_bytes(), 0o644)
        await host.write(posixpath.join(tls, files.key.name), files.key.read_bytes(), 0o600)
    return []


def remote_identity_args(host: Host, name: str, ids: Identities) -> list[str]:
    """The flags that give service ``name`` its identity from the host's copy."""
    if ids.keys is not None:
        keys = host.path("etc", "keys")
        return [
            "--cluster-key",
            posixpath.join(keys, f"{key_file_stem(name)}.key"),
            "--cluster-keyring",
            posixpath.join(keys, KEYRING_DIR),
        ]
    files = ids.certs[name]
    tls = host.path("etc", "tls")
    return [
        "--cluster-tls-cert",
        posixpath.join(tls, files.cert.name),
        "--cluster-tls-key",
        posixpath.join(tls, files.key.name),
        "--cluster-ca",
        posixpath.join(tls, "ca.pem"),
    ]


async def _copy_file(host: Host, local: Path, remote: str, secret: bool) -> None:
    try:
        data = local.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{local}: cannot read: {exc.strerror}") from None
    await host.write(remote, data, 0o600 if secret else 0o644)


async def push_artifacts(host: Host, plan: Plan, w: WorkerConfig) -> dict[str, str]:
    """A worker's signed model (verified here first) and keyring; its remote paths."""
    from haif.runtime.artifacts import ArtifactError, ArtifactRef, blob_path, manifest_path, verify
    from haif.runtime.security import Keyring

    assert w.artifact_store and w.keyring and w.model_ref
    store, keyring = plan.local_path(w.artifact_store), plan.local_path(w.keyring)
    try:
        ref = ArtifactRef.parse(w.model_ref)
        blobs = verify(store, ref.name, ref.version, Keyring.from_dir(keyring))
    except (ArtifactError, OSError, ValueError) as exc:
        raise ConfigError(f"worker {w.id}: model {w.model_ref}: {exc}") from None
    root = host.path("artifacts", w.id)
    r_store, r_ring = posixpath.join(root, "store"), posixpath.join(root, "keyring")
    manifest = manifest_path(store, ref.name, ref.version)
    r_manifest = str(manifest_path(r_store, ref.name, ref.version))
    await host.run_args(
        [
            "mkdir",
            "-p",
            posixpath.dirname(r_manifest),
            posixpath.join(r_store, "blobs", "sha256"),
            r_ring,
        ]
    )
    have = await host.listdir(posixpath.join(r_store, "blobs", "sha256"))
    for path in blobs.values():
        digest = path.name
        if have.get(digest) != path.stat().st_size:
            await host.put(path, str(blob_path(r_store, digest)))
    await host.put(manifest, r_manifest)
    for pub in sorted(keyring.glob("*.pub")):
        await host.put(pub, posixpath.join(r_ring, pub.name))
    return {"artifact_store": r_store, "keyring": r_ring}


async def push_config(host: Host, plan: Plan) -> str:
    """The cluster YAML as this host's services read it (paths rewritten to copies)."""
    c = plan.config.cluster
    data: dict[str, Any] = c.model_dump(mode="json", exclude_unset=True)
    data.pop("cluster_ca", None)  # the CA's key stays with the operator
    data["internal_tls"] = plan.tls
    files = host.path("etc", "files")
    await host.run_args(["mkdir", "-p", files])
    if c.gateway_tls is not None:
        for part in ("cert", "key"):
            remote = posixpath.join(files, f"gateway-tls.{part}.pem")
            local = plan.local_path(getattr(c.gateway_tls, part))
            await _copy_file(host, local, remote, secret=part == "key")
            data["gateway_tls"][part] = remote
    if c.auth.jwt is not None and c.auth.jwt.key_file is not None:
        remote = posixpath.join(files, "jwt.key")
        await _copy_file(host, plan.local_path(c.auth.jwt.key_file), remote, secret=True)
        data["auth"]["jwt"]["key_file"] = remote
    if c.store_ca is not None:
        remote = posixpath.join(files, "store-ca.pem")
        await _copy_file(host, plan.local_path(c.store_ca), remote, secret=False)
        data["store_ca"] = remote
    for entry in data.get("workers", []):  # workers load their files from their own flags
        for key in ("artifact_store", "keyring", "profiles"):
            entry.pop(key, None)
    path = host.path("etc", "cluster.yaml")
    await host.write(path, yaml.safe_dump(data, sort_keys=False).encode(), 0o600)
    return path


async def worker_files(host: Host, plan: Plan, w: WorkerConfig) -> WorkerConfig:
    """``w`` with its files (profiles, model artifacts) copied to the host, paths remote."""
    update: dict[str, str] = {}
    if w.profiles is not None:
        remote = host.path("etc", "files", f"profiles-{key_file_stem(w.id)}.yaml")
        await host.run_args(["mkdir", "-p", host.path("etc", "files")])
        await _copy_file(host, plan.local_path(w.profiles), remote, secret=False)
        update["profiles"] = remote
    if w.artifact_store is not None:
        update |= await push_artifacts(host, plan, w)
    return w.model_copy(update=update)


async def write_specs(
    host: Host, plan: Plan, venv: str, ids: Identities, config_path: str
) -> list[Spec]:
    """The supervisor spec of each service on ``host`` (written, 0600)."""
    c = plan.config.cluster
    listen = host.config.address
    etc = Path(host.path("etc"))
    monitor: dict[str, str | None] = {"monitor_cert": None, "monitor_key": None}
    if ids.keys is None:
        tls = host.path("etc", "tls")
        monitor = {
            "monitor_cert": posixpath.join(tls, ids.certs[MONITOR].cert.name),
            "monitor_key": posixpath.join(tls, ids.certs[MONITOR].key.name),
        }
    specs: list[Spec] = []
    serving = gateway_serving_args(c, None)
    if c.gateway_tls is not None:
        files = host.path("etc", "files")
        serving = [
            *serving[:2],
            *("--tls-cert", posixpath.join(files, "gateway-tls.cert.pem")),
            *("--tls-key", posixpath.join(files, "gateway-tls.key.pem")),
        ]
    workers = {w.id: w for w in c.workers}
    for s in plan.on(host.config):
        restart: list[str] = []
        timeout = plan.config.health_timeout_s
        if s.kind == "orchestrator":
            journal = "journal" if s.name == "orchestrator" else "journal2"
            args = orchestrator_args(
                c.model_copy(update={"orchestrator_port": s.port}),
                host=listen,
                port=s.port,
                store=store_url(c, config_path, Path(host.path("data"))),
                journal=Path(host.path("data", journal)),
                identity=remote_identity_args(host, "orchestrator", ids),
                config_path=config_path,
                serving=serving,
            )
        elif s.kind == "worker":
            w = await worker_files(host, plan, workers[s.name])
            args = [*worker_args(w, plan.orchestrator_url, s.port, etc, plan.standby_url)]
            args += ["--host", listen, *remote_identity_args(host, identity_name(s), ids)]
            if w.engine == "synthetic" and w.timing != "fixed":
                restart = ["--cold-start"]
            timeout = max(timeout, w.start_timeout())
        else:
            args = gateway_args(
                c.model_copy(update={"gateway_port": s.port}),
                host=listen,
                orchestrator_url=plan.orchestrator_url,
                standby_url=plan.standby_url,
                identity=remote_identity_args(host, "gateway", ids),
                config_path=config_path,
                serving=serving,
            )
        spec = Spec(
            name=s.name,
            kind=s.kind,
            args=args,
            url=s.url,
            start_timeout_s=timeout,
            drain_s=plan.config.drain_timeout_s,
            restart_args=restart,
            bind_host=listen if s.kind == "gateway" else None,
            bind_port=s.port if s.kind == "gateway" else None,
            python=posixpath.join(venv, "bin", "python"),
            cluster=plan.config.name,
            **monitor,
        )
        body = json.dumps(dataclasses.asdict(spec), indent=2).encode()
        await host.write(host.path("run", f"{_file(s.name)}.json"), body, 0o600)
        specs.append(spec)
    return specs


def _file(name: str) -> str:
    from haif.runtime.supervisor import log_name

    return log_name(name)


async def supervise(host: Host, venv: str, action: str, name: str | None = None) -> Any:
    """``haif supervise ACTION`` on the host; its JSON answer."""
    args = [posixpath.join(venv, "bin", "python"), "-m", "haif.deploy.supervise", action]
    args += [name] if name else []
    args += ["--dir", host.dir]
    if action == "start":
        args += [
            "--via",
            {"auto": "auto", "systemd": "systemd"}.get(host.config.supervisor, "detached"),
        ]
    out = await host.run_args(args, what=f"haif supervise {action} {name or ''}".strip())
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeployError(f"host {host.config.name}: haif supervise {action}: {out!r}") from None


@overload
async def current_venv(host: Host, missing_ok: Literal[False] = False) -> str: ...
@overload
async def current_venv(host: Host, missing_ok: bool) -> str | None: ...
async def current_venv(host: Host, missing_ok: bool = False) -> str | None:
    """The virtualenv the host's services run (``DeployError`` when never deployed,
    or None with ``missing_ok``)."""
    await host.resolve_dir()
    out = await host.run(f"readlink {shlex.quote(host.path('current'))} || true")
    if not out.strip():
        if missing_ok:
            return None
        raise DeployError(f"host {host.config.name}: nothing deployed in {host.dir}")
    return host.path(out.strip())


async def set_current(host: Host, venv: str) -> None:
    rel = posixpath.relpath(venv, host.dir)
    await host.run_args(["ln", "-sfn", rel, host.path("current")])


async def gather(*aws: Any) -> list[Any]:
    """``asyncio.gather`` that lets every task finish, then raises the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)
