"""The deploy YAML: the hosts, how to reach them, and which service runs where.

A deploy file is a cluster YAML (:class:`~haif.runtime.cluster.ClusterConfig`,
under ``cluster:``) plus ``hosts:``, each an SSH destination (address, port,
user, key file, known-hosts file), an install directory and the services it
runs (``gateway``, ``orchestrator``, ``orchestrator2`` for the standby of
``orchestrators: 2``, and worker ids). Every service is placed exactly once,
except the gateway, which may run on several hosts.

Services listen on their host's address and reach each other there (never
127.0.0.1): :func:`plan` gives each one its port (the cluster YAML's, else a
fixed default: workers share a host without colliding) and URL, built by the
same :func:`~haif.runtime.cluster.service_url` as ``haif up``.

``haif deploy`` encrypts every hop by default (``internal_tls``: mutual TLS
1.3 with certificates from the cluster CA); ``insecure_plain_internal_http:
true`` is the explicit opt-out, and every command then says so loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from haif.configfile import ConfigError, load_model
from haif.runtime.cluster import ClusterConfig, beside, gateway_auth, service_url
from haif.runtime.supervisor import ServiceKind

Port = Annotated[int, Field(ge=1, le=65535)]
#: Default ports where the cluster YAML leaves one at 0 (a free one, for ``haif up``):
#: a remote service needs a port known before it starts.
ORCHESTRATOR_PORT = 7070
STANDBY_PORT = 7071
WORKER_PORT = 7100
#: What every command prints when the opt-out is taken.
PLAIN_HTTP_WARNING = (
    "WARNING: insecure_plain_internal_http: true: every hop between the hosts is plain "
    "HTTP (prompts, completions and API-key lookups readable on the network), "
    "authenticated by Ed25519 seals only. Remove it to get mutual TLS on every hop."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostConfig(_Strict):
    """One machine: how to reach it over SSH, where to install, what it runs."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] = Field(
        description="a short name for messages and haif deploy logs HOST:SERVICE"
    )
    address: Annotated[str, Field(min_length=1)] = Field(
        description="the address SSH connects to, the services listen on and the other "
        "hosts reach them at"
    )
    port: Port = Field(default=22, description="the SSH port")
    user: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="the SSH user (default: the local user)"
    )
    key_file: Annotated[str, Field(min_length=1)] = Field(
        description="the SSH private key (relative to this file; ~ expands); never printed"
    )
    known_hosts: Annotated[str, Field(min_length=1)] = Field(
        description="a known_hosts file holding this host's key (relative to this file; "
        "~ expands): a host whose key is not there, or differs, is refused"
    )
    dir: Annotated[str, Field(min_length=1)] = Field(
        default="haif",
        description="the install directory on the host (relative: to the user's home); "
        "wheels, virtualenvs, configuration, keys, logs and data live under it",
    )
    python: Annotated[str, Field(min_length=1)] = Field(
        default="python3", description="the host's Python (>= 3.11) the virtualenv is made from"
    )
    supervisor: Literal["auto", "systemd", "detached"] = Field(
        default="auto",
        description="what keeps the services running after SSH disconnects: systemd user "
        "units, or a detached haif supervise per service; auto: systemd where "
        "systemctl --user works",
    )
    services: Annotated[tuple[str, ...], Field(min_length=1)] = Field(
        description="the services it runs: gateway, orchestrator, orchestrator2 (the "
        "standby of orchestrators: 2) and worker ids"
    )

    def destination(self) -> str:
        return f"{self.user or _local_user()}@{self.address}:{self.port}"


def _local_user() -> str:
    import getpass

    return getpass.getuser()


class DeployConfig(_Strict):
    """A cluster on several machines: what ``haif deploy`` installs and starts."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")] = Field(
        default="haif", description="the cluster's name (systemd unit names; local state)"
    )
    hosts: Annotated[tuple[HostConfig, ...], Field(min_length=1)] = Field(
        description="the machines and the services each runs"
    )
    cluster: ClusterConfig = Field(
        default=ClusterConfig(),
        description="the cluster itself, as a haif up cluster YAML (host is set per host)",
    )
    insecure_plain_internal_http: bool = Field(
        default=False,
        description="true: plain HTTP between the services, sealed but readable on the "
        "network (loudly warned). Default: mutual TLS 1.3 on every hop",
    )
    health_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, description="seconds to wait for a started service's health check"
    )
    drain_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=30.0,
        description="upgrade and stop: seconds a worker may take to finish its attempts",
    )

    @model_validator(mode="after")
    def _placement(self) -> DeployConfig:
        c = self.cluster
        if "host" in c.model_fields_set:
            raise ValueError("cluster.host: set per host by haif deploy (hosts[].address)")
        if "internal_tls" in c.model_fields_set:
            raise ValueError(
                "cluster.internal_tls: haif deploy always uses mutual TLS; to opt out, set "
                "insecure_plain_internal_http: true"
            )
        if c.colocate_gateway:
            raise ValueError("cluster.colocate_gateway: not supported by haif deploy")
        if c.cluster_ca is not None and self.insecure_plain_internal_http:
            raise ValueError("cluster.cluster_ca: unused with insecure_plain_internal_http")
        wanted = ["orchestrator", *(["orchestrator2"] if c.orchestrators == 2 else [])]
        wanted += [w.id for w in c.workers]
        names = [h.name for h in self.hosts]
        placed: dict[str, int] = {}
        for i, host in enumerate(self.hosts):
            if names.count(host.name) > 1:
                raise ValueError(f"hosts.{i}.name: {host.name!r} names two hosts")
            for name in host.services:
                if name != "gateway" and name not in wanted:
                    raise ValueError(
                        f"hosts.{i}.services: no service {name!r} in the cluster "
                        f"(services: gateway, {', '.join(wanted)})"
                    )
                if name in placed and (name != "gateway" or placed[name] == i):
                    raise ValueError(f"hosts.{i}.services: {name!r} is placed twice")
                placed[name] = i
        missing = [n for n in ["gateway", *wanted] if n not in placed]
        if missing:
            raise ValueError(f"hosts: no host runs {', '.join(missing)}")
        return self


@dataclass(frozen=True)
class Placed:
    """One service on one host: its port and its URL (as the other services reach it)."""

    name: str
    kind: ServiceKind
    host: HostConfig
    port: int
    url: str

    @property
    def label(self) -> str:
        return f"{self.host.name}:{self.name}"


@dataclass(frozen=True)
class Plan:
    """Where everything of a :class:`DeployConfig` runs."""

    config: DeployConfig
    #: The deploy YAML's directory: relative paths in it are relative to this.
    base: Path
    services: tuple[Placed, ...]

    @property
    def tls(self) -> bool:
        return not self.config.insecure_plain_internal_http

    def on(self, host: HostConfig) -> list[Placed]:
        return [s for s in self.services if s.host.name == host.name]

    def named(self, name: str) -> Placed:
        return next(s for s in self.services if s.name == name)

    @property
    def orchestrator_url(self) -> str:
        return self.named("orchestrator").url

    @property
    def standby_url(self) -> str | None:
        return self.named("orchestrator2").url if self.config.cluster.orchestrators == 2 else None

    def gateway_urls(self) -> list[str]:
        scheme = "https" if self.config.cluster.gateway_tls is not None else "http"
        return [
            service_url(s.host.address, s.port, scheme)
            for s in self.services
            if s.kind == "gateway"
        ]

    def find(self, label: str) -> list[Placed]:
        """The services ``label`` names: ``SERVICE`` (all hosts) or ``HOST:SERVICE``."""
        host, sep, name = label.rpartition(":")
        found = [s for s in self.services if s.name == name and (not sep or s.host.name == host)]
        if not found:
            known = ", ".join(s.label for s in self.services)
            raise ConfigError(f"no service {label!r}; services are {known}")
        return found

    def local_path(self, path: str) -> Path:
        """A path of the deploy YAML on this machine (``~`` expanded, relative to the file)."""
        return beside(self.base, os.path.expanduser(path))


def plan(config: DeployConfig, base: Path) -> Plan:
    """Each service's host, port and URL (the order services start in: orchestrators,
    workers, gateways)."""
    c = config.cluster
    scheme = "http" if config.insecure_plain_internal_http else "https"
    host_of = {name: h for h in config.hosts for name in h.services if name != "gateway"}
    out: list[Placed] = []

    client_scheme = "https" if c.gateway_tls is not None else "http"

    def place(name: str, kind: ServiceKind, host: HostConfig, port: int) -> None:
        url = service_url(host.address, port, scheme if kind != "gateway" else client_scheme)
        out.append(Placed(name, kind, host, port, url))

    place(
        "orchestrator",
        "orchestrator",
        host_of["orchestrator"],
        c.orchestrator_port or ORCHESTRATOR_PORT,
    )
    if c.orchestrators == 2:
        place(
            "orchestrator2",
            "orchestrator",
            host_of["orchestrator2"],
            c.standby_port or STANDBY_PORT,
        )
    per_host: dict[str, int] = {}
    for w in c.workers:
        host = host_of[w.id]
        index = per_host.get(host.name, 0)
        per_host[host.name] = index + 1
        place(w.id, "worker", host, w.port or WORKER_PORT + index)
    for host in config.hosts:
        if "gateway" in host.services:
            place("gateway", "gateway", host, c.gateway_port)
    for host in config.hosts:
        ports = [s.port for s in out if s.host.name == host.name]
        for port in ports:
            if ports.count(port) > 1:
                clash = [s.name for s in out if s.host.name == host.name and s.port == port]
                raise ConfigError(f"host {host.name}: {' and '.join(clash)} both use port {port}")
    return Plan(config, base, tuple(out))


def load_deploy(path: str | Path) -> Plan:
    """Read and check a deploy YAML; ``ConfigError`` names the file, line and field."""
    config = load_model(DeployConfig, path)
    base = Path(path).resolve().parent
    try:
        gateway_auth(config.cluster.auth, base)
    except ValueError as exc:
        raise ConfigError(f"{path}: cluster.{exc}") from None
    try:
        return plan(config, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def iter_hosts(plan_: Plan, only: str | None = None) -> Iterator[HostConfig]:
    """The hosts (``only``: the one of that name; ``ConfigError`` if none is)."""
    hosts = [h for h in plan_.config.hosts if only is None or h.name == only]
    if not hosts:
        raise ConfigError(
            f"no host {only!r}; hosts are {', '.join(h.name for h in plan_.config.hosts)}"
        )
    yield from hosts
