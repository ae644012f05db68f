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

Conventions: every strategy first orders the candidates by ``worker_id``, so
its answer does not depend on the order the core listed them in. Ties are
broken by ``rng.choice`` over the tied candidates in ``worker_id`` order; when
nothing is tied no random number is drawn. Float scores within ``1e-9`` of the
best count as tied. ``choose`` returns ``None`` only for an empty candidate
list.

Registering a new strategy
--------------------------
Write a frozen dataclass for its parameters and a factory from that config
to an object with ``name`` and ``choose``, then::

    @dataclass(frozen=True, slots=True)
    class MyConfig:
        alpha: float = 1.0

    class MyStrategy:
        name = "mine"
        def __init__(self, config: MyConfig) -> None: ...
        def choose(self, request, candidates, now, rng): ...

    register_placement("mine", MyConfig, MyStrategy)
    strategy = make_placement("mine", {"alpha": 2.0})
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, runtime_checkable

from haif.contracts import Request

__all__ = [
    "DEFAULT_GPU_PREFERENCE",
    "JSQ",
    "P2C",
    "PLACEMENTS",
    "Candidate",
    "JSQConfig",
    "LeastOutstanding",
    "LeastOutstandingConfig",
    "Locality",
    "LocalityConfig",
    "P2CConfig",
    "PlacementSpec",
    "PlacementStrategy",
    "RandomConfig",
    "RandomPlacement",
    "RoundRobin",
    "RoundRobinConfig",
    "WeightedScore",
    "WeightedScoreConfig",
    "make_placement",
    "placement_names",
    "register_placement",
]

_TIE_EPS = 1e-9


# ------------------------------------------------------------------ helpers


def _check_number(owner: str, field: str, value: object, *, minimum: float | None = None) -> float:
    """Return ``value`` as a finite float or raise a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{owner}.{field} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{owner}.{field} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{owner}.{field} must be >= {minimum:g}, got {value!r}")
    return number


def _check_int(owner: str, field: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{field} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{field} must be >= {minimum}, got {value!r}")


def _by_id(candidates: Sequence[Candidate]) -> list[Candidate]:
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
    best = min(key(c) for c in candidates)
    return _tie_break([c for c in candidates if key(c) <= best + _TIE_EPS], rng)


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
        # One cheap test on the hot path; the detailed checks only on failure.
        if not (
            queue_depth >= 0
            and running >= 0
            and outstanding >= 0
            and capacity >= 1
            and 0.0 <= rtt_ms < math.inf
        ):
            _check_int("Candidate", "queue_depth", queue_depth, minimum=0)
            _check_int("Candidate", "running", running, minimum=0)
            _check_int("Candidate", "outstanding", outstanding, minimum=0)
            _check_int("Candidate", "capacity", capacity, minimum=1)
            _check_number("Candidate", "rtt_ms", rtt_ms, minimum=0.0)
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


# ----------------------------------------------------------------- protocol


@runtime_checkable
class PlacementStrategy(Protocol):
    """Chooses one of the eligible candidates for a request."""

    name: str

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


@dataclass(frozen=True, slots=True)
class RandomConfig:
    """``random`` has no parameters."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}


class RandomPlacement:
    """Uniform choice with ``rng.choice`` (over candidates in worker_id order)."""

    __slots__ = ("config",)
    name: str = "random"

    def __init__(self, config: RandomConfig | None = None) -> None:
        self.config = config or RandomConfig()

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


@dataclass(frozen=True, slots=True)
class RoundRobinConfig:
    """``round_robin`` has no parameters."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}


class RoundRobin:
    """Rotate over candidates in worker_id order, keyed on the last chosen id.

    The next pick is the smallest id strictly greater than the last chosen
    one, wrapping to the smallest id; the first pick is the smallest id. The
    rng is not used.
    """

    __slots__ = ("config", "last_worker_id")
    name: str = "round_robin"

    def __init__(self, config: RoundRobinConfig | None = None) -> None:
        self.config = config or RoundRobinConfig()
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
            ids = [c.worker_id for c in ordered]
            index = bisect_right(ids, self.last_worker_id)
            if index == len(ordered):
                index = 0
        chosen = ordered[index]
        self.last_worker_id = chosen.worker_id
        return chosen


# -------------------------------------------------------- least outstanding


@dataclass(frozen=True, slots=True)
class LeastOutstandingConfig:
    """``least_outstanding`` has no parameters."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}


class LeastOutstanding:
    """Minimum local ``outstanding`` (heartbeat load ignored), ties by rng."""

    __slots__ = ("config",)
    name: str = "least_outstanding"

    def __init__(self, config: LeastOutstandingConfig | None = None) -> None:
        self.config = config or LeastOutstandingConfig()

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        return _argmin(_by_id(candidates), lambda c: c.outstanding, rng)


# ---------------------------------------------------------------------- p2c


@dataclass(frozen=True, slots=True)
class P2CConfig:
    """``p2c`` has no parameters."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}


class P2C:
    """Power of two choices: ``rng.sample`` two, keep the lower ``load``.

    Ties go to the first sampled candidate; a single candidate is returned
    without drawing.
    """

    __slots__ = ("config",)
    name: str = "p2c"

    def __init__(self, config: P2CConfig | None = None) -> None:
        self.config = config or P2CConfig()

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
        first, second = rng.sample(_by_id(candidates), 2)
        return second if second.load < first.load else first


# ---------------------------------------------------------------------- jsq


@dataclass(frozen=True, slots=True)
class JSQConfig:
    """``jsq`` has no parameters."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}


class JSQ:
    """Join the shortest queue: minimum ``load``, ties uniformly by rng."""

    __slots__ = ("config",)
    name: str = "jsq"

    def __init__(self, config: JSQConfig | None = None) -> None:
        self.config = config or JSQConfig()

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        if not candidates:
            return None
        return _argmin(_by_id(candidates), lambda c: c.load, rng)


# ----------------------------------------------------------- weighted score

GpuPreference = tuple[tuple[str, float], ...]

DEFAULT_GPU_PREFERENCE: GpuPreference = (
    ("A100-80G", 0.8),
    ("CPU", 0.0),
    ("H100-80G", 1.0),
    ("L40S", 0.6),
    ("RTX4090-24G", 0.4),
)


def _normalize_preference(value: object) -> GpuPreference:
    """Turn a mapping or an iterable of pairs into a sorted tuple of pairs."""
    owner, field = "WeightedScoreConfig", "gpu_preference"
    pairs: Iterable[object]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list | tuple):
        pairs = value
    else:
        raise ValueError(f"{owner}.{field} must be a mapping or pairs, got {value!r}")
    seen: dict[str, float] = {}
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"{owner}.{field} entries must be (gpu_class, score), got {pair!r}")
        gpu_class, score = pair
        if not isinstance(gpu_class, str) or not gpu_class:
            raise ValueError(
                f"{owner}.{field} gpu class must be a non-empty str, got {gpu_class!r}"
            )
        if gpu_class in seen:
            raise ValueError(f"{owner}.{field} lists {gpu_class!r} twice")
        seen[gpu_class] = _check_number(owner, f"{field}[{gpu_class!r}]", score)
    return tuple(sorted(seen.items()))


@dataclass(frozen=True, slots=True)
class WeightedScoreConfig:
    """Weights of the seeds' linear score; ``w_rtt`` is per 100 ms of RTT.

    ``gpu_preference`` may be given as a mapping or pairs; it is stored as a
    tuple of ``(gpu_class, score)`` pairs sorted by class. Unlisted classes
    score 0.
    """

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    w_region: float = 1.0
    w_gpu: float = 1.0
    gpu_preference: GpuPreference | Mapping[str, float] = DEFAULT_GPU_PREFERENCE
    w_warm: float = 1.0
    w_queue: float = 1.0
    w_rtt: float = 0.0

    def __post_init__(self) -> None:
        for name in ("w_region", "w_gpu", "w_warm", "w_queue", "w_rtt"):
            number = _check_number("WeightedScoreConfig", name, getattr(self, name), minimum=0.0)
            object.__setattr__(self, name, number)
        object.__setattr__(self, "gpu_preference", _normalize_preference(self.gpu_preference))

    def preference(self, gpu_class: str) -> float:
        """The configured preference for ``gpu_class`` (0 when unlisted)."""
        return dict(_normalize_preference(self.gpu_preference)).get(gpu_class, 0.0)


class WeightedScore:
    """Highest weighted score wins; ties (within 1e-9) by rng."""

    __slots__ = ("_preference", "config")
    name: str = "weighted_score"

    def __init__(self, config: WeightedScoreConfig | None = None) -> None:
        self.config = config or WeightedScoreConfig()
        self._preference = dict(_normalize_preference(self.config.gpu_preference))

    def score(self, candidate: Candidate) -> float:
        """The candidate's score under this strategy's weights."""
        cfg = self.config
        return (
            cfg.w_region * candidate.same_region
            + cfg.w_gpu * self._preference.get(candidate.gpu_class, 0.0)
            + cfg.w_warm * candidate.warm
            - cfg.w_queue * candidate.utilization
            - cfg.w_rtt * candidate.rtt_ms / 100.0
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
        return _argmin(_by_id(candidates), lambda c: -self.score(c), rng)


# ----------------------------------------------------------------- locality


@dataclass(frozen=True, slots=True)
class LocalityConfig:
    """A candidate is saturated at ``utilization >= spill_utilization``."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    spill_utilization: float = 0.8

    def __post_init__(self) -> None:
        value = _check_number("LocalityConfig", "spill_utilization", self.spill_utilization)
        if value <= 0.0:
            raise ValueError(f"LocalityConfig.spill_utilization must be > 0, got {value!r}")
        object.__setattr__(self, "spill_utilization", value)


class Locality:
    """Locality first, spilling to the nearest region with headroom.

    1. Unsaturated ``same_region`` candidates: least ``load``, ties by rng.
    2. Else regions by increasing RTT (the region's minimum ``rtt_ms``, then
       name): the first with an unsaturated candidate; least ``load`` there.
    3. Else (all saturated): least ``utilization``, then lowest ``rtt_ms``,
       remaining ties by rng.
    """

    __slots__ = ("config",)
    name: str = "locality"

    def __init__(self, config: LocalityConfig | None = None) -> None:
        self.config = config or LocalityConfig()

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
        limit = self.config.spill_utilization
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


# ----------------------------------------------------------------- registry

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    """A registered strategy: its config dataclass and a factory from it."""

    config_cls: type[Any]
    factory: Callable[[Any], PlacementStrategy]


_REGISTRY: dict[str, PlacementSpec] = {}

PLACEMENTS: Mapping[str, PlacementSpec] = MappingProxyType(_REGISTRY)
"""Read-only view of the registered strategies, by name."""


def register_placement(
    name: str,
    config_cls: type[C],
    factory: Callable[[C], PlacementStrategy],
    *,
    replace: bool = False,
) -> None:
    """Register strategy ``name``: ``make_placement(name, params)`` will call
    ``factory(config_cls(**params))``.

    ``config_cls`` must be a dataclass (its fields are the allowed
    parameters). Registering an existing name raises ValueError unless
    ``replace`` is true.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"placement name must be a non-empty str, got {name!r}")
    if not (isinstance(config_cls, type) and is_dataclass(config_cls)):
        raise ValueError(f"config_cls for placement {name!r} must be a dataclass type")
    if name in _REGISTRY and not replace:
        raise ValueError(f"placement strategy {name!r} is already registered")
    _REGISTRY[name] = PlacementSpec(config_cls=config_cls, factory=factory)


def placement_names() -> tuple[str, ...]:
    """Registered strategy names, sorted."""
    return tuple(sorted(_REGISTRY))


def make_placement(name: str, params: Mapping[str, object] | None = None) -> PlacementStrategy:
    """Build strategy ``name`` from ``params`` (its config's fields).

    Raises ValueError for an unknown name (listing the allowed names), an
    unknown parameter (naming it and listing the allowed ones) or an invalid
    value (the config's own message, naming the field).
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        allowed = ", ".join(placement_names())
        raise ValueError(f"unknown placement strategy {name!r}; allowed: {allowed}")
    params = dict(params or {})
    allowed_params = sorted(f.name for f in fields(spec.config_cls) if f.init)
    for key in sorted(params, key=str):
        if key not in allowed_params:
            allowed = ", ".join(allowed_params) or "(none)"
            raise ValueError(
                f"unknown parameter {key!r} for placement strategy {name!r}; allowed: {allowed}"
            )
    try:
        config = spec.config_cls(**params)
    except TypeError as exc:
        raise ValueError(f"invalid parameters for placement strategy {name!r}: {exc}") from exc
    return spec.factory(config)


register_placement("random", RandomConfig, RandomPlacement)
register_placement("round_robin", RoundRobinConfig, RoundRobin)
register_placement("least_outstanding", LeastOutstandingConfig, LeastOutstanding)
register_placement("p2c", P2CConfig, P2C)
register_placement("jsq", JSQConfig, JSQ)
register_placement("weighted_score", WeightedScoreConfig, WeightedScore)
register_placement("locality", LocalityConfig, Locality)
