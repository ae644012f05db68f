"""Placement: which eligible worker runs a request.

Theory of operation
-------------------
The orchestrator core filters the worker set first (unhealthy, stale,
breaker-open and model-incapable workers are removed) and hands each strategy
only the *eligible* workers as :class:`Candidate` objects. A strategy is a
pure function of ``(request, candidates, now, rng)`` plus, at most, its own
deterministic state; it never reads a clock or the global random generator,
so a simulation run replays bit-for-bit from its seed.

Load signal. A heartbeat's ``queue_depth + running`` may be seconds old,
whereas ``outstanding`` (requests this orchestrator dispatched and has not
seen finish) is exact local knowledge that is never stale-low. ``load`` is
therefore ``max(outstanding, queue_depth + running)``.

Why each strategy exists:

* ``random`` -- the baseline every paper compares against; stateless,
  herd-free, but its maximum load grows as ``log n / log log n``.
* ``round_robin`` -- the classic fair rotation (nginx/Envoy default).
  The cursor is the last chosen ``worker_id``; the next pick is the smallest
  id greater than it (wrapping), so workers joining or leaving do not
  restart or skip the cycle.
* ``least_outstanding`` -- Envoy's "least request" on purely local,
  exact counts: immune to stale heartbeats, blind to load sent by other
  orchestrators.
* ``p2c`` -- Mitzenmacher's power of two choices ("The Power of Two
  Choices in Randomized Load Balancing", 2001): sample two candidates and
  take the less loaded. The maximum load drops to ``log log n / log 2``
  while avoiding the herding that full JSQ shows on stale information
  (Envoy's least-request uses the same two-choice sampling).
* ``jsq`` -- join the shortest queue on ``load``: optimal with fresh
  information, the reference point for the others.
* ``weighted_score`` -- the HAIF seeds' scorer: a linear score over
  region affinity, GPU class preference, warm model cache and queue depth
  (utilization), optionally penalising RTT::

      score = w_region*same_region + w_gpu*pref(gpu_class) + w_warm*warm
              - w_queue*utilization - w_rtt*rtt_ms/100

* ``locality`` -- locality first with spill-over: stay in the origin
  region while it has a candidate below ``spill_utilization``, otherwise
  spill to the nearest (lowest RTT) region that has one; if every candidate
  is saturated, take the least utilized overall (lower RTT on ties).
* ``prefix_affinity`` -- send a request where its prompt's leading KV
  blocks (``Request.prefix_hashes``, :mod:`haif.fleet.prefix`) are most
  likely cached, unless that worker is too loaded: SGLang's cache-aware
  router and the Gateway API Inference Extension's ``prefix-cache-scorer``
  keep the same *approximate* index (which blocks were sent where, per
  worker, least recently sent evicted first: it is updated when a request
  is placed, not from the workers, so it can believe a block is cached
  after the worker evicted it or restarted). Among candidates whose
  ``load`` is at most the least ``load`` plus ``max_imbalance``, take the
  one whose index holds the longest run of the request's leading blocks
  (ties: less ``load``, then rng); with fewer than ``min_match_blocks``
  matched anywhere, or no hashes, take the least ``load`` (as ``jsq``).
  O(eligible workers x matched blocks) per request.

Conventions: every strategy first orders the candidates by ``worker_id``, so
its answer does not depend on the order the core listed them in. Ties are
broken by ``rng.choice`` over the tied candidates in ``worker_id`` order; when
nothing is tied no random number is drawn. Float scores within ``1e-9`` of the
best count as tied. ``choose`` returns ``None`` only for an empty candidate
list.

Fleet-size independent decisions
--------------------------------
The core does not build a list of every eligible worker per request (that
cost grows with the fleet). It hands strategies an :class:`OrderedCandidates`:
a read-only view of the eligible workers, already in ``worker_id`` order,
that builds a :class:`Candidate` only for the positions a strategy reads.
The strategies draw exactly what they draw from a list (``rng.choice`` of
one index, ``rng.sample`` of two indices), so a view and the equivalent
list give the same answer for the same seed. Two hooks spare the rest the
O(n) walk: :meth:`OrderedCandidates.position_after` (round robin's cursor)
and :meth:`OrderedCandidates.least` (the tied minimum of ``outstanding`` or
``load``, kept by the core's index for the orders a strategy names in its
``indexed_orders``).

``weighted_score`` and ``locality`` read :meth:`OrderedCandidates.groups`
instead (``indexed_orders = ("groups",)``): the eligible workers split into
:class:`CandidateGroup` s, one per ``(region, gpu_class, warm, capacity)``,
each listing its members by ``load`` in increasing order (the index keeps
them so). Members of a group differ only in ``load`` (and in how it splits
into ``outstanding``, ``queue_depth`` and ``running``, which neither
strategy reads), so both rules can be answered group by group, from the
lowest loads, and the answer is the one the exhaustive scan gives, exactly,
with the same random draws:

* ``weighted_score``: within a group every score term but the queue term is
  the same, and the score is computed with the same float operations, each
  monotone, so it never increases with ``load``: the best score is the best
  of the groups' least loads, and the tied set (within 1e-9 of it) is read
  from each group's lowest loads until one falls out of the tie;
* ``locality``: whether a group has an unsaturated member is whether its
  least ``load`` is (``utilization`` grows with ``load`` at one capacity);
  the least ``load`` among them, the nearest region with one, and the least
  ``utilization`` and then ``rtt_ms`` of step 3 all come from the groups'
  least loads.

The tied workers, the union of a few loads' members, each in ``worker_id``
order, are read as one sequence in ``worker_id`` order (:class:`_Union`: its
length, and the one member ``rng.choice`` picks, found by bisection), so the
same index is drawn as from the full list. Cost per request: O(groups) score
evaluations plus O(tied loads squared x log n) bisections, whatever the
number of workers; groups are bounded by the fleet's variety (regions x GPU
classes x warm or not x capacities), not its size. Given a plain list (or a
view without groups) both strategies score every candidate, as before.

Strategies by name
------------------
A strategy is a small class with a ``name`` and ``choose``; its
parameters are its constructor's keyword arguments, declared as the fields
of a frozen settings dataclass (:func:`haif.policy.settings.setting`), so
checking them is structural: an unknown parameter is refused by name and a
bad value is refused by its field's type. A strategy without parameters is
a plain class. :data:`STRATEGIES` maps each name to its class, and
:func:`make_placement` builds one from a name and a parameter mapping (the
``placement`` / ``placement_params`` of :class:`haif.control.config.CoreConfig`).
Adding a strategy is adding an entry::

    @setting
    class Mine:
        name: ClassVar[str] = "mine"
        alpha: Positive = 1.0

        def choose(self, request, candidates, now, rng): ...

    STRATEGIES["mine"] = Mine
    strategy = make_placement("mine", {"alpha": 2.0})
"""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import field, fields, is_dataclass
from typing import Annotated, ClassVar, NamedTuple, Protocol, overload, runtime_checkable

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, field_validator

from haif.contracts import Request
from haif.policy.settings import (
    Count,
    Finite,
    NonNegative,
    NonNegativeCount,
    Positive,
    setting,
)

__all__ = [
    "DEFAULT_GPU_PREFERENCE",
    "JSQ",
    "P2C",
    "STRATEGIES",
    "Candidate",
    "CandidateGroup",
    "GpuPreference",
    "LeastOutstanding",
    "Locality",
    "OrderedCandidates",
    "ParameterError",
    "PlacementStrategy",
    "PrefixAffinity",
    "RandomPlacement",
    "RoundRobin",
    "WeightedScore",
    "make_placement",
    "placement_names",
    "strategy_class",
    "strategy_parameters",
]

_TIE_EPS = 1e-9


# ------------------------------------------------------------------ helpers


def _by_id(candidates: Sequence[Candidate]) -> Sequence[Candidate]:
    if isinstance(candidates, OrderedCandidates):
        return candidates  # already in worker_id order
    return sorted(candidates, key=lambda c: c.worker_id)


def _tie_break(tied: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Pick uniformly among ``tied`` (already in worker_id order); no draw for one."""
    if len(tied) == 1:
        return tied[0]
    return rng.choice(tied)


def _argmin(
    candidates: Sequence[Candidate], key: Callable[[Candidate], float], rng: random.Random
) -> Candidate:
    """Minimum of ``key`` over ``candidates`` (worker_id ordered), ties by ``rng``."""
    keys = [key(c) for c in candidates]
    best = min(keys)
    limit = best + _TIE_EPS
    return _tie_break([c for c, k in zip(candidates, keys, strict=True) if k <= limit], rng)


# ---------------------------------------------------------------- candidate


class _CandidateFields(NamedTuple):
    worker_id: str
    region: str
    gpu_class: str
    warm: bool
    queue_depth: int
    running: int
    outstanding: int
    capacity: int
    rtt_ms: float
    same_region: bool


@setting(title="Candidate")
class _CandidateLoad:
    """What :class:`Candidate` accepts in its load fields."""

    queue_depth: NonNegativeCount
    running: NonNegativeCount
    outstanding: NonNegativeCount
    capacity: Count
    rtt_ms: NonNegative


class Candidate(_CandidateFields):
    """One eligible worker as the core presents it to a placement strategy.

    ``outstanding`` is the orchestrator's exact count of requests it sent
    there and has not seen finish; ``queue_depth`` and ``running`` come from
    the last heartbeat. ``rtt_ms`` is from the request's origin region.

    An immutable named tuple rather than a dataclass: the core builds one per
    eligible worker for every request, and a tuple is several times cheaper
    to build (see ``bench/sim_speed.py``). Values are checked on creation.
    """

    __slots__ = ()

    def __new__(
        cls,
        worker_id: str,
        region: str,
        gpu_class: str,
        warm: bool,
        queue_depth: int,
        running: int,
        outstanding: int,
        capacity: int,
        rtt_ms: float,
        same_region: bool,
    ) -> Candidate:
        # One cheap test on the hot path; the declared checks (naming the
        # field) only on failure.
        if not (
            queue_depth >= 0
            and running >= 0
            and outstanding >= 0
            and capacity >= 1
            and 0.0 <= rtt_ms < math.inf
        ):
            _CandidateLoad(queue_depth, running, outstanding, capacity, rtt_ms)
        return tuple.__new__(
            cls,
            (
                worker_id,
                region,
                gpu_class,
                warm,
                queue_depth,
                running,
                outstanding,
                capacity,
                rtt_ms,
                same_region,
            ),
        )

    @property
    def load(self) -> int:
        """``max(outstanding, queue_depth + running)``: the local count is never stale-low."""
        return max(self.outstanding, self.queue_depth + self.running)

    @property
    def utilization(self) -> float:
        """``load / capacity`` (may exceed 1 when requests queue)."""
        return self.load / self.capacity


class OrderedCandidates(Sequence[Candidate]):
    """Eligible candidates in ``worker_id`` order (no id twice), read lazily.

    What the core hands a strategy instead of a list (see the module
    docstring): indexing and ``len`` are cheap, iterating builds every
    candidate. The two hooks have exhaustive defaults; the core's view
    answers them from its index.
    """

    __slots__ = ()

    def __iter__(self) -> Iterator[Candidate]:
        for i in range(len(self)):
            yield self[i]

    def position_after(self, worker_id: str) -> int:
        """How many candidates have an id ``<= worker_id`` (``bisect_right`` on the ids)."""
        return bisect_right([c.worker_id for c in self], worker_id)

    def least(self, order: str) -> Sequence[Candidate] | None:
        """The candidates tied at the minimum ``outstanding`` (``order="outstanding"``)
        or ``load`` (``order="load"``), in ``worker_id`` order; ``None`` when this
        view does not index ``order`` (the strategy then looks at every candidate)."""
        return None

    def groups(self) -> Sequence[CandidateGroup] | None:
        """The candidates split by ``(region, gpu_class, warm, capacity)``, each group
        read by ``load`` (see the module docstring); ``None`` when this view does not
        keep them (the strategy then looks at every candidate)."""
        return None

    def worker_id_at(self, i: int) -> str:
        """The id of candidate ``i`` (a view answers without building the candidate)."""
        return self[i].worker_id

    def rank(self, worker_id: str) -> int:
        """How many candidates have an id ``< worker_id`` (``bisect_left`` on the ids)."""
        return bisect_left([c.worker_id for c in self], worker_id)


class CandidateGroup:
    """Eligible candidates that share ``region``, ``gpu_class``, ``warm`` and
    ``capacity`` (hence ``rtt_ms`` and ``same_region``) and differ only in load.

    :meth:`loads` iterates the loads its members have, increasing (lazily, so
    a strategy that stops at the first reads no more), and :meth:`members` the
    candidates at one of them, in ``worker_id`` order (never empty). A group
    has no loads when every member is left out (tried before, with an untried
    worker elsewhere).
    """

    __slots__ = ("capacity", "gpu_class", "region", "rtt_ms", "same_region", "warm")

    def __init__(
        self,
        region: str,
        gpu_class: str,
        warm: bool,
        capacity: int,
        rtt_ms: float,
        same_region: bool,
    ) -> None:
        self.region = region
        self.gpu_class = gpu_class
        self.warm = warm
        self.capacity = capacity
        self.rtt_ms = rtt_ms
        self.same_region = same_region

    def loads(self) -> Iterator[int]:
        """The members' loads, each once, increasing."""
        raise NotImplementedError

    def members(self, load: int) -> OrderedCandidates:
        """The members at ``load`` (one :meth:`loads` gave), in worker_id order."""
        raise NotImplementedError


class _Union(Sequence[Candidate]):
    """Disjoint runs of candidates, each in ``worker_id`` order, read as one sequence
    in ``worker_id`` order without merging them: ``len`` adds up, and member ``k``
    is found by bisection (see ``__getitem__``), never by walking the runs."""

    __slots__ = ("_len", "_runs")

    def __init__(self, runs: Sequence[OrderedCandidates]) -> None:
        self._runs = sorted(runs, key=len, reverse=True)
        self._len = sum(len(run) for run in runs)

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, k: int) -> Candidate: ...

    @overload
    def __getitem__(self, k: slice) -> list[Candidate]: ...

    def __getitem__(self, k: int | slice) -> Candidate | list[Candidate]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(self._len))]
        if k < 0:
            k += self._len
        if not 0 <= k < self._len:
            raise IndexError("candidate index out of range")
        runs = len(self._runs)
        if self._len <= runs * runs * max(1, (self._len // runs).bit_length()):
            # Few members for many runs: merging the ids (a call per member) costs less
            # than bisecting (about runs^2 x log(members per run) calls).
            merged = sorted(
                (run.worker_id_at(i), r, i)
                for r, run in enumerate(self._runs)
                for i in range(len(run))
            )
            _, r, i = merged[k]
            return self._runs[r][i]
        # Windows [a, b) of the runs that still may hold member k of their union.
        # Bisect the widest for its first member with >= k members of the union
        # ahead of it; either that is the one, or the one lies strictly between it
        # and its predecessor, in another run: narrow the others to that gap.
        windows = [(run, 0, len(run)) for run in self._runs]
        while True:
            windows.sort(key=lambda w: w[2] - w[1], reverse=True)
            (run, a, b), others = windows[0], windows[1:]
            if not others:
                return run[a + k]
            lo, hi = a, b
            while lo < hi:
                mid = (lo + hi) // 2
                if _ahead(run.worker_id_at(mid), others) + mid - a < k:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < b and _ahead(run.worker_id_at(lo), others) + lo - a == k:
                return run[lo]
            after = run.worker_id_at(lo - 1) if lo > a else None
            before = run.worker_id_at(lo) if lo < b else None
            k -= lo - a
            narrowed = []
            for other, oa, ob in others:
                na = _within(other.rank(after), oa, ob) if after is not None else oa
                nb = _within(other.rank(before), oa, ob) if before is not None else ob
                k -= na - oa
                if na < nb:
                    narrowed.append((other, na, nb))
            windows = narrowed


def _within(r: int, a: int, b: int) -> int:
    return a if r < a else b if r > b else r


def _ahead(wid: str, windows: Sequence[tuple[OrderedCandidates, int, int]]) -> int:
    """How many members of the windows have an id ``< wid``."""
    n = 0
    for run, a, b in windows:
        r = run.rank(wid)
        n += (a if r < a else b if r > b else r) - a
    return n


def _tie_break_runs(runs: Sequence[OrderedCandidates], rng: random.Random) -> Candidate:
    """:func:`_tie_break` over the union of ``runs`` (disjoint, each in worker_id order)."""
    if len(runs) == 1:
        return _tie_break(runs[0], rng)
    return _tie_break(_Union(runs), rng)


def _least(
    ordered: Sequence[Candidate], order: str, key: Callable[[Candidate], int], rng: random.Random
) -> Candidate:
    """``_argmin`` of an integer ``key`` (so ties are equal values), from the index if it has it."""
    if isinstance(ordered, OrderedCandidates):
        tied = ordered.least(order)
        if tied is not None:
            return _tie_break(tied, rng)
    return _argmin(ordered, key, rng)


# ----------------------------------------------------------------- protocol


@runtime_checkable
class PlacementStrategy(Protocol):
    """Chooses one of the eligible candidates for a request."""

    @property
    def name(self) -> str:
        """The strategy's name in :data:`STRATEGIES` (``placement: <name>``)."""
        ...

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        """Return a member of ``candidates``, or ``None`` iff it is empty."""
        ...


# ------------------------------------------------------------------- random


class RandomPlacement:
    """Uniform choice with ``rng.choice`` (over candidates in worker_id order)."""

    __slots__ = ()
    name: ClassVar[str] = "random"

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        return rng.choice(_by_id(candidates))


# -------------------------------------------------------------- round robin


class RoundRobin:
    """Rotate over candidates in worker_id order, keyed on the last chosen id.

    The next pick is the smallest id strictly greater than the last chosen
    one, wrapping to the smallest id; the first pick is the smallest id. The
    rng is not used.
    """

    __slots__ = ("last_worker_id",)
    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self.last_worker_id: str | None = None

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        ordered = _by_id(candidates)
        index = 0
        if self.last_worker_id is not None:
            if isinstance(ordered, OrderedCandidates):
                index = ordered.position_after(self.last_worker_id)
            else:
                index = bisect_right([c.worker_id for c in ordered], self.last_worker_id)
            if index == len(ordered):
                index = 0
        chosen = ordered[index]
        self.last_worker_id = chosen.worker_id
        return chosen


# -------------------------------------------------------- least outstanding


class LeastOutstanding:
    """Minimum local ``outstanding`` (heartbeat load ignored), ties by rng."""

    __slots__ = ()
    name: ClassVar[str] = "least_outstanding"
    indexed_orders: ClassVar[tuple[str, ...]] = ("outstanding",)

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        return _least(_by_id(candidates), "outstanding", lambda c: c.outstanding, rng)


# ---------------------------------------------------------------------- p2c


class P2C:
    """Power of two choices: ``rng.sample`` two, keep the lower ``load``.

    Ties go to the first sampled candidate; a single candidate is returned
    without drawing.
    """

    __slots__ = ()
    name: ClassVar[str] = "p2c"

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        ordered = _by_id(candidates)
        # Sampling two positions draws exactly what sampling two candidates does.
        i, j = rng.sample(range(len(ordered)), 2)
        first, second = ordered[i], ordered[j]
        return second if second.load < first.load else first


# ---------------------------------------------------------------------- jsq


class JSQ:
    """Join the shortest queue: minimum ``load``, ties uniformly by rng."""

    __slots__ = ()
    name: ClassVar[str] = "jsq"
    indexed_orders: ClassVar[tuple[str, ...]] = ("load",)

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        return _least(_by_id(candidates), "load", lambda c: c.load, rng)


# ----------------------------------------------------------- weighted score

GpuPreference = tuple[tuple[str, float], ...]
"""``(gpu_class, score)`` pairs, sorted by class."""

DEFAULT_GPU_PREFERENCE: GpuPreference = (
    ("A100-80G", 0.8),
    ("CPU", 0.0),
    ("H100-80G", 1.0),
    ("L40S", 0.6),
    ("RTX4090-24G", 0.4),
)


_GpuClass = Annotated[str, Field(strict=True, min_length=1)]
_BY_CLASS = TypeAdapter(dict[_GpuClass, Finite])


def _as_pairs(value: object) -> object:
    """A mapping becomes its ``(gpu_class, score)`` pairs (checked as a mapping, so
    that an error names the class); pairs pass through."""
    if isinstance(value, Mapping):
        return tuple(_BY_CLASS.validate_python(value).items())
    if not isinstance(value, list | tuple):
        raise ValueError("must be a mapping of gpu class to score, or (gpu_class, score) pairs")
    return value


_Preference = Annotated[tuple[tuple[_GpuClass, Finite], ...], BeforeValidator(_as_pairs)]


@setting
class WeightedScore:
    """Highest weighted score wins; ties (within 1e-9) by rng.

    The weights (each ``>= 0``) of the seeds' linear score; ``w_rtt`` is per
    100 ms of RTT. ``gpu_preference`` may be given as a mapping or pairs; it
    is stored as ``(gpu_class, score)`` pairs sorted by class. Unlisted
    classes score 0.
    """

    name: ClassVar[str] = "weighted_score"
    indexed_orders: ClassVar[tuple[str, ...]] = ("groups",)

    w_region: NonNegative = 1.0
    w_gpu: NonNegative = 1.0
    gpu_preference: _Preference = DEFAULT_GPU_PREFERENCE
    w_warm: NonNegative = 1.0
    w_queue: NonNegative = 1.0
    w_rtt: NonNegative = 0.0
    _preference: dict[str, float] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    @field_validator("gpu_preference")
    @classmethod
    def _sorted_once_each(cls, pairs: GpuPreference) -> GpuPreference:
        seen: set[str] = set()
        for gpu_class, _ in pairs:
            if gpu_class in seen:
                raise ValueError(f"lists {gpu_class!r} twice")
            seen.add(gpu_class)
        return tuple(sorted(pairs))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_preference", dict(self.gpu_preference))

    def preference(self, gpu_class: str) -> float:
        """The configured preference for ``gpu_class`` (0 when unlisted)."""
        return self._preference.get(gpu_class, 0.0)

    def score(self, candidate: Candidate) -> float:
        """The candidate's score under this strategy's weights."""
        return self._score(
            candidate.same_region,
            candidate.gpu_class,
            candidate.warm,
            candidate.utilization,
            candidate.rtt_ms,
        )

    def _score(
        self, same_region: bool, gpu_class: str, warm: bool, utilization: float, rtt_ms: float
    ) -> float:
        # choose() computes this by groups in the same float operations, in the same
        # order (so the same value to the last bit): keep the two in step. Each step
        # is monotone in ``utilization`` (w_queue >= 0), so at one set of the other
        # inputs the score never rises with it.
        return (
            self.w_region * same_region
            + self.w_gpu * self._preference.get(gpu_class, 0.0)
            + self.w_warm * warm
            - self.w_queue * utilization
            - self.w_rtt * rtt_ms / 100.0
        )

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        groups = candidates.groups() if isinstance(candidates, OrderedCandidates) else None
        if groups is None:
            return _argmin(list(_by_id(candidates)), lambda c: -self.score(c), rng)
        # The exhaustive rule on keys -score: best = min, tied = key <= best + 1e-9.
        # Within a group the key never decreases with load, so the best key is a
        # group's first load's, and a group's tied loads are its first few. The key
        # is _score's expression, split: the terms a group shares first, then
        # ((shared - queue term) - rtt term), the order _score subtracts them in.
        w_region, w_gpu, w_warm, w_queue, w_rtt = (
            self.w_region,
            self.w_gpu,
            self.w_warm,
            self.w_queue,
            self.w_rtt,
        )
        preference = self._preference
        heads: list[tuple[float, CandidateGroup, int, Iterator[int], float, float]] = []
        best = math.inf
        for g in groups:
            loads = g.loads()
            load = next(loads, None)
            if load is None:
                continue
            shared = (
                w_region * g.same_region
                + w_gpu * preference.get(g.gpu_class, 0.0)
                + w_warm * g.warm
            )
            rtt_term = w_rtt * g.rtt_ms / 100.0
            key = -(shared - w_queue * (load / g.capacity) - rtt_term)
            heads.append((key, g, load, loads, shared, rtt_term))
            if key < best:
                best = key
        limit = best + _TIE_EPS
        tied: list[OrderedCandidates] = []
        for key, g, load, loads, shared, rtt_term in heads:
            if key > limit:
                continue
            tied.append(g.members(load))
            for more in loads:
                if -(shared - w_queue * (more / g.capacity) - rtt_term) > limit:
                    break
                tied.append(g.members(more))
        return _tie_break_runs(tied, rng)


# ----------------------------------------------------------------- locality


@setting
class Locality:
    """Locality first, spilling to the nearest region with headroom.

    A candidate is saturated at ``utilization >= spill_utilization`` (> 0).

    1. Unsaturated ``same_region`` candidates: least ``load``, ties by rng.
    2. Else regions by increasing RTT (the region's minimum ``rtt_ms``, then
       name): the first with an unsaturated candidate; least ``load`` there.
    3. Else (all saturated): least ``utilization``, then lowest ``rtt_ms``,
       remaining ties by rng.
    """

    name: ClassVar[str] = "locality"
    indexed_orders: ClassVar[tuple[str, ...]] = ("groups",)

    spill_utilization: Positive = 0.8

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        groups = candidates.groups() if isinstance(candidates, OrderedCandidates) else None
        if groups is not None:
            return self._by_groups(groups, rng)
        ordered = list(_by_id(candidates))
        limit = self.spill_utilization
        open_ = [c for c in ordered if c.utilization < limit]

        local = [c for c in open_ if c.same_region]
        if local:
            return _argmin(local, lambda c: c.load, rng)

        if open_:
            region_rtt: dict[str, float] = {}
            for c in open_:
                region_rtt[c.region] = min(region_rtt.get(c.region, math.inf), c.rtt_ms)
            nearest = min(region_rtt, key=lambda r: (region_rtt[r], r))
            return _argmin([c for c in open_ if c.region == nearest], lambda c: c.load, rng)

        least = min(c.utilization for c in ordered)
        tied = [c for c in ordered if c.utilization <= least + _TIE_EPS]
        return _argmin(tied, lambda c: c.rtt_ms, rng)

    def _by_groups(self, groups: Sequence[CandidateGroup], rng: random.Random) -> Candidate:
        """The three steps above, from each group's lowest loads (same choice, same draws).

        A group has an unsaturated member iff its least load is unsaturated
        (one capacity: utilization grows with load), and that least load is
        its least unsaturated one.
        """
        limit = self.spill_utilization
        heads: list[tuple[CandidateGroup, int]] = []
        open_: list[tuple[CandidateGroup, int]] = []
        # The origin's groups first: when one is open, no other group is read.
        for local in (True, False):
            for g in groups:
                if g.same_region != local:
                    continue
                load = next(g.loads(), None)
                if load is None:
                    continue
                heads.append((g, load))
                if load / g.capacity < limit:
                    open_.append((g, load))
            if open_:
                if not local:
                    # Every open candidate of a region has the region's RTT from the origin.
                    nearest = min((g.rtt_ms, g.region) for g, _ in open_)[1]
                    open_ = [head for head in open_ if head[0].region == nearest]
                least_load = min(load for _, load in open_)
                return _tie_break_runs(
                    [g.members(load) for g, load in open_ if load == least_load], rng
                )
        # All saturated: least utilization (within 1e-9), then least RTT (within 1e-9).
        # Only a group's first load can be within 1e-9 of the least: its next
        # load is at least 1 more at the same capacity, 1 / capacity more.
        least = min(load / g.capacity for g, load in heads)
        bound = least + _TIE_EPS
        tied = [(g, load) for g, load in heads if load / g.capacity <= bound]
        rtt_bound = min(g.rtt_ms for g, _ in tied) + _TIE_EPS
        return _tie_break_runs([g.members(load) for g, load in tied if g.rtt_ms <= rtt_bound], rng)


# ---------------------------------------------------------- prefix affinity


@setting
class PrefixAffinity:
    """The worker most likely to hold the request's leading prefix blocks, within a
    load bound (see the module docstring).

    ``max_imbalance``: how many more requests (``load``) than the least loaded
    candidate a worker may have and still win on its cached prefix.
    ``min_match_blocks``: the fewest leading blocks that count as a match.
    ``index_blocks``: block hashes remembered per worker (its least recently
    sent evicted first): about what one worker's prefix cache holds.
    """

    name: ClassVar[str] = "prefix_affinity"

    max_imbalance: NonNegativeCount = 4
    min_match_blocks: Count = 1
    index_blocks: Count = 100_000
    _index: dict[str, dict[int, None]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def matched(self, worker_id: str, hashes: Sequence[int]) -> int:
        """How many of ``hashes``, from the first, the index holds for ``worker_id``."""
        held = self._index.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def _remember(self, worker_id: str, hashes: Sequence[int]) -> None:
        held = self._index.setdefault(worker_id, {})
        for h in hashes:
            held.pop(h, None)  # most recently sent last
            held[h] = None
        excess = len(held) - self.index_blocks
        if excess > 0:
            for h in list(itertools.islice(held, excess)):
                del held[h]

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        ordered = list(_by_id(candidates))
        hashes = request.prefix_hashes
        if not hashes:
            return _argmin(ordered, lambda c: c.load, rng)
        limit = min(c.load for c in ordered) + self.max_imbalance
        best, best_match = [], 0
        for c in ordered:
            if c.load > limit:
                continue
            m = self.matched(c.worker_id, hashes)
            if m > best_match:
                best, best_match = [c], m
            elif m == best_match and m > 0:
                best.append(c)
        pool = best if best_match >= self.min_match_blocks else ordered
        chosen = _argmin(pool, lambda c: c.load, rng)
        self._remember(chosen.worker_id, hashes)
        return chosen


# ---------------------------------------------------------------- by name

STRATEGIES: dict[str, type[PlacementStrategy]] = {
    cls.name: cls
    for cls in (
        RandomPlacement,
        RoundRobin,
        LeastOutstanding,
        P2C,
        JSQ,
        WeightedScore,
        Locality,
        PrefixAffinity,
    )
}
"""Every strategy by its name; adding an entry makes ``placement: <name>`` valid."""


class ParameterError(ValueError):
    """An unknown or invalid placement parameter; ``parameter`` is its dotted path."""

    def __init__(self, message: str, parameter: str = "") -> None:
        super().__init__(message)
        self.parameter = parameter


def placement_names() -> tuple[str, ...]:
    """The strategies' names, sorted."""
    return tuple(sorted(STRATEGIES))


def strategy_class(name: str) -> type[PlacementStrategy]:
    """The strategy called ``name``; ValueError lists the allowed names."""
    cls = STRATEGIES.get(name)
    if cls is None:
        allowed = ", ".join(placement_names())
        raise ValueError(f"unknown placement strategy {name!r}; allowed: {allowed}")
    return cls


def strategy_parameters(cls: type[PlacementStrategy]) -> tuple[str, ...]:
    """The parameters ``cls`` takes: its dataclass fields (none for a plain class)."""
    if not is_dataclass(cls):
        return ()
    return tuple(f.name for f in fields(cls) if f.init)


def make_placement(name: str, params: Mapping[str, object] | None = None) -> PlacementStrategy:
    """Build strategy ``name`` with ``params`` (its constructor's keyword arguments).

    Raises ValueError for an unknown name (listing the allowed names), and
    :class:`ParameterError` (a ValueError) for an unknown parameter (naming
    it and listing the allowed ones) or an invalid value (naming the
    parameter, what it accepts and what it got).
    """
    cls = strategy_class(name)
    params = dict(params or {})
    allowed_params = strategy_parameters(cls)
    for key in sorted(params, key=str):
        if key not in allowed_params:
            allowed = ", ".join(allowed_params) or "(none)"
            raise ParameterError(
                f"unknown parameter {key!r} for placement strategy {name!r}; allowed: {allowed}",
                str(key),
            )
    factory: Callable[..., PlacementStrategy] = cls
    try:
        return factory(**params)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        problem = error["msg"].removeprefix("Value error, ")
        raise ParameterError(
            f"invalid parameter {where!r} for placement strategy {name!r}: "
            f"{problem} (got {error['input']!r})",
            where,
        ) from None
