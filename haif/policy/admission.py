"""Admission control: client-side adaptive throttling and priority shedding.

Theory of operation
-------------------
**Adaptive throttling** (Google SRE book, ch. 21 "Handling Overload",
"Client-side throttling"): each client remembers, over a sliding window, how
many requests it sent to the backend (``requests``) and how many the backend
accepted (``accepts``). While the backend accepts everything the client sends
freely; once ``requests`` exceeds ``K * accepts`` it rejects locally with
probability ``max(0, (requests - K * accepts) / (requests + 1))``. ``K = 2``
lets twice the accepted volume through, so the backend still sees enough
traffic to signal recovery. Conventions: counts live in 1-second buckets
(a deque of ``[second, requests, accepts]``), so memory is bounded by
``window_s`` buckets at any request rate; an event is stamped with
``floor(now)`` and counts at ``now`` iff ``now - floor(t) < window_s``. A
rejection decided locally is *not* recorded by :meth:`AdaptiveThrottle.should_reject`;
the caller records only requests it actually sent (as the SRE book's
formula counts backend requests). ``should_reject`` draws from the ``rng``
only when the probability is positive, so an idle throttle consumes no
randomness and simulations stay reproducible.

**Priority shedding** (criticality-based load shedding, SRE book ch. 21-22):
priority ``p`` (0 = most important) is shed when fleet utilization reaches
``thresholds[min(p, len - 1)]``; thresholds are non-increasing so less
important work is shed first.

Everything is pure: time is the ``now`` argument, randomness the ``rng``
argument.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from typing import Annotated

from pydantic import Field, field_validator

from haif.policy.settings import AtLeastOne, Flag, Positive, setting

__all__ = ["AdaptiveThrottle", "PriorityShedder", "ShedConfig", "ThrottleConfig"]


@setting
class ThrottleConfig:
    """Adaptive throttling settings (``k`` >= 1, ``window_s`` > 0)."""

    k: AtLeastOne = 2.0
    window_s: Positive = 120.0
    enabled: Flag = True


class AdaptiveThrottle:
    """Google SRE client-side adaptive throttling over a sliding window."""

    __slots__ = ("_accepts", "_buckets", "_config", "_requests")

    def __init__(self, config: ThrottleConfig) -> None:
        self._config = config
        self._buckets: deque[list[int]] = deque()
        self._requests = 0
        self._accepts = 0

    @property
    def config(self) -> ThrottleConfig:
        return self._config

    def _prune(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite number, got {now!r}")
        window = self._config.window_s
        while self._buckets and now - self._buckets[0][0] >= window:
            _, requests, accepts = self._buckets.popleft()
            self._requests -= requests
            self._accepts -= accepts

    def record(self, now: float, accepted: bool) -> None:
        """Count one request sent to the backend, and one accept if ``accepted``."""
        self._prune(now)
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] >= second:
            bucket = self._buckets[-1]  # same second (or time went backwards)
        else:
            bucket = [second, 0, 0]
            self._buckets.append(bucket)
        bucket[1] += 1
        self._requests += 1
        if accepted:
            bucket[2] += 1
            self._accepts += 1

    def counts(self, now: float) -> tuple[int, int]:
        """``(requests, accepts)`` in the window at ``now``."""
        self._prune(now)
        return self._requests, self._accepts

    def reject_probability(self, now: float) -> float:
        """``max(0, (requests - k * accepts) / (requests + 1))``; 0 when disabled."""
        self._prune(now)
        if not self._config.enabled:
            return 0.0
        excess = self._requests - self._config.k * self._accepts
        return max(0.0, excess / (self._requests + 1))

    def should_reject(self, now: float, rng: random.Random) -> bool:
        """Reject locally with the current probability (no draw when it is 0)."""
        p = self.reject_probability(now)
        return p > 0.0 and rng.random() < p


@setting
class ShedConfig:
    """Utilization thresholds per priority (index = priority, last one repeats).

    At least one threshold, each in ``(0, inf)``, non-increasing (less
    important work is shed first); a list is stored as a tuple.
    """

    thresholds: Annotated[tuple[Positive, ...], Field(min_length=1)] = (1.0, 0.95, 0.85)

    @field_validator("thresholds")
    @classmethod
    def _non_increasing(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(later > earlier for earlier, later in itertools.pairwise(values)):
            raise ValueError(f"must be non-increasing, got {list(values)!r}")
        return values

    def threshold(self, priority: int) -> float:
        """Utilization at which ``priority`` is shed."""
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise ValueError(f"priority must be an int in [0, inf), got {priority!r}")
        return self.thresholds[min(priority, len(self.thresholds) - 1)]


class PriorityShedder:
    """Sheds less important priorities first as fleet utilization rises."""

    __slots__ = ("_config",)

    def __init__(self, config: ShedConfig) -> None:
        self._config = config

    @property
    def config(self) -> ShedConfig:
        return self._config

    def should_shed(self, priority: int, utilization: float) -> bool:
        """True iff ``utilization >= threshold(priority)`` (NaN never sheds)."""
        return utilization >= self._config.threshold(priority)
