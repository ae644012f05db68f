"""Which workers may take a request, per model, kept up to date as events arrive.

Theory of operation
-------------------
Why: the core used to rebuild the list of eligible workers for every
request, walking the whole fleet (about 0.75 µs per worker per request), so
a decision on 10,000 GPUs cost 10,000 times what one on a single GPU did.
Eligibility changes far less often than requests arrive, so this index
keeps it instead, and a placement reads it.

A worker is *eligible for model m* when all of these hold (the rule the
core always applied, unchanged):

* its last heartbeat said ``healthy`` and was received at
  ``last_seen >= now - stale_after_s`` (fresh);
* ``m`` is in its warm or loadable models;
* the core's ``outstanding`` count there is ``< capacity * max_queue_factor``;
* its worker breaker and the ``(m, region)`` route breaker would allow a call.

Each input changes at a known moment, and the index re-judges only the
worker it concerns: a heartbeat (health, models, capacity, freshness), a
dispatch or a release (outstanding, breaker permits and outcomes), a
worker leaving. A route breaker's change re-judges the workers of its
region. Two inputs change with time alone, and are kept as deadlines, the
way every time-driven object here is (``next_deadline`` / ``on_timer``):
staleness (heartbeat times in arrival order, a FIFO; a worker goes stale
once ``last_seen < now - stale_after_s``, the very comparison the core made)
and
breakers (a heap of each breaker's ``next_deadline``; at it the breaker is
asked again). The core applies them with :meth:`EligibilityIndex.on_timer`
at the ``now`` of every event that reads the index, so ``now`` must not go
backwards between calls (as for the breakers). It does not fold these
deadlines into its own ``next_deadline``: nothing is decided at them, and
waking the shells for them would only cost time.

Per model the eligible ids are one sorted list (the order the core always
listed candidates in, ``worker_id`` order), so a view reads position ``i`` in
O(1) and strategies draw exactly the random numbers they drew from the full
list: decisions are identical to the exhaustive rebuild for the same seed
and events. Updates are ``bisect.insort`` / ``del``: O(log n) comparisons
plus a memmove of at most n pointers, a few microseconds at 10,000 workers
and needed only when a worker's eligibility changes. For the strategies
that ask (``indexed_orders``), each model's eligible ids are also filed in
buckets by ``outstanding`` or by ``load`` (``max(outstanding, queue_depth +
running)``), each bucket a sorted list, so the tied minimum is the first
non-empty bucket. For ``weighted_score`` and ``locality`` (order
``"groups"``) they are also filed by ``(region, gpu_class, warm, capacity)``,
and within each such group in buckets by ``load``: a view reads them as
:class:`~haif.policy.placement.CandidateGroup` s (the placement module says
why that answers both rules exactly).

Requests re-placed after a failure avoid the workers they already tried
when some other worker is eligible; the view skips those positions.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import overload

from haif.contracts import WorkerSnapshot
from haif.policy.breaker import CircuitBreaker
from haif.policy.placement import Candidate, CandidateGroup, OrderedCandidates

__all__ = ["ORDERS", "EligibilityIndex", "EligibleView"]

ORDERS: tuple[str, ...] = ("outstanding", "load", "groups")
"""The orders the index can keep: buckets for ``OrderedCandidates.least``
(``outstanding``, ``load``) and groups for ``OrderedCandidates.groups``."""

Route = tuple[str, str]  # (model, region)
_NOTHING: frozenset[str] = frozenset()
# What a worker is filed under in a pool: (outstanding, load, place), place being
# (region, gpu_class, capacity, models_warm) when groups are kept, else None.
Place = tuple[str, str, int, tuple[str, ...]]
Keys = tuple[int, int, Place | None]
GroupKey = tuple[str, str, bool, int]  # (region, gpu_class, warm, capacity)
_NO_KEYS: Keys = (0, 0, None)


class _Buckets:
    """Ids filed by an integer key; each bucket a sorted list, keys sorted."""

    __slots__ = ("keys", "lists")

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.lists: dict[int, list[str]] = {}

    def add(self, wid: str, key: int) -> None:
        ids = self.lists.get(key)
        if ids is None:
            ids = self.lists[key] = []
            insort(self.keys, key)
        insort(ids, wid)

    def remove(self, wid: str, key: int) -> None:
        ids = self.lists[key]
        del ids[bisect_left(ids, wid)]
        if not ids:
            del self.lists[key]
            del self.keys[bisect_left(self.keys, key)]

    def move(self, wid: str, was: int, now: int) -> None:
        """:meth:`remove` from ``was`` then :meth:`add` at ``now``, in one call."""
        lists = self.lists
        left = lists[was]
        del left[bisect_left(left, wid)]
        if not left:
            del lists[was]
            del self.keys[bisect_left(self.keys, was)]
        ids = lists.get(now)
        if ids is None:
            ids = lists[now] = []
            insort(self.keys, now)
        insort(ids, wid)


class _Pool:
    """The workers eligible for one model."""

    __slots__ = ("buckets", "groups", "ids", "members", "model", "views")

    def __init__(self, model: str, orders: Iterable[str]) -> None:
        self.model = model
        self.ids: list[str] = []  # sorted
        self.members: set[str] = set()
        wanted = set(orders)
        self.buckets: dict[str, _Buckets] = {
            order: _Buckets() for order in ("outstanding", "load") if order in wanted
        }
        # (region, gpu_class, warm, capacity) -> ids by load; a group left empty is dropped.
        self.groups: dict[GroupKey, _Buckets] | None = {} if "groups" in wanted else None
        # origin -> the groups as a view without skipped ids reads them (EligibleView.groups);
        # cleared whenever a group is made or dropped.
        self.views: dict[str, list[_Group]] = {}

    def _group(self, place: Place | None) -> GroupKey:
        assert place is not None
        region, gpu_class, capacity, warm = place
        return (region, gpu_class, self.model in warm, capacity)

    def add(self, wid: str, keys: Keys) -> None:
        insort(self.ids, wid)
        self.members.add(wid)
        for order, buckets in self.buckets.items():
            buckets.add(wid, keys[1] if order == "load" else keys[0])
        if self.groups is not None:
            self._regroup(wid, keys)

    def remove(self, wid: str, keys: Keys) -> None:
        ids = self.ids
        del ids[bisect_left(ids, wid)]
        self.members.discard(wid)
        for order, buckets in self.buckets.items():
            buckets.remove(wid, keys[1] if order == "load" else keys[0])
        if self.groups is not None:
            self._ungroup(wid, keys)

    def _regroup(self, wid: str, keys: Keys) -> None:
        assert self.groups is not None
        key = self._group(keys[2])
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Buckets()
            self.views.clear()
        group.add(wid, keys[1])

    def _ungroup(self, wid: str, keys: Keys) -> None:
        assert self.groups is not None
        key = self._group(keys[2])
        group = self.groups[key]
        group.remove(wid, keys[1])
        if not group.keys:
            del self.groups[key]
            self.views.clear()

    def rekey(self, wid: str, old: Keys, new: Keys) -> None:
        for order, buckets in self.buckets.items():
            was, now = (old[1], new[1]) if order == "load" else (old[0], new[0])
            if was != now:
                buckets.move(wid, was, now)
        groups = self.groups
        if groups is None:
            return
        if old[2] == new[2]:  # same group (the usual case: a dispatch or a release)
            if old[1] != new[1]:
                groups[self._group(old[2])].move(wid, old[1], new[1])
        else:
            self._ungroup(wid, old)
            self._regroup(wid, new)


class _Worker:
    """What the index knows about one registered worker."""

    __slots__ = ("counted", "fresh", "keys", "last_seen", "listed", "models", "snapshot")

    def __init__(self, snapshot: WorkerSnapshot, now: float, fresh: bool) -> None:
        self.snapshot = snapshot
        self.last_seen = now
        self.fresh = fresh
        self.models = frozenset(snapshot.models_warm) | frozenset(snapshot.models_loadable)
        self.listed: frozenset[str] = _NOTHING  # models whose pool lists it
        self.keys: Keys = _NO_KEYS  # what it is filed under in its pools
        self.counted: tuple[int, int] | None = None  # (load, capacity) in the totals


class EligibilityIndex:
    """Eligible workers per model, updated by events (see the module docstring).

    ``worker_breakers`` and ``route_breakers`` are the core's own maps; the
    index reads them (never creates or drives a breaker) whenever the core
    says one changed and at the breaker's deadlines. ``orders`` names the
    buckets to keep (a subset of :data:`ORDERS`).
    """

    def __init__(
        self,
        *,
        stale_after_s: float,
        max_queue_factor: float,
        worker_breakers: Mapping[str, CircuitBreaker],
        route_breakers: Mapping[Route, CircuitBreaker],
        rtt_ms: Callable[[str, str], float],
        orders: Iterable[str] = (),
    ) -> None:
        self._stale_after_s = stale_after_s
        self._queue_factor = max_queue_factor
        self._worker_breakers = worker_breakers
        self._route_breakers = route_breakers
        self._rtt_of = rtt_ms
        wanted = set(orders)
        self._orders = tuple(o for o in ORDERS if o in wanted)
        self._grouped = "groups" in wanted
        unknown = wanted - set(ORDERS)
        if unknown:
            raise ValueError(f"unknown orders {sorted(unknown)}; allowed: {', '.join(ORDERS)}")
        self._workers: dict[str, _Worker] = {}
        self._outstanding: dict[str, int] = {}  # kept after a worker leaves, as the core did
        self._pools: dict[str, _Pool] = {}
        self._capable: dict[str, int] = {}  # model -> registered workers that list it
        self._by_region: dict[str, set[str]] = {}
        self._blocked_workers: set[str] = set()  # worker breaker would refuse
        self._blocked_routes: set[Route] = set()  # route breaker would refuse
        self._rtt: dict[Route, float] = {}
        self._load_total = 0
        self._capacity_total = 0
        # Deadlines, each with lazy deletion. (receipt time, worker) per heartbeat,
        # stale once < now - stale_after_s: a FIFO while receipt times never
        # decrease, a heap for one stamped earlier than the last. And breakers'
        # next state changes: (at, seq, kind, key...), the latest per breaker.
        self._seen: deque[tuple[float, str]] = deque()
        self._seen_late: list[tuple[float, str]] = []
        self._oldest = -math.inf  # the freshness bound last applied
        self._breaker_deadlines: list[tuple[float, int, str, str, str]] = []
        self._scheduled: dict[tuple[str, str, str], float] = {}
        self._seq = 0

    # ------------------------------------------------------------ views

    def knows_workers(self) -> bool:
        """Whether any worker is registered (heartbeat seen, not gone)."""
        return bool(self._workers)

    def serves(self, model: str) -> bool:
        """Whether a registered worker lists ``model`` as warm or loadable."""
        return self._capable.get(model, 0) > 0

    def outstanding(self, worker_id: str) -> int:
        return self._outstanding.get(worker_id, 0)

    def utilization(self, now: float) -> float:
        """Load over capacity of the fresh, healthy registered workers (0 if none)."""
        self.on_timer(now)
        capacity = self._capacity_total
        return self._load_total / capacity if capacity else 0.0

    def eligible(self, model: str, now: float) -> list[str]:
        """The ids eligible for ``model`` at ``now``, in worker_id order (a copy)."""
        self.on_timer(now)
        pool = self._pools.get(model)
        return list(pool.ids) if pool is not None else []

    def candidates(self, model: str, origin: str, tried: Sequence[str], now: float) -> EligibleView:
        """The eligible workers for a request as candidates, ``tried`` ones left out
        unless nothing else is eligible."""
        self.on_timer(now)
        pool = self._pools.get(model)
        if pool is None:
            return EligibleView(self, model, origin, [], (), ())
        skipped: tuple[str, ...] = ()
        if tried:
            members = pool.members
            skipped = tuple(sorted({wid for wid in tried if wid in members}))
            if len(skipped) == len(pool.ids):
                skipped = ()  # every eligible worker was tried: all of them again
        ids = pool.ids
        positions = tuple(bisect_left(ids, wid) for wid in skipped)
        return EligibleView(self, model, origin, ids, skipped, positions)

    # ------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """When eligibility may next change by time alone (None: never).

        A hint, exact to float rounding: a worker goes stale once ``last_seen <
        now - stale_after_s`` holds, which :meth:`on_timer` tests as such.
        """
        seen, late = self._seen, self._seen_late
        while seen and not self._current(*seen[0]):
            seen.popleft()  # superseded by a later heartbeat, or gone
        while late and not self._current(*late[0]):
            heapq.heappop(late)
        first = min([queue[0][0] for queue in (seen, late) if queue], default=None)
        stale = first + self._stale_after_s if first is not None else None
        breaker = self._breaker_deadlines[0][0] if self._breaker_deadlines else None
        known = [t for t in (stale, breaker) if t is not None]
        return min(known) if known else None

    def on_timer(self, now: float) -> None:
        """Apply the changes due by ``now``: workers gone stale, breakers' timed moves."""
        self._expire_stale(now)
        deadlines = self._breaker_deadlines
        due: list[tuple[str, str, str]] = []
        while deadlines and deadlines[0][0] <= now:
            at, _, kind, a, b = heapq.heappop(deadlines)
            key = (kind, a, b)
            if self._scheduled.get(key) == at:  # else superseded
                del self._scheduled[key]
                due.append(key)
        for kind, a, b in due:  # (asking may schedule the breaker's next deadline)
            if kind == "worker":
                self.worker_breaker_changed(a, now)
            else:
                self.route_breaker_changed((a, b), now)

    # ------------------------------------------------------------ events

    def heartbeat(self, snapshot: WorkerSnapshot, now: float) -> None:
        """A worker's heartbeat, received at ``now``."""
        self.heartbeats(((snapshot, now),))

    def heartbeats(self, reports: Iterable[tuple[WorkerSnapshot, float]]) -> None:
        """:meth:`heartbeat` for each ``(snapshot, received at)``, in order.

        A report that is the very object the worker last sent (a shell that
        keeps an unchanged snapshot sends the same one), from a worker fresh
        then and now, only moves its receipt time: what it is eligible for
        and its load stay as they are, so it is not judged again.

        The workers that went stale meanwhile are expired once, after the
        batch, at its latest time: the same state as expiring them before each
        report (eligibility is a function of each worker's latest report and
        of the freshness bound; a worker that reports in the batch is fresh
        either way), at one pass instead of one per report.
        """
        workers, seen, late = self._workers, self._seen, self._seen_late
        stale_after = self._stale_after_s
        latest = -math.inf
        for snapshot, now in reports:
            if now > latest:
                latest = now
            oldest = now - stale_after
            if oldest > self._oldest:
                self._oldest = oldest  # the freshness bound, as _expire_stale(now) sets it
            worker = workers.get(snapshot.worker_id)
            if (
                worker is None
                or worker.snapshot is not snapshot
                or not worker.fresh
                or now < self._oldest  # stamped before the freshness bound: stale now
            ):
                self._report(snapshot, now)
            else:
                worker.last_seen = now
                if seen and now < seen[-1][0]:
                    heapq.heappush(late, (now, snapshot.worker_id))
                else:
                    seen.append((now, snapshot.worker_id))
        if latest > -math.inf:
            self._expire_stale(latest)  # also keeps the queue of receipt times short

    def _report(self, snapshot: WorkerSnapshot, now: float) -> None:
        """A heartbeat that may change what the worker is eligible for (stale ones expired)."""
        wid = snapshot.worker_id
        fresh = not now < self._oldest
        worker = self._workers.get(wid)
        same = False
        if worker is None:
            worker = self._workers[wid] = _Worker(snapshot, now, fresh)
            self._by_region.setdefault(snapshot.region, set()).add(wid)
            for model in worker.models:
                self._capable[model] = self._capable.get(model, 0) + 1
            self._outstanding.setdefault(wid, 0)
        else:
            old = worker.snapshot
            # Whether anything _judge reads may change: the models it lists, its
            # region, health, capacity, reported load and freshness.
            same = (
                worker.fresh == fresh
                and old.healthy == snapshot.healthy
                and old.capacity == snapshot.capacity
                and old.queue_depth + old.running == snapshot.queue_depth + snapshot.running
                and old.gpu_class == snapshot.gpu_class
                and old.models_warm == snapshot.models_warm
            )
            if (
                old.models_warm != snapshot.models_warm
                or old.models_loadable != snapshot.models_loadable
            ):
                models = frozenset(snapshot.models_warm) | frozenset(snapshot.models_loadable)
                if models != worker.models:
                    same = False
                for model in worker.models - models:
                    self._capable[model] -= 1
                for model in models - worker.models:
                    self._capable[model] = self._capable.get(model, 0) + 1
                worker.models = models
            if old.region != snapshot.region:
                same = False
                self._by_region[old.region].discard(wid)
                self._by_region.setdefault(snapshot.region, set()).add(wid)
            worker.snapshot = snapshot
            worker.last_seen = now
            worker.fresh = fresh
        seen = self._seen
        if seen and now < seen[-1][0]:
            heapq.heappush(self._seen_late, (now, wid))
        else:
            seen.append((now, wid))
        if same:
            return  # a new report that changes nothing it is judged by
        self._judge(wid, worker)

    def gone(self, worker_id: str) -> None:
        """Forget a departed worker (its outstanding count and breakers stay)."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        self._unlist(worker_id, worker)
        snapshot = worker.snapshot
        self._by_region[snapshot.region].discard(worker_id)
        for model in worker.models:
            self._capable[model] -= 1

    def dispatched(self, worker_id: str, route: Route, now: float) -> None:
        """The core sent a request: permits taken from both breakers, outstanding + 1."""
        self._outstanding[worker_id] = self._outstanding.get(worker_id, 0) + 1
        self._watch_worker(worker_id, now)
        self._watch_route(route, now)
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._judge(worker_id, worker)

    def released(self, worker_id: str, route: Route, now: float, *, breakers_used: bool) -> None:
        """A request there ended (outstanding - 1, never below 0); ``breakers_used``:
        its outcome was recorded on both breakers."""
        count = self._outstanding.get(worker_id, 0) - 1
        self._outstanding[worker_id] = count if count > 0 else 0
        if breakers_used:
            self._watch_worker(worker_id, now)
            self._watch_route(route, now)
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._judge(worker_id, worker)

    def add_outstanding(self, worker_id: str, delta: int) -> None:
        """Change the outstanding count there by ``delta`` (never below 0)."""
        count = self._outstanding.get(worker_id, 0) + delta
        self._outstanding[worker_id] = count if count > 0 else 0
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._judge(worker_id, worker)

    def worker_breaker_changed(self, worker_id: str, now: float) -> None:
        """The worker's breaker was used (a permit taken, an outcome recorded)."""
        if self._watch_worker(worker_id, now):
            worker = self._workers.get(worker_id)
            if worker is not None:
                self._judge(worker_id, worker)

    def route_breaker_changed(self, route: Route, now: float) -> None:
        """The ``(model, region)`` breaker was used; re-judges its region if it flipped."""
        self._watch_route(route, now)

    # ------------------------------------------------------------ internals

    def _expire_stale(self, now: float) -> None:
        """Workers whose last heartbeat was received before ``now - stale_after_s``."""
        oldest = now - self._stale_after_s
        if oldest > self._oldest:
            self._oldest = oldest
        seen, workers = self._seen, self._workers
        while seen and seen[0][0] < oldest:
            t, wid = seen.popleft()
            worker = workers.get(wid)
            if worker is not None and worker.last_seen == t and worker.fresh:
                worker.fresh = False
                self._judge(wid, worker)
        late = self._seen_late
        while late and late[0][0] < oldest:
            self._expire(*heapq.heappop(late))

    def _current(self, t: float, wid: str) -> bool:
        """Whether the heartbeat received at ``t`` is the worker's latest, and it is fresh."""
        worker = self._workers.get(wid)
        return worker is not None and worker.fresh and worker.last_seen == t

    def _expire(self, t: float, wid: str) -> None:
        """The heartbeat received at ``t`` is too old now: stale, unless a later one came."""
        if self._current(t, wid):
            worker = self._workers[wid]
            worker.fresh = False
            self._judge(wid, worker)

    def _watch_worker(self, worker_id: str, now: float) -> bool:
        """Ask the worker's breaker again; whether its verdict flipped."""
        breaker = self._worker_breakers.get(worker_id)
        if breaker is None:
            return False
        blocked = self._blocked_workers
        if breaker.is_closed():  # allows, no deadline (the usual case)
            if worker_id in blocked:
                blocked.discard(worker_id)
                return True
            return False
        allows = breaker.would_allow(now)
        at = breaker.next_deadline()
        if at is not None:
            self._schedule(("worker", worker_id, ""), at)
        if allows == (worker_id not in blocked):
            return False
        if allows:
            blocked.discard(worker_id)
        else:
            blocked.add(worker_id)
        return True

    def _watch_route(self, route: Route, now: float) -> None:
        """Ask the route's breaker again; if its verdict flipped, re-judge its region."""
        breaker = self._route_breakers.get(route)
        if breaker is None:
            return
        if breaker.is_closed() and route not in self._blocked_routes:
            return  # allows, no deadline, as before (the usual case)
        allows = breaker.would_allow(now)
        at = breaker.next_deadline()
        if at is not None:
            self._schedule(("route", *route), at)
        blocked = self._blocked_routes
        if allows == (route not in blocked):
            return
        if allows:
            blocked.discard(route)
        else:
            blocked.add(route)
        model, region = route
        workers = self._workers
        for wid in sorted(self._by_region.get(region, ())):
            worker = workers[wid]
            if model in worker.models:
                self._judge(wid, worker)

    def _schedule(self, key: tuple[str, str, str], at: float) -> None:
        if self._scheduled.get(key) == at:
            return
        self._scheduled[key] = at
        self._seq += 1
        heapq.heappush(self._breaker_deadlines, (at, self._seq, *key))

    def _judge(self, wid: str, worker: _Worker) -> None:
        """Bring the worker's listings, bucket keys and utilization share up to date."""
        snapshot = worker.snapshot
        outstanding = self._outstanding[wid]
        reported = snapshot.queue_depth + snapshot.running
        load = outstanding if outstanding > reported else reported
        live = snapshot.healthy and worker.fresh
        counted = (load, snapshot.capacity) if live else None
        if counted != worker.counted:
            if worker.counted is not None:
                self._load_total -= worker.counted[0]
                self._capacity_total -= worker.counted[1]
            if counted is not None:
                self._load_total += load
                self._capacity_total += snapshot.capacity
            worker.counted = counted
        listed = _NOTHING
        if (
            live
            and outstanding < snapshot.capacity * self._queue_factor
            and wid not in self._blocked_workers
        ):
            listed = worker.models
            blocked = self._blocked_routes
            if blocked:
                region = snapshot.region
                listed = frozenset(m for m in listed if (m, region) not in blocked)
        keys: Keys = _NO_KEYS
        if self._orders:
            place: Place | None = None
            if self._grouped:
                place = (
                    snapshot.region,
                    snapshot.gpu_class,
                    snapshot.capacity,
                    snapshot.models_warm,
                )
            keys = (outstanding, load, place)
        before, old_keys = worker.listed, worker.keys
        if listed == before and keys == old_keys:
            return
        pools = self._pools
        for model in before:
            if model not in listed:
                pools[model].remove(wid, old_keys)
        for model in listed:
            if model in before:
                if keys != old_keys:
                    pools[model].rekey(wid, old_keys, keys)
            else:
                pool = pools.get(model)
                if pool is None:
                    pool = pools[model] = _Pool(model, self._orders)
                pool.add(wid, keys)
        worker.listed = listed
        worker.keys = keys

    def _unlist(self, wid: str, worker: _Worker) -> None:
        for model in worker.listed:
            self._pools[model].remove(wid, worker.keys)
        worker.listed = _NOTHING
        if worker.counted is not None:
            self._load_total -= worker.counted[0]
            self._capacity_total -= worker.counted[1]
            worker.counted = None

    def _rtt_ms(self, origin: str, region: str) -> float:
        key = (origin, region)
        rtt = self._rtt.get(key)
        if rtt is None:
            rtt = self._rtt[key] = self._rtt_of(origin, region)
        return rtt

    def _candidate(self, wid: str, model: str, origin: str) -> Candidate:
        snapshot = self._workers[wid].snapshot
        region = snapshot.region
        rtt = self._rtt_ms(origin, region)
        return Candidate(
            wid,
            region,
            snapshot.gpu_class,
            model in snapshot.models_warm,
            snapshot.queue_depth,
            snapshot.running,
            self._outstanding[wid],
            snapshot.capacity,
            rtt,
            region == origin,
        )


class EligibleView(OrderedCandidates):
    """Sorted ids minus skipped positions, read as candidates for one request.

    Valid until the index next changes (the core hands it to one strategy
    call). ``skipped`` are ids of ``ids`` left out (tried before), sorted,
    and ``positions`` their indices in ``ids``.
    """

    __slots__ = ("_ids", "_index", "_len", "_model", "_origin", "_positions", "_skipped")

    def __init__(
        self,
        index: EligibilityIndex,
        model: str,
        origin: str,
        ids: list[str],
        skipped: tuple[str, ...],
        positions: tuple[int, ...],
    ) -> None:
        self._index = index
        self._model = model
        self._origin = origin
        self._ids = ids
        self._skipped = skipped
        self._positions = positions
        self._len = len(ids) - len(positions)

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> Candidate: ...

    @overload
    def __getitem__(self, i: slice) -> list[Candidate]: ...

    def __getitem__(self, i: int | slice) -> Candidate | list[Candidate]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        return self._index._candidate(self.worker_id_at(i), self._model, self._origin)

    def __iter__(self) -> Iterator[Candidate]:
        # Every candidate at once (weighted_score and locality read them all): one
        # tight loop rather than a method call per position.
        index, model, origin = self._index, self._model, self._origin
        workers, outstanding, rtt_of = index._workers, index._outstanding, index._rtt_ms
        skipped = set(self._skipped)
        rtt: dict[str, float] = {}
        out: list[Candidate] = []
        for wid in self._ids:
            if wid in skipped:
                continue
            s = workers[wid].snapshot
            region = s.region
            ms = rtt.get(region)
            if ms is None:
                ms = rtt[region] = rtt_of(origin, region)
            out.append(
                Candidate(
                    wid,
                    region,
                    s.gpu_class,
                    model in s.models_warm,
                    s.queue_depth,
                    s.running,
                    outstanding[wid],
                    s.capacity,
                    ms,
                    region == origin,
                )
            )
        return iter(out)

    def position_after(self, worker_id: str) -> int:
        at = bisect_right(self._ids, worker_id)
        return at - bisect_left(self._positions, at)

    def worker_id_at(self, i: int) -> str:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("candidate index out of range")
        for p in self._positions:
            if p <= i:
                i += 1
            else:
                break
        return self._ids[i]

    def rank(self, worker_id: str) -> int:
        at = bisect_left(self._ids, worker_id)
        return at - bisect_left(self._positions, at)

    def groups(self) -> Sequence[CandidateGroup] | None:
        index = self._index
        if not index._grouped:
            return None
        pool = index._pools.get(self._model)
        if pool is None or pool.groups is None:
            return []
        if not self._skipped:
            # The same for every request from this origin until a group comes or goes.
            cached = pool.views.get(self._origin)
            if cached is None:
                cached = pool.views[self._origin] = self._groups(pool.groups)
            return cached
        return self._groups(pool.groups)

    def _groups(self, groups: dict[GroupKey, _Buckets]) -> list[_Group]:
        index, origin = self._index, self._origin
        return [
            _Group(self, buckets, region, gpu_class, warm, capacity, index._rtt_ms(origin, region))
            for (region, gpu_class, warm, capacity), buckets in groups.items()
        ]

    def _level(self, ids: list[str]) -> EligibleView | None:
        """``ids`` (sorted, all eligible) less the skipped ones; None if none is left."""
        skipped = self._skipped
        positions: tuple[int, ...] = ()
        left_out: tuple[str, ...] = ()
        if skipped:
            found = [(bisect_left(ids, wid), wid) for wid in skipped]
            hits = [(p, wid) for p, wid in found if p < len(ids) and ids[p] == wid]
            if len(hits) == len(ids):
                return None
            positions = tuple(p for p, _ in hits)
            left_out = tuple(wid for _, wid in hits)
        return EligibleView(self._index, self._model, self._origin, ids, left_out, positions)

    def least(self, order: str) -> Sequence[Candidate] | None:
        pool = self._index._pools.get(self._model)
        buckets = pool.buckets.get(order) if pool is not None else None
        if buckets is None:
            return None
        for key in buckets.keys:
            level = self._level(buckets.lists[key])
            if level is not None:  # else all tried; a later bucket has an untried one
                return level
        return EligibleView(self._index, self._model, self._origin, [], (), ())


class _Group(CandidateGroup):
    """One ``(region, gpu_class, warm, capacity)`` group of a view, by load.

    Reads the view's model, origin and skipped ids, never its positions, so
    one made for a view without skipped ids serves every such view of the
    same model and origin (the pool keeps them until its groups change).
    """

    __slots__ = ("_buckets", "_view")

    def __init__(
        self,
        view: EligibleView,
        buckets: _Buckets,
        region: str,
        gpu_class: str,
        warm: bool,
        capacity: int,
        rtt_ms: float,
    ) -> None:
        super().__init__(region, gpu_class, warm, capacity, rtt_ms, region == view._origin)
        self._view = view
        self._buckets = buckets

    def loads(self) -> Iterator[int]:
        buckets, view = self._buckets, self._view
        if not view._skipped:
            return iter(buckets.keys)
        lists = buckets.lists
        return (load for load in buckets.keys if view._level(lists[load]) is not None)

    def members(self, load: int) -> OrderedCandidates:
        view = self._view
        ids = self._buckets.lists[load]
        if not view._skipped:
            return EligibleView(view._index, view._model, view._origin, ids, (), ())
        level = view._level(ids)
        if level is None:
            raise KeyError(f"no member at load {load}")
        return level
