"""Token bucket and quota manager tests, driven by a hand-advanced clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from haif.policy.ratelimit import (
    Acquire,
    QuotaConfig,
    QuotaDecision,
    QuotaManager,
    TokenBucket,
)

# ------------------------------------------------------------------ bucket


def test_bucket_starts_full_at_now() -> None:
    b = TokenBucket(rate=2.0, capacity=5.0, now=100.0)
    assert b.available(100.0) == 5.0
    assert b.rate == 2.0
    assert b.capacity == 5.0


@pytest.mark.parametrize(
    ("rate", "capacity", "take", "dt", "expected"),
    [
        (1.0, 10.0, 10.0, 0.0, 0.0),
        (1.0, 10.0, 10.0, 3.0, 3.0),
        (2.0, 10.0, 10.0, 2.5, 5.0),
        (2.0, 10.0, 4.0, 1.0, 8.0),
        (2.0, 10.0, 4.0, 100.0, 10.0),  # capped at capacity
        (0.5, 4.0, 4.0, 4.0, 2.0),
        (0.0, 4.0, 3.0, 1000.0, 1.0),  # never refills
    ],
)
def test_bucket_refill_math(
    rate: float, capacity: float, take: float, dt: float, expected: float
) -> None:
    b = TokenBucket(rate, capacity, now=0.0)
    assert b.try_acquire(0.0, take) == Acquire(True, 0.0)
    assert b.available(dt) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("rate", "capacity", "take", "at", "cost", "retry_after"),
    [
        (1.0, 1.0, 1.0, 0.0, 1.0, 1.0),
        (1.0, 1.0, 1.0, 0.5, 1.0, 0.5),
        (2.0, 4.0, 4.0, 0.0, 1.0, 0.5),
        (2.0, 4.0, 4.0, 0.0, 3.0, 1.5),
        (2.0, 4.0, 4.0, 1.0, 3.0, 0.5),
        (10.0, 100.0, 100.0, 0.0, 50.0, 5.0),
        (0.25, 2.0, 2.0, 0.0, 1.0, 4.0),
    ],
)
def test_retry_after_exact(
    rate: float, capacity: float, take: float, at: float, cost: float, retry_after: float
) -> None:
    b = TokenBucket(rate, capacity)
    assert b.try_acquire(0.0, take).allowed
    denied = b.try_acquire(at, cost)
    assert denied == Acquire(False, retry_after)
    # waiting exactly retry_after is enough
    assert b.try_acquire(at + denied.retry_after, cost) == Acquire(True, 0.0)


@pytest.mark.parametrize(
    ("rate", "capacity", "cost"),
    [(1.0, 5.0, 5.000001), (100.0, 1.0, 2.0), (0.0, 1.0, 1.5)],
)
def test_cost_above_capacity_is_never(rate: float, capacity: float, cost: float) -> None:
    b = TokenBucket(rate, capacity)
    assert b.try_acquire(0.0, cost) == Acquire(False, math.inf)
    assert b.available(0.0) == capacity  # consumed nothing


def test_zero_rate_denial_is_inf() -> None:
    b = TokenBucket(0.0, 2.0)
    assert b.try_acquire(0.0, 2.0).allowed
    assert b.try_acquire(50.0, 1.0) == Acquire(False, math.inf)


def test_zero_cost_always_allowed() -> None:
    b = TokenBucket(1.0, 1.0)
    assert b.try_acquire(0.0, 1.0).allowed
    assert b.try_acquire(0.0, 0.0) == Acquire(True, 0.0)


def test_denial_consumes_nothing() -> None:
    b = TokenBucket(1.0, 10.0)
    assert b.try_acquire(0.0, 7.0).allowed
    for _ in range(5):
        assert not b.try_acquire(0.0, 4.0).allowed
    assert b.available(0.0) == pytest.approx(3.0)
    assert b.try_acquire(0.0, 3.0).allowed


def test_peek_does_not_consume() -> None:
    b = TokenBucket(1.0, 3.0)
    for _ in range(10):
        assert b.peek(0.0, 2.0) == Acquire(True, 0.0)
    assert b.available(0.0) == 3.0
    assert b.try_acquire(0.0, 3.0).allowed
    assert b.peek(1.0, 2.0) == Acquire(False, 1.0)
    assert b.peek(1.0, 2.0) == b.try_acquire(1.0, 2.0)


def test_time_going_backwards_mints_nothing() -> None:
    b = TokenBucket(1.0, 10.0, now=10.0)
    assert b.try_acquire(10.0, 10.0).allowed
    assert b.available(5.0) == 0.0
    assert not b.try_acquire(0.0, 1.0).allowed
    # going back to 10.0 after visiting 5.0 must not re-credit 5..10
    assert b.available(10.0) == 0.0
    assert b.available(12.0) == pytest.approx(2.0)


def test_retry_after_from_the_past_includes_the_gap() -> None:
    b = TokenBucket(1.0, 1.0, now=10.0)
    assert b.try_acquire(10.0, 1.0).allowed
    denied = b.try_acquire(8.0, 1.0)
    assert denied == Acquire(False, 3.0)
    assert b.try_acquire(8.0 + denied.retry_after, 1.0).allowed


@pytest.mark.parametrize(
    ("take", "refund", "expected"),
    [(5.0, 2.0, 7.0), (5.0, 5.0, 10.0), (5.0, 50.0, 10.0), (0.0, 1.0, 10.0), (3.0, 0.0, 7.0)],
)
def test_refund_capped(take: float, refund: float, expected: float) -> None:
    b = TokenBucket(1.0, 10.0)
    assert b.try_acquire(0.0, take).allowed
    b.refund(0.0, refund)
    assert b.available(0.0) == expected


def test_reset_after() -> None:
    b = TokenBucket(2.0, 10.0)
    assert b.reset_after(0.0) == 0.0
    assert b.try_acquire(0.0, 4.0).allowed
    assert b.reset_after(0.0) == 2.0
    assert b.reset_after(1.0) == 1.0
    assert b.reset_after(5.0) == 0.0


@pytest.mark.parametrize(
    ("rate", "capacity", "now", "field"),
    [(-1.0, 1.0, 0.0, "rate"), (1.0, 0.0, 0.0, "capacity"), (1.0, -1.0, 0.0, "capacity"),
     (math.inf, 1.0, 0.0, "rate"), (1.0, math.nan, 0.0, "capacity"), (1.0, 1.0, math.inf, "now"),
     (True, 1.0, 0.0, "rate")],
)  # fmt: skip
def test_bucket_validation(rate: float, capacity: float, now: float, field: str) -> None:
    with pytest.raises(ValueError, match=rf"TokenBucket\n{field}\n  Input should be"):
        TokenBucket(rate, capacity, now)


@pytest.mark.parametrize("cost", [-1.0, math.nan, math.inf])
def test_bad_cost_raises(cost: float) -> None:
    b = TokenBucket(1.0, 1.0)
    with pytest.raises(ValueError, match="cost"):
        b.try_acquire(0.0, cost)
    with pytest.raises(ValueError, match="amount"):
        b.refund(0.0, cost)


# ------------------------------------------------- bucket properties (hypothesis)

rates = st.floats(min_value=0.0, max_value=1000.0, allow_nan=False)
capacities = st.floats(min_value=0.01, max_value=1000.0, allow_nan=False)
steps = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=10.0, allow_nan=False),  # dt
        st.floats(min_value=0.0, max_value=1200.0, allow_nan=False),  # cost
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(rate=rates, capacity=capacities, start=st.floats(0.0, 1e6), ops=steps)
def test_granted_cost_bounded(
    rate: float, capacity: float, start: float, ops: list[tuple[float, float]]
) -> None:
    b = TokenBucket(rate, capacity, now=start)
    now, granted = start, 0.0
    for dt, cost in ops:
        now += dt
        before = b.available(now)
        result = b.try_acquire(now, cost)
        after = b.available(now)
        assert 0.0 <= after <= capacity
        if result.allowed:
            assert result.retry_after == 0.0
            granted += cost
        else:
            assert after == before
            assert result.retry_after > 0.0
            if cost > capacity or rate == 0.0:
                assert result.retry_after == math.inf
    slack = 1e-6 * (1.0 + capacity + granted)
    assert granted <= capacity + rate * (now - start) + slack


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(min_value=1e-3, max_value=1e4),
    capacity=capacities,
    start=st.floats(0.0, 1e7),
    take=st.floats(0.0, 1.0),
    dt=st.floats(0.0, 5.0),
    cost=st.floats(0.0, 1.0),
)
def test_waiting_retry_after_suffices(
    rate: float, capacity: float, start: float, take: float, dt: float, cost: float
) -> None:
    b = TokenBucket(rate, capacity, now=start)
    assert b.try_acquire(start, take * capacity).allowed
    now = start + dt
    result = b.try_acquire(now, cost * capacity)
    if not result.allowed:
        assert b.try_acquire(now + result.retry_after, cost * capacity).allowed


class BucketMachine(RuleBasedStateMachine):
    """Random acquires/peeks/refunds/time moves keep the bucket invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.bucket: TokenBucket | None = None
        self.now = 0.0
        self.start = 0.0
        self.granted = 0.0
        self.refunded = 0.0

    @precondition(lambda self: self.bucket is None)
    @rule(rate=rates, capacity=capacities, start=st.floats(-1e3, 1e6))
    def create(self, rate: float, capacity: float, start: float) -> None:
        self.bucket = TokenBucket(rate, capacity, now=start)
        self.now = self.start = start

    @precondition(lambda self: self.bucket is not None)
    @rule(dt=st.floats(0.0, 20.0))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.bucket is not None)
    @rule(back=st.floats(0.0, 20.0), cost=st.floats(0.0, 50.0))
    def acquire_in_the_past(self, back: float, cost: float) -> None:
        assert self.bucket is not None
        before = self.bucket.available(self.now)
        result = self.bucket.try_acquire(self.now - back, cost)
        if result.allowed:
            self.granted += cost
        else:
            assert self.bucket.available(self.now) == before

    @precondition(lambda self: self.bucket is not None)
    @rule(cost=st.floats(0.0, 1200.0))
    def acquire(self, cost: float) -> None:
        assert self.bucket is not None
        before = self.bucket.available(self.now)
        peeked = self.bucket.peek(self.now, cost)
        result = self.bucket.try_acquire(self.now, cost)
        assert peeked == result
        if result.allowed:
            self.granted += cost
        else:
            assert self.bucket.available(self.now) == before

    @precondition(lambda self: self.bucket is not None)
    @rule(amount=st.floats(0.0, 50.0))
    def refund(self, amount: float) -> None:
        assert self.bucket is not None
        self.bucket.refund(self.now, amount)
        self.refunded += amount

    @invariant()
    def within_bounds(self) -> None:
        if self.bucket is None:
            return
        available = self.bucket.available(self.now)
        assert 0.0 <= available <= self.bucket.capacity
        minted = self.bucket.capacity + self.bucket.rate * (self.now - self.start)
        slack = 1e-6 * (1.0 + minted + self.granted)
        assert self.granted <= minted + self.refunded + slack


TestBucketMachine = BucketMachine.TestCase
TestBucketMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# ------------------------------------------------------------------ quota config


def test_quota_config_capacity_from_burst() -> None:
    cfg = QuotaConfig(requests_per_min=120, tokens_per_min=6000, burst_s=30)
    rb, tb = cfg.requests_bucket(0.0), cfg.tokens_bucket(0.0)
    assert rb is not None and tb is not None
    assert (rb.rate, rb.capacity) == (2.0, 60.0)
    assert (tb.rate, tb.capacity) == (100.0, 3000.0)
    default = QuotaConfig(requests_per_min=60)
    drb = default.requests_bucket(0.0)
    assert drb is not None and drb.capacity == 60.0
    assert default.tokens_bucket(0.0) is None
    bogus: dict[str, Any] = {"bogus": 1}
    with pytest.raises(ValueError, match=r"bogus\n  Unexpected keyword argument"):
        QuotaConfig(**bogus)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"requests_per_min": 0}, "requests_per_min"),
        ({"requests_per_min": -5.0}, "requests_per_min"),
        ({"requests_per_min": math.inf}, "requests_per_min"),
        ({"tokens_per_min": math.nan}, "tokens_per_min"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 1.5}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"burst_s": 0.0}, "burst_s"),
        ({"burst_s": math.inf}, "burst_s"),
    ],
)
def test_quota_config_validation(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        QuotaConfig(**kwargs)  # type: ignore[arg-type]


def test_quota_config_positional_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"max_concurrency\n  Input should be greater than"):
        QuotaConfig(60, None, 0)
    assert QuotaConfig(60, 6000, 2, 30) == QuotaConfig(
        requests_per_min=60, tokens_per_min=6000, max_concurrency=2, burst_s=30
    )


def test_quota_config_is_frozen() -> None:
    cfg = QuotaConfig()
    with pytest.raises(AttributeError):
        cfg.burst_s = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------ quota manager


def test_unlimited_tenant_without_default() -> None:
    qm = QuotaManager()
    for i in range(1000):
        d = qm.admit("anyone", 10**6, float(i))
        assert d == QuotaDecision(True, None, 0.0)
    assert qm.in_flight("anyone") == 1000
    assert qm.global_in_flight() == 1000


def test_tenant_rpm_limit_and_retry_after() -> None:
    qm = QuotaManager({"a": QuotaConfig(requests_per_min=60)})
    for _ in range(60):
        assert qm.admit("a", 0, 0.0).allowed
    d = qm.admit("a", 0, 0.0)
    assert (d.allowed, d.reason, d.retry_after) == (False, "tenant_requests_per_min", 1.0)
    assert d.limit_requests == 60.0
    assert d.remaining_requests == 0.0
    assert d.reset_requests == 60.0
    assert d.limit_tokens is None and d.remaining_tokens is None and d.reset_tokens is None
    assert qm.admit("a", 0, 1.0).allowed
    # other tenants are not limited
    assert qm.admit("b", 0, 1.0).allowed


def test_tenant_tpm_limit_and_cost_above_capacity() -> None:
    qm = QuotaManager({"a": QuotaConfig(tokens_per_min=600)})  # 10 tokens/s, cap 600
    d = qm.admit("a", 500, 0.0)
    assert d.allowed
    assert (d.limit_tokens, d.remaining_tokens, d.reset_tokens) == (600.0, 100.0, 50.0)
    d = qm.admit("a", 200, 0.0)
    assert (d.allowed, d.reason, d.retry_after) == (False, "tenant_tokens_per_min", 10.0)
    d = qm.admit("a", 601, 0.0)
    assert (d.allowed, d.reason, d.retry_after) == (False, "tenant_tokens_per_min", math.inf)
    assert qm.in_flight("a") == 1


def test_default_config_applies_to_unknown_tenants_lazily() -> None:
    qm = QuotaManager(default=QuotaConfig(requests_per_min=1))
    assert qm.admit("x", 0, 30.0).allowed  # created full at first sight
    assert not qm.admit("x", 0, 30.0).allowed
    assert qm.admit("y", 0, 30.0).allowed
    assert qm.admit("x", 0, 90.0).allowed


def test_explicit_tenant_overrides_default() -> None:
    qm = QuotaManager({"vip": QuotaConfig(requests_per_min=100)}, QuotaConfig(requests_per_min=1))
    assert qm.config_for("vip") == QuotaConfig(requests_per_min=100)
    assert qm.config_for("other") == QuotaConfig(requests_per_min=1)
    assert all(qm.admit("vip", 0, 0.0).allowed for _ in range(100))


def test_global_denial_debits_no_tenant_bucket() -> None:
    qm = QuotaManager(
        {"a": QuotaConfig(requests_per_min=10, tokens_per_min=1000)},
        global_=QuotaConfig(tokens_per_min=100),
    )
    assert qm.admit("a", 100, 0.0).allowed  # exhausts the global TPM
    for _ in range(20):
        d = qm.admit("a", 50, 0.0)
        assert (d.allowed, d.reason) == (False, "global_tokens_per_min")
        assert d.retry_after == pytest.approx(30.0)
    # the tenant buckets were not touched by the denials: 9 requests, 900 tokens left
    d = qm.admit("a", 0, 0.0)
    assert d.allowed
    assert d.remaining_requests == 8.0
    assert qm.in_flight("a") == 2


def test_tenant_denial_debits_no_global_bucket() -> None:
    qm = QuotaManager(
        {"a": QuotaConfig(requests_per_min=1)},
        global_=QuotaConfig(requests_per_min=2, tokens_per_min=100),
    )
    assert qm.admit("a", 10, 0.0).allowed
    for _ in range(10):
        d = qm.admit("a", 10, 0.0)
        assert (d.allowed, d.reason) == (False, "tenant_requests_per_min")
    # global still has 1 request and 90 tokens
    d = qm.admit("b", 90, 0.0)
    assert d.allowed
    assert d.remaining_requests == 0.0 and d.remaining_tokens == 0.0
    d = qm.admit("c", 0, 0.0)
    assert (d.allowed, d.reason) == (False, "global_requests_per_min")


@pytest.mark.parametrize(
    ("tenant_cfg", "global_cfg", "tokens", "reason", "retry_after"),
    [
        # both tenant and global deny: first reason in order, max retry_after
        (QuotaConfig(requests_per_min=1), QuotaConfig(requests_per_min=2, burst_s=30), 0,
         "tenant_requests_per_min", 60.0),
        (QuotaConfig(requests_per_min=2, burst_s=30), QuotaConfig(requests_per_min=1), 0,
         "tenant_requests_per_min", 60.0),
        (QuotaConfig(requests_per_min=30), QuotaConfig(requests_per_min=60), 0,
         "tenant_requests_per_min", 2.0),
        (QuotaConfig(requests_per_min=60), QuotaConfig(requests_per_min=30), 0,
         "global_requests_per_min", 2.0),
        (QuotaConfig(tokens_per_min=60), QuotaConfig(tokens_per_min=6000), 100,
         "tenant_tokens_per_min", math.inf),
        (QuotaConfig(), QuotaConfig(tokens_per_min=60), 61, "global_tokens_per_min", math.inf),
    ],
)  # fmt: skip
def test_reason_order_and_max_retry_after(
    tenant_cfg: QuotaConfig, global_cfg: QuotaConfig, tokens: int, reason: str, retry_after: float
) -> None:
    qm = QuotaManager({"a": tenant_cfg}, global_=global_cfg)
    while qm.admit("a", min(tokens, 1), 0.0).allowed:
        pass
    d = qm.admit("a", tokens, 0.0)
    assert (d.allowed, d.reason, d.retry_after) == (False, reason, retry_after)


def test_tenant_concurrency_and_release() -> None:
    qm = QuotaManager({"a": QuotaConfig(max_concurrency=2, tokens_per_min=100)})
    assert qm.admit("a", 10, 0.0).allowed
    assert qm.admit("a", 10, 0.0).allowed
    d = qm.admit("a", 10, 0.0)
    assert (d.allowed, d.reason, d.retry_after) == (False, "tenant_concurrency", 0.0)
    assert d.remaining_tokens == 80.0  # denial debited nothing
    assert qm.in_flight("a") == 2
    qm.release("a", 0.0)
    assert qm.in_flight("a") == 1
    assert qm.admit("a", 10, 0.0).allowed


def test_global_concurrency() -> None:
    qm = QuotaManager(global_=QuotaConfig(max_concurrency=2))
    assert qm.admit("a", 1, 0.0).allowed
    assert qm.admit("b", 1, 0.0).allowed
    d = qm.admit("c", 1, 0.0)
    assert (d.allowed, d.reason) == (False, "global_concurrency")
    assert qm.global_in_flight() == 2
    qm.release("a", 0.0)
    assert qm.admit("c", 1, 0.0).allowed
    assert qm.global_in_flight() == 2


def test_release_never_goes_negative() -> None:
    qm = QuotaManager(
        {"a": QuotaConfig(max_concurrency=1, tokens_per_min=100)},
        global_=QuotaConfig(max_concurrency=5, tokens_per_min=1000),
    )
    qm.release("a", 0.0, unused_tokens=50)  # spurious: no-op
    qm.release("ghost", 0.0)
    assert qm.in_flight("a") == 0 and qm.in_flight("ghost") == 0
    assert qm.global_in_flight() == 0
    assert qm.admit("a", 60, 0.0).allowed
    qm.release("a", 0.0, unused_tokens=10)
    qm.release("a", 0.0, unused_tokens=10)  # double release refunds nothing
    assert qm.in_flight("a") == 0 and qm.global_in_flight() == 0
    d = qm.admit("a", 0, 0.0)
    assert d.remaining_tokens == 50.0
    # concurrency still works after the errors
    assert not qm.admit("a", 0, 0.0).allowed


@pytest.mark.parametrize(
    ("used", "unused", "tenant_left", "global_left"),
    [(60, 0, 40.0, 940.0), (60, 30, 70.0, 970.0), (60, 60, 100.0, 1000.0),
     (60, 500, 100.0, 1000.0)],
)  # fmt: skip
def test_release_refunds_capped(
    used: int, unused: int, tenant_left: float, global_left: float
) -> None:
    qm = QuotaManager(
        {"a": QuotaConfig(tokens_per_min=100)}, global_=QuotaConfig(tokens_per_min=1000)
    )
    assert qm.admit("a", used, 0.0).allowed
    qm.release("a", 0.0, unused_tokens=unused)
    # peek via a zero-token request on another, unlimited tenant for the global bucket
    assert qm.admit("z", 0, 0.0).remaining_tokens == global_left
    assert qm.admit("a", 0, 0.0).remaining_tokens == tenant_left


def test_headers_report_most_constraining_bucket() -> None:
    qm = QuotaManager(
        {"a": QuotaConfig(requests_per_min=100, tokens_per_min=10_000)},
        global_=QuotaConfig(requests_per_min=10, tokens_per_min=1_000_000),
    )
    d = qm.admit("a", 1000, 0.0)
    assert d.allowed
    assert (d.limit_requests, d.remaining_requests) == (10.0, 9.0)  # global is tighter
    assert d.reset_requests == pytest.approx(6.0)
    assert (d.limit_tokens, d.remaining_tokens) == (10_000.0, 9_000.0)  # tenant is tighter
    assert d.reset_tokens == pytest.approx(6.0)


def test_in_flight_per_tenant_is_independent() -> None:
    qm = QuotaManager()
    qm.admit("a", 1, 0.0)
    qm.admit("a", 1, 0.0)
    qm.admit("b", 1, 0.0)
    assert (qm.in_flight("a"), qm.in_flight("b"), qm.global_in_flight()) == (2, 1, 3)
    qm.release("a", 1.0)
    qm.release("a", 1.0)
    qm.release("a", 1.0)
    assert (qm.in_flight("a"), qm.in_flight("b"), qm.global_in_flight()) == (0, 1, 1)


@pytest.mark.parametrize("bad", [-1, math.nan])
def test_manager_rejects_bad_token_counts(bad: float) -> None:
    qm = QuotaManager()
    with pytest.raises(ValueError, match="tokens"):
        qm.admit("a", bad, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unused_tokens"):
        qm.release("a", 0.0, unused_tokens=bad)  # type: ignore[arg-type]


def test_time_backwards_in_manager_mints_nothing() -> None:
    qm = QuotaManager({"a": QuotaConfig(requests_per_min=60)}, now=0.0)
    for _ in range(60):
        assert qm.admit("a", 0, 10.0).allowed
    assert not qm.admit("a", 0, 5.0).allowed
    assert not qm.admit("a", 0, 10.0).allowed
    assert qm.admit("a", 0, 11.0).allowed


def test_decisions_are_frozen() -> None:
    d = QuotaManager().admit("a", 1, 0.0)
    with pytest.raises(AttributeError):
        d.allowed = False  # type: ignore[misc]
    a = Acquire(True, 0.0)
    with pytest.raises(AttributeError):
        a.allowed = False  # type: ignore[misc]
