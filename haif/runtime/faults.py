"""A scenario's fault schedule, executed against a live ``haif up`` cluster.

The simulator's faults become process actions through the cluster's control
endpoint (:mod:`haif.runtime.supervisor`): a crash is SIGKILL and, after
``restart_s``, the same command line again; a region outage kills every
worker of the region for the window; a gray failure (``factor`` times
slower) freezes the victims with SIGSTOP for ``1 - 1/factor`` of every
``GRAY_PERIOD_S``; ``gateway_down`` kills the region's gateway for the
window. Victims are chosen exactly as the simulator chooses them
(:func:`haif.sim.targets.pick_workers`), so the workers of the cluster must
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
from dataclasses import dataclass
from typing import Any

import aiohttp

from haif.configfile import ConfigError
from haif.sim.scenario import (
    GatewayDown,
    GrayFailure,
    RegionOutage,
    Scenario,
    WorkerCrash,
)
from haif.sim.targets import pick_workers

#: A gray failure's stop / continue cycle.
GRAY_PERIOD_S = 0.2
log = logging.getLogger("haif.faults")


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """Services ``names`` are faulted from ``start_s`` to ``end_s`` (trace time)."""

    index: int
    kind: str  # "down" (killed, then started again) or "gray"
    names: tuple[str, ...]
    start_s: float
    end_s: float
    factor: float = 1.0
    label: str = ""


def plan_faults(scenario: Scenario, services: Sequence[dict[str, Any]]) -> list[FaultWindow]:
    """The windows of ``scenario.faults`` over the cluster's ``services`` (its control table)."""
    workers = [(s["name"], s["region"]) for s in services if s["kind"] == "worker"]
    gateways = [(s["name"], s["region"]) for s in services if s["kind"] == "gateway"]
    plan: list[FaultWindow] = []
    for i, fault in enumerate(scenario.faults):
        if isinstance(fault, WorkerCrash):
            names = pick_workers(
                scenario.seed, i, workers, fault.ids, fault.region, fault.count, fault.fraction
            )
            end = fault.at_s + fault.restart_s
            plan.append(
                FaultWindow(i, "down", tuple(names), fault.at_s, end, label=f"{names} crash")
            )
        elif isinstance(fault, RegionOutage):
            names = pick_workers(scenario.seed, i, workers, (), fault.region, None)
            if not names:
                raise ConfigError(f"faults.{i}: the cluster has no worker in {fault.region!r}")
            plan.append(
                FaultWindow(
                    i, "down", tuple(names), fault.start_s, fault.end_s, label=f"{fault.region} out"
                )
            )
        elif isinstance(fault, GrayFailure):
            names = pick_workers(scenario.seed, i, workers, fault.ids, fault.region, fault.count)
            plan.append(
                FaultWindow(
                    i,
                    "gray",
                    tuple(names),
                    fault.start_s,
                    fault.end_s,
                    fault.factor,
                    label=f"{names} {fault.factor:g}x slow",
                )
            )
        elif isinstance(fault, GatewayDown):
            names = [name for name, region in gateways if region == fault.region]
            if not names:
                raise ConfigError(
                    f"faults.{i}: the cluster has no gateway process in {fault.region!r} "
                    "(with colocate_gateway the gateway lives in the orchestrator's "
                    "process and cannot go down alone)"
                )
            plan.append(
                FaultWindow(
                    i,
                    "down",
                    tuple(names),
                    fault.start_s,
                    fault.end_s,
                    label=f"{fault.region} gateway down",
                )
            )
        else:
            raise ConfigError(
                f"faults.{i}: a {fault.kind!r} fault cannot be executed on a local cluster "
                "(no inter-region links or separate store process to act on); live faults "
                "are worker_crash, region_outage, gray_failure and gateway_down"
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
        await note(f"fault {w.index} begins: {w.label}")
        if w.kind == "down":
            await each(w.names, "kill")
            await at(w.end_s)
            await each(w.names, "start")
        else:
            stopped = 1.0 - 1.0 / w.factor
            try:
                while loop.time() < t0 + w.end_s / speed:
                    await each(w.names, "stop")
                    await asyncio.sleep(GRAY_PERIOD_S * stopped)
                    await each(w.names, "cont")
                    await asyncio.sleep(GRAY_PERIOD_S * (1.0 - stopped))
            finally:
                with contextlib.suppress(Exception):
                    await each(w.names, "cont")
        await note(f"fault {w.index} ends: {w.label}")

    await asyncio.gather(*(window(w) for w in plan))
