"""Sim == runtime: the same events through both drivers give the same decisions.

A seeded scenario (with a region outage, so retries, breakers, timeouts and
re-placement all happen) runs in the SimPy shell, which records every event
it fed the core and every decision it got back. The same events are then
replayed, at the same times, into the runtime's :class:`LoopDriver` on an
asyncio loop with a virtual clock. The decision sequences must be equal.

Presence is replayed too: the runtime's :class:`LoopPresence` gets the
heartbeats and decides the evictions itself (the sim's ``WorkerGone`` events
are left out of the replay), so both shells' presence drivers must evict the
same workers at the same times and feed their cores the same events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
from virtual_loop import VirtualTimeLoop

from haif.contracts import Decision, Event, Finalize, Heartbeat, WorkerGone
from haif.control.core import ControlCore
from haif.control.presence import Presence
from haif.fleet.scenario import Scenario, load_scenario
from haif.runtime.orchestrator import LoopDriver, LoopPresence
from haif.seeding import derive_rng
from haif.sim.driver import run_scenario

ROOT = Path(__file__).resolve().parent.parent


def _scenario(placement: str, seed: int) -> Scenario:
    return load_scenario(
        ROOT / "scenarios" / "failover.yaml",
        [
            f"seed={seed}",
            "duration_s=240",
            "drain_s=120",
            "workload.rate_scale=3",
            "faults.0.start_s=60",
            "faults.0.end_s=150",
            "workload.timeout_s=20",
            "policy.attempt_timeout_s=8",
            f"policy.placement={placement}",
        ],
    )


def _normalize(value: Any) -> Any:
    """Dataclasses to tuples, floats rounded (the clocks may differ by an ulp)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__name__,
            *(_normalize(getattr(value, f.name)) for f in dataclasses.fields(value)),
        )
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, tuple | list):
        return tuple(_normalize(v) for v in value)
    return value


class ExactTimeLoop(VirtualTimeLoop):
    """A virtual-clock loop that runs every timer at its own time.

    asyncio runs the timers due within its clock's resolution (1 ns) in one
    pass, at the first one's time; a replay must feed each event at the time
    the simulator did (presence timers and heartbeats may be closer than that).
    """

    def __init__(self) -> None:
        super().__init__()
        self._clock_resolution = 1e-12  # below any gap that matters, above an ulp up to ~8000 s


@dataclasses.dataclass
class Replay:
    decisions: list[tuple[float, Decision]]
    events: list[tuple[float, Event]]  # fed to the core, WorkerGone from its presence included


def replay_in_runtime(scenario: Scenario, region: str, events: list[tuple[float, Event]]) -> Replay:
    loop = ExactTimeLoop()
    try:
        taken: list[Decision] = []
        core = ControlCore(scenario.policy, derive_rng(scenario.seed, f"core:{region}"))
        driver = LoopDriver(loop, core, taken.append, keep_log=True)
        presence = LoopPresence(driver, Presence(scenario.heartbeat.presence()))

        # Events at the same instant go in one callback, in the sim's order;
        # heartbeats through the presence driver, which decides the evictions.
        def feed_all(batch: list[Event]) -> None:
            for event in batch:
                if isinstance(event, Heartbeat):
                    presence.heartbeat(event.snapshot)
                else:
                    driver.feed(event)

        ours: list[tuple[float, Event]] = [
            (t, e) for t, e in events if not isinstance(e, WorkerGone)
        ]
        for t, group in itertools.groupby(ours, key=lambda te: te[0]):
            loop.call_at(t, feed_all, [e for _, e in group])

        async def until_quiet() -> None:
            await asyncio.sleep(events[-1][0] + 1e-6)
            while core.in_flight() or core.next_deadline() is not None:
                await asyncio.sleep(1.0)

        loop.run_until_complete(until_quiet())
        presence.close()
        assert driver.decisions is not None and driver.events is not None
        assert [d for _, d in driver.decisions] == taken  # the sink saw every decision
        return Replay(driver.decisions, driver.events)
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("placement", "seed"),
    [("p2c", 1), ("jsq", 2), ("round_robin", 3), ("locality", 4), ("weighted_score", 5)],
)
def test_sim_and_runtime_drivers_decide_identically(placement: str, seed: int) -> None:
    scenario = _scenario(placement, seed)
    result = run_scenario(scenario, keep_log=True)
    assert result.events and result.decisions
    assert set(result.decisions) == set(scenario.control)  # one core per control region
    kinds = {type(d).__name__ for log in result.decisions.values() for _, d in log}
    # The run must exercise the interesting paths, or the test proves little.
    assert {"Dispatch", "RetryAt", "Finalize", "Cancel", "DeadLetter"} <= kinds, kinds
    # One record, one meaning: the Finalize decisions compared below carry the records
    # both shells persist, field by field, for every kind of history.
    records = [
        d.record for log in result.decisions.values() for _, d in log if isinstance(d, Finalize)
    ]
    assert {"ok", "dead_lettered", "timeout"} <= {r.status for r in records}
    assert any(r.status == "ok" and r.attempts > 1 and r.first_token_s for r in records)
    for region, sim_log in result.decisions.items():
        assert len(sim_log) > 300, region
        sim_events = result.events[region]
        # The outage is noticed by presence too: every us-east worker is evicted.
        gone = {e.worker_id for t, e in sim_events if isinstance(e, WorkerGone) and t > 60}
        assert {w for w in result.served_by_worker if w.startswith("us-east/")} <= gone, region
        assert [(t, e.worker_id) for t, e in sim_events if isinstance(e, WorkerGone)] == (
            result.evictions[region]
        )
        runtime = replay_in_runtime(scenario, region, sim_events)
        assert len(runtime.decisions) == len(sim_log), region
        for i, (sim_d, rt_d) in enumerate(zip(sim_log, runtime.decisions, strict=True)):
            assert _normalize(sim_d) == _normalize(rt_d), f"{region}: decision {i} differs"
        # The same evictions at the same times: everything the runtime's core
        # was fed up to the sim's last event is what the sim's core was fed.
        horizon = sim_events[-1][0]
        runtime_events = [(t, e) for t, e in runtime.events if t <= horizon]
        assert len(runtime_events) == len(sim_events), region
        for i, (sim_e, rt_e) in enumerate(zip(sim_events, runtime_events, strict=True)):
            assert _normalize(sim_e) == _normalize(rt_e), f"{region}: event {i} differs"


def test_replay_detects_a_different_policy() -> None:
    """The comparison has teeth: another placement gives other decisions."""
    scenario = _scenario("p2c", 1)
    result = run_scenario(scenario, keep_log=True)
    assert result.events is not None and result.decisions is not None
    other = scenario.model_copy(
        update={"policy": dataclasses.replace(scenario.policy, placement="random")}
    )
    runtime = replay_in_runtime(other, "us-east", result.events["us-east"])
    sim_log = result.decisions["us-east"]
    assert [_normalize(d) for d in runtime.decisions] != [_normalize(d) for d in sim_log]


def test_replay_detects_other_heartbeat_settings() -> None:
    """The presence comparison has teeth: another eviction rule evicts at other times."""
    scenario = _scenario("p2c", 1)
    result = run_scenario(scenario, keep_log=True)
    assert result.events is not None
    sim_events = result.events["us-east"]
    other = scenario.model_copy(
        update={"heartbeat": scenario.heartbeat.model_copy(update={"evict_after_missed": 5})}
    )
    runtime = replay_in_runtime(other, "us-east", sim_events)

    def gone(log: list[tuple[float, Event]]) -> list[tuple[float, str]]:
        return [(round(t, 9), e.worker_id) for t, e in log if isinstance(e, WorkerGone)]

    horizon = sim_events[-1][0]
    assert gone(sim_events) and gone(runtime.events)
    assert gone(sim_events) != gone([(t, e) for t, e in runtime.events if t <= horizon])
