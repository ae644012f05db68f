"""The SimPy shell: runs a scenario's fleet, workload and faults around the core.

Clients in each region send requests to the orchestrator in the control
region (one network hop); the orchestrator is a :class:`SimDriver` around
the same :class:`~haif.control.core.ControlCore` the runtime uses; workers
are :class:`~haif.sim.fleet.SimWorker`. Network hops are half the RTT
between the regions involved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import simpy

from haif.contracts import (
    Cancel,
    DeadLetter,
    Decision,
    Dispatch,
    Event,
    Finalize,
    Request,
    RequestRecord,
    Submit,
)
from haif.control.core import ControlCore
from haif.control.driver import CoreDriver, Sink
from haif.seeding import derive_rng
from haif.sim.fleet import SimWorker
from haif.sim.scenario import Scenario
from haif.sim.workload import poisson_requests

Progress = Callable[[float, float], None]  # (sim time, end time)


class SimDriver(CoreDriver):
    """The core on SimPy's clock."""

    def __init__(
        self, env: simpy.Environment, core: ControlCore, sink: Sink, *, keep_log: bool = False
    ) -> None:
        super().__init__(core, sink, keep_log=keep_log)
        self.env = env

    def now(self) -> float:
        return float(self.env.now)

    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        timeout = self.env.timeout(max(0.0, when - self.env.now))
        timeout.callbacks.append(lambda _ev: fn(when))

    def deliver(self, delay: float, event: Event) -> None:
        """Feed ``event`` after ``delay`` seconds of simulated network."""
        if delay <= 0:
            # Still go through the event queue: never re-enter the core from a sink.
            delay = 0.0
        timeout = self.env.timeout(delay)
        timeout.callbacks.append(lambda _ev: self.feed(event))


@dataclass
class SimResult:
    scenario: Scenario
    records: list[RequestRecord]
    dead_letters: list[DeadLetter]
    served_by_worker: dict[str, int]
    unfinished: int
    end_s: float
    events: list[tuple[float, Event]] | None = None
    decisions: list[tuple[float, Decision]] | None = None
    extra: dict[str, object] = field(default_factory=dict)


class SimCluster:
    """Builds the simulated world for a scenario and executes the core's decisions."""

    def __init__(self, scenario: Scenario, *, keep_log: bool = False) -> None:
        self.scenario = scenario
        self.env = simpy.Environment()
        seed = scenario.seed
        core = ControlCore(scenario.policy, derive_rng(seed, "core"))
        self.driver = SimDriver(self.env, core, self.execute, keep_log=keep_log)
        self.requests: dict[str, Request] = {}
        self.records: list[RequestRecord] = []
        self.dead_letters: list[DeadLetter] = []
        self.pending_submits = 0
        policy = scenario.policy
        ctrl = scenario.control_region
        self.workers: dict[str, SimWorker] = {}
        for gi, group in enumerate(scenario.workers):
            for i in range(group.count):
                wid = f"{group.region}/{group.gpu_class}/{gi}.{i}"
                self.workers[wid] = SimWorker(
                    self.env,
                    wid,
                    group,
                    one_way_s=policy.rtt(ctrl, group.region) / 2000.0,
                    connect_timeout_s=scenario.network.connect_timeout_s,
                    deliver=self.driver.deliver,
                    rng=derive_rng(seed, f"worker:{wid}"),
                )
        hb = scenario.heartbeat
        for w in self.workers.values():
            self.env.process(w.heartbeats(hb.interval_s, hb.loss))
        for fault in scenario.faults:
            self.env.process(self._outage(fault.region, fault.start_s, fault.end_s))
        self.env.process(self._clients())

    # ------------------------------------------------------------ world

    def _clients(self) -> simpy.events.ProcessGenerator:
        sc = self.scenario
        rng = derive_rng(sc.seed, "workload")
        for req in poisson_requests(sc.workload, sc.regions, sc.duration_s, rng):
            yield self.env.timeout(req.arrival_s - self.env.now)
            self.requests[req.request_id] = req
            hop = sc.policy.rtt(req.origin_region, sc.control_region) / 2000.0
            self.pending_submits += 1
            timeout = self.env.timeout(hop)
            timeout.callbacks.append(partial(self._submit, req))

    def _submit(self, req: Request, _event: object) -> None:
        self.pending_submits -= 1
        self.driver.feed(Submit(req))

    def _outage(self, region: str, start: float, end: float) -> simpy.events.ProcessGenerator:
        yield self.env.timeout(start)
        victims = [w for w in self.workers.values() if w.group.region == region]
        for w in victims:
            w.go_down()
        yield self.env.timeout(end - start)
        for w in victims:
            w.come_up()

    # ------------------------------------------------------------ decisions

    def execute(self, decision: Decision) -> None:
        if isinstance(decision, Dispatch):
            req = self.requests[decision.request_id]
            self.workers[decision.worker_id].dispatch(req, decision.attempt)
        elif isinstance(decision, Cancel):
            self.workers[decision.worker_id].cancel(decision.request_id, decision.attempt)
        elif isinstance(decision, Finalize):
            self.records.append(decision.record)
            self.requests.pop(decision.record.request_id, None)
        elif isinstance(decision, DeadLetter):
            self.dead_letters.append(decision)
        # Reject and RetryAt need no action here: a Finalize or a timer follows.

    # ------------------------------------------------------------ running

    def run(self, progress: Progress | None = None) -> SimResult:
        sc = self.scenario
        end = sc.duration_s + sc.drain_s
        step = max(1.0, sc.duration_s / 200)
        t = 0.0
        while t < end:
            t = min(end, t + step)
            self.env.run(until=t)
            if progress is not None:
                progress(t, end)
            if t >= sc.duration_s and self._idle():
                break
        return SimResult(
            scenario=sc,
            records=self.records,
            dead_letters=self.dead_letters,
            served_by_worker={wid: w.served for wid, w in self.workers.items()},
            unfinished=self.driver.core.in_flight() + self.pending_submits,
            end_s=float(self.env.now),
            events=self.driver.events,
            decisions=self.driver.decisions,
        )

    def _idle(self) -> bool:
        return self.pending_submits == 0 and self.driver.core.in_flight() == 0


def run_scenario(
    scenario: Scenario, *, progress: Progress | None = None, keep_log: bool = False
) -> SimResult:
    """Simulate ``scenario`` to the end (arrivals stop at duration_s, then drain)."""
    return SimCluster(scenario, keep_log=keep_log).run(progress)
