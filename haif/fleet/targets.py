"""Which workers a scenario has, and which of them each fault hits.

Shared by the simulator and by ``haif replay --faults`` against a live
cluster, so both name the workers the same way and a fault with ``count``
or ``fraction`` picks the same victims (the fault's own seeded generator
over the workers in scenario order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from haif.configfile import ConfigError
from haif.fleet.scenario import Scenario, WorkerGroup
from haif.seeding import derive_rng


class ScenarioWorker(NamedTuple):
    worker_id: str
    region: str
    group: WorkerGroup


def scenario_workers(scenario: Scenario) -> list[ScenarioWorker]:
    """Every worker of the fleet, ``<region>/<label>/<group>.<n>``, in scenario order."""
    return [
        ScenarioWorker(f"{group.region}/{group.label}/{gi}.{i}", group.region, group)
        for gi, group in enumerate(scenario.workers)
        for i in range(group.count)
    ]


def pick_workers(
    seed: int,
    index: int,
    workers: Sequence[tuple[str, str]],
    ids: Sequence[str] = (),
    region: str | None = None,
    count: int | None = None,
    fraction: float | None = None,
) -> list[str]:
    """The ids fault ``index`` hits among ``workers`` (``(id, region)`` in scenario order).

    Explicit ``ids`` (each must exist), else ``count`` / ``fraction`` of the
    workers of ``region`` (or of the fleet), else all of them, drawn with
    the generator ``derive_rng(seed, f"fault:{index}")``.
    """
    known = [wid for wid, _ in workers]
    if ids:
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(
                f"faults.{index}.ids: unknown worker(s) {unknown}; workers are {known}"
            )
        return list(ids)
    pool = [wid for wid, r in workers if region is None or r == region]
    n = len(pool)
    if count is not None:
        n = min(n, count)
    elif fraction is not None:
        n = max(1, round(fraction * len(pool)))
    return derive_rng(seed, f"fault:{index}").sample(pool, n)
