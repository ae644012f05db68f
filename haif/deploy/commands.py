"""What ``haif deploy`` does: install, start, watch, upgrade and stop a cluster on SSH hosts.

::

    haif deploy CLUSTER.yaml                  build, copy, install, start; print the endpoints
    haif deploy status CLUSTER.yaml           each service on each host: state, health
    haif deploy logs CLUSTER.yaml SERVICE     its log (-f: follow); SERVICE or HOST:SERVICE
    haif deploy upgrade CLUSTER.yaml          rolling: workers, orchestrators, gateways
    haif deploy stop CLUSTER.yaml             gateways, workers, then orchestrators

The operator's side keeps the cluster's identities in
``<the YAML's directory>/.haif-deploy/<name>/`` (mode 0700): the cluster CA
and the services' certificates (``tls/``), or, with the plain-HTTP opt-out,
the cluster keys (``keys/``). They are made on the first deploy and reused
after, so an upgrade keeps the CA the services trust.

*Rolling upgrade.* The new haif wheel goes to every host and into a new
virtualenv beside the running one; then each service is replaced by one from
the new virtualenv, one at a time, each waited for until healthy: the workers
first (each drained: out of placement, its attempts finished, then stopped;
the others carry the load), then the orchestrators (the standby of
``orchestrators: 2`` first, then the leader, whose requests the standby takes
over), then the gateways (the new one accepts on the socket the supervisor
holds, beside the old one, which then hands its clients over and drains).
With one orchestrator its replacement is a short outage: requests sent
meanwhile fail; ``orchestrators: 2`` avoids it.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from haif.configfile import ConfigError
from haif.deploy import remote
from haif.deploy.config import PLAIN_HTTP_WARNING, Placed, Plan
from haif.deploy.ssh import Host, connect

STATE_DIR = ".haif-deploy"
console = Console(soft_wrap=True, highlight=False)


def identities(plan: Plan) -> remote.Identities:
    """The cluster's certificates (or keys, with the opt-out), made on the first deploy."""
    from haif.runtime.cluster import SERVICE_KEYS
    from haif.runtime.cluster_keys import ensure_cluster_keys
    from haif.runtime.cluster_tls import MONITOR, ensure_cluster_certs

    state = plan.base / STATE_DIR / plan.config.name
    state.mkdir(parents=True, exist_ok=True)
    state.parent.chmod(0o700)
    state.chmod(0o700)
    c = plan.config.cluster
    names = [*SERVICE_KEYS, *(w.id for w in c.workers)]
    try:
        if not plan.tls:
            ensure_cluster_keys(state / "keys", names)
            return remote.Identities({}, state / "keys")
        ca_files = None
        if c.cluster_ca is not None:
            ca_files = (plan.local_path(c.cluster_ca.cert), plan.local_path(c.cluster_ca.key))
        hosts = sorted({h.address for h in plan.config.hosts})
        return remote.Identities(
            ensure_cluster_certs(state / "tls", [*names, MONITOR], ca_files, hosts=hosts)
        )
    except ValueError as exc:
        raise ConfigError(f"cluster.workers: {exc}") from None


async def _connect_all(plan: Plan) -> list[Host]:
    """Every host, connected (all host keys checked before anything is done)."""
    results = await asyncio.gather(
        *(connect(plan, h) for h in plan.config.hosts), return_exceptions=True
    )
    hosts = [r for r in results if isinstance(r, Host)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for h in hosts:
            h.close()
        raise errors[0]
    return hosts


async def _prepare(plan: Plan, say: Callable[[str], None]) -> tuple[list[Host], dict[str, str]]:
    """Connect, build and copy the wheels, make the virtualenvs, push configuration,
    identities, artifacts and the services' specs; the hosts and each one's venv."""
    from haif.deploy import wheels

    hosts = await _connect_all(plan)
    try:
        ids = identities(plan)
        house = await asyncio.to_thread(wheels.build, None, say)

        async def one(host: Host) -> str:
            venv = await remote.install(host, house, say)
            await remote.push_identities(host, plan.on(host.config), ids)
            config_path = await remote.push_config(host, plan)
            await remote.write_specs(host, plan, venv, ids, config_path)
            return venv

        venvs = await remote.gather(*(one(h) for h in hosts))
    except BaseException:
        for h in hosts:
            h.close()
        raise
    return hosts, {h.config.name: v for h, v in zip(hosts, venvs, strict=True)}


async def _prepare_with_progress(plan: Plan) -> tuple[list[Host], dict[str, str]]:
    """:func:`_prepare` with a spinner naming the step under way (on a terminal)."""
    with console.status("[bold]connecting to the hosts") as status:

        def say(message: str) -> None:
            console.print(message)
            status.update(f"[bold]{message}")

        return await _prepare(plan, say)


def _by_name(hosts: list[Host]) -> dict[str, Host]:
    return {h.config.name: h for h in hosts}


async def deploy(plan: Plan) -> int:
    hosts, venvs = await _prepare_with_progress(plan)
    try:
        by = _by_name(hosts)
        before = {h.config.name: await remote.current_venv(h, missing_ok=True) for h in hosts}
        kept: set[str] = set()

        async def start(s: Placed) -> None:
            answer = await remote.supervise(by[s.host.name], venvs[s.host.name], "start", s.name)
            how = answer.get("how", "")
            console.print(f"{s.label}: {answer.get('state')} ({how}) at {s.url}")
            if how == "already running":
                kept.add(s.host.name)

        # The orchestrators first (the others connect to them), then the workers, then
        # the gateways; each waited for until healthy, those of one kind at once.
        for kind in ("orchestrator", "worker", "gateway"):
            await remote.gather(*(start(s) for s in plan.services if s.kind == kind))
        for host in hosts:
            name = host.config.name
            if name in kept and before[name] not in (None, venvs[name]):
                console.print(
                    f"{name}: services already running kept their build; "
                    "haif deploy upgrade replaces them with this one"
                )
            else:
                await remote.set_current(host, venvs[name])
        _endpoints(plan)
    finally:
        for h in hosts:
            h.close()
    return 0


async def upgrade(plan: Plan) -> int:
    hosts, venvs = await _prepare_with_progress(plan)
    try:
        by = _by_name(hosts)
        leader = await _leader(plan, by, venvs)
        kinds = ("worker", "orchestrator", "gateway")
        # The standby before the leader: one takeover, not two.
        order = sorted(plan.services, key=lambda s: (kinds.index(s.kind), s.name == leader))
        for s in order:
            host = by[s.host.name]
            role = f" (the {'leader' if s.name == leader else 'standby'})" if leader else ""
            console.print(f"{s.label}: replacing{role}")
            answer = await remote.supervise(host, venvs[s.host.name], "reload", s.name)
            console.print(
                f"{s.label}: {answer.get('state')} (generation {answer.get('generation')})"
            )
        for host in hosts:
            await remote.set_current(host, venvs[host.config.name])
        _endpoints(plan)
    finally:
        for h in hosts:
            h.close()
    return 0


async def _leader(plan: Plan, by: dict[str, Host], venvs: dict[str, str]) -> str | None:
    """Which orchestrator of a standby pair leads now (None: one orchestrator, or unknown)."""
    if plan.config.cluster.orchestrators == 1:
        return None
    hosts = {s.host.name for s in plan.services if s.kind == "orchestrator"}
    for name in sorted(hosts):
        for row in await remote.supervise(by[name], venvs[name], "status"):
            if row.get("kind") == "orchestrator" and row.get("leader"):
                return str(row["name"])
    return None


async def _each_host(plan: Plan, action: str) -> list[tuple[Host, Any]]:
    hosts = await _connect_all(plan)
    try:
        venvs = await remote.gather(*(remote.current_venv(h) for h in hosts))
        if action == "stop":
            out: list[tuple[Host, Any]] = []
            by = _by_name(hosts)
            for kind in ("gateway", "worker", "orchestrator"):
                for s in plan.services:
                    if s.kind == kind:
                        host = by[s.host.name]
                        venv = venvs[hosts.index(host)]
                        out.append((host, await remote.supervise(host, venv, "stop", s.name)))
            return out
        answers = await remote.gather(
            *(remote.supervise(h, v, action) for h, v in zip(hosts, venvs, strict=True))
        )
        return list(zip(hosts, answers, strict=True))
    finally:
        for h in hosts:
            h.close()


async def status(plan: Plan) -> int:
    rows = await _each_host(plan, "status")
    table = Table(title=f"cluster {plan.config.name}")
    for col in ("host", "service", "kind", "state", "healthy", "ready", "pid", "restarts", "url"):
        table.add_column(col)
    bad = 0
    for host, services in rows:
        for r in services:
            ok = r["healthy"] and r["state"] == "running"
            bad += not ok
            table.add_row(
                host.config.name,
                r["name"],
                r["kind"],
                r["state"],
                "yes" if r["healthy"] else "[red]no[/]",
                ("yes" if r["ready"] else "no") + (" (leader)" if r.get("leader") else ""),
                str(r["pid"] or "-"),
                str(r["restarts"]),
                r["url"],
            )
    console.print(table)
    return 0 if bad == 0 else 1


async def stop(plan: Plan) -> int:
    for host, answer in await _each_host(plan, "stop"):
        state = "stopped" if answer.get("stopped") else "was not running"
        console.print(f"{host.config.name}:{answer.get('name')}: {state}")
    return 0


async def logs(plan: Plan, service: str, follow: bool, lines: int) -> int:
    from haif.deploy.supervise import log_path

    targets = plan.find(service)
    hosts = await _connect_all(plan)
    by = _by_name(hosts)
    try:

        async def stream(label: str, host: Host, name: str) -> None:
            await host.resolve_dir()
            path = str(log_path(Path(host.dir), name))
            cmd = ["tail", "-n", str(lines), *(["-F"] if follow else []), path]
            prefix = f"{label} | " if len(targets) > 1 else ""
            async with host.conn.create_process(shlex.join(cmd)) as proc:
                async for line in proc.stdout:
                    sys.stdout.write(prefix + str(line))
                    sys.stdout.flush()

        await asyncio.gather(*(stream(t.label, by[t.host.name], t.name) for t in targets))
    finally:
        for h in hosts:
            h.close()
    return 0


def _endpoints(plan: Plan) -> None:
    table = Table(title="endpoints")
    table.add_column("service")
    table.add_column("url")
    for url in plan.gateway_urls():
        reach = "ready" if _ready(url) else "not reachable from here"
        table.add_row("gateway (OpenAI API: /v1)", f"{url}  ({reach})")
    for s in plan.services:
        if s.kind != "gateway":
            table.add_row(s.label, s.url)
    console.print(table)
    if not plan.tls:
        console.print(f"[bold red]{PLAIN_HTTP_WARNING}[/]")


def _ready(url: str) -> bool:
    import ssl

    context = ssl.create_default_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=3, context=context) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False
