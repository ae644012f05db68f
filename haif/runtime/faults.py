"""A scenario's fault schedule, executed against a live ``haif up`` cluster.

The simulator's faults become process actions through the cluster's control
endpoint (:mod:`haif.runtime.supervisor`): a crash is SIGKILL and, after
``restart_s``, the same command line again; a region outage kills every
worker of the region for the window; a gray failure (``factor`` times
slower) freezes the victims with SIGSTOP for ``1 - 1/factor`` of every
``GRAY_PERIOD_S``; ``gateway_down`` kills the region's gateway for the
window. Victims are chosen exactly as the simulator chooses them
(:func:`haif.fleet.faults.plan_faults`), so the workers of the cluster must
carry the scenario's worker ids (``haif parity`` builds such a cluster).

A network partition and a store outage have no process to act on in a
one-machine cluster on loopback: such a scenario is refused with a message
naming the fault, before anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp

from haif.configfile import ConfigError
from haif.fleet.faults import FaultWindow, plan_faults
from haif.fleet.scenario import Scenario

#: A gray failure's stop / continue cycle.
GRAY_PERIOD_S = 0.2
log = logging.getLogger("haif.faults")


def live_plan(scenario: Scenario, services: Sequence[dict[str, Any]]) -> list[FaultWindow]:
    """The scenario's fault plan over a cluster's ``services`` (its control table).

    Refuses, naming the fault, what a one-machine cluster cannot execute:
    a partition or a store outage, a region outage with no worker there, a
    ``gateway_down`` with no gateway process in its region.
    """
    workers = [(s["name"], s["region"]) for s in services if s["kind"] == "worker"]
    gateways = [(s["name"], s["region"]) for s in services if s["kind"] == "gateway"]
    plan = plan_faults(scenario, workers, gateways)
    for w in plan:
        where = f"faults.{w.index}"
        if w.kind in ("partition", "store_out"):
            raise ConfigError(
                f"{where}: a {w.source!r} fault cannot be executed on a local cluster "
                "(no inter-region links or separate store process to act on); live faults "
                "are worker_crash, region_outage, gray_failure and gateway_down"
            )
        if w.source == "region_outage" and not w.targets:
            region = scenario.faults[w.index].region  # type: ignore[union-attr]
            raise ConfigError(f"{where}: the cluster has no worker in {region!r}")
        if w.kind == "gateway_down" and not w.targets:
            region = scenario.faults[w.index].region  # type: ignore[union-attr]
            raise ConfigError(
                f"{where}: the cluster has no gateway process in {region!r} "
                "(with colocate_gateway the gateway lives in the orchestrator's "
                "process and cannot go down alone)"
            )
    return plan


class ClusterControl:
    """Client of a ``haif up`` control endpoint (see :mod:`haif.runtime.supervisor`)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    async def services(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}/services", headers=self._headers) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise ConfigError(f"cluster control: {body.get('error', resp.status)}")
            services: list[dict[str, Any]] = body["services"]
            return services

    async def act(self, name: str, action: str) -> None:
        url = f"{self.url}/services/{name}/{action}"
        async with self.session.post(url, headers=self._headers) as resp:
            if resp.status != 200:
                body = await resp.json(content_type=None)
                raise ConfigError(f"cluster control: {action} {name}: {body.get('error')}")


async def run_faults(
    plan: Sequence[FaultWindow],
    control: ClusterControl,
    *,
    t0: float,
    speed: float = 1.0,
    log_event: Any = None,
) -> None:
    """Execute ``plan`` on the loop's clock, trace time 0 at loop time ``t0``."""
    loop = asyncio.get_running_loop()

    async def at(trace_s: float) -> None:
        await asyncio.sleep(max(0.0, t0 + trace_s / speed - loop.time()))

    async def note(text: str) -> None:
        log.info("%s", text)
        if log_event is not None:
            log_event(text)

    async def each(names: Sequence[str], action: str) -> None:
        await asyncio.gather(*(control.act(name, action) for name in names))

    async def window(w: FaultWindow) -> None:
        await at(w.start_s)
        await note(f"fault {w.index} begins: {w.label} {list(w.targets)}")
        if w.kind in ("down", "gateway_down"):
            await each(w.targets, "kill")
            await at(w.end_s)
            await each(w.targets, "start")
        else:
            stopped = 1.0 - 1.0 / w.factor
            try:
                while loop.time() < t0 + w.end_s / speed:
                    await each(w.targets, "stop")
                    await asyncio.sleep(GRAY_PERIOD_S * stopped)
                    await each(w.targets, "cont")
                    await asyncio.sleep(GRAY_PERIOD_S * (1.0 - stopped))
            finally:
                with contextlib.suppress(Exception):
                    await each(w.targets, "cont")
        await note(f"fault {w.index} ends: {w.label}")

    await asyncio.gather(*(window(w) for w in plan))
