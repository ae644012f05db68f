"""Adaptive throttling and priority shedding tests (hand-advanced clock)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.policy.admission import AdaptiveThrottle, PriorityShedder, ShedConfig, ThrottleConfig

# ------------------------------------------------------------------ throttle


def _throttle(k: float = 2.0, window_s: float = 120.0, enabled: bool = True) -> AdaptiveThrottle:
    return AdaptiveThrottle(ThrottleConfig(k=k, window_s=window_s, enabled=enabled))


@pytest.mark.parametrize(
    ("k", "requests", "accepts", "expected"),
    [
        (2.0, 0, 0, 0.0),
        (2.0, 10, 10, 0.0),
        (2.0, 10, 5, 0.0),  # exactly K * accepts
        (2.0, 10, 4, 2 / 11),
        (2.0, 10, 0, 10 / 11),
        (2.0, 100, 10, 80 / 101),
        (1.0, 10, 9, 1 / 11),
        (1.5, 100, 50, 25 / 101),
        (3.0, 99, 0, 99 / 100),
    ],
)
def test_reject_probability_formula(k: float, requests: int, accepts: int, expected: float) -> None:
    th = _throttle(k=k)
    for i in range(requests):
        th.record(0.5, accepted=i < accepts)
    assert th.counts(0.5) == (requests, accepts)
    assert th.reject_probability(0.5) == pytest.approx(expected)
    assert th.reject_probability(0.5) == pytest.approx(
        max(0.0, (requests - k * accepts) / (requests + 1))
    )


def test_window_expiry_uses_one_second_buckets() -> None:
    th = _throttle(window_s=10.0)
    for _ in range(10):
        th.record(0.3, accepted=False)  # bucket second 0
    for _ in range(10):
        th.record(5.7, accepted=True)  # bucket second 5
    assert th.counts(9.99) == (20, 10)
    assert th.reject_probability(9.99) == 0.0
    assert th.counts(10.0) == (10, 10)  # second 0 is 10 s old -> gone
    assert th.counts(14.99) == (10, 10)
    assert th.counts(15.0) == (0, 0)
    assert th.reject_probability(15.0) == 0.0


def test_rejection_rises_then_recovers_after_window() -> None:
    th = _throttle(window_s=60.0)
    for s in range(30):
        th.record(float(s), accepted=False)
    assert th.reject_probability(30.0) == pytest.approx(30 / 31)
    assert th.reject_probability(88.5) == pytest.approx(1 / 2)  # only second 29 left
    assert th.reject_probability(89.0) == 0.0


def test_memory_bounded_by_window_seconds() -> None:
    th = _throttle(window_s=5.0)
    for i in range(100_000):
        th.record(i * 0.001, accepted=i % 3 == 0)
    assert len(th._buckets) <= 6
    requests, accepts = th.counts(99.999)
    # Seconds 95-99 remain: i = 95000 .. 99999; the multiples of 3 among them
    # run from 95001 = 3 x 31667 to 99999 = 3 x 33333, 33333 - 31667 + 1 = 1667.
    assert requests == 5000
    assert accepts == 1667


def test_time_backwards_records_into_latest_bucket() -> None:
    th = _throttle(window_s=10.0)
    th.record(5.0, accepted=True)
    th.record(3.0, accepted=False)
    assert th.counts(5.0) == (2, 1)
    assert th.counts(14.99) == (2, 1)
    assert th.counts(15.0) == (0, 0)


def test_disabled_never_rejects_and_draws_nothing() -> None:
    th = _throttle(enabled=False)
    for _ in range(100):
        th.record(0.0, accepted=False)
    rng = random.Random(0)
    state = rng.getstate()
    assert th.reject_probability(0.0) == 0.0
    assert not th.should_reject(0.0, rng)
    assert rng.getstate() == state


def test_idle_throttle_consumes_no_randomness() -> None:
    th = _throttle()
    rng = random.Random(11)
    state = rng.getstate()
    for i in range(50):
        th.record(float(i), accepted=True)
        assert not th.should_reject(float(i), rng)
    assert rng.getstate() == state


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_should_reject_draws_against_probability(seed: int) -> None:
    th = _throttle()
    for _ in range(10):
        th.record(0.0, accepted=False)
    p = th.reject_probability(0.0)
    expected = random.Random(seed).random() < p
    assert th.should_reject(0.0, random.Random(seed)) == expected


def test_should_reject_frequency_matches_probability() -> None:
    th = _throttle()
    for i in range(100):
        th.record(0.0, accepted=i < 25)  # p = 50 / 101
    rng = random.Random(2024)
    n = 20_000
    rejected = sum(th.should_reject(0.0, rng) for _ in range(n))
    # One uniform draw per call, rejected below p = (100 - 2 x 25) / (100 + 1):
    # the same generator drawn here directly gives the exact (seeded) count.
    p = 50 / 101
    direct = random.Random(2024)
    assert rejected == sum(direct.random() < p for _ in range(n)) == 9848
    # And whatever the seed: binomial(n, p), mean 9901, sd sqrt(n p (1 - p)) = 70.7;
    # within 4 sd (a probability off by 0.015, or 3 %, falls outside).
    assert abs(rejected - n * p) <= 4 * math.sqrt(n * p * (1 - p))


@settings(max_examples=100, deadline=None)
@given(
    k=st.floats(1.0, 5.0),
    events=st.lists(st.tuples(st.floats(0.0, 3.0), st.booleans()), max_size=60),
)
def test_probability_in_unit_interval(k: float, events: list[tuple[float, bool]]) -> None:
    th = _throttle(k=k, window_s=10.0)
    now = 0.0
    for dt, accepted in events:
        now += dt
        th.record(now, accepted)
        p = th.reject_probability(now)
        requests, accepts = th.counts(now)
        assert 0 <= accepts <= requests
        assert 0.0 <= p < 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0.5}, "k"),
        ({"k": math.inf}, "k"),
        ({"window_s": 0.0}, "window_s"),
        ({"window_s": -1.0}, "window_s"),
        ({"window_s": math.nan}, "window_s"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_throttle_config_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ThrottleConfig(**kwargs)  # type: ignore[arg-type]


def test_throttle_config_defaults() -> None:
    cfg = ThrottleConfig()
    assert (cfg.k, cfg.window_s, cfg.enabled) == (2.0, 120.0, True)
    bogus: dict[str, Any] = {"bogus": 1}
    with pytest.raises(ValueError, match=r"bogus\n  Unexpected keyword argument"):
        ThrottleConfig(**bogus)
    with pytest.raises(AttributeError):
        cfg.k = 3.0  # type: ignore[misc]


# ------------------------------------------------------------------ shedding


@pytest.mark.parametrize(
    ("priority", "utilization", "shed"),
    [
        (0, 0.99, False),
        (0, 1.0, True),
        (0, 1.5, True),
        (1, 0.949, False),
        (1, 0.95, True),
        (2, 0.84, False),
        (2, 0.85, True),
        (7, 0.85, True),  # beyond the table: last threshold repeats
        (7, 0.5, False),
        (0, 0.0, False),
        (2, math.nan, False),
    ],
)
def test_default_thresholds(priority: int, utilization: float, shed: bool) -> None:
    assert PriorityShedder(ShedConfig()).should_shed(priority, utilization) is shed


def test_custom_thresholds_from_yaml_list() -> None:
    cfg = ShedConfig(thresholds=[1.2, 0.9, 0.9, 0.5])  # type: ignore[arg-type]
    assert cfg.thresholds == (1.2, 0.9, 0.9, 0.5)
    assert isinstance(cfg.thresholds, tuple)
    shedder = PriorityShedder(cfg)
    assert [shedder.should_shed(p, 0.95) for p in range(5)] == [False, True, True, True, True]
    assert [cfg.threshold(p) for p in range(6)] == [1.2, 0.9, 0.9, 0.5, 0.5, 0.5]


def test_single_threshold_applies_to_all() -> None:
    shedder = PriorityShedder(ShedConfig((0.8,)))
    assert [shedder.should_shed(p, 0.8) for p in range(3)] == [True, True, True]
    assert [shedder.should_shed(p, 0.79) for p in range(3)] == [False, False, False]


@pytest.mark.parametrize(
    "thresholds",
    [(), (0.0,), (-0.5,), (math.inf,), (math.nan,), (0.8, 0.9), (1.0, 0.5, 0.6), ("high",), "1.0"],
)
def test_shed_config_validation(thresholds: object) -> None:
    with pytest.raises(ValueError, match="thresholds"):
        ShedConfig(thresholds=thresholds)  # type: ignore[arg-type]


@pytest.mark.parametrize("priority", [-1, True])
def test_bad_priority_raises(priority: int) -> None:
    with pytest.raises(ValueError, match="priority"):
        PriorityShedder(ShedConfig()).should_shed(priority, 0.5)


@settings(max_examples=100, deadline=None)
@given(priority=st.integers(0, 10), utilization=st.floats(0.0, 2.0))
def test_less_important_is_shed_first(priority: int, utilization: float) -> None:
    shedder = PriorityShedder(ShedConfig())
    if shedder.should_shed(priority, utilization):
        assert shedder.should_shed(priority + 1, utilization)
