"""Token buckets and per-tenant / global quotas.

Theory of operation
-------------------
A token bucket holds at most ``capacity`` tokens and refills continuously at
``rate`` tokens per second: ``tokens = min(capacity, tokens + dt * rate)``. A
request of ``cost`` is admitted iff that many tokens are present, and then
they are removed; a denial removes nothing and reports ``retry_after``, the
seconds until ``cost`` tokens will be there (``math.inf`` when ``cost`` exceeds
``capacity`` or the bucket never refills). Over any interval of length ``T``
a bucket therefore grants at most ``capacity + rate * T``.

The bucket is pure: it never reads a clock, every method takes ``now`` in
seconds on the caller's clock (``env.now`` in the simulator, ``loop.time()`` in
the runtime). Conventions chosen:

* Time going backwards never mints tokens: the refill uses
  ``max(0, now - last)`` and ``last`` only moves forward. ``retry_after`` is
  measured from the caller's ``now``, so it includes the gap to ``last``.
* Comparisons allow a relative slack of ``1e-9`` so that a caller who waits
  exactly ``retry_after`` is admitted despite float rounding, and the reported
  ``retry_after`` is nudged up by ulps when rounding would otherwise make
  that wait fall just short.
* ``peek`` answers like ``try_acquire`` without consuming; ``refund`` gives
  back unused reserved tokens (capped at capacity).

:class:`QuotaManager` composes per-tenant buckets (requests per minute with
cost 1, tokens per minute with cost = the request's tokens, a concurrency
cap) with the same three limits fleet-wide. A request must pass every
applicable limit; all limits are peeked first and only then consumed, so a
denial by any one debits none of them. The decision carries the data a
gateway needs for ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
headers, in the style of the OpenAI / Anthropic APIs.

Sources: the classic token bucket (RFC 2697 / 4115 style metering), Envoy's
local rate limit filter, and the published ``x-ratelimit-*`` header
conventions of hosted LLM APIs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from haif.policy.settings import Count, Finite, NonNegative, Positive, setting

__all__ = ["Acquire", "QuotaConfig", "QuotaDecision", "QuotaManager", "TokenBucket"]

_REL_TOL = 1e-9
_REASON_ORDER = (
    "tenant_requests_per_min",
    "tenant_tokens_per_min",
    "tenant_concurrency",
    "global_requests_per_min",
    "global_tokens_per_min",
    "global_concurrency",
)
_MAX_NUDGES = 64


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True, slots=True)
class Acquire:
    """Answer of :meth:`TokenBucket.try_acquire` / :meth:`TokenBucket.peek`.

    ``retry_after`` is 0.0 when allowed, else the seconds (from the caller's
    ``now``) until ``cost`` tokens are available, ``math.inf`` if never.
    """

    allowed: bool
    retry_after: float


@setting(title="TokenBucket")
class _BucketArgs:
    """What :class:`TokenBucket` accepts (checked once, when it is built)."""

    rate: NonNegative
    capacity: Positive
    now: Finite


class TokenBucket:
    """A continuously refilling token bucket, full at construction time.

    ``rate`` (tokens per second) must be finite and ``>= 0``, ``capacity``
    finite and ``> 0``, ``now`` finite; anything else raises ``ValueError``
    naming the argument.
    """

    __slots__ = ("_capacity", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, capacity: float, now: float = 0.0) -> None:
        args = _BucketArgs(rate, capacity, now)
        self._rate = float(args.rate)
        self._capacity = float(args.capacity)
        self._tokens = float(args.capacity)
        self._last = float(args.now)

    @property
    def rate(self) -> float:
        """Refill rate in tokens per second."""
        return self._rate

    @property
    def capacity(self) -> float:
        """Maximum number of tokens the bucket holds."""
        return self._capacity

    def _refill(self, now: float) -> None:
        _finite("now", now)
        if now > self._last:
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now

    @staticmethod
    def _check_cost(name: str, cost: float) -> None:
        _finite(name, cost)
        if cost < 0:
            raise ValueError(f"{name} must be >= 0, got {cost!r}")

    def _tol(self, cost: float) -> float:
        return _REL_TOL * max(1.0, cost)

    def _retry_after(self, now: float, cost: float) -> float:
        if self._rate == 0.0:
            return math.inf
        deficit = cost - self._tokens
        wait = max(0.0, self._last - now) + deficit / self._rate
        floor = cost - self._tol(cost)
        for _ in range(_MAX_NUDGES):
            at = now + wait
            if self._tokens + max(0.0, at - self._last) * self._rate >= floor:
                break
            wait += math.ulp(at)
        return wait

    def _decide(self, now: float, cost: float) -> Acquire:
        if cost > self._capacity:
            return Acquire(False, math.inf)
        if self._tokens >= cost - self._tol(cost):
            return Acquire(True, 0.0)
        return Acquire(False, self._retry_after(now, cost))

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (always within ``[0, capacity]``)."""
        self._refill(now)
        return self._tokens

    def peek(self, now: float, cost: float = 1.0) -> Acquire:
        """What :meth:`try_acquire` would answer, without consuming anything."""
        self._check_cost("cost", cost)
        self._refill(now)
        return self._decide(now, cost)

    def try_acquire(self, now: float, cost: float = 1.0) -> Acquire:
        """Take ``cost`` tokens if present; a denial consumes nothing."""
        self._check_cost("cost", cost)
        self._refill(now)
        decision = self._decide(now, cost)
        if decision.allowed:
            self._tokens = max(0.0, self._tokens - cost)
        return decision

    def refund(self, now: float, amount: float) -> None:
        """Give back ``amount`` tokens (e.g. unused reservation), capped at capacity."""
        self._check_cost("amount", amount)
        self._refill(now)
        self._tokens = min(self._capacity, self._tokens + amount)

    def reset_after(self, now: float) -> float:
        """Seconds from ``now`` until the bucket is full again (0.0 if full)."""
        self._refill(now)
        if self._tokens >= self._capacity:
            return 0.0
        if self._rate == 0.0:
            return math.inf
        return max(0.0, self._last - now) + (self._capacity - self._tokens) / self._rate

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate={self._rate!r}, capacity={self._capacity!r}, "
            f"tokens={self._tokens!r}, last={self._last!r})"
        )


# ------------------------------------------------------------------ quotas


@setting
class QuotaConfig:
    """Limits for one tenant (or the whole fleet); ``None`` means unlimited.

    Bucket capacity is ``per_minute_limit * burst_s / 60``: with the default
    ``burst_s = 60`` a full minute's allowance may arrive at once.
    """

    requests_per_min: Positive | None = None
    tokens_per_min: Positive | None = None
    max_concurrency: Count | None = None
    burst_s: Positive = 60.0

    def requests_bucket(self, now: float) -> TokenBucket | None:
        """A fresh (full) requests bucket, or ``None`` when unlimited."""
        if self.requests_per_min is None:
            return None
        rpm = float(self.requests_per_min)
        return TokenBucket(rpm / 60.0, rpm * self.burst_s / 60.0, now)

    def tokens_bucket(self, now: float) -> TokenBucket | None:
        """A fresh (full) tokens bucket, or ``None`` when unlimited."""
        if self.tokens_per_min is None:
            return None
        tpm = float(self.tokens_per_min)
        return TokenBucket(tpm / 60.0, tpm * self.burst_s / 60.0, now)


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """Outcome of :meth:`QuotaManager.admit`, with rate-limit header data.

    ``reason`` names the first failing limit in the order tenant requests,
    tenant tokens, tenant concurrency, global requests, global tokens, global
    concurrency. Header fields describe the most constraining bucket (least
    remaining; tenant wins ties) after the decision; ``None`` when unlimited.
    ``reset_*`` is seconds until that bucket is full again.
    """

    allowed: bool
    reason: str | None = None
    retry_after: float = 0.0
    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests: float | None = None
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None


_ADMITTED_UNLIMITED = QuotaDecision(True)
"""What :meth:`QuotaManager.admit` says when neither the tenant nor the fleet has a limit."""


@dataclass(slots=True)
class _Scope:
    """Mutable limiter state of one tenant or of the fleet."""

    requests: TokenBucket | None
    tokens: TokenBucket | None
    max_concurrency: int | None
    in_flight: int = 0

    @classmethod
    def build(cls, config: QuotaConfig | None, now: float) -> _Scope:
        if config is None:
            return cls(None, None, None)
        return cls(config.requests_bucket(now), config.tokens_bucket(now), config.max_concurrency)

    @property
    def unlimited(self) -> bool:
        return self.requests is None and self.tokens is None and self.max_concurrency is None


def _header(
    buckets: tuple[TokenBucket | None, ...], now: float
) -> tuple[float | None, float | None, float | None]:
    best: TokenBucket | None = None
    best_left = math.inf
    for bucket in buckets:
        if bucket is None:
            continue
        left = bucket.available(now)
        if best is None or left < best_left:
            best, best_left = bucket, left
    if best is None:
        return None, None, None
    return best.capacity, best_left, best.reset_after(now)


class QuotaManager:
    """Per-tenant quotas composed with global quotas.

    Tenants named in ``tenants`` use their config; other tenants get
    ``default`` (or are unlimited when it is ``None``). Buckets are created
    lazily, full, at the first ``admit`` that sees the tenant. ``global_``
    limits the whole fleet. Spurious releases (tenant has nothing in flight)
    are ignored entirely, so counters never go negative and double releases
    cannot refund tokens twice.
    """

    __slots__ = ("_configs", "_default", "_global", "_tenants")

    def __init__(
        self,
        tenants: Mapping[str, QuotaConfig] | None = None,
        default: QuotaConfig | None = None,
        global_: QuotaConfig | None = None,
        now: float = 0.0,
    ) -> None:
        _finite("now", now)
        self._configs: dict[str, QuotaConfig] = dict(tenants or {})
        self._default = default
        self._global = _Scope.build(global_, now)
        self._tenants: dict[str, _Scope] = {}

    def config_for(self, tenant: str) -> QuotaConfig | None:
        """The config that applies to ``tenant`` (``None`` = unlimited)."""
        return self._configs.get(tenant, self._default)

    def _scope(self, tenant: str, now: float) -> _Scope:
        scope = self._tenants.get(tenant)
        if scope is None:
            scope = _Scope.build(self.config_for(tenant), now)
            self._tenants[tenant] = scope
        return scope

    def _forget_if_idle(self, tenant: str) -> None:
        scope = self._tenants.get(tenant)
        if scope is not None and scope.unlimited and scope.in_flight == 0:
            del self._tenants[tenant]

    def admit(self, tenant: str, tokens: int, now: float) -> QuotaDecision:
        """Admit one request of ``tokens`` tokens for ``tenant`` at ``now``."""
        if not math.isfinite(tokens) or tokens < 0:
            raise ValueError(f"tokens must be in [0, inf), got {tokens!r}")
        _finite("now", now)
        cost = float(tokens)
        t, g = self._scope(tenant, now), self._global
        if t.unlimited and g.unlimited:  # nothing to check or charge (the usual case)
            t.in_flight += 1
            g.in_flight += 1
            return _ADMITTED_UNLIMITED
        buckets: tuple[tuple[str, TokenBucket | None, float], ...] = (
            ("tenant_requests_per_min", t.requests, 1.0),
            ("tenant_tokens_per_min", t.tokens, cost),
            ("global_requests_per_min", g.requests, 1.0),
            ("global_tokens_per_min", g.tokens, cost),
        )
        denials: dict[str, float] = {}
        for name, bucket, amount in buckets:
            if bucket is not None:
                answer = bucket.peek(now, amount)
                if not answer.allowed:
                    denials[name] = answer.retry_after
        for name, scope in (("tenant_concurrency", t), ("global_concurrency", g)):
            if scope.max_concurrency is not None and scope.in_flight >= scope.max_concurrency:
                # No time-based estimate exists for a free slot: contributes 0.0.
                denials[name] = 0.0
        reason = next((name for name in _REASON_ORDER if name in denials), None)
        retry_after = max(denials.values(), default=0.0)
        allowed = reason is None
        if allowed:
            for _, bucket, amount in buckets:
                if bucket is not None:
                    bucket.try_acquire(now, amount)
            t.in_flight += 1
            g.in_flight += 1
        lr, rr, sr = _header((t.requests, g.requests), now)
        lt, rt, st = _header((t.tokens, g.tokens), now)
        self._forget_if_idle(tenant)
        return QuotaDecision(allowed, reason, retry_after, lr, rr, sr, lt, rt, st)

    def release(self, tenant: str, now: float, unused_tokens: int = 0) -> None:
        """End one admitted request; refund ``unused_tokens`` to the TPM buckets."""
        if not math.isfinite(unused_tokens) or unused_tokens < 0:
            raise ValueError(f"unused_tokens must be in [0, inf), got {unused_tokens!r}")
        _finite("now", now)
        scope = self._tenants.get(tenant)
        if scope is None or scope.in_flight <= 0:
            return
        scope.in_flight -= 1
        self._global.in_flight = max(0, self._global.in_flight - 1)
        if unused_tokens > 0:
            for bucket in (scope.tokens, self._global.tokens):
                if bucket is not None:
                    bucket.refund(now, float(unused_tokens))
        self._forget_if_idle(tenant)

    def in_flight(self, tenant: str) -> int:
        """Requests of ``tenant`` admitted and not yet released."""
        scope = self._tenants.get(tenant)
        return 0 if scope is None else scope.in_flight

    def global_in_flight(self) -> int:
        """Requests admitted fleet-wide and not yet released."""
        return self._global.in_flight
