"""Backoff, retry budget and retry policy tests (seeded rng, hand-advanced clock)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.policy.retry import (
    BACKOFF_KINDS,
    DEFAULT_BACKOFF,
    Backoff,
    RetryBudget,
    RetryConfig,
    RetryDecision,
    RetryPolicy,
)

# ------------------------------------------------------------------ backoff


@pytest.mark.parametrize(
    ("backoff", "attempt", "expected"),
    [
        (Backoff("constant", 0.5, 10.0), 1, 0.5),
        (Backoff("constant", 0.5, 10.0), 50, 0.5),
        (Backoff("constant", 5.0, 2.0), 1, 2.0),
        (Backoff("exponential", 0.1, 10.0), 1, 0.1),
        (Backoff("exponential", 0.1, 10.0), 2, 0.2),
        (Backoff("exponential", 0.1, 10.0), 4, 0.8),
        (Backoff("exponential", 0.1, 10.0), 8, 10.0),
        (Backoff("exponential", 1.0, 100.0, multiplier=3.0), 3, 9.0),
        (Backoff("exponential", 1.0, 100.0, multiplier=1.0), 99, 1.0),
        (Backoff("exponential", 0.0, 100.0), 5, 0.0),
    ],
)
def test_deterministic_kinds(backoff: Backoff, attempt: int, expected: float) -> None:
    rng = random.Random(0)
    state = rng.getstate()
    assert backoff.delay(attempt, rng) == pytest.approx(expected)
    assert rng.getstate() == state  # no randomness consumed


def _replay(seed: int, a: float, b: float) -> float:
    return random.Random(seed).uniform(a, b)


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 20])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_full_jitter_formula(attempt: int, seed: int) -> None:
    b = Backoff("full_jitter", 0.1, 5.0)
    t = min(5.0, 0.1 * 2.0 ** (attempt - 1))
    d = b.delay(attempt, random.Random(seed))
    assert d == _replay(seed, 0.0, t)
    assert 0.0 <= d <= t


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 20])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_equal_jitter_formula(attempt: int, seed: int) -> None:
    b = Backoff("equal_jitter", 0.1, 5.0)
    t = min(5.0, 0.1 * 2.0 ** (attempt - 1))
    d = b.delay(attempt, random.Random(seed))
    assert d == t / 2 + _replay(seed, 0.0, t / 2)
    assert t / 2 <= d <= t


@pytest.mark.parametrize(
    ("prev", "low", "high"),
    [(None, 0.1, 0.3), (0.1, 0.1, 0.3), (1.0, 0.1, 3.0), (4.0, 0.1, 5.0), (100.0, 0.1, 5.0)],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_decorrelated_formula(prev: float | None, low: float, high: float, seed: int) -> None:
    b = Backoff("decorrelated", 0.1, 5.0)
    last = 0.1 if prev is None else prev
    d = b.delay(3, random.Random(seed), prev)
    assert d == min(5.0, _replay(seed, 0.1, 3 * last))
    assert low <= d <= high


def test_decorrelated_chain_stays_within_bounds() -> None:
    b = Backoff("decorrelated", 0.05, 2.0)
    rng = random.Random(123)
    prev: float | None = None
    for attempt in range(1, 200):
        prev = b.delay(attempt, rng, prev)
        assert 0.05 <= prev <= 2.0


@pytest.mark.parametrize("kind", BACKOFF_KINDS)
@pytest.mark.parametrize("attempt", [10**6, 10**100, 1025, 1100])
def test_huge_attempts_do_not_raise(kind: str, attempt: int) -> None:
    b = Backoff(kind, 0.1, 30.0)
    d = b.delay(attempt, random.Random(1), prev=30.0)
    assert 0.0 <= d <= 30.0
    assert math.isfinite(d)
    if kind == "exponential":
        assert d == 30.0


def test_huge_base_times_multiplier_saturates() -> None:
    b = Backoff("exponential", 1e300, 1e308, multiplier=1e10)
    assert b.delay(5, random.Random(0)) == 1e308


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(BACKOFF_KINDS),
    base=st.floats(0.0, 10.0),
    cap=st.floats(0.0, 100.0),
    multiplier=st.floats(1.0, 10.0),
    attempt=st.integers(1, 10**7),
    seed=st.integers(0, 2**32),
)
def test_delay_bounds_property(
    kind: str, base: float, cap: float, multiplier: float, attempt: int, seed: int
) -> None:
    b = Backoff(kind, base, cap, multiplier)
    d = b.delay(attempt, random.Random(seed))
    assert 0.0 <= d <= max(cap, 0.0)


@pytest.mark.parametrize("attempt", [0, -1])
@pytest.mark.parametrize("kind", BACKOFF_KINDS)
def test_attempt_below_one_raises(kind: str, attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff(kind, 0.1, 1.0).delay(attempt, random.Random(0))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "linear", "base": 0.1, "cap": 1.0}, "kind"),
        ({"kind": "constant", "base": -0.1, "cap": 1.0}, "base"),
        ({"kind": "constant", "base": 0.1, "cap": math.inf}, "cap"),
        ({"kind": "constant", "base": 0.1, "cap": 1.0, "multiplier": 0.5}, "multiplier"),
        ({"kind": "constant", "base": math.nan, "cap": 1.0}, "base"),
    ],
)
def test_backoff_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_backoff_kind_error_lists_allowed_kinds() -> None:
    with pytest.raises(ValueError, match="full_jitter"):
        Backoff("linear", 0.1, 1.0)


def test_backoff_positional_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"Backoff\nbase\n  Input should be greater than or equal"):
        Backoff("constant", -0.1, 1.0)
    with pytest.raises(ValueError, match=r"kind\n  Value error, must be one of 'constant'"):
        Backoff("linear", 0.1, 1.0)


# ------------------------------------------------------------------ budget


def test_budget_floor_without_traffic() -> None:
    budget = RetryBudget(ratio=0.1, min_retries=3, window_s=10.0)
    assert [budget.try_spend(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert budget.retries_in_window(0.0) == 3


@pytest.mark.parametrize(
    ("ratio", "min_retries", "requests", "allowed"),
    [
        (0.1, 3, 0, 3),
        (0.1, 3, 9, 3),
        (0.1, 3, 10, 4),
        (0.1, 3, 100, 13),
        (0.2, 0, 10, 2),
        (0.0, 0, 1000, 0),
        (0.5, 1, 3, 2),
        (1.0, 0, 5, 5),
    ],
)
def test_budget_ratio(ratio: float, min_retries: int, requests: int, allowed: int) -> None:
    budget = RetryBudget(ratio, min_retries, 10.0)
    for _ in range(requests):
        budget.record_request(0.0)
    granted = sum(budget.try_spend(0.0) for _ in range(requests + min_retries + 10))
    assert granted == allowed


def test_denied_retry_records_nothing_and_can_spend_is_pure() -> None:
    budget = RetryBudget(0.0, 1, 10.0)
    assert budget.can_spend(0.0) and budget.can_spend(0.0)
    assert budget.try_spend(0.0)
    assert not budget.can_spend(0.0)
    for _ in range(10):
        assert not budget.try_spend(0.0)
    assert budget.retries_in_window(0.0) == 1


def test_budget_window_expiry() -> None:
    budget = RetryBudget(ratio=0.5, min_retries=0, window_s=10.0)
    for t in (0.0, 1.0, 2.0, 3.0):
        budget.record_request(t)
    assert budget.try_spend(3.0)
    assert budget.try_spend(3.0)
    assert not budget.try_spend(3.0)
    # at t=10 the request at 0 leaves (10 - 0 >= 10): 3 requests -> 1.5 allowed
    assert budget.requests_in_window(9.999) == 4
    assert budget.requests_in_window(10.0) == 3
    assert not budget.can_spend(10.0)
    # at t=13 the retries (at 3) and all requests are gone
    assert budget.retries_in_window(12.9) == 2
    assert budget.retries_in_window(13.0) == 0
    assert budget.requests_in_window(13.0) == 0
    assert not budget.can_spend(13.0)  # no floor, no traffic
    budget.record_request(13.0)
    budget.record_request(13.0)
    assert budget.try_spend(13.0)


def test_budget_memory_is_bounded() -> None:
    budget = RetryBudget(0.1, 3, 1.0)
    for i in range(10_000):
        budget.record_request(i * 0.01)
        budget.try_spend(i * 0.01)
    # events at 99.01 .. 99.99 are within 1 s of t=100 (99.0 is exactly 1 s old)
    assert budget.requests_in_window(100.0) == 99
    assert len(budget._requests) == 99  # pruned each call


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": math.inf}, "ratio"),
        ({"min_retries": -1}, "min_retries"),
        ({"min_retries": 1.5}, "min_retries"),
        ({"window_s": 0.0}, "window_s"),
    ],
)
def test_budget_validation(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=rf"RetryBudget\n{field}\n"):
        RetryBudget(**kwargs)  # type: ignore[arg-type]
    args: dict[str, Any] = {"ratio": 0.1, "min_retries": 3, "window_s": 10.0, **kwargs}
    with pytest.raises(ValueError, match=rf"RetryBudget\n{field}\n"):
        RetryBudget(*args.values())  # positional: still named


# ------------------------------------------------------------------ config


def test_retry_config_defaults() -> None:
    cfg = RetryConfig()
    assert cfg.max_attempts == 3
    assert cfg.backoff == Backoff("full_jitter", 0.1, 5.0) == DEFAULT_BACKOFF
    assert (cfg.budget_ratio, cfg.budget_min_retries, cfg.budget_window_s) == (0.1, 3, 10.0)
    assert cfg.retry_on == (
        "no_eligible_worker",
        "store_unavailable",
        "worker_crashed",
        "connection_error",
        "timeout",
        "overloaded",
        "unavailable",
        "internal",
        "bad_reply",
    )
    bogus: dict[str, Any] = {"bogus": 1}
    with pytest.raises(ValueError, match=r"bogus\n  Unexpected keyword argument"):
        RetryConfig(**bogus)


def test_retry_config_accepts_yaml_shapes() -> None:
    cfg = RetryConfig(
        backoff={"kind": "exponential", "base": 1.0, "cap": 8.0},  # type: ignore[arg-type]
        retry_on=["timeout"],  # type: ignore[arg-type]
    )
    assert cfg.backoff == Backoff("exponential", 1.0, 8.0)
    assert cfg.retry_on == ("timeout",)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"budget_ratio": -1.0}, "budget_ratio"),
        ({"budget_min_retries": -1}, "budget_min_retries"),
        ({"budget_window_s": 0.0}, "budget_window_s"),
        ({"retry_on": "timeout"}, "retry_on"),
        ({"backoff": 3}, "backoff"),
    ],
)
def test_retry_config_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryConfig(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ policy


def _policy(**kwargs: object) -> RetryPolicy:
    return RetryPolicy(RetryConfig(**kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attempt", "error", "retryable", "reason"),
    [
        (1, "timeout", True, "retry"),
        (2, "worker_crashed", True, "retry"),
        (1, "timeout", False, "not_retryable"),
        (1, "bad_request", True, "not_retryable"),
        (1, None, True, "not_retryable"),
        (3, "timeout", True, "attempts_exhausted"),
        (4, "timeout", True, "attempts_exhausted"),
        (3, "bad_request", True, "not_retryable"),  # retryability is checked first
        (1, "internal", True, "retry"),  # the runtime's retryable codes are retried
        (1, "bad_reply", True, "retry"),
        (1, "context_too_long", True, "not_retryable"),
        (1, "unknown_kind", True, "not_retryable"),
    ],
)
def test_policy_reasons(attempt: int, error: str | None, retryable: bool, reason: str) -> None:
    policy = _policy(backoff=Backoff("constant", 0.25, 1.0))
    d = policy.decide(attempt, error, retryable, 0.0, random.Random(0))
    assert d.reason == reason
    assert d.retry == (reason == "retry")
    assert d.delay == (0.25 if reason == "retry" else 0.0)


def test_policy_budget_exhausted_and_only_spends_on_retry() -> None:
    policy = _policy(max_attempts=10, budget_ratio=0.0, budget_min_retries=2)
    rng = random.Random(5)
    # non-retries do not spend the budget
    for _ in range(5):
        assert policy.decide(1, "bad_request", True, 0.0, rng).reason == "not_retryable"
        assert policy.decide(10, "timeout", True, 0.0, rng).reason == "attempts_exhausted"
    assert policy.budget.retries_in_window(0.0) == 0
    assert policy.decide(1, "timeout", True, 0.0, rng).retry
    assert policy.decide(2, "timeout", True, 0.0, rng).retry
    d = policy.decide(3, "timeout", True, 0.0, rng)
    assert d == RetryDecision(False, 0.0, "budget_exhausted")
    assert policy.budget.retries_in_window(0.0) == 2
    # the window slides: budget is back 10 s later
    assert policy.decide(3, "timeout", True, 10.0, rng).retry


def test_policy_record_request_grows_budget() -> None:
    policy = _policy(max_attempts=5, budget_ratio=0.5, budget_min_retries=0)
    rng = random.Random(0)
    assert policy.decide(1, "timeout", True, 0.0, rng).reason == "budget_exhausted"
    policy.record_request(0.0)
    policy.record_request(0.0)
    assert policy.decide(1, "timeout", True, 0.0, rng).retry
    assert policy.decide(1, "timeout", True, 0.0, rng).reason == "budget_exhausted"


def test_policy_delay_uses_backoff_and_prev_delay() -> None:
    policy = _policy(max_attempts=5, backoff=Backoff("decorrelated", 0.1, 5.0))
    d = policy.decide(2, "overloaded", True, 0.0, random.Random(9), prev_delay=1.0)
    assert d.retry
    assert d.delay == min(5.0, random.Random(9).uniform(0.1, 3.0))
    policy2 = _policy(backoff=Backoff("full_jitter", 0.1, 5.0))
    d2 = policy2.decide(2, "overloaded", True, 0.0, random.Random(9))
    assert d2.delay == random.Random(9).uniform(0.0, 0.2)


def test_policy_no_randomness_when_not_retrying() -> None:
    policy = _policy()
    rng = random.Random(3)
    state = rng.getstate()
    policy.decide(1, "bad_request", True, 0.0, rng)
    policy.decide(3, "timeout", True, 0.0, rng)
    assert rng.getstate() == state


def test_policy_attempt_below_one_raises() -> None:
    with pytest.raises(ValueError, match="attempt"):
        _policy().decide(0, "timeout", True, 0.0, random.Random(0))


def test_decision_is_frozen() -> None:
    d = RetryDecision(True, 0.1, "retry")
    with pytest.raises(AttributeError):
        d.retry = False  # type: ignore[misc]
