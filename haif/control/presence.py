"""Presence: which workers are alive, judged from their heartbeats alone.

Theory of operation
-------------------
An orchestrator learns that a worker exists, and that it still does, only
from its heartbeats. :class:`Presence` keeps, per worker, the receiver's time
of its last heartbeat and an estimate of its heartbeat interval:

- Until a worker's second heartbeat its interval is assumed to be
  ``default_interval_s``: the workers' configured ``heartbeat_s`` (0.5 s,
  the runtime worker's default, unless told otherwise). A worker beating
  more than ``evict_after_missed`` times slower than that is evicted after
  its first heartbeat, and after each one following a rejoin.
- The second heartbeat's gap *is* the estimate; each later gap moves it by
  an exponentially weighted average, ``0.7 · estimate + 0.3 · gap``, where a
  gap counts at most twice the estimate (one long stall must not stretch the
  estimate for good). A gap of zero changes nothing.
- A worker is judged by ``interval = max(min_interval_s, estimate)``.

A present worker silent for more than ``stale_after_missed`` intervals is
*stale* (a view: it missed a heartbeat, nothing is decided). One silent for
more than ``evict_after_missed`` intervals — ``now > seen + evict_after_missed
· interval`` — is *evicted*: :meth:`Presence.on_timer` returns an
:class:`Evicted` notice, whose :attr:`~Evicted.gone` (a ``WorkerGone``) the
shell feeds to its control core, and forgets the worker's state. When an
evicted worker beats again it is present anew (its interval estimate starts
over) and :meth:`Presence.heartbeat` returns a :class:`Rejoined` notice; the
core needs nothing more than that heartbeat, which the shell feeds it as
usual.

Timers (DESIGN.md §1, rule 2): :meth:`Presence.next_deadline` is when
:meth:`Presence.on_timer` must next be called — the first instant after the
earliest worker's limit, so a heartbeat that arrives exactly at the limit
still counts. It is never later than the next eviction, and may be earlier
(the worker it was armed for beat since; ``on_timer`` then finds nothing to
do, and the next deadline is later). Both shells arm it the same way: a SimPy
timeout, or ``loop.call_at``.

Cost: heartbeats are the most numerous messages in a fleet, so
:meth:`~Presence.heartbeat` is O(1) and usually only updates the estimate:
the heap of limits is touched only when a limit moves *earlier* (a new
worker, or a shrinking estimate). Entries made stale by later heartbeats
stay in the heap as lower bounds and are refreshed lazily when they reach
its top (about once per ``evict_after_missed - 1`` intervals per worker);
when many are stale at once the heap is rebuilt instead (see ``_settle``).
No heartbeat scans the workers; only the views and a rebuild do.
:attr:`Presence.min_silence_s` lets a shell that batches heartbeats (the
simulator) feed several between two calls of :meth:`next_deadline`.

The rule and its numbers are the runtime orchestrator's, unchanged since
before this module existed; it is pure (time is an argument, no clock, no
I/O), so the simulator runs the deployed failure detector.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

from haif.contracts import WorkerGone

#: Interval assumed until a worker's second heartbeat (the runtime worker's default).
DEFAULT_HEARTBEAT_S = 0.5
#: No worker is judged by a shorter interval than this.
MIN_HEARTBEAT_S = 0.05


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    """How silence is judged; validated once, where it is built."""

    #: Silent for more than this many intervals: evicted.
    evict_after_missed: int = 3
    #: Silent for more than this many intervals: stale (a view only).
    stale_after_missed: float = 1.5
    default_interval_s: float = DEFAULT_HEARTBEAT_S
    min_interval_s: float = MIN_HEARTBEAT_S

    def __post_init__(self) -> None:
        if self.evict_after_missed < 1:
            raise ValueError(f"evict_after_missed must be >= 1, got {self.evict_after_missed}")
        if self.stale_after_missed <= 0:
            raise ValueError(f"stale_after_missed must be > 0, got {self.stale_after_missed}")
        if self.default_interval_s <= 0:
            raise ValueError(f"default_interval_s must be > 0, got {self.default_interval_s}")
        if self.min_interval_s <= 0:
            raise ValueError(f"min_interval_s must be > 0, got {self.min_interval_s}")


@dataclass(frozen=True, slots=True)
class Evicted:
    """A worker was silent for ``evict_after_missed`` intervals: it is gone."""

    worker_id: str
    at_s: float  # when it was evicted
    silent_s: float  # since its last heartbeat
    interval_s: float  # the interval it was judged by

    @property
    def gone(self) -> WorkerGone:
        """The event that tells the control core."""
        return WorkerGone(self.worker_id)


@dataclass(frozen=True, slots=True)
class Rejoined:
    """An evicted worker beat again: it is present anew."""

    worker_id: str
    at_s: float
    away_s: float  # since its eviction


class _Beat:
    """One present worker's state (mutable, internal).

    Its limit (``seen + evict_after_missed * interval``) is computed when
    needed, not stored: most heartbeats only move it later.
    """

    __slots__ = ("estimate", "queued", "seen")

    def __init__(self, seen: float, queued: float) -> None:
        self.seen = seen  # receiver's time of its last heartbeat
        self.estimate: float | None = None  # heartbeat interval, from the gaps seen
        self.queued = queued  # key of its live heap entry (<= its limit); inf once evicted

    def __lt__(self, other: object) -> bool:
        return False  # heap entries only tie up to here for stale duplicates


_Entry = tuple[float, str, _Beat]  # (limit, worker, its state) in the heap


class Presence:
    """Heartbeats in, eviction and rejoin notices out. Not thread-safe."""

    def __init__(self, config: PresenceConfig | None = None) -> None:
        self.config = cfg = config if config is not None else PresenceConfig()
        self._missed = float(cfg.evict_after_missed)
        self._min = cfg.min_interval_s
        self._first = max(cfg.min_interval_s, cfg.default_interval_s)
        #: The shortest silence that evicts: no heartbeat at ``t`` makes a
        #: deadline earlier than ``t + min_silence_s``, so a shell may feed
        #: heartbeats that far ahead without asking :meth:`next_deadline` between.
        self.min_silence_s = self._missed * self._min
        self._live: dict[str, _Beat] = {}
        self._evicted: dict[str, float] = {}  # worker -> when, until it beats again
        # Lower bounds of the present workers' limits; an entry whose key is
        # not its worker's ``queued`` is stale and dropped when popped.
        self._heap: list[_Entry] = []
        self._next: float | None = None  # next_deadline(): just after the heap's top key
        #: Workers evicted since the start.
        self.evictions = 0

    # ------------------------------------------------------------ inputs

    def heartbeat(self, worker_id: str, now: float) -> Rejoined | None:
        """Worker ``worker_id``'s heartbeat arrived at ``now``."""
        try:
            beat = self._live[worker_id]
        except KeyError:
            return self._join(worker_id, now)
        est = beat.estimate
        gap = now - beat.seen
        beat.seen = now
        if est is not None and gap >= est:
            # The hot path: the estimate does not shrink, so the limit only
            # moves later and its heap entry stays a lower bound.
            # 0.7 * est + 0.3 * min(gap, 2 * est), inlined.
            cap = est + est
            beat.estimate = 0.7 * est + 0.3 * (gap if gap < cap else cap)
            return None
        if gap > 0.0:  # a first estimate, or a shrinking one (gap < est < 2 * est)
            est = gap if est is None else 0.7 * est + 0.3 * gap
            beat.estimate = est
        interval = self._first if est is None else (est if est > self._min else self._min)
        limit = now + self._missed * interval
        if limit < beat.queued:  # earlier than its heap entry: it needs its own
            self._push((limit, worker_id, beat))
        return None

    def heartbeats(self, beats: Iterable[tuple[str, float]]) -> list[Rejoined]:
        """:meth:`heartbeat` for each ``(worker, arrived at)``, in order; the rejoin notices.

        One call for a batch (a shell that queues heartbeats feeds them so);
        the usual case, a gap no shorter than the estimate, is done here.
        """
        live = self._live
        out: list[Rejoined] = []
        for worker_id, now in beats:
            beat = live.get(worker_id)
            if beat is not None:
                est = beat.estimate
                gap = now - beat.seen
                if est is not None and gap >= est:  # heartbeat()'s hot path
                    beat.seen = now
                    cap = est + est
                    beat.estimate = 0.7 * est + 0.3 * (gap if gap < cap else cap)
                    continue
            notice = self.heartbeat(worker_id, now)
            if notice is not None:
                out.append(notice)
        return out

    def _join(self, worker_id: str, now: float) -> Rejoined | None:
        limit = now + self._missed * self._first
        beat = self._live[worker_id] = _Beat(now, limit)
        self._push((limit, worker_id, beat))
        evicted_s = self._evicted.pop(worker_id, None)
        return None if evicted_s is None else Rejoined(worker_id, now, now - evicted_s)

    def _push(self, entry: _Entry) -> None:
        limit = entry[0]
        entry[2].queued = limit
        heap = self._heap
        if not heap or limit < heap[0][0]:
            self._next = math.nextafter(limit, math.inf)
        heapq.heappush(heap, entry)

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next be called (None: no worker to watch)."""
        return self._next

    def on_timer(self, now: float) -> list[Evicted]:
        """Evict every worker silent past its limit at ``now``."""
        heap = self._heap
        out: list[Evicted] = []
        while heap and heap[0][0] < now:
            entry = heapq.heappop(heap)
            key, wid, beat = entry
            if beat.queued != key:
                continue  # superseded by an earlier entry, or evicted already
            limit = self._limit(beat)
            if limit < now:
                out.append(self._evict(wid, beat, now))
            else:  # it beat since: watch its new limit
                beat.queued = limit
                heapq.heappush(heap, (limit, wid, beat))
        self._settle()
        return out

    def _evict(self, worker_id: str, beat: _Beat, now: float) -> Evicted:
        del self._live[worker_id]
        beat.queued = math.inf  # every heap entry of it is stale now
        self._evicted[worker_id] = now
        self.evictions += 1
        return Evicted(worker_id, now, now - beat.seen, self._judged(beat))

    def _settle(self) -> None:
        """Refresh stale entries at the top, so the next deadline is a live one.

        The lazy half of the heap: each present worker's entry is refreshed
        about once per ``evict_after_missed - 1`` intervals. One by one at
        first; when more than one in 32 of the present workers' entries are
        stale at once (steady heartbeats make most of them stale between two
        deadlines), rebuilding the heap from every present worker is cheaper,
        and costs at most 32 refreshes per entry that needed one.
        """
        heap = self._heap
        missed, least, first = self._missed, self._min, self._first
        budget = len(self._live) >> 5
        while heap:
            key, wid, beat = heap[0]
            if beat.queued != key:
                heapq.heappop(heap)
                continue
            est = beat.estimate
            limit = beat.seen + missed * (first if est is None else (est if est > least else least))
            if limit <= key:
                self._next = math.nextafter(key, math.inf)
                return
            if budget <= 0:
                self._rebuild()
                return
            budget -= 1
            beat.queued = limit
            heapq.heapreplace(heap, (limit, wid, beat))
        self._next = None

    def _rebuild(self) -> None:
        """A fresh heap: one exact entry per present worker, stale ones gone."""
        missed, least, first = self._missed, self._min, self._first
        heap: list[_Entry] = []
        for wid, beat in self._live.items():
            est = beat.estimate
            limit = beat.seen + missed * (first if est is None else (est if est > least else least))
            beat.queued = limit
            heap.append((limit, wid, beat))
        heapq.heapify(heap)
        self._heap = heap
        self._next = math.nextafter(heap[0][0], math.inf) if heap else None

    # ------------------------------------------------------------ views

    def _judged(self, beat: _Beat) -> float:
        est = beat.estimate
        return self._first if est is None else (est if est > self._min else self._min)

    def _limit(self, beat: _Beat) -> float:
        return beat.seen + self._missed * self._judged(beat)

    def __contains__(self, worker_id: object) -> bool:
        """Present: it beat and was not evicted since."""
        return worker_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def present(self) -> list[str]:
        """Workers that beat and were not evicted since, sorted."""
        return sorted(self._live)

    def stale(self, now: float) -> list[str]:
        """Present workers silent for more than ``stale_after_missed`` intervals."""
        k = self.config.stale_after_missed
        return sorted(w for w, b in self._live.items() if now - b.seen > k * self._judged(b))

    def fresh(self, now: float) -> list[str]:
        """Present workers that are not stale."""
        k = self.config.stale_after_missed
        return sorted(w for w, b in self._live.items() if now - b.seen <= k * self._judged(b))

    def evicted(self) -> list[str]:
        """Workers evicted and not back since, sorted."""
        return sorted(self._evicted)

    def last_seen(self, worker_id: str) -> float | None:
        """When a present worker last beat (None: not present)."""
        beat = self._live.get(worker_id)
        return None if beat is None else beat.seen

    def interval(self, worker_id: str) -> float | None:
        """The interval a present worker is judged by (None: not present)."""
        beat = self._live.get(worker_id)
        return None if beat is None else self._judged(beat)

    def limit(self, worker_id: str) -> float | None:
        """The time after which a present worker is evicted unless it beats again."""
        beat = self._live.get(worker_id)
        return None if beat is None else self._limit(beat)
