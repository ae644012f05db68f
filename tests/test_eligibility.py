"""The eligibility index agrees with a from-scratch rebuild, and the core decides as before.

Two properties, each against the exhaustive rule the core used to apply to
the whole fleet on every request:

* a Hypothesis state machine drives :class:`EligibilityIndex` with real
  breakers through heartbeats (health, models, capacity, load, region),
  departures, dispatches and releases (breaker permits and outcomes) and
  the passing of time (staleness, breakers opening and half-opening), and
  checks after every step that the eligible ids, the candidates a request
  sees (tried workers left out), the tied minimum by ``outstanding`` and by
  ``load``, the groups by ``(region, gpu_class, warm, capacity)`` and load,
  round robin's cursor and the fleet's utilization are what a rebuild over
  every worker gives;
* random event sequences drive a :class:`ControlCore` and a subclass that
  places from the exhaustive list, as the core did before the index, under
  every strategy: every decision is identical.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from haif.contracts import (
    AttemptResult,
    Decision,
    Dispatch,
    Event,
    Heartbeat,
    Request,
    Submit,
    WorkerGone,
    WorkerSnapshot,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore, _Job
from haif.control.eligibility import ORDERS, EligibilityIndex, EligibleView
from haif.policy.breaker import BreakerConfig, CircuitBreaker, Permit
from haif.policy.placement import Candidate, CandidateGroup, OrderedCandidates, placement_names
from haif.policy.retry import Backoff, RetryConfig

MODELS = ("m1", "m2")
REGIONS = ("a", "b", "c")
IDS = tuple(f"w{i}" for i in range(7))
STALE_S = 3.0
QUEUE_FACTOR = 1.5
RTT = {"a": {"b": 40.0, "c": 90.0}, "b": {"c": 60.0}}

# Small breakers that open, half-open and close within a few steps.
WORKER_BREAKER = BreakerConfig(
    window="count",
    window_size=2,
    min_calls=1,
    failure_threshold=0.5,
    open_s=1.0,
    open_multiplier=2.0,
    open_max_s=4.0,
    half_open_permits=1,
    half_open_max_s=2.0,
)
ROUTE_BREAKER = BreakerConfig(
    window="time",
    window_size=2.0,
    min_calls=2,
    failure_threshold=0.5,
    open_s=1.5,
    half_open_permits=2,
    half_open_max_s=2.5,
)


def rtt(a: str, b: str) -> float:
    return CoreConfig(rtt_ms=RTT).rtt(a, b)


snapshots = st.builds(
    WorkerSnapshot,
    worker_id=st.sampled_from(IDS),
    region=st.sampled_from(REGIONS),
    gpu_class=st.sampled_from(("H100-80G", "A100-80G")),
    models_warm=st.lists(st.sampled_from(MODELS), max_size=2, unique=True).map(tuple),
    models_loadable=st.lists(st.sampled_from(MODELS), max_size=2, unique=True).map(tuple),
    queue_depth=st.integers(0, 3),
    running=st.integers(0, 3),
    capacity=st.integers(1, 3),
    healthy=st.sampled_from([True, True, True, False]),
)


@dataclass
class _Sent:
    """One dispatch in flight, with its permits."""

    worker_id: str
    route: tuple[str, str]
    worker_permit: Permit
    route_permit: Permit
    started_s: float


# ---------------------------------------------------------------- the rebuild


def rebuild(
    snaps: dict[str, WorkerSnapshot],
    last_seen: dict[str, float],
    outstanding: dict[str, int],
    worker_breakers: dict[str, CircuitBreaker],
    route_breakers: dict[tuple[str, str], CircuitBreaker],
    model: str,
    now: float,
) -> list[str]:
    """The eligible ids for ``model``: the core's rule, over every worker, in id order."""
    oldest = now - STALE_S
    out = []
    for wid in sorted(snaps):
        w = snaps[wid]
        if not w.healthy or last_seen[wid] < oldest:
            continue
        if model not in w.models_warm and model not in w.models_loadable:
            continue
        if outstanding.get(wid, 0) >= w.capacity * QUEUE_FACTOR:
            continue
        br = worker_breakers.get(wid)
        if br is not None and not br.would_allow(now):
            continue
        route = route_breakers.get((model, w.region))
        if route is not None and not route.would_allow(now):
            continue
        out.append(wid)
    return out


def exhaustive_candidates(
    snaps: dict[str, WorkerSnapshot],
    outstanding: dict[str, int],
    ids: list[str],
    model: str,
    origin: str,
    tried: Sequence[str],
) -> list[Candidate]:
    """The candidate list the core built before the index, tried ones left out."""
    fresh = [
        Candidate(
            wid,
            snaps[wid].region,
            snaps[wid].gpu_class,
            model in snaps[wid].models_warm,
            snaps[wid].queue_depth,
            snaps[wid].running,
            outstanding[wid],
            snaps[wid].capacity,
            rtt(origin, snaps[wid].region),
            snaps[wid].region == origin,
        )
        for wid in ids
    ]
    untried = [c for c in fresh if c.worker_id not in tried]
    return untried if tried and untried else fresh


def least(candidates: list[Candidate], order: str) -> list[Candidate]:
    def key(c: Candidate) -> int:
        return c.outstanding if order == "outstanding" else c.load

    if not candidates:
        return []
    best = min(key(c) for c in candidates)
    return [c for c in candidates if key(c) == best]


Grouped = dict[tuple[str, str, bool, int, float, bool], list[tuple[int, list[Candidate]]]]


def grouped(groups: Sequence[CandidateGroup]) -> Grouped:
    """What a view's groups hold: per group, its levels (load, members) in order."""
    out: Grouped = {}
    for g in groups:
        key = (g.region, g.gpu_class, g.warm, g.capacity, g.rtt_ms, g.same_region)
        assert key not in out
        levels = [(load, list(g.members(load))) for load in g.loads()]
        assert all(members for _, members in levels)
        if levels:  # (none when every member was tried)
            out[key] = levels
    return out


def grouped_list(candidates: list[Candidate]) -> Grouped:
    """The same from the candidate list: levels by increasing load, ids in order."""
    out: dict[tuple[str, str, bool, int, float, bool], dict[int, list[Candidate]]] = {}
    for c in candidates:
        key = (c.region, c.gpu_class, c.warm, c.capacity, c.rtt_ms, c.same_region)
        out.setdefault(key, {}).setdefault(c.load, []).append(c)
    return {key: sorted(levels.items()) for key, levels in out.items()}


# ---------------------------------------------------------------- state machine


class IndexMachine(RuleBasedStateMachine):
    """Random events into the index and into a plain model of the fleet; compare."""

    sent = Bundle("sent")

    @initialize(
        orders=st.sampled_from(
            [(), ("outstanding",), ("load",), ("outstanding", "load"), ("groups",), ORDERS]
        )
    )
    def start(self, orders: tuple[str, ...]) -> None:
        self.now = 0.0
        self.snaps: dict[str, WorkerSnapshot] = {}
        self.last_seen: dict[str, float] = {}
        self.outstanding: dict[str, int] = {}
        self.worker_breakers: dict[str, CircuitBreaker] = {}
        self.route_breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self.orders = orders
        self.index = EligibilityIndex(
            stale_after_s=STALE_S,
            max_queue_factor=QUEUE_FACTOR,
            worker_breakers=self.worker_breakers,
            route_breakers=self.route_breakers,
            rtt_ms=rtt,
            orders=orders,
        )

    @rule(snapshot=snapshots)
    def heartbeat(self, snapshot: WorkerSnapshot) -> None:
        wid = snapshot.worker_id
        self.snaps[wid] = snapshot
        self.last_seen[wid] = self.now
        self.outstanding.setdefault(wid, 0)
        self.index.heartbeat(snapshot, self.now)

    @rule(wid=st.sampled_from(IDS))
    def gone(self, wid: str) -> None:
        if self.snaps.pop(wid, None) is not None:
            del self.last_seen[wid]
        self.index.gone(wid)

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 1.5, 2.0, 2.999, 3.0, 3.001, 5.0]))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule(
        target=sent,
        model=st.sampled_from(MODELS),
        pick=st.integers(0, 100),
        anywhere=st.booleans(),
    )
    def dispatch(self, model: str, pick: int, anywhere: bool) -> _Sent | None:
        """Send to an eligible worker (or, to stress the counts, any registered one)."""
        now = self.now
        ids = self.index.eligible(model, now)
        if anywhere:
            ids = sorted(self.snaps)
        if not ids:
            return None
        wid = ids[pick % len(ids)]
        route = (model, self.snaps[wid].region)
        wb = self.worker_breakers.setdefault(wid, CircuitBreaker(WORKER_BREAKER))
        rb = self.route_breakers.setdefault(route, CircuitBreaker(ROUTE_BREAKER))
        wp, rp = wb.acquire(now), rb.acquire(now)
        self.index.worker_breaker_changed(wid, now)
        self.index.route_breaker_changed(route, now)
        self.outstanding[wid] = self.outstanding.get(wid, 0) + 1
        self.index.add_outstanding(wid, +1)
        if not isinstance(wp, Permit) or not isinstance(rp, Permit):
            return None  # counted, but no outcome to record (as if it never came back)
        return _Sent(wid, route, wp, rp, now)

    @rule(sent=consumes(sent), ok=st.booleans(), fault=st.booleans())
    def release(self, sent: _Sent | None, ok: bool, fault: bool) -> None:
        if sent is None:
            return
        now, wid = self.now, sent.worker_id
        if ok or fault:
            duration = now - sent.started_s
            self.worker_breakers[wid].record(sent.worker_permit, ok, duration, now)
            self.route_breakers[sent.route].record(sent.route_permit, ok, duration, now)
            self.index.worker_breaker_changed(wid, now)
            self.index.route_breaker_changed(sent.route, now)
        self.outstanding[wid] = max(0, self.outstanding.get(wid, 0) - 1)
        self.index.add_outstanding(wid, -1)

    # -------------------------------------------------------------- checks

    def _expected(self, model: str) -> list[str]:
        return rebuild(
            self.snaps,
            self.last_seen,
            self.outstanding,
            self.worker_breakers,
            self.route_breakers,
            model,
            self.now,
        )

    @invariant()
    def eligible_ids_match_the_rebuild(self) -> None:
        for model in MODELS:
            assert self.index.eligible(model, self.now) == self._expected(model)
            serves = any(
                model in w.models_warm or model in w.models_loadable for w in self.snaps.values()
            )
            assert self.index.serves(model) == serves
        assert self.index.knows_workers() == bool(self.snaps)

    @invariant()
    def views_match_the_candidate_list(self) -> None:
        now = self.now
        for model in MODELS:
            ids = self._expected(model)
            for origin in ("a", "c"):
                for tried in ((), ids[:1], ids[1:3], ids, ("w9", *ids[-1:])):
                    view = self.index.candidates(model, origin, tried, now)
                    want = exhaustive_candidates(
                        self.snaps, self.outstanding, ids, model, origin, tried
                    )
                    assert list(view) == want
                    assert len(view) == len(want)
                    assert [view[i] for i in range(len(view))] == want
                    if want:
                        assert view[-1] == want[-1]
                    for wid in ("w", "w0", "w3", "w35", "w9"):
                        assert view.position_after(wid) == bisect_right(
                            [c.worker_id for c in want], wid
                        )
                    for order in ("outstanding", "load"):
                        tied = view.least(order)
                        if order not in self.orders:
                            assert tied is None
                        elif want:
                            assert tied is not None
                            assert list(tied) == least(want, order)
                    groups = view.groups()
                    if "groups" not in self.orders:
                        assert groups is None
                    else:
                        assert groups is not None
                        assert grouped(groups) == grouped_list(want)

    @invariant()
    def utilization_matches_the_rebuild(self) -> None:
        oldest = self.now - STALE_S
        load = capacity = 0
        for wid, w in self.snaps.items():
            if w.healthy and self.last_seen[wid] >= oldest:
                load += max(self.outstanding[wid], w.queue_depth + w.running)
                capacity += w.capacity
        assert self.index.utilization(self.now) == (load / capacity if capacity else 0.0)


IndexMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestIndexMachine = IndexMachine.TestCase


# ---------------------------------------------------------------- table cases


def _index(orders: tuple[str, ...] = ()) -> tuple[EligibilityIndex, dict[str, CircuitBreaker]]:
    breakers: dict[str, CircuitBreaker] = {}
    index = EligibilityIndex(
        stale_after_s=STALE_S,
        max_queue_factor=QUEUE_FACTOR,
        worker_breakers=breakers,
        route_breakers={},
        rtt_ms=rtt,
        orders=orders,
    )
    return index, breakers


def _snap(wid: str, **kw: object) -> WorkerSnapshot:
    base: dict[str, object] = {
        "worker_id": wid,
        "region": "a",
        "gpu_class": "H100-80G",
        "models_warm": ("m1",),
        "capacity": 2,
    }
    base.update(kw)
    return WorkerSnapshot(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("heartbeat_at", "now", "eligible"),
    [
        (0.0, 3.0, True),  # exactly stale_after_s old: still fresh
        (0.0, 3.0001, False),
        (1.0, 3.5, True),
        (0.5, 100.0, False),
    ],
)
def test_staleness_is_the_cores_comparison(heartbeat_at: float, now: float, eligible: bool) -> None:
    index, _ = _index()
    index.heartbeat(_snap("w1"), heartbeat_at)
    assert index.eligible("m1", now) == (["w1"] if eligible else [])


def test_a_late_heartbeat_restores_a_stale_worker() -> None:
    index, _ = _index()
    index.heartbeat(_snap("w1"), 0.0)
    assert index.eligible("m1", 10.0) == []
    index.heartbeat(_snap("w1"), 10.0)
    assert index.eligible("m1", 10.0) == ["w1"]
    assert index.next_deadline() == 13.0


def test_a_heartbeat_stamped_earlier_than_the_last_still_expires() -> None:
    """Receipt times that go backwards (never in the shells) are still judged exactly
    by every later query."""
    index, _ = _index()
    index.heartbeat(_snap("w1"), 5.0)
    index.heartbeat(_snap("w2"), 4.0)  # earlier than w1's
    assert index.next_deadline() == 7.0
    assert index.eligible("m1", 5.0) == ["w1", "w2"]
    assert index.eligible("m1", 7.0) == ["w1", "w2"]
    assert index.eligible("m1", 7.5) == ["w1"]
    assert index.eligible("m1", 8.0) == ["w1"]
    assert index.eligible("m1", 8.5) == []
    assert index.next_deadline() is None


def test_open_breaker_returns_at_its_deadline_without_any_other_event() -> None:
    index, breakers = _index()
    index.heartbeat(_snap("w1"), 0.0)
    br = breakers["w1"] = CircuitBreaker(WORKER_BREAKER)
    permit = br.acquire(0.0)
    assert isinstance(permit, Permit)
    br.record(permit, False, 0.1, 0.1)
    index.worker_breaker_changed("w1", 0.1)
    assert index.eligible("m1", 0.5) == []
    assert index.next_deadline() == 1.1  # open_s after it opened
    index.heartbeat(_snap("w1"), 1.0)  # keep it fresh
    assert index.eligible("m1", 1.1) == ["w1"]  # half-open: one probe allowed
    probe = br.acquire(1.1)
    index.worker_breaker_changed("w1", 1.1)
    assert isinstance(probe, Permit) and index.eligible("m1", 1.1) == []


def test_outstanding_fills_a_worker_and_buckets_follow() -> None:
    index, _ = _index(("outstanding", "load"))
    for wid in ("w1", "w2"):
        index.heartbeat(_snap(wid, capacity=2), 0.0)  # full at 2 * 1.5 = 3
    for _ in range(3):
        index.add_outstanding("w1", +1)
    assert index.eligible("m1", 0.0) == ["w2"]
    index.add_outstanding("w1", -1)
    view = index.candidates("m1", "a", (), 0.0)
    assert [c.worker_id for c in view] == ["w1", "w2"]
    tied = view.least("outstanding")
    assert tied is not None and [c.worker_id for c in tied] == ["w2"]
    index.add_outstanding("w1", -5)  # never below zero
    assert index.outstanding("w1") == 0


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown orders"):
        _index(("latency",))


def test_view_is_an_ordered_candidates_and_rejects_bad_indices() -> None:
    index, _ = _index()
    index.heartbeat(_snap("w1"), 0.0)
    view = index.candidates("m1", "b", (), 0.0)
    assert isinstance(view, OrderedCandidates) and isinstance(view, EligibleView)
    assert view[0].rtt_ms == 40.0 and not view[0].same_region
    assert view[:5] == [view[0]]
    with pytest.raises(IndexError):
        view[1]
    assert len(index.candidates("nope", "a", (), 0.0)) == 0


# ---------------------------------------------------------------- decisions


class ExhaustiveCore(ControlCore):
    """The core as it placed before the index: the candidate list and the
    utilization rebuilt over every registered worker, per request."""

    def __init__(self, config: CoreConfig, rng: random.Random) -> None:
        super().__init__(config, rng)
        self.snaps: dict[str, WorkerSnapshot] = {}
        self.last_seen: dict[str, float] = {}

    def on_heartbeat(self, snapshot: WorkerSnapshot, now: float) -> None:
        super().on_heartbeat(snapshot, now)
        self.snaps[snapshot.worker_id] = snapshot
        self.last_seen[snapshot.worker_id] = now

    def on_worker_gone(self, worker_id: str) -> None:
        super().on_worker_gone(worker_id)
        if self.snaps.pop(worker_id, None) is not None:
            del self.last_seen[worker_id]

    def utilization(self, now: float) -> float:
        oldest = now - self.config.stale_after_s
        load = capacity = 0
        for wid, w in self.snaps.items():
            if w.healthy and self.last_seen[wid] >= oldest:
                load += max(self.outstanding(wid), w.queue_depth + w.running)
                capacity += w.capacity
        return load / capacity if capacity else 0.0

    def _candidates(self, job: _Job, now: float) -> list[Candidate]:
        req = job.request
        model, origin = req.model, req.origin_region
        oldest = now - self.config.stale_after_s
        fresh: list[Candidate] = []
        for wid in sorted(self.snaps):
            w = self.snaps[wid]
            if not w.healthy or self.last_seen[wid] < oldest:
                continue
            warm = model in w.models_warm
            if not warm and model not in w.models_loadable:
                continue
            load = self.outstanding(wid)
            if load >= w.capacity * self.config.max_queue_factor:
                continue
            breaker = self._worker_breakers.get(wid)
            if breaker is not None and not breaker.would_allow(now):
                continue
            if not self._route_breaker((model, w.region)).would_allow(now):
                continue
            fresh.append(
                Candidate(
                    wid,
                    w.region,
                    w.gpu_class,
                    warm,
                    w.queue_depth,
                    w.running,
                    load,
                    w.capacity,
                    self.config.rtt(origin, w.region),
                    w.region == origin,
                )
            )
        if job.tried:
            untried = [c for c in fresh if c.worker_id not in job.tried]
            if untried:
                return untried
        return fresh


def _config(placement: str) -> CoreConfig:
    return CoreConfig(
        placement=placement,
        rtt_ms=RTT,
        stale_after_s=STALE_S,
        max_queue_factor=QUEUE_FACTOR,
        attempt_timeout_s=4.0,
        worker_breaker=WORKER_BREAKER,
        route_breaker=ROUTE_BREAKER,
        retry=RetryConfig(
            max_attempts=3, backoff=Backoff("constant", 0.5, 0.5), budget_min_retries=100
        ),
    )


def _step(core: ControlCore, now: float, event: Event | None) -> list[tuple[float, Decision]]:
    """Fire the timers due by ``now``, then feed ``event``: what a driver does."""
    out: list[tuple[float, Decision]] = []
    deadline = core.next_deadline()
    while deadline is not None and deadline <= now:
        out.extend((deadline, d) for d in core.on_timer(deadline))
        deadline = core.next_deadline()
    if event is not None:
        out.extend((now, d) for d in core.handle(event, now))
    return out


@settings(max_examples=60, deadline=None)
@given(placement=st.sampled_from(placement_names()), data=st.data())
def test_decisions_identical_to_the_exhaustive_rebuild(placement: str, data: st.DataObject) -> None:
    fast = ControlCore(_config(placement), random.Random(5))
    slow = ExhaustiveCore(_config(placement), random.Random(5))
    now = 0.0
    running: list[Dispatch] = []
    for n in range(data.draw(st.integers(10, 60), label="steps")):
        action = data.draw(
            st.sampled_from(["heartbeat", "submit", "submit", "result", "gone", "wait"])
        )
        event: Event | None = None
        if action == "heartbeat":
            event = Heartbeat(data.draw(snapshots))
        elif action == "submit":
            event = Submit(
                Request(
                    request_id=f"r{n}",
                    tenant="t",
                    model=data.draw(st.sampled_from(MODELS)),
                    prompt_tokens=10,
                    max_tokens=5,
                    arrival_s=now,
                    origin_region=data.draw(st.sampled_from(REGIONS)),
                )
            )
        elif action == "result" and running:
            d = running.pop(data.draw(st.integers(0, len(running) - 1)))
            ok = data.draw(st.booleans())
            event = AttemptResult(
                d.request_id,
                d.attempt,
                d.worker_id,
                ok,
                now - 0.1,
                now,
                error=None if ok else "connection_error",
            )
        elif action == "gone":
            event = WorkerGone(data.draw(st.sampled_from(IDS)))
        else:
            now += data.draw(st.sampled_from([0.0, 0.3, 1.0, 2.0, 3.5]))
        got, want = _step(fast, now, event), _step(slow, now, event)
        assert got == want
        running.extend(d for _, d in got if isinstance(d, Dispatch))
    assert _step(fast, now + 100.0, None) == _step(slow, now + 100.0, None)


def test_heartbeats_alone_keep_the_queue_of_receipt_times_bounded() -> None:
    """An idle orchestrator (heartbeats, no requests) must not grow without end."""
    index, _ = _index()
    for second in range(1000):
        for wid in ("w1", "w2", "w3"):
            index.heartbeat(_snap(wid), float(second))
    assert len(index._seen) <= 3 * (STALE_S + 2)
