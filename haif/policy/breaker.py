"""Circuit breaker: stop sending work to a backend that keeps failing.

Theory of operation
-------------------
Why: when a worker (or a whole region) fails or becomes very slow, every
request sent to it wastes a client's latency budget and piles more load onto
something already unhealthy. A breaker watches recent outcomes, and once they
are bad enough it *opens*: callers are refused immediately (with a
``retry_after`` hint) so they can route elsewhere. After a cool-down it lets a
few *probe* calls through; their outcomes decide whether the backend is back.

State machine (events in brackets, ``k`` = consecutive re-opens)::

              [TRIP: failure rate >= failure_threshold
               or slow rate >= slow_call_threshold]
    CLOSED ---------------------------------------------> OPEN (k = 0)
      ^                                                    |  ^
      | [PROBES_PASSED: both probe rates                   |  | [PROBES_FAILED]
      |  below their thresholds]                           |  | [PROBE_TIMEOUT:
      |                                     [OPEN_ELAPSED] |  |  half_open_max_s]
      |                                                    v  | (k += 1)
      +-------------------------------------------------- HALF_OPEN

* CLOSED admits everything and records outcomes in a sliding window: the last
  ``window_size`` outcomes (``window="count"``) or those recorded at ``t`` with
  ``now - t < window_size`` (``window="time"``). A rate exists once the window
  holds ``min(min_calls, window_size)`` (count) or ``min_calls`` (time)
  outcomes; rates are evaluated whenever an outcome is recorded, and reaching a
  threshold *exactly* trips. A call is slow iff ``duration > slow_call_s``; a
  slow failure counts as both.
* OPEN refuses everything for ``min(open_max_s, open_s * open_multiplier**k)``
  seconds (overflow saturates at ``open_max_s``), see :func:`open_duration`.
* HALF_OPEN admits exactly ``half_open_permits`` probes per visit and refuses
  the rest. When all probe outcomes are in it closes (fresh empty window,
  ``k = 0``) or re-opens. With ``half_open_max_s`` set, a visit that has not
  collected every probe outcome in time re-opens, whether or not any probe was
  handed out.

Conventions chosen
------------------
* Pure and clock-free: every time-dependent method takes ``now`` (seconds on
  the caller's clock, expected non-decreasing) and first applies the
  time-driven transitions due by ``now``. :meth:`CircuitBreaker.on_timer` does
  only that, for shells that schedule a wake-up at :meth:`next_deadline`.
* Deadline anchoring: a time-driven transition happens *at its deadline*, not
  when it is observed, so the state is a function of the recorded history
  alone (a simulator polling at every deadline and a runtime that looks
  seldom agree). A non-finite ``now`` raises ``ValueError``; an earlier ``now``
  than already seen never undoes a transition. Catching up over a long idle gap replays the missed
  open/half-open cycles; past a few dozen of them whole cycles are skipped
  arithmetically, so a huge jump of ``now`` costs O(log) work, not O(gap).
  (Where a duration is below the float resolution of ``now``, e.g. 1 s at
  ``now`` = 1e300, time cannot advance: the breaker then stays half-open.)
* Generations: every transition increments :attr:`CircuitBreaker.generation`.
  A :class:`Permit` remembers the generation it was issued in, and an outcome
  recorded with a permit from another generation is silently ignored (a call
  admitted before the breaker opened neither closes a half-open breaker nor
  pollutes a fresh window). Each probe permit carries a slot number and is
  counted at most once.
* Rejections are never outcomes: :meth:`CircuitBreaker.record` raises
  ``TypeError`` for anything that is not a :class:`Permit`.
* ``retry_after`` is the time left in the open period; while half-open with
  every probe out it is the time left before ``half_open_max_s`` re-opens the
  breaker, or, without that timeout, the base open duration (a hint only).
* :meth:`CircuitBreaker.next_deadline` is ``None`` when closed and when
  half-open without ``half_open_max_s`` (nothing happens by itself then).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Final, Literal

from pydantic import Field, ValidationInfo, field_validator

from haif.policy.settings import AtLeastOne, Count, Fraction, Positive, one_of, setting

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BreakerConfig",
    "CircuitBreaker",
    "Decision",
    "Permit",
    "Rejection",
    "StateName",
    "open_duration",
]

StateName = Literal["closed", "open", "half_open"]
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# Exact step-by-step catch-up for this many time-driven transitions, then
# skip whole open/half-open cycles arithmetically.
_EXACT_CATCH_UP_STEPS: Final = 64
# Hard bound on loop iterations in one catch-up (defensive; the skip keeps
# real catch-ups far below it).
_MAX_CATCH_UP_STEPS: Final = 4096
# Largest number of cycles skipped in one jump (keeps float(n) finite).
_MAX_SKIP: Final = 2**1023
# Up to this many uncapped open durations are summed term by term.
_EXACT_SUM_TERMS: Final = 256


@setting
class BreakerConfig:
    """Breaker tuning; validated on construction (``ValueError`` names the field).

    The constraints are the field types (see :mod:`haif.policy.settings`);
    ``window_size`` is also a whole number of calls when ``window="count"``.
    ``slow_call_s`` may be ``inf`` (nothing is ever slow), like ``None``.
    """

    window: Annotated[str, one_of("count", "time")] = "count"
    window_size: Positive = 20
    min_calls: Count = 10
    failure_threshold: Fraction = 0.5
    slow_call_s: Annotated[float, Field(strict=True, ge=0)] | None = None
    slow_call_threshold: Fraction = 1.0
    open_s: Positive = 30.0
    open_multiplier: AtLeastOne = 1.0
    open_max_s: Positive = 300.0
    half_open_permits: Count = 1
    half_open_max_s: Positive | None = None

    @field_validator("window_size")
    @classmethod
    def _whole_calls(cls, size: float, info: ValidationInfo) -> float:
        if info.data.get("window") == "count" and size != int(size):
            raise ValueError(
                f"must be a whole number of calls >= 1 for window='count', got {size!r}"
            )
        return size

    @property
    def required_calls(self) -> int:
        """Outcomes the window must hold before a rate is defined."""
        if self.window == "count":
            return min(self.min_calls, int(self.window_size))
        return self.min_calls


def _raw_open(config: BreakerConfig, reopen_count: int) -> float:
    """``open_s * open_multiplier**reopen_count``, ``inf`` on overflow."""
    if config.open_multiplier == 1.0:
        return config.open_s
    try:
        # float(): an int multiplier would make this an exact (unbounded) int power.
        return config.open_s * float(config.open_multiplier) ** reopen_count
    except OverflowError:
        return math.inf


def open_duration(config: BreakerConfig, reopen_count: int) -> float:
    """How long the breaker stays open on its ``reopen_count``-th consecutive re-open.

    ``min(open_max_s, open_s * open_multiplier**reopen_count)``; never raises,
    however large ``reopen_count`` is.
    """
    return min(config.open_max_s, _raw_open(config, reopen_count))


def _uncapped_count(config: BreakerConfig, reopen_count: int) -> int:
    """Number of ``j >= 0`` with ``_raw_open(reopen_count + j) < open_max_s``.

    Requires ``open_multiplier > 1`` and ``_raw_open(reopen_count) < open_max_s``.
    """
    first = _raw_open(config, reopen_count)
    cap, mult = config.open_max_s, config.open_multiplier
    estimate = max(1, math.ceil((math.log(cap) - math.log(first)) / math.log(mult)))
    while estimate > 1 and _raw_open(config, reopen_count + estimate - 1) >= cap:
        estimate -= 1
    while _raw_open(config, reopen_count + estimate) < cap:
        estimate += 1
    return estimate


def _open_time(config: BreakerConfig, reopen_count: int, cycles: int) -> float:
    """Sum of the open durations for re-open counts ``reopen_count .. + cycles - 1``."""
    cap, mult = config.open_max_s, config.open_multiplier
    first = _raw_open(config, reopen_count)
    if first >= cap:
        return float(cycles) * cap
    if mult == 1.0:
        return float(cycles) * first
    uncapped = min(cycles, _uncapped_count(config, reopen_count))
    if uncapped <= _EXACT_SUM_TERMS:
        geometric = math.fsum(_raw_open(config, reopen_count + j) for j in range(uncapped))
    else:
        try:
            growth = math.expm1(uncapped * math.log1p(mult - 1.0))
        except OverflowError:
            growth = math.inf
        geometric = first * growth / (mult - 1.0)
    return geometric + float(cycles - uncapped) * cap


@dataclass(frozen=True, slots=True)
class Permit:
    """Admission: the caller may send the call, then must :meth:`~CircuitBreaker.record` it.

    ``generation`` is the breaker generation it was issued in; ``probe`` marks
    a half-open probe, and ``slot`` numbers the probes of one half-open visit
    (0 for ordinary permits).
    """

    generation: int
    probe: bool = False
    slot: int = 0

    @property
    def allowed(self) -> Literal[True]:
        return True

    @property
    def is_probe(self) -> bool:
        return self.probe

    def __bool__(self) -> Literal[True]:
        return True


@dataclass(frozen=True, slots=True)
class Rejection:
    """Refusal: nothing to record; try again (or elsewhere) after ``retry_after`` seconds."""

    retry_after: float
    state: StateName

    @property
    def allowed(self) -> Literal[False]:
        return False

    def __bool__(self) -> Literal[False]:
        return False


Decision = Permit | Rejection


class _Event(Enum):
    TRIP = "trip"  # closed: a window rate reached its threshold
    OPEN_ELAPSED = "open_elapsed"  # open: the open period is over
    PROBES_PASSED = "probes_passed"  # half-open: all probes in, both rates below thresholds
    PROBES_FAILED = "probes_failed"  # half-open: all probes in, a rate reached its threshold
    PROBE_TIMEOUT = "probe_timeout"  # half-open: half_open_max_s elapsed first


# The whole state machine. Any (state, event) pair not listed is a bug.
_TRANSITIONS: Final[dict[tuple[StateName, _Event], StateName]] = {
    (CLOSED, _Event.TRIP): OPEN,
    (OPEN, _Event.OPEN_ELAPSED): HALF_OPEN,
    (HALF_OPEN, _Event.PROBES_PASSED): CLOSED,
    (HALF_OPEN, _Event.PROBES_FAILED): OPEN,
    (HALF_OPEN, _Event.PROBE_TIMEOUT): OPEN,
}


class _CountWindow:
    """The last ``size`` outcomes, with running totals."""

    __slots__ = ("_items", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._items: deque[tuple[bool, bool]] = deque(maxlen=size)
        self.failures = 0
        self.slow = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, now: float, failed: bool, slow: bool) -> None:
        if len(self._items) == self._items.maxlen:
            old_failed, old_slow = self._items[0]
            self.failures -= old_failed
            self.slow -= old_slow
        self._items.append((failed, slow))
        self.failures += failed
        self.slow += slow

    def prune(self, now: float) -> None:
        """Count windows do not age."""

    def clear(self) -> None:
        self._items.clear()
        self.failures = self.slow = 0


class _TimeWindow:
    """Outcomes recorded at ``t`` with ``now - t < size``, with running totals."""

    __slots__ = ("_items", "_size", "failures", "slow")

    def __init__(self, size: float) -> None:
        self._size = size
        self._items: deque[tuple[float, bool, bool]] = deque()
        self.failures = 0
        self.slow = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self._items.append((now, failed, slow))
        self.failures += failed
        self.slow += slow

    def prune(self, now: float) -> None:
        items = self._items
        while items and now - items[0][0] >= self._size:
            _, failed, slow = items.popleft()
            self.failures -= failed
            self.slow -= slow

    def clear(self) -> None:
        self._items.clear()
        self.failures = self.slow = 0


@dataclass(slots=True)
class _Probes:
    """Bookkeeping of one half-open visit."""

    granted: int = 0
    reported: set[int] = field(default_factory=set)
    failures: int = 0
    slow: int = 0


class CircuitBreaker:
    """One breaker (per worker, region, ...); see the module docstring."""

    __slots__ = (
        "_entered_at",
        "_generation",
        "_open_s",
        "_permit",
        "_probes",
        "_reopen_count",
        "_state",
        "_window",
        "config",
    )

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self._state: StateName = CLOSED
        self._generation = 0
        self._entered_at = -math.inf
        self._reopen_count = 0  # k: consecutive re-opens since last closed
        self._open_s = 0.0  # duration of the current open period
        self._probes = _Probes()
        self._permit = Permit(0)  # the closed state's permit of this generation (immutable)
        self._window: _CountWindow | _TimeWindow = (
            _CountWindow(int(config.window_size))
            if config.window == "count"
            else _TimeWindow(config.window_size)
        )

    # -- introspection (as of the last call; these take no ``now``) ---------

    @property
    def generation(self) -> int:
        """Incremented by every state transition."""
        return self._generation

    @property
    def entered_at(self) -> float:
        """When the current state was entered (``-inf`` for the initial closed state)."""
        return self._entered_at

    @property
    def reopen_count(self) -> int:
        """``k``: consecutive re-opens since the breaker last left closed."""
        return self._reopen_count

    def next_deadline(self) -> float | None:
        """When the state next changes by itself, or ``None`` if it never will.

        The end of the open period while open; the ``half_open_max_s`` timeout
        while half-open (``None`` without one); ``None`` while closed.
        """
        match self._state:
            case "open":
                return self._entered_at + self._open_s
            case "half_open":
                limit = self.config.half_open_max_s
                return None if limit is None else self._entered_at + limit
            case "closed":
                return None

    # -- public operations ------------------------------------------------

    def state(self, now: float) -> StateName:
        self._advance(now)
        return self._state

    def on_timer(self, now: float) -> None:
        """Apply the time-driven transitions due by ``now`` (every method does too)."""
        self._advance(now)

    def would_allow(self, now: float) -> bool:
        """Whether :meth:`acquire` would return a :class:`Permit` now; consumes nothing."""
        if self._state == CLOSED:
            return True  # time never moves a closed breaker (fast path: hot in placement)
        self._advance(now)
        match self._state:
            case "closed":
                return True
            case "open":
                return False
            case "half_open":
                return self._probes.granted < self.config.half_open_permits

    def is_closed(self) -> bool:
        """Whether it is closed (then it allows every call and has no deadline; time
        alone never moves a closed breaker, so this needs no ``now``)."""
        return self._state == CLOSED

    def acquire(self, now: float) -> Decision:
        """Ask to send one call: a :class:`Permit` (truthy) or a :class:`Rejection`."""
        if self._state == CLOSED:  # the hot path: _advance and the closed case inlined
            if not math.isfinite(now):
                raise ValueError(f"now must be a finite number of seconds, got {now!r}")
            self._window.prune(now)
            permit = self._permit
            if permit.generation != self._generation:
                permit = self._permit = Permit(self._generation)
            return permit
        self._advance(now)
        match self._state:
            case "closed":
                permit = self._permit
                if permit.generation != self._generation:
                    permit = self._permit = Permit(self._generation)
                return permit
            case "open":
                return Rejection(self._retry_after(self._entered_at + self._open_s, now), OPEN)
            case "half_open":
                probes = self._probes
                if probes.granted < self.config.half_open_permits:
                    probes.granted += 1
                    return Permit(self._generation, probe=True, slot=probes.granted - 1)
                limit = self.config.half_open_max_s
                until = math.inf if limit is None else self._entered_at + limit
                return Rejection(self._retry_after(until, now), HALF_OPEN)

    def record(self, permit: Permit, ok: bool, duration: float, now: float) -> None:
        """Report the outcome of a call admitted by ``permit``.

        Outcomes of permits from another generation, and repeated outcomes of
        one probe, are ignored. Raises ``TypeError`` unless ``permit`` is a
        :class:`Permit` (a :class:`Rejection` has no outcome to record).
        """
        if not isinstance(permit, Permit):
            raise TypeError(f"record() needs the Permit returned by acquire(), got {permit!r}")
        if self._state == CLOSED:  # the hot path: _advance and the closed case inlined
            if not math.isfinite(now):
                raise ValueError(f"now must be a finite number of seconds, got {now!r}")
            self._window.prune(now)
            if permit.generation == self._generation:
                limit = self.config.slow_call_s
                self._record_closed(now, not ok, limit is not None and duration > limit)
            return
        self._advance(now)
        if permit.generation != self._generation:
            return  # stale: issued before the latest transition
        failed = not ok
        slow = self.config.slow_call_s is not None and duration > self.config.slow_call_s
        match self._state:
            case "closed":
                self._record_closed(now, failed, slow)
            case "half_open":
                self._record_probe(permit, now, failed, slow)
            case "open":
                pass  # unreachable: no permit is ever issued in an open generation

    # -- event sources ------------------------------------------------------

    def _record_closed(self, now: float, failed: bool, slow: bool) -> None:
        window = self._window
        window.add(now, failed, slow)
        window.prune(now)
        if not (window.failures or window.slow):
            return  # both rates 0, below thresholds that are > 0
        calls = len(window)
        if calls < self.config.required_calls:
            return
        if self._reaches_threshold(window.failures, window.slow, calls):
            self._fire(_Event.TRIP, now)

    def _record_probe(self, permit: Permit, now: float, failed: bool, slow: bool) -> None:
        probes = self._probes
        if not permit.probe or not 0 <= permit.slot < probes.granted:
            return  # not a probe of this visit
        if permit.slot in probes.reported:
            return  # each probe counts once
        probes.reported.add(permit.slot)
        probes.failures += failed
        probes.slow += slow
        total = self.config.half_open_permits
        if len(probes.reported) < total:
            return
        if self._reaches_threshold(probes.failures, probes.slow, total):
            self._fire(_Event.PROBES_FAILED, now)
        else:
            self._fire(_Event.PROBES_PASSED, now)

    def _reaches_threshold(self, failures: int, slow: int, calls: int) -> bool:
        return (
            failures / calls >= self.config.failure_threshold
            or slow / calls >= self.config.slow_call_threshold
        )

    def _advance(self, now: float) -> None:
        """Fire the time-driven events due by ``now``, each at its own deadline."""
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite number of seconds, got {now!r}")
        if self._state == CLOSED:  # time never moves a closed breaker; only its window ages
            self._window.prune(now)
            return
        for step in range(_MAX_CATCH_UP_STEPS):
            deadline = self.next_deadline()
            if deadline is None or now < deadline:
                break
            if self._state == OPEN:
                if step >= _EXACT_CATCH_UP_STEPS and self._skip_cycles(now):
                    continue
                self._fire(_Event.OPEN_ELAPSED, deadline)
            elif deadline > self._entered_at:
                self._fire(_Event.PROBE_TIMEOUT, deadline)
            else:
                # half_open_max_s is below the float resolution of the clock at
                # this magnitude: cycling could never advance time, so stay
                # half-open (probes can still settle it).
                break
        # (Time alone never closes a breaker: only probes passing do, in record().)

    def _skip_cycles(self, now: float) -> bool:
        """Jump over whole open -> half-open -> timeout cycles that ended by ``now``.

        Equivalent to firing OPEN_ELAPSED and PROBE_TIMEOUT alternately, up to
        float rounding. Returns whether anything was skipped.
        """
        limit = self.config.half_open_max_s
        if limit is None:
            return False
        start, k = self._entered_at, self._reopen_count

        def elapsed_by_now(cycles: int) -> bool:
            length = _open_time(self.config, k, cycles) + float(cycles) * limit
            return start + length <= now

        low, high = 0, 1
        while high < _MAX_SKIP and elapsed_by_now(high):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            if elapsed_by_now(middle):
                low = middle
            else:
                high = middle
        resumed_at = start + (_open_time(self.config, k, low) + float(low) * limit)
        if low == 0 or resumed_at <= start:
            return False  # nothing to skip, or cycles below the clock's float resolution
        self._entered_at = resumed_at
        self._reopen_count = k + low
        self._open_s = open_duration(self.config, self._reopen_count)
        self._generation += 2 * low
        return True

    def _retry_after(self, until: float, now: float) -> float:
        """Seconds from ``now`` to ``until``; the base open duration when that is
        unknown (``inf``) or not positive (only past a float-resolution stall)."""
        wait = until - now
        if 0 < wait < math.inf:
            return wait
        return open_duration(self.config, 0)

    # -- the transition function ---------------------------------------------

    def _fire(self, event: _Event, at: float) -> None:
        """Take the transition for ``event`` at time ``at`` and run the entry actions."""
        source = self._state
        target = _TRANSITIONS[(source, event)]
        self._state = target
        self._generation += 1
        self._entered_at = at
        match target:
            case "open":
                self._reopen_count = 0 if source == CLOSED else self._reopen_count + 1
                self._open_s = open_duration(self.config, self._reopen_count)
                self._window.clear()
            case "half_open":
                self._probes = _Probes()
            case "closed":
                self._reopen_count = 0
                self._window.clear()
