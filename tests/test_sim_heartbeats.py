"""Heartbeats on the fleet's clock (haif/sim/heartbeats.py) against one process per worker.

The simulator runs every worker's heartbeats from one heap, each beat just
before the next event that could change what it reads, instead of a SimPy
process per worker. These tests hold it to the per-process cadence it
replaced: the same beats (times, contents, losses), and whole runs with
outages, restarts and partitions that agree in every record, sample,
eviction, and event and decision the cores saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import simpy

from haif.contracts import Event, Heartbeat, Request
from haif.fleet.profiles import load_catalog
from haif.fleet.scenario import load_scenario
from haif.sim.driver import SimResult, run_scenario
from haif.sim.engine import BatchingWorker
from haif.sim.fleet import BaseWorker, Network, PostBeat
from haif.sim.heartbeats import Environment, HeartbeatClock, call_in

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"

Beat = tuple[float, str, Heartbeat]  # (sent at, to, beat)


def _worker(env: simpy.Environment, sent: list[Beat]) -> BatchingWorker:
    profiles = {"llama-3-8b": load_catalog(None).get("A100-80G", "llama-3-8b")}

    def send(_src: str, dst: str, event: Event, _delay_s: float | None = None) -> None:
        if isinstance(event, Heartbeat):
            sent.append((float(env.now), dst, event))

    return BatchingWorker(
        env,
        "w",
        "a",
        "A100-80G",
        models=("llama-3-8b",),
        capacity=8,
        vram_gb=80.0,
        price_per_hour=1.0,
        net=Network(lambda _a, _b: 10.0, connect_timeout_s=1.0),
        send=send,
        rng=random.Random(7),
        profiles=profiles,
        warm="llama-3-8b",
    )


def _script(env: simpy.Environment, worker: BaseWorker) -> None:
    """Requests, a crash and a restart with a boot delay, at fixed times."""

    def send(req: Request) -> Callable[[simpy.Event], None]:
        return lambda _ev: worker.dispatch(req, 1, "a")

    for i in range(40):
        req = Request(f"r{i}", "t", "llama-3-8b", 200 + 37 * i, 20 + i, 0.0)
        call_in(env, 0.3 + 0.45 * i, send(req))
    call_in(env, 9.05, lambda _ev: worker.go_down())
    call_in(env, 12.5, lambda _ev: worker.come_up(boot_s=2.0))


def test_a_worker_beats_the_same_on_the_clock_as_with_its_own_process() -> None:
    orchestrators = ("a", "b", "c")
    eager_env = simpy.Environment()
    eager: list[Beat] = []
    worker = _worker(eager_env, eager)
    eager_env.process(worker.heartbeats(orchestrators, 0.5, 0.2))
    _script(eager_env, worker)
    eager_env.run(until=30.0)

    env = Environment()
    clocked: list[Beat] = []
    worker = _worker(env, clocked)

    def post(sent_s: float, beat: Heartbeat, draw: Callable[[], float] | None, loss: float) -> None:
        for dst in orchestrators:
            if draw is None or draw() >= loss:
                clocked.append((sent_s, dst, beat))

    worker.beat_on(env.heartbeats, orchestrators, 0.5, 0.2, post)
    _script(env, worker)
    env.run(until=30.0)

    assert len(eager) > 100
    assert [(t, dst, b.snapshot) for t, dst, b in clocked] == [
        (t, dst, b.snapshot) for t, dst, b in eager
    ]
    # Busy, then down (no beats), then back: the snapshots moved and beats stopped.
    assert len({b.snapshot.running for _, _, b in eager}) > 2
    assert not [t for t, _, _ in eager if 9.05 < t < 14.5]


def test_the_clock_runs_due_beats_in_time_order_and_stops_ended_cadences() -> None:
    ticks: list[tuple[str, float]] = []

    class Ticker:
        def __init__(self, name: str, every: float, last: float) -> None:
            self.name, self.every, self.last = name, every, last

        def beat(self, at: float, cadence: int) -> float | None:
            ticks.append((self.name, at))
            return at + self.every if at + self.every <= self.last else None

    clock = HeartbeatClock()
    assert clock.due == float("inf")
    clock.add(0.5, Ticker("x", 1.0, 3.0), 1)
    clock.add(0.25, Ticker("y", 1.5, 10.0), 1)
    assert clock.due == 0.25
    clock.catch_up(2.5)
    assert ticks == [("y", 0.25), ("x", 0.5), ("x", 1.5), ("y", 1.75), ("x", 2.5)]
    clock.catch_up(100.0)
    assert ticks[5:] == [("y", 3.25), ("y", 4.75), ("y", 6.25), ("y", 7.75), ("y", 9.25)]
    assert clock.due == float("inf")


def _eager_beat_on(
    self: BaseWorker,
    clock: HeartbeatClock,
    orchestrators: tuple[str, ...],
    interval_s: float,
    loss: float,
    post: PostBeat,
) -> None:
    """The simulator before the clock: every worker beats with a process of its own."""
    self.env.process(self.heartbeats(orchestrators, interval_s, loss))


def _same(a: SimResult, b: SimResult) -> None:
    assert a.records == b.records
    assert a.utilization == b.utilization
    assert a.evictions == b.evictions
    assert a.dead_letters == b.dead_letters
    assert a.served_by_worker == b.served_by_worker
    assert (a.end_s, a.unfinished) == (b.end_s, b.unfinished)
    assert a.events == b.events
    assert a.decisions == b.decisions


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        (
            "failover",
            [
                "duration_s=240",
                "drain_s=60",
                "faults.0.start_s=60",
                "faults.0.end_s=150",
                "heartbeat.boot_s=4",
                "heartbeat.loss=0.3",
            ],
        ),
        (
            "partition",
            ["duration_s=200", "drain_s=60", "faults.0.start_s=50", "faults.0.end_s=120"],
        ),
    ],
)
@pytest.mark.parametrize("fidelity", ["iteration", "request"])
def test_runs_on_the_clock_equal_runs_with_a_process_per_worker(
    name: str, overrides: list[str], fidelity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = load_scenario(SCENARIOS / f"{name}.yaml", [*overrides, f"fidelity={fidelity}"])
    clocked = run_scenario(scenario, keep_log=True)
    with monkeypatch.context() as m:
        m.setattr(BaseWorker, "beat_on", _eager_beat_on)
        eager = run_scenario(scenario, keep_log=True)
    if name == "failover":  # the outage evicts us-east's workers, their restart rejoins them
        assert any(clocked.evictions.values())
    _same(clocked, eager)


def test_every_orchestrator_starts_with_the_whole_fleet_announced() -> None:
    """The same starting view as a live cluster, whose workers have all announced before
    its first request: each core is fed every worker's announcement at time 0, in
    scenario order, before anything else, wherever the worker is (the RTT to a remote
    region delays only the beats after it). So the first request, with every worker
    idle, is placed from the same candidates in both shells: on parity_ci with jsq it
    goes to the RTX 4090 the live cluster chose, not to one of the two us-east workers,
    the only ones its core knew when the announcements travelled the RTT."""
    scenario = load_scenario(
        ROOT / "scenarios" / "parity_ci.yaml", ["policy.placement=jsq", "duration_s=10"]
    )
    result = run_scenario(scenario, keep_log=True)
    assert result.events is not None
    fleet = [f"{g.region}/{g.label}/{gi}.0" for gi, g in enumerate(scenario.workers)]
    for region, events in result.events.items():
        first = events[: len(fleet)]
        assert [(t, type(e).__name__) for t, e in first] == [(0.0, "Heartbeat")] * len(fleet)
        assert [e.snapshot.worker_id for _, e in first if isinstance(e, Heartbeat)] == fleet
        assert events[len(fleet)][0] > 0, region  # the first submit comes after
    first_request = min(result.records, key=lambda r: r.arrival_s)
    assert first_request.worker_id == "us-west/RTX4090-24G/3.0"
