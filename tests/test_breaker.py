"""Tests for :mod:`haif.policy.breaker` with a hand-advanced clock.

Every ``now`` is passed explicitly. Times and durations are small dyadic
rationals (0.25, 0.5, 1.5, ...) so float arithmetic is exact and boundary
checks are meaningful.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pydantic import BaseModel, ValidationError

from haif.policy.breaker import (
    BreakerConfig,
    CircuitBreaker,
    Permit,
    Rejection,
    StateName,
    open_duration,
)

STATES: frozenset[str] = frozenset({"closed", "open", "half_open"})

# (ok, duration) of one call
Call = tuple[bool, float]
OK: Call = (True, 0.0)
FAIL: Call = (False, 0.0)


def call(breaker: CircuitBreaker, now: float, ok: bool = True, duration: float = 0.0) -> StateName:
    """Acquire (must be admitted), record, and return the state afterwards."""
    permit = breaker.acquire(now)
    assert isinstance(permit, Permit), f"rejected at {now}: {permit}"
    breaker.record(permit, ok, duration, now)
    return breaker.state(now)


def trip(breaker: CircuitBreaker, now: float) -> None:
    """Record failures at ``now`` until the breaker opens."""
    for _ in range(10_000):
        if call(breaker, now, ok=False) == "open":
            return
    raise AssertionError("breaker never tripped")


def quick(**overrides: Any) -> BreakerConfig:
    """A config that trips on a single failure, with the given overrides."""
    base: dict[str, Any] = {"window_size": 1, "min_calls": 1, "failure_threshold": 1.0}
    base.update(overrides)
    return BreakerConfig(**base)


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": "x"}, "must be one of 'count', 'time', got 'x'"),
        ({"window_size": 0}, "Input should be greater than 0"),
        ({"window_size": -1.0}, "Input should be greater than 0"),
        ({"window_size": math.inf}, "Input should be a finite number"),
        ({"window_size": math.nan}, "Input should be a finite number"),
        ({"window_size": True}, "Input should be a valid number"),
        ({"window_size": 2.5}, "must be a whole number of calls >= 1 for window='count'"),
        ({"min_calls": 0}, "Input should be greater than or equal to 1"),
        ({"min_calls": 1.5}, "Input should be a valid integer"),
        ({"min_calls": True}, "Input should be a valid integer"),
        ({"failure_threshold": 0.0}, "Input should be greater than 0"),
        ({"failure_threshold": 1.5}, "Input should be less than or equal to 1"),
        ({"failure_threshold": math.nan}, "Input should be a finite number"),
        ({"slow_call_threshold": 0.0}, "Input should be greater than 0"),
        ({"slow_call_threshold": 2.0}, "Input should be less than or equal to 1"),
        ({"slow_call_s": -0.5}, "Input should be greater than or equal to 0"),
        ({"slow_call_s": math.nan}, "Input should be greater than or equal to 0"),
        ({"open_s": 0.0}, "Input should be greater than 0"),
        ({"open_s": -1.0}, "Input should be greater than 0"),
        ({"open_max_s": math.inf}, "Input should be a finite number"),
        ({"open_multiplier": 0.5}, "Input should be greater than or equal to 1"),
        ({"open_multiplier": math.inf}, "Input should be a finite number"),
        ({"half_open_permits": 0}, "Input should be greater than or equal to 1"),
        ({"half_open_max_s": 0.0}, "Input should be greater than 0"),
        ({"half_open_max_s": math.inf}, "Input should be a finite number"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        BreakerConfig(**kwargs)
    assert isinstance(info.value, ValidationError)
    (error,) = info.value.errors()
    (field,) = kwargs
    assert error["loc"] == (field,)
    assert message in error["msg"]
    assert f"{field}\n  " in str(info.value)  # the message a caller sees names the field


def test_positional_arguments_are_named_too() -> None:
    with pytest.raises(ValueError, match=r"window_size\n  Input should be greater than 0"):
        BreakerConfig("count", 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"window": "time", "window_size": 2.5},
        {"window_size": 20.0},
        {"slow_call_s": math.inf},
        {"slow_call_s": 0.0, "slow_call_threshold": 0.5},
        {"failure_threshold": 1.0, "open_multiplier": 1e300, "open_max_s": 1e300},
        {"half_open_max_s": 5.0, "half_open_permits": 3},
    ],
)
def test_valid_configs(kwargs: dict[str, Any]) -> None:
    config = BreakerConfig(**kwargs)
    assert {name: getattr(config, name) for name in kwargs} == kwargs  # taken as given


def test_config_is_frozen_and_pydantic_forbids_extra_keys() -> None:
    config = BreakerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.open_s = 1.0  # type: ignore[misc]
    assert "__pydantic_config__" not in {f.name for f in dataclasses.fields(BreakerConfig)}
    assert vars(BreakerConfig)["__pydantic_config__"] == {"extra": "forbid"}

    class Holder(BaseModel):
        breaker: BreakerConfig

    assert Holder(breaker={"window": "time"}).breaker.window == "time"  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Holder(breaker={"bogus": 1})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="must be one of 'count', 'time'") as info:
        Holder(breaker={"window": "x"})  # type: ignore[arg-type]
    assert info.value.errors()[0]["loc"] == ("breaker", "window")
    with pytest.raises(ValidationError) as info:
        Holder(breaker={"open_s": 0})  # type: ignore[arg-type]
    assert info.value.errors()[0]["loc"] == ("breaker", "open_s")


# ---------------------------------------------------------------------------
# Closed state: windows, min_calls, thresholds
# ---------------------------------------------------------------------------

# Each case: config, calls (t, ok, duration) and the state after each call.
TripCase = tuple[BreakerConfig, list[tuple[float, bool, float]], list[StateName]]

CL: StateName = "closed"
OP: StateName = "open"

TRIP_CASES: dict[str, TripCase] = {
    "min_calls not reached": (
        BreakerConfig(window_size=10, min_calls=5),
        [(0, False, 0)] * 4,
        [CL, CL, CL, CL],
    ),
    "min_calls reached trips": (
        BreakerConfig(window_size=10, min_calls=5),
        [(0, False, 0)] * 5,
        [CL, CL, CL, CL, OP],
    ),
    "count window needs only window_size when min_calls is larger": (
        BreakerConfig(window_size=3, min_calls=10, failure_threshold=1.0),
        [(0, False, 0)] * 3,
        [CL, CL, OP],
    ),
    "failure rate equal to threshold trips": (
        BreakerConfig(window_size=4, min_calls=4, failure_threshold=0.5),
        [(0, True, 0), (0, True, 0), (0, False, 0), (0, False, 0)],
        [CL, CL, CL, OP],
    ),
    "failure rate below threshold stays closed": (
        BreakerConfig(window_size=4, min_calls=4, failure_threshold=0.5),
        [(0, True, 0), (0, True, 0), (0, True, 0), (0, False, 0)],
        [CL, CL, CL, CL],
    ),
    "threshold 1/3 equality trips": (
        BreakerConfig(window_size=3, min_calls=3, failure_threshold=1 / 3),
        [(0, True, 0), (0, True, 0), (0, False, 0)],
        [CL, CL, OP],
    ),
    "count window evicts the oldest outcome": (
        BreakerConfig(window_size=3, min_calls=3, failure_threshold=1.0),
        [(0, False, 0), (0, False, 0), (0, True, 0), (0, False, 0), (0, False, 0), (0, False, 0)],
        [CL, CL, CL, CL, CL, OP],
    ),
    "time window: outcome exactly window_size old is out": (
        BreakerConfig(window="time", window_size=10, min_calls=3, failure_threshold=1.0),
        [(0, False, 0), (5, False, 0), (10, False, 0)],
        [CL, CL, CL],
    ),
    "time window: outcome just younger than window_size is in": (
        BreakerConfig(window="time", window_size=10, min_calls=3, failure_threshold=1.0),
        [(0, False, 0), (5, False, 0), (9.75, False, 0)],
        [CL, CL, OP],
    ),
    "time window: min_calls is not capped by anything": (
        BreakerConfig(window="time", window_size=1, min_calls=4, failure_threshold=0.5),
        [(0, False, 0), (0, False, 0), (0, False, 0), (0.5, True, 0)],
        [CL, CL, CL, OP],
    ),
    "time window: aged-out successes no longer dilute": (
        BreakerConfig(window="time", window_size=2, min_calls=2, failure_threshold=0.75),
        [(0, True, 0), (0, True, 0), (1, False, 0), (2, False, 0)],
        [CL, CL, CL, OP],
    ),
    "slow calls trip at slow_call_threshold": (
        BreakerConfig(window_size=4, min_calls=4, slow_call_s=1.0, slow_call_threshold=0.5),
        [(0, True, 2.0), (0, True, 2.0), (0, True, 0.5), (0, True, 0.5)],
        [CL, CL, CL, OP],
    ),
    "duration equal to slow_call_s is not slow": (
        BreakerConfig(window_size=4, min_calls=4, slow_call_s=1.0, slow_call_threshold=0.25),
        [(0, True, 1.0)] * 4,
        [CL, CL, CL, CL],
    ),
    "slow_call_s None: nothing is slow": (
        BreakerConfig(window_size=2, min_calls=2, slow_call_threshold=0.5),
        [(0, True, 1e9)] * 2,
        [CL, CL],
    ),
    "a slow failure counts as slow": (
        BreakerConfig(window_size=2, min_calls=2, failure_threshold=1.0, slow_call_s=1.0),
        [(0, False, 2.0), (0, True, 2.0)],
        [CL, OP],
    ),
    "a slow failure counts as a failure": (
        BreakerConfig(window_size=2, min_calls=2, failure_threshold=1.0, slow_call_s=1.0),
        [(0, False, 2.0), (0, False, 0.5)],
        [CL, OP],
    ),
    "neither rate reached": (
        BreakerConfig(window_size=2, min_calls=2, failure_threshold=1.0, slow_call_s=1.0),
        [(0, False, 2.0), (0, True, 0.5)],
        [CL, CL],
    ),
}


@pytest.mark.parametrize("case", list(TRIP_CASES), ids=list(TRIP_CASES))
def test_closed_state_trip_conditions(case: str) -> None:
    config, calls, expected = TRIP_CASES[case]
    breaker = CircuitBreaker(config)
    seen = [call(breaker, t, ok, duration) for t, ok, duration in calls]
    assert seen == expected


def test_rates_are_evaluated_only_when_recording() -> None:
    # Successes aging out of a time window do not by themselves trip the breaker.
    breaker = CircuitBreaker(
        BreakerConfig(window="time", window_size=2, min_calls=2, failure_threshold=0.5)
    )
    assert [call(breaker, 0, ok) for ok in (True, True, True, False)] == [CL, CL, CL, CL]
    assert breaker.state(1.75) == "closed"
    assert breaker.state(100) == "closed"


def test_time_window_memory_is_bounded() -> None:
    breaker = CircuitBreaker(BreakerConfig(window="time", window_size=1, min_calls=5))
    for i in range(1000):
        call(breaker, i * 0.25)
    # Only outcomes from the last second remain.
    assert len(breaker._window) == 4


# ---------------------------------------------------------------------------
# Open state: duration growth and cap, rejection, deadlines
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("open_s", "multiplier", "max_s", "k", "expected"),
    [
        (30.0, 1.0, 300.0, 0, 30.0),
        (30.0, 1.0, 300.0, 7, 30.0),
        (10.0, 2.0, 35.0, 0, 10.0),
        (10.0, 2.0, 35.0, 1, 20.0),
        (10.0, 2.0, 35.0, 2, 35.0),
        (10.0, 2.0, 35.0, 50, 35.0),
        (40.0, 1.0, 35.0, 0, 35.0),
        (1.0, 1e300, 5.0, 10**6, 5.0),
        (1.0, 3.0, 100.0, 10**400, 100.0),
        (1.0, 2, 100.0, 10**18, 100.0),  # an int multiplier must not build a huge int
        (1.0, 1.5, 1e308, 10**9, 1e308),
        (1.0, 1.0, 100.0, 10**400, 1.0),
    ],
)
def test_open_duration(
    open_s: float, multiplier: float, max_s: float, k: int, expected: float
) -> None:
    config = BreakerConfig(open_s=open_s, open_multiplier=multiplier, open_max_s=max_s)
    assert open_duration(config, k) == expected


def test_open_rejects_with_retry_after_and_grows_with_cap() -> None:
    config = quick(open_s=10, open_multiplier=2, open_max_s=35)
    breaker = CircuitBreaker(config)
    assert breaker.next_deadline() is None
    trip(breaker, 0)

    # (time the re-open happens, expected open duration)
    for opened_at, duration in [(0, 10), (10, 20), (30, 35), (65, 35)]:
        assert breaker.state(opened_at) == "open"
        assert breaker.entered_at == opened_at
        assert breaker.next_deadline() == opened_at + duration
        for now in (opened_at, opened_at + duration - 0.25):
            rejection = breaker.acquire(now)
            assert isinstance(rejection, Rejection)
            assert not rejection
            assert rejection.allowed is False
            assert rejection.retry_after == opened_at + duration - now
            assert rejection.retry_after > 0
            assert not breaker.would_allow(now)
        end = opened_at + duration
        assert breaker.state(end) == "half_open"
        assert call(breaker, end, ok=False) == "open"  # a bad probe re-opens

    # A good probe closes and resets k: the next trip opens for open_s again.
    assert breaker.state(135) == "half_open"
    assert call(breaker, 135) == "closed"
    assert breaker.reopen_count == 0
    trip(breaker, 136)
    assert breaker.next_deadline() == 146


def test_huge_multiplier_reopens_do_not_raise() -> None:
    breaker = CircuitBreaker(quick(open_s=1, open_multiplier=1e300, open_max_s=1e6))
    trip(breaker, 0)
    now = 0.0
    for _ in range(10):
        deadline = breaker.next_deadline()
        assert deadline is not None
        now = deadline
        assert call(breaker, now, ok=False) == "open"
    assert breaker.next_deadline() == now + 1e6


# ---------------------------------------------------------------------------
# Half-open state: probes, closing, re-opening, timeout
# ---------------------------------------------------------------------------


def test_half_open_admits_exactly_n_probes() -> None:
    breaker = CircuitBreaker(quick(open_s=10, half_open_permits=3))
    trip(breaker, 0)
    assert breaker.state(9.75) == "open"
    assert breaker.state(10) == "half_open"
    # would_allow does not consume probes.
    assert all(breaker.would_allow(10) for _ in range(5))
    permits = [breaker.acquire(10) for _ in range(3)]
    for slot, permit in enumerate(permits):
        assert isinstance(permit, Permit)
        assert permit
        assert permit.allowed is True
        assert permit.probe
        assert permit.slot == slot
        assert permit.generation == breaker.generation
    assert not breaker.would_allow(10)
    rejection = breaker.acquire(11)
    assert isinstance(rejection, Rejection)
    assert not rejection
    assert rejection.state == "half_open"
    # No half_open_max_s: the hint is the base open duration.
    assert rejection.retry_after == 10
    assert breaker.next_deadline() is None


def test_half_open_retry_after_is_time_to_probe_timeout() -> None:
    breaker = CircuitBreaker(quick(open_s=10, half_open_max_s=4))
    trip(breaker, 0)
    assert isinstance(breaker.acquire(10), Permit)
    rejection = breaker.acquire(11)
    assert isinstance(rejection, Rejection)
    assert rejection.retry_after == 3


def test_good_probes_close_with_fresh_window() -> None:
    config = BreakerConfig(
        window_size=4, min_calls=2, failure_threshold=0.5, open_s=10, half_open_permits=2
    )
    breaker = CircuitBreaker(config)
    assert call(breaker, 0, ok=True) == "closed"
    trip(breaker, 0)
    first, second = breaker.acquire(10), breaker.acquire(10)
    assert isinstance(first, Permit)
    assert isinstance(second, Permit)
    breaker.record(first, True, 0.0, 10)
    assert breaker.state(10) == "half_open"  # waits for all probes
    breaker.record(second, True, 0.0, 10.5)
    assert breaker.state(10.5) == "closed"
    assert breaker.entered_at == 10.5
    assert breaker.next_deadline() is None
    # Fresh window: one failure is below min_calls, a second one trips (2/2).
    assert call(breaker, 11, ok=False) == "closed"
    assert call(breaker, 11, ok=False) == "open"
    assert breaker.next_deadline() == 21  # k was reset


@pytest.mark.parametrize(
    ("config", "outcomes", "expected"),
    [
        (quick(half_open_permits=2, failure_threshold=0.5), [OK, FAIL], "open"),
        (quick(half_open_permits=2, failure_threshold=0.5), [FAIL, OK], "open"),
        (quick(half_open_permits=2, failure_threshold=0.75), [FAIL, OK], "closed"),
        (quick(half_open_permits=2, failure_threshold=0.5), [OK, OK], "closed"),
        (quick(half_open_permits=1), [FAIL], "open"),
        (quick(half_open_permits=1), [OK], "closed"),
        (quick(half_open_permits=1, slow_call_s=1.0), [(True, 1.5)], "open"),
        (quick(half_open_permits=1, slow_call_s=1.0), [(True, 1.0)], "closed"),
        (
            quick(half_open_permits=2, slow_call_s=1.0, slow_call_threshold=0.75),
            [(True, 1.5), OK],
            "closed",
        ),
    ],
)
def test_probe_outcomes_decide(config: BreakerConfig, outcomes: list[Call], expected: str) -> None:
    breaker = CircuitBreaker(config)
    trip(breaker, 0)
    start = config.open_s
    permits = [breaker.acquire(start) for _ in outcomes]
    for i, (permit, (ok, duration)) in enumerate(zip(permits, outcomes, strict=True)):
        assert isinstance(permit, Permit)
        assert breaker.state(start) == "half_open"
        breaker.record(permit, ok, duration, start + i)
    now = start + len(outcomes) - 1
    assert breaker.state(now) == expected
    if expected == "open":
        assert breaker.reopen_count == 1
        assert breaker.next_deadline() == now + open_duration(config, 1)


@pytest.mark.parametrize("acquire_probe", [True, False])
def test_half_open_max_s_reopens(acquire_probe: bool) -> None:
    breaker = CircuitBreaker(quick(open_s=10, open_multiplier=2, half_open_max_s=5))
    trip(breaker, 0)
    assert breaker.state(10) == "half_open"
    assert breaker.next_deadline() == 15
    permit = breaker.acquire(11) if acquire_probe else None
    assert breaker.state(14.75) == "half_open"
    assert breaker.state(15) == "open"
    assert breaker.entered_at == 15
    assert breaker.reopen_count == 1
    assert breaker.next_deadline() == 35  # 15 + 10 * 2
    if isinstance(permit, Permit):  # the late probe result is stale
        generation = breaker.generation
        breaker.record(permit, True, 0.0, 16)
        assert breaker.state(16) == "open"
        assert breaker.generation == generation


def test_half_open_timeout_is_anchored_at_its_deadline() -> None:
    # Observed late, the transitions still happen at their deadlines.
    breaker = CircuitBreaker(quick(open_s=10, open_multiplier=2, half_open_max_s=5))
    trip(breaker, 0)
    assert breaker.state(39) == "half_open"  # open 0-10, half 10-15, open 15-35, half 35-40
    assert breaker.entered_at == 35
    assert breaker.reopen_count == 1
    assert breaker.next_deadline() == 40
    assert breaker.generation == 4


def test_long_idle_catch_up_matches_stepping() -> None:
    # Exact (integer) arithmetic, so the arithmetic skip must agree exactly.
    config = quick(open_s=1, open_multiplier=2, open_max_s=8, half_open_max_s=1)
    stepped, jumped = CircuitBreaker(config), CircuitBreaker(config)
    trip(stepped, 0)
    trip(jumped, 0)
    end = 10_000.5
    while (deadline := stepped.next_deadline()) is not None and deadline <= end:
        stepped.on_timer(deadline)
    assert stepped.generation > 1000
    for now in (end, 10**15 + 0.5):
        jumped.on_timer(now)
        if now == end:
            assert jumped.state(now) == stepped.state(now)
            assert jumped.generation == stepped.generation
            assert jumped.reopen_count == stepped.reopen_count
            assert jumped.entered_at == stepped.entered_at
            assert jumped.next_deadline() == stepped.next_deadline()
        deadline = jumped.next_deadline()
        assert deadline is not None
        assert jumped.entered_at <= now < deadline


@pytest.mark.parametrize("now", [1e15, 1e300, 1.7e308])
def test_huge_clock_jumps_finish(now: float) -> None:
    for multiplier in (1.0, 1.0 + 2**-40, 2.0):
        config = quick(open_s=0.5, open_multiplier=multiplier, open_max_s=300, half_open_max_s=1)
        breaker = CircuitBreaker(config)
        trip(breaker, 0)
        state = breaker.state(now)
        assert breaker.entered_at <= now
        deadline = breaker.next_deadline()
        assert deadline is not None
        if now == 1e15:
            assert now < deadline
        else:
            # 1 s is below the clock's resolution here: documented to stay half-open.
            assert state == "half_open"
        assert breaker.acquire(now).allowed == (state == "half_open")


def test_non_finite_now_is_rejected() -> None:
    breaker = CircuitBreaker(BreakerConfig())
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="now must be a finite number"):
            breaker.state(bad)


# ---------------------------------------------------------------------------
# Generations: stale permits
# ---------------------------------------------------------------------------


def test_success_from_before_open_does_not_close_half_open() -> None:
    breaker = CircuitBreaker(quick(open_s=10))
    early = breaker.acquire(0)
    assert isinstance(early, Permit)
    trip(breaker, 1)
    assert breaker.state(11) == "half_open"
    generation = breaker.generation
    breaker.record(early, True, 0.0, 11)
    assert breaker.state(11) == "half_open"
    assert breaker.generation == generation
    assert breaker.would_allow(11)  # the probe is still available


def test_late_failure_from_before_does_not_count_in_fresh_window() -> None:
    breaker = CircuitBreaker(quick(open_s=10))
    early = breaker.acquire(0)
    assert isinstance(early, Permit)
    trip(breaker, 1)
    assert call(breaker, 11) == "closed"
    breaker.record(early, False, 0.0, 12)  # would trip a 1-call window if counted
    assert breaker.state(12) == "closed"
    assert call(breaker, 12) == "closed"


def test_a_probe_counts_once() -> None:
    breaker = CircuitBreaker(quick(open_s=10, half_open_permits=2))
    trip(breaker, 0)
    probe = breaker.acquire(10)
    assert isinstance(probe, Permit)
    breaker.record(probe, True, 0.0, 10)
    breaker.record(probe, True, 0.0, 10)
    assert breaker.state(10) == "half_open"
    # A forged probe permit for a slot never handed out is ignored too.
    breaker.record(Permit(breaker.generation, probe=True, slot=1), True, 0.0, 10)
    assert breaker.state(10) == "half_open"


def test_recording_a_rejection_raises_type_error() -> None:
    breaker = CircuitBreaker(quick(open_s=10))
    trip(breaker, 0)
    rejection = breaker.acquire(1)
    assert isinstance(rejection, Rejection)
    with pytest.raises(TypeError, match="Permit"):
        breaker.record(rejection, False, 0.0, 1)  # type: ignore[arg-type]
    assert breaker.next_deadline() == 10


def test_next_deadline_in_each_state() -> None:
    with_timeout = CircuitBreaker(quick(open_s=10, half_open_max_s=3))
    without = CircuitBreaker(quick(open_s=10))
    for breaker in (with_timeout, without):
        assert breaker.next_deadline() is None
        trip(breaker, 2)
        assert breaker.next_deadline() == 12
        assert breaker.state(12) == "half_open"
    assert with_timeout.next_deadline() == 15
    assert without.next_deadline() is None
    for breaker in (with_timeout, without):
        assert call(breaker, 12) == "closed"
        assert breaker.next_deadline() is None


# ---------------------------------------------------------------------------
# Model-based stateful test
# ---------------------------------------------------------------------------


@dataclass
class _Outcome:
    t: float
    failed: bool
    slow: bool


class ReferenceBreaker:
    """A deliberately naive re-statement of the spec: lists, loops, no shortcuts."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state: str = "closed"
        self.generation = 0
        self.k = 0
        self.entered = -math.inf
        self.outcomes: list[_Outcome] = []
        self.granted = 0
        self.probe_results: dict[int, _Outcome] = {}

    def open_for(self) -> float:
        duration = self.config.open_s
        for _ in range(self.k):  # repeated products stay exact for the dyadic test values
            if duration >= self.config.open_max_s:
                break
            duration *= self.config.open_multiplier
        return min(self.config.open_max_s, duration)

    def deadline(self) -> float | None:
        if self.state == "open":
            return self.entered + self.open_for()
        if self.state == "half_open" and self.config.half_open_max_s is not None:
            return self.entered + self.config.half_open_max_s
        return None

    def go(self, target: str, at: float) -> None:
        if target == "open":
            self.k = 0 if self.state == "closed" else self.k + 1
        if target == "closed":
            self.k = 0
        self.outcomes = []
        self.granted = 0
        self.probe_results = {}
        self.state = target
        self.generation += 1
        self.entered = at

    def advance(self, now: float) -> None:
        while (deadline := self.deadline()) is not None and now >= deadline:
            self.go("half_open" if self.state == "open" else "open", deadline)

    def window(self, now: float) -> list[_Outcome]:
        if self.config.window == "count":
            return self.outcomes[-int(self.config.window_size) :]
        return [o for o in self.outcomes if now - o.t < self.config.window_size]

    def bad(self, outcomes: list[_Outcome]) -> bool:
        n = len(outcomes)
        failures = sum(o.failed for o in outcomes)
        slow = sum(o.slow for o in outcomes)
        return (
            failures / n >= self.config.failure_threshold
            or slow / n >= self.config.slow_call_threshold
        )

    def would_allow(self, now: float) -> bool:
        self.advance(now)
        return self.state == "closed" or (
            self.state == "half_open" and self.granted < self.config.half_open_permits
        )

    def acquire(self, now: float) -> tuple[bool, bool, int]:
        """(allowed, probe, slot)"""
        if not self.would_allow(now):
            return (False, False, 0)
        if self.state == "closed":
            return (True, False, 0)
        self.granted += 1
        return (True, True, self.granted - 1)

    def record(self, permit: Permit, ok: bool, duration: float, now: float) -> None:
        self.advance(now)
        if permit.generation != self.generation:
            return
        slow_s = self.config.slow_call_s
        outcome = _Outcome(now, not ok, slow_s is not None and duration > slow_s)
        if self.state == "closed":
            self.outcomes.append(outcome)
            window = self.window(now)
            need = self.config.min_calls
            if self.config.window == "count":
                need = min(need, int(self.config.window_size))
            if len(window) >= need and self.bad(window):
                self.go("open", now)
        elif self.state == "half_open":
            if not permit.probe or permit.slot >= self.granted or permit.slot in self.probe_results:
                return
            self.probe_results[permit.slot] = outcome
            if len(self.probe_results) == self.config.half_open_permits:
                results = list(self.probe_results.values())
                self.go("open" if self.bad(results) else "closed", now)


@st.composite
def breaker_configs(draw: st.DrawFn) -> BreakerConfig:
    window = draw(st.sampled_from(["count", "time"]))
    if window == "count":
        size: float = draw(st.integers(min_value=1, max_value=8))
    else:
        size = draw(st.sampled_from([0.5, 1.0, 2.5, 5.0]))
    return BreakerConfig(
        window=window,
        window_size=size,
        min_calls=draw(st.integers(min_value=1, max_value=6)),
        failure_threshold=draw(st.sampled_from([0.25, 1 / 3, 0.5, 0.75, 1.0])),
        slow_call_s=draw(st.sampled_from([None, 0.5, 1.0])),
        slow_call_threshold=draw(st.sampled_from([0.25, 0.5, 1.0])),
        open_s=draw(st.sampled_from([0.5, 1.0, 2.0, 5.0])),
        open_multiplier=draw(st.sampled_from([1.0, 1.5, 2.0])),
        open_max_s=draw(st.sampled_from([1.0, 4.0, 10.0, 40.0])),
        half_open_permits=draw(st.integers(min_value=1, max_value=3)),
        half_open_max_s=draw(st.sampled_from([None, 0.5, 1.0, 3.0])),
    )


QUARTERS = st.integers(min_value=0, max_value=40).map(lambda n: n / 4)
DURATIONS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])


class BreakerMachine(RuleBasedStateMachine):
    """Drives a breaker and the reference model side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.breaker = CircuitBreaker(BreakerConfig())
        self.model = ReferenceBreaker(BreakerConfig())
        self.permits: list[Permit] = []

    @initialize(config=breaker_configs())
    def start(self, config: BreakerConfig) -> None:
        self.breaker = CircuitBreaker(config)
        self.model = ReferenceBreaker(config)

    def snapshot(self) -> tuple[str, int, float | None, float]:
        breaker = self.breaker
        return (
            breaker.state(self.now),
            breaker.generation,
            breaker.next_deadline(),
            breaker.entered_at,
        )

    @rule(dt=QUARTERS)
    def advance(self, dt: float) -> None:
        self.now += dt
        self.breaker.on_timer(self.now)
        self.model.advance(self.now)

    @rule(dt=st.integers(min_value=50, max_value=400))
    def idle(self, dt: int) -> None:
        self.now += dt
        self.breaker.on_timer(self.now)
        self.model.advance(self.now)

    @rule()
    def would_allow(self) -> None:
        before = self.snapshot()
        allowed = self.breaker.would_allow(self.now)
        assert allowed == self.model.would_allow(self.now)
        assert self.breaker.would_allow(self.now) == allowed
        assert self.snapshot() == before

    @rule()
    def acquire(self) -> None:
        state = self.breaker.state(self.now)
        promised = self.breaker.would_allow(self.now)
        decision = self.breaker.acquire(self.now)
        allowed, probe, slot = self.model.acquire(self.now)
        assert bool(decision) == decision.allowed == allowed == promised
        if isinstance(decision, Permit):
            assert state != "open"
            assert decision.generation == self.breaker.generation
            assert (decision.probe, decision.slot) == (probe, slot)
            self.permits.append(decision)
        else:
            assert state != "closed"
            assert decision.state == state
            assert 0 < decision.retry_after < math.inf
            if state == "open":
                deadline = self.breaker.next_deadline()
                assert deadline is not None
                assert decision.retry_after == deadline - self.now

    @precondition(lambda self: bool(self.permits))
    @rule(index=st.integers(min_value=0, max_value=1000), ok=st.booleans(), duration=DURATIONS)
    def record(self, index: int, ok: bool, duration: float) -> None:
        permit = self.permits[index % len(self.permits)]
        before = self.snapshot()  # applies time-driven transitions first
        self.breaker.record(permit, ok, duration, self.now)
        self.model.record(permit, ok, duration, self.now)
        if permit.generation != before[1]:
            assert self.snapshot() == before, "a stale permit changed the breaker"

    @rule()
    def record_rejection(self) -> None:
        before = self.snapshot()
        with pytest.raises(TypeError):
            self.breaker.record(Rejection(1.0, "open"), False, 0.0, self.now)  # type: ignore[arg-type]
        assert self.snapshot() == before

    @invariant()
    def matches_reference(self) -> None:
        model = self.model
        model.advance(self.now)
        assert self.snapshot() == (
            model.state,
            model.generation,
            model.deadline(),
            model.entered,
        )
        assert self.breaker.reopen_count == model.k

    @invariant()
    def state_invariants(self) -> None:
        breaker, config = self.breaker, self.breaker.config
        state = breaker.state(self.now)
        assert state in STATES
        assert breaker.is_closed() == (state == "closed")
        deadline = breaker.next_deadline()
        timeless = state == "closed" or (state == "half_open" and config.half_open_max_s is None)
        assert (deadline is None) == timeless
        assert breaker.entered_at <= self.now
        if deadline is not None:
            assert breaker.entered_at <= self.now < deadline
        if state == "open":
            assert deadline == breaker.entered_at + open_duration(config, breaker.reopen_count)
        probes_out = sum(p.probe and p.generation == breaker.generation for p in self.permits)
        assert probes_out <= (config.half_open_permits if state == "half_open" else 0)


def test_breaker_state_machine() -> None:
    run_state_machine_as_test(
        BreakerMachine,
        settings=settings(max_examples=100, stateful_step_count=50, deadline=None),
    )
