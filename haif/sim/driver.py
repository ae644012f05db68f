"""The SimPy shell: regions, clients, control planes, workers and faults around the core.

Each control region runs a gateway and an orchestrator — a :class:`SimDriver`
around the same :class:`~haif.control.core.ControlCore` the runtime uses —
that sees every worker through heartbeats. Clients send to their region's
gateway (or the nearest one) and fail over to the nearest healthy gateway
once they notice theirs is down. Every message crosses the network: half
the RTT between the regions involved, and nothing across a partition. A
reservation is written to the metadata store before each dispatch; while the
store is out, the attempt fails with ``store_unavailable`` and the core
retries or gives up as its policy says.

Each orchestrator judges its workers' presence with the runtime's rule
(:class:`~haif.control.presence.Presence`): a worker silent for
``heartbeat.evict_after_missed`` of its heartbeat intervals is evicted, and
its core is told ``WorkerGone``; its next heartbeat brings it back.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from heapq import heappop, heappush

import simpy

from haif.contracts import (
    AttemptResult,
    Cancel,
    DeadLetter,
    Decision,
    Dispatch,
    ErrorKind,
    Event,
    Finalize,
    Heartbeat,
    Request,
    RequestRecord,
    Submit,
    WorkerSnapshot,
)
from haif.control.core import ControlCore
from haif.control.driver import CoreDriver, Sink
from haif.control.presence import Presence
from haif.fleet.faults import FaultWindow, plan_faults
from haif.fleet.hops import HopSampler
from haif.fleet.profiles import PerfProfile, ProfileCatalog
from haif.fleet.scenario import Scenario, WorkerGroup
from haif.fleet.targets import scenario_workers
from haif.fleet.workload import build_requests
from haif.seeding import derive_rng
from haif.sim.engine import BatchingWorker, PrefixHits, RequestLevelWorker, prefix_hits
from haif.sim.fleet import AbstractWorker, BaseWorker, Network, PostBeat
from haif.sim.heartbeats import Environment, call_in

Progress = Callable[[float, float], None]  # (sim time, end time)
_ON_WORKERS = ("down", "slow")


class SimDriver(CoreDriver):
    """The core and its presence on SimPy's clock.

    Heartbeats are the most numerous messages by far (every worker, every
    interval, to every orchestrator) and change nothing until the core is
    next consulted. So they are not scheduled as SimPy events: they wait in
    a queue ordered by delivery time and are fed, each at its own delivery
    time, just before the core handles the next event or timer. The core
    sees exactly what per-message events would have shown it.

    Presence (:class:`~haif.control.presence.Presence`, the runtime's rule)
    sees each heartbeat at its delivery time too: the queue is merged with
    its timer, so an eviction is decided at its own time, between the
    heartbeats before and after it, and fed to the core as ``WorkerGone`` at
    that time (a heartbeat at the very same instant goes first, as for the
    core's timers). Its timer is also armed as a SimPy timeout, so an
    eviction happens on time even when nothing else consults the core.
    """

    def __init__(
        self,
        env: simpy.Environment,
        core: ControlCore,
        sink: Sink,
        *,
        presence: Presence | None = None,
        keep_log: bool = False,
    ) -> None:
        super().__init__(core, sink, keep_log=keep_log)
        self.env = env
        self.presence = presence if presence is not None else Presence()
        #: Heartbeats not fed yet: (delivery time, arrival number, heartbeat).
        self.inbox: list[tuple[float, int, Heartbeat]] = []
        self.arrivals = itertools.count()  # ties in delivery time keep arrival order
        self._presence_armed: float | None = None
        #: (time, worker) of every eviction, and of every return after one.
        self.evicted: list[tuple[float, str]] = []
        self.rejoined: list[tuple[float, str]] = []

    def now(self) -> float:
        return float(self.env.now)

    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        call_in(self.env, max(0.0, when - self.env.now), lambda _ev: fn(when))

    def deliver_at(self, when: float, beat: Heartbeat) -> None:
        """Queue a heartbeat: it changes nothing until the core is next consulted."""
        heappush(self.inbox, (when, next(self.arrivals), beat))

    def _flush(self) -> None:
        """Feed the heartbeats delivered by now, and presence's timer, in time order."""
        now = self.env.now
        pending = self.inbox
        presence = self.presence
        due = presence.next_deadline()
        while True:
            # Heartbeats up to the next presence deadline (one at that very
            # instant goes first), or up to now.
            until = now if due is None or due > now else due
            if pending and pending[0][0] <= until:
                # None of these can set a deadline before `stop` (a new worker's
                # or a shrinking interval's), so they go to presence and to the
                # core as one batch each, and the next deadline is asked after.
                stop = pending[0][0] + presence.min_silence_s
                if stop > until:
                    stop = until
                arrived: list[tuple[str, float]] = []
                reports: list[tuple[WorkerSnapshot, float]] = []
                log = self.events
                while pending and pending[0][0] <= stop:
                    when, _seq, beat = heappop(pending)
                    snapshot = beat.snapshot
                    arrived.append((snapshot.worker_id, when))
                    reports.append((snapshot, when))
                    if log is not None:
                        log.append((when, beat))
                for notice in presence.heartbeats(arrived):
                    self.rejoined.append((notice.at_s, notice.worker_id))
                self.core.on_heartbeats(reports)  # what core.handle does with each
                due = presence.next_deadline()
            elif due is not None and due <= now:
                for evicted in presence.on_timer(due):
                    self.evicted.append((due, evicted.worker_id))
                    self._feed_at(due, evicted.gone)
                due = presence.next_deadline()
            else:
                break
        if due is not None and (self._presence_armed is None or due < self._presence_armed):
            self._presence_armed = due
            self.call_at(due, self._presence_timer)

    def _presence_timer(self, when: float) -> None:
        if when != self._presence_armed:
            return  # superseded by an earlier deadline that already fired
        self._presence_armed = None
        self._flush()

    def feed(self, event: Event) -> None:
        self._flush()
        super().feed(event)

    def _fire(self, when: float) -> None:
        self._flush()
        super()._fire(when)


@dataclass
class SimResult:
    scenario: Scenario
    records: list[RequestRecord]
    dead_letters: list[DeadLetter]
    served_by_worker: dict[str, int]
    unfinished: int
    end_s: float
    wall_s: float = 0.0
    # (t, worker_id, region, gpu_class, busy fraction) once per simulated second.
    utilization: list[tuple[float, str, str, str, float]] = field(default_factory=list)
    fault_windows: list[tuple[float, float, str]] = field(default_factory=list)
    provisioned_cost: float = 0.0
    sim_events: int = 0
    # Per control region: (time, worker) of each eviction by its presence.
    evictions: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    # Per worker with a prefix cache: (request id, attempt) -> prompt tokens it held.
    prefix_hits: dict[str, PrefixHits] = field(default_factory=dict)
    # Per control region: (time, event) fed to its core and (time, decision) taken.
    events: dict[str, list[tuple[float, Event]]] | None = None
    decisions: dict[str, list[tuple[float, Decision]]] | None = None


class SimCluster:
    """Builds the simulated world for a scenario and executes the cores' decisions."""

    def __init__(self, scenario: Scenario, *, keep_log: bool = False) -> None:
        self.scenario = sc = scenario
        self.env = Environment()
        hops = sc.hop_samples()
        sampler = (
            None if hops is None else HopSampler(hops.hop_ms, derive_rng(sc.seed, "network:hops"))
        )
        self.net = Network(
            sc.policy.rtt,
            sc.network.connect_timeout_s,
            sc.network.hop_ms / 1000 if sampler is None else sampler.median_s,
            refused_when_down=sc.network.crashed_worker == "refused",
            draw_hop=None if sampler is None else sampler.draw_s,
        )
        presence = sc.heartbeat.presence()
        self.drivers: dict[str, SimDriver] = {
            region: SimDriver(
                self.env,
                ControlCore(sc.policy, derive_rng(sc.seed, f"core:{region}")),
                partial(self.execute, region),
                presence=Presence(presence),
                keep_log=keep_log,
            )
            for region in sc.control
        }
        self.requests: dict[str, Request] = {}
        self.records: list[RequestRecord] = []
        self.dead_letters: list[DeadLetter] = []
        self.in_transit = 0  # submits on the wire, client retries pending
        self.gateway_down: dict[str, float] = {}
        self._gateways_by_distance: dict[str, list[str]] = {}
        self.store_down: set[str | None] = set()
        self.fault_windows: list[tuple[float, float, str]] = []
        self.utilization: list[tuple[float, str, str, str, float]] = []
        self.workers: dict[str, BaseWorker] = {}
        # send(): src region -> dst region -> (its orchestrator, one-way delay).
        self._routes: dict[str, dict[str, tuple[SimDriver | None, float]]] = {}
        self._gpus: dict[str, int] = {}
        catalog = sc.catalog() if any(g.gpu for g in sc.workers) else None
        for wid, _region, group in scenario_workers(sc):
            self.workers[wid] = self._make_worker(wid, group, catalog)
        self._arrivals = build_requests(sc)
        hb = sc.heartbeat
        beats = self.env.heartbeats
        posters: dict[str, PostBeat] = {}
        for w in self.workers.values():
            post = posters.get(w.region)
            if post is None:
                post = posters[w.region] = self._beat_poster(w.region, sc.control)
            w.beat_on(beats, sc.control, hb.interval_s, hb.loss, post)
        # The fleet is registered before the run starts, as a live cluster's workers
        # have all announced before its first request (haif parity waits for every
        # one): each orchestrator holds every worker's announcement at time 0, in
        # scenario order, so both shells' cores start from the same view.
        for driver in self.drivers.values():
            driver.inbox[:] = sorted((0.0, n, beat) for _, n, beat in driver.inbox)
        fleet = [(wid, w.region) for wid, w in self.workers.items()]
        # A simulated region's gateway is named by its region.
        for window in plan_faults(sc, fleet, [(r, r) for r in sc.control]):
            self.fault_windows.append((window.start_s, window.end_s, window.label))
            self.env.process(self._fault(window))
        if sc.random_failures is not None and sc.random_failures.per_gpu_hour > 0:
            for wid in self.workers:
                self.env.process(self._random_failures(wid))
        self.env.process(self._clients())
        self.env.process(self._sample_utilization())

    def _make_worker(
        self, wid: str, group: WorkerGroup, catalog: ProfileCatalog | None
    ) -> BaseWorker:
        sc = self.scenario
        common: dict[str, object] = {
            "models": group.models,
            "net": self.net,
            "send": self.send,
            "rng": derive_rng(sc.seed, f"worker:{wid}"),
        }
        if group.gpu is None:
            self._gpus[wid] = 1
            return AbstractWorker(
                self.env,
                wid,
                group.region,
                group.label,
                capacity=group.capacity,
                vram_gb=0.0,
                price_per_hour=group.price_per_hour or 0.0,
                kind=group.service.kind,
                mean_s=group.service.mean_s,
                ttft_s=group.service.ttft_s,
                **common,
            )
        assert catalog is not None
        profiles: dict[str, PerfProfile] = {m: catalog.get(group.gpu, m) for m in group.models}
        warm = (group.warm_models or group.models)[0]
        first = profiles[warm]
        self._gpus[wid] = first.model.tensor_parallel
        price = (
            group.price_per_hour
            if group.price_per_hour is not None
            else first.gpu.price_per_hour * first.model.tensor_parallel
        )
        max_batch = group.max_batch or first.max_batch
        args = (self.env, wid, group.region, group.label)
        if sc.fidelity == "request":
            return RequestLevelWorker(
                *args,
                capacity=max_batch,
                vram_gb=first.gpu.vram_gb,
                price_per_hour=price,
                profiles=profiles,
                warm=warm,
                **common,
            )
        return BatchingWorker(
            *args,
            capacity=max_batch,
            vram_gb=first.gpu.vram_gb,
            price_per_hour=price,
            profiles=profiles,
            warm=warm,
            max_batch=max_batch,
            chunked_prefill_tokens=group.chunked_prefill_tokens,
            prefix_cache=group.prefix_cache,
            prefix_cache_max_tokens=group.prefix_cache_max_tokens,
            **common,
        )

    # ------------------------------------------------------------ network

    def send(self, src: str, dst: str, event: Event, delay_s: float | None = None) -> None:
        """Deliver ``event`` to the orchestrator of region ``dst`` (if reachable), after
        ``delay_s`` (a drawn hop) or the route's one-way delay."""
        try:
            driver, one_way = self._routes[src][dst]
        except KeyError:
            driver, one_way = self._route(src, dst)
        if delay_s is not None:
            one_way = delay_s
        net = self.net
        if driver is None or (net.cuts and not net.reachable(src, dst)):
            return
        if isinstance(event, Heartbeat):  # the most frequent message by far: deliver_at, inlined
            heappush(driver.inbox, (self.env.now + one_way, next(driver.arrivals), event))
            return
        call_in(self.env, one_way, lambda _ev: driver.feed(event))

    def _beat_poster(self, src: str, orchestrators: tuple[str, ...]) -> PostBeat:
        """How a worker in ``src`` sends a heartbeat (:mod:`haif.sim.heartbeats`): queued
        in each orchestrator's inbox as :meth:`send` queues one sent at that time."""
        routes = []
        for dst in orchestrators:
            driver, one_way = self._route(src, dst)
            inbox = None if driver is None else driver.inbox
            order = None if driver is None else driver.arrivals
            routes.append((dst, inbox, order, one_way))
        net = self.net

        def post(
            sent_s: float, beat: Heartbeat, draw: Callable[[], float] | None, loss: float
        ) -> None:
            cuts = net.cuts
            for dst, inbox, order, one_way in routes:
                if draw is not None and draw() < loss:
                    continue  # lost
                if inbox is None or order is None or (cuts and not net.reachable(src, dst)):
                    continue
                heappush(inbox, (sent_s + one_way, next(order), beat))

        return post

    def _route(self, src: str, dst: str) -> tuple[SimDriver | None, float]:
        """(orchestrator of ``dst``, one-way delay from ``src``), remembered."""
        route = (self.drivers.get(dst), self.net.one_way_s(src, dst))
        self._routes.setdefault(src, {})[dst] = route
        return route

    # ------------------------------------------------------------ clients

    def _gateway_for(self, origin: str, now: float) -> tuple[str | None, float]:
        """(gateway region, extra delay) for a client in ``origin`` sending now."""
        by_distance = self._gateways_by_distance.get(origin)
        if by_distance is None:
            rtt = self.scenario.policy.rtt
            by_distance = sorted(self.drivers, key=lambda r: (rtt(origin, r), r))
            self._gateways_by_distance[origin] = by_distance
        first = by_distance[0]
        down_at = self.gateway_down.get(first)
        if down_at is None:
            return first, 0.0
        noticed = down_at + self.scenario.network.failover_delay_s
        # Until the client notices, its attempts time out; then it fails over.
        delay = max(self.net.connect_timeout_s, noticed - now) if now < noticed else 0.0
        for region in by_distance[1:]:
            if region not in self.gateway_down:
                return region, delay
        return None, delay

    def _clients(self) -> simpy.events.ProcessGenerator:
        for req in self._arrivals:
            if req.arrival_s > self.env.now:
                yield self.env.timeout(req.arrival_s - self.env.now)
            self.requests[req.request_id] = req
            self._client_send(req)

    def _client_send(self, req: Request) -> None:
        region, delay = self._gateway_for(req.origin_region, self.env.now)
        if region is None:
            if delay > 0:
                self._later(delay, lambda: self._client_send(req))
            else:
                self._record_client_failure(req, "no_gateway")
            return
        hop = delay + self.net.request_hop_s(req.origin_region, region)
        driver = self.drivers[region]
        self._later(hop, lambda: driver.feed(Submit(req)))

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self.in_transit += 1

        def fire(_ev: simpy.Event) -> None:
            self.in_transit -= 1
            fn()

        call_in(self.env, delay, fire)

    def _record_client_failure(self, req: Request, reason: str) -> None:
        """The request never reached any gateway; only the client knows."""
        self.records.append(RequestRecord.never_served(req, self.env.now, "failed", reason))

    # ------------------------------------------------------------ decisions

    def execute(self, region: str, decision: Decision) -> None:
        if isinstance(decision, Dispatch):
            self._later(
                self.scenario.store.write_latency_ms / 1000.0,
                partial(self._dispatch, region, decision),
            )
        elif isinstance(decision, Cancel):
            self.workers[decision.worker_id].cancel(decision.request_id, decision.attempt)
        elif isinstance(decision, Finalize):
            self.records.append(self._at_client(region, decision.record))
        elif isinstance(decision, DeadLetter):
            self.dead_letters.append(decision)
        # Reject and RetryAt need no action here: a Finalize or a timer follows.

    def _at_client(self, region: str, record: RequestRecord) -> RequestRecord:
        """The record as its client sees it: tokens and the end travel back from the gateway."""
        back = self.net.request_hop_s(region, record.origin_region)
        if back == 0:
            return record
        first = record.first_token_s
        return dataclasses.replace(
            record,
            first_token_s=None if first is None else first + back,
            finish_s=record.finish_s + back,
        )

    def _dispatch(self, region: str, d: Dispatch) -> None:
        down = self.store_down
        if down and (None in down or region in down):
            now = self.env.now
            self.drivers[region].feed(
                AttemptResult(
                    request_id=d.request_id,
                    attempt=d.attempt,
                    worker_id=d.worker_id,
                    ok=False,
                    started_s=now,
                    finish_s=now,
                    error=ErrorKind.STORE_UNAVAILABLE.value,
                )
            )
            return
        self.workers[d.worker_id].dispatch(
            self.requests[d.request_id], d.attempt, region, d.resume_tokens
        )

    # ------------------------------------------------------------ faults

    def _fault(self, window: FaultWindow) -> simpy.events.ProcessGenerator:
        """Execute one window of the fault plan (:mod:`haif.fleet.faults`)."""
        env = self.env
        victims = (
            [self.workers[wid] for wid in window.targets] if window.kind in _ON_WORKERS else []
        )
        yield env.timeout(window.start_s)
        if window.kind == "down":
            for w in victims:
                w.go_down()
        elif window.kind == "slow":
            for w in victims:
                w.slow = window.factor
        elif window.kind == "partition":
            self.net.cuts.add(frozenset(window.targets))
        elif window.kind == "store_out":
            self.store_down.add(window.targets[0] if window.targets else None)
        else:
            for region in window.targets:
                self.gateway_down[region] = env.now
        yield env.timeout(window.end_s - window.start_s)
        if window.kind == "down":
            for w in victims:
                w.come_up(self.scenario.heartbeat.boot_s)
        elif window.kind == "slow":
            for w in victims:
                w.slow = 1.0
        elif window.kind == "partition":
            self.net.cuts.discard(frozenset(window.targets))
        elif window.kind == "store_out":
            self.store_down.discard(window.targets[0] if window.targets else None)
        else:
            for region in window.targets:
                self.gateway_down.pop(region, None)

    def _random_failures(self, wid: str) -> simpy.events.ProcessGenerator:
        rf = self.scenario.random_failures
        assert rf is not None
        worker = self.workers[wid]
        rng = derive_rng(self.scenario.seed, f"random_failures:{wid}")
        rate = rf.per_gpu_hour * self._gpus[wid] / 3600.0
        while True:
            yield self.env.timeout(rng.expovariate(rate))
            if worker.up:
                worker.go_down()
                self.fault_windows.append(
                    (self.env.now, self.env.now + rf.restart_s, f"{wid} failed")
                )
                yield self.env.timeout(rf.restart_s)
                worker.come_up(self.scenario.heartbeat.boot_s)

    # ------------------------------------------------------------ telemetry

    def _sample_utilization(self) -> simpy.events.ProcessGenerator:
        workers = [(w, w.worker_id, w.region, w.gpu_class) for w in self.workers.values()]
        append = self.utilization.append
        while True:
            yield self.env.timeout(1.0)
            t = float(self.env.now) - 1.0
            for w, wid, region, gpu_class in workers:
                busy = w.take_busy_s()
                append((t, wid, region, gpu_class, busy if busy < 1.0 else 1.0))  # min(1.0, busy)

    # ------------------------------------------------------------ running

    def run(self, progress: Progress | None = None) -> SimResult:
        import time

        sc = self.scenario
        end = sc.duration_s + sc.drain_s
        step = max(1.0, sc.duration_s / 200)
        t = 0.0
        wall = time.perf_counter()
        with rare_collections():
            while t < end:
                t = min(end, t + step)
                self.env.run(until=t)
                if progress is not None:
                    progress(t, end)
                if t >= sc.duration_s and self._idle():
                    break
        wall = time.perf_counter() - wall
        end_s = float(self.env.now)
        keep = next(iter(self.drivers.values())).events is not None
        hours = end_s / 3600.0
        return SimResult(
            scenario=sc,
            records=self.records,
            dead_letters=self.dead_letters,
            served_by_worker={wid: w.served for wid, w in self.workers.items()},
            unfinished=sum(d.core.in_flight() for d in self.drivers.values())
            + self.in_transit
            + sum(1 for r in self._arrivals if r.arrival_s > end_s),
            end_s=end_s,
            wall_s=wall,
            utilization=self.utilization,
            fault_windows=sorted(self.fault_windows),
            provisioned_cost=sum(w.price_per_hour for w in self.workers.values()) * hours,
            sim_events=_event_count(self.env),
            evictions={r: d.evicted for r, d in self.drivers.items()},
            prefix_hits=prefix_hits(self.workers.values()),
            events={r: d.events or [] for r, d in self.drivers.items()} if keep else None,
            decisions={r: d.decisions or [] for r, d in self.drivers.items()} if keep else None,
        )

    def _idle(self) -> bool:
        if self.in_transit or any(r.arrival_s > self.env.now for r in self._arrivals[-1:]):
            return False
        return all(d.core.in_flight() == 0 for d in self.drivers.values())


@contextmanager
def rare_collections() -> Iterator[None]:
    """Python's cyclic garbage collector, told to run rarely while a simulation does.

    A run keeps millions of objects alive (requests, records, timers) and
    makes almost no cyclic garbage, yet by default every 700 allocations a
    collection starts and every so often one walks everything alive: up to
    a quarter of a 1,000-GPU run's time. Inside, what exists on entry is
    frozen (never walked again), young collections come 100 times less often
    and full ones 10 times; on exit, both are as they were. Nothing simulated
    depends on it.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], 70_000), max(thresholds[1], 20), max(thresholds[2], 100))
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _event_count(env: simpy.Environment) -> int:
    # SimPy numbers every scheduled event; the counter is the number scheduled so far.
    eid = getattr(env, "_eid", None)
    try:
        return int(next(eid)) if eid is not None else 0
    except TypeError:
        return 0


def run_scenario(
    scenario: Scenario, *, progress: Progress | None = None, keep_log: bool = False
) -> SimResult:
    """Simulate ``scenario`` to the end (arrivals stop at duration_s, then drain)."""
    return SimCluster(scenario, keep_log=keep_log).run(progress)
