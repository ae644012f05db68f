"""A scenario's fault schedule as data: one plan that both shells execute.

:func:`plan_faults` turns ``scenario.faults`` into :class:`FaultWindow`s —
what is faulted, from when to when — over the fleet the caller has
(worker ids and gateway ids, each with its region). The simulator executes
a window with SimPy timeouts (a worker goes down, a link is cut); the
runtime with process actions on a ``haif up`` cluster (SIGKILL, SIGSTOP).
Victims of a ``count`` / ``fraction`` fault are drawn by
:func:`~haif.fleet.targets.pick_workers` from the fault's own seeded
generator, so both shells fault the same workers.

Window kinds:

- ``down``: workers ``targets`` crash at ``start_s`` and restart at ``end_s``
  (``worker_crash``, ``region_outage``);
- ``slow``: workers ``targets`` run ``factor`` times slower (``gray_failure``);
- ``gateway_down``: gateways ``targets`` are down;
- ``partition``: no traffic between regions ``targets[0]`` and ``targets[1]``;
- ``store_out``: the metadata store is out in region ``targets[0]`` (or in
  every region when ``targets`` is empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from haif.fleet.scenario import (
    GatewayDown,
    GrayFailure,
    Partition,
    RegionOutage,
    Scenario,
    StoreOutage,
    WorkerCrash,
)
from haif.fleet.targets import pick_workers

WindowKind = Literal["down", "slow", "gateway_down", "partition", "store_out"]


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """Fault ``index`` of the scenario (its ``source`` kind) over ``[start_s, end_s)``."""

    index: int
    source: str  # the scenario's fault kind: worker_crash, region_outage, ...
    kind: WindowKind
    targets: tuple[str, ...]
    start_s: float
    end_s: float
    factor: float = 1.0
    label: str = ""


def plan_faults(
    scenario: Scenario,
    workers: Sequence[tuple[str, str]],
    gateways: Sequence[tuple[str, str]] = (),
) -> list[FaultWindow]:
    """The windows of ``scenario.faults`` over ``workers`` and ``gateways`` (``(id, region)``)."""
    plan: list[FaultWindow] = []
    seed = scenario.seed
    for i, fault in enumerate(scenario.faults):
        factor = 1.0
        if isinstance(fault, WorkerCrash):
            names = pick_workers(
                seed, i, workers, fault.ids, fault.region, fault.count, fault.fraction
            )
            kind: WindowKind = "down"
            start, end = fault.at_s, fault.at_s + fault.restart_s
            label = f"{len(names)} worker(s) crash"
        elif isinstance(fault, RegionOutage):
            names = pick_workers(seed, i, workers, (), fault.region, None)
            kind, start, end, label = "down", fault.start_s, fault.end_s, f"{fault.region} out"
        elif isinstance(fault, GrayFailure):
            names = pick_workers(seed, i, workers, fault.ids, fault.region, fault.count)
            kind, start, end, factor = "slow", fault.start_s, fault.end_s, fault.factor
            label = f"{len(names)} worker(s) {fault.factor:g}x slow"
        elif isinstance(fault, GatewayDown):
            names = [gid for gid, region in gateways if region == fault.region]
            kind, start, end = "gateway_down", fault.start_s, fault.end_s
            label = f"{fault.region} gateway down"
        elif isinstance(fault, Partition):
            names = [fault.a, fault.b]
            kind, start, end = "partition", fault.start_s, fault.end_s
            label = f"{fault.a} | {fault.b} partition"
        else:
            assert isinstance(fault, StoreOutage)
            names = [fault.region] if fault.region else []
            kind, start, end = "store_out", fault.start_s, fault.end_s
            label = f"store out ({fault.region or 'all regions'})"
        plan.append(FaultWindow(i, fault.kind, kind, tuple(names), start, end, factor, label))
    return plan
