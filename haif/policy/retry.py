"""Retry decisions: backoff schedules, a retry budget and the retry policy.

Theory of operation
-------------------
Retries turn a transient failure into a success, but unbounded retries turn
an overload into a retry storm. Three mechanisms keep them honest:

* **Backoff with jitter** (AWS Architecture Blog, "Exponential Backoff And
  Jitter", Marc Brooker, 2015): the ``n``-th retry waits
  ``t = min(cap, base * multiplier**(n-1))`` (exponential), ``U(0, t)`` (full
  jitter, the recommended default), ``t/2 + U(0, t/2)`` (equal jitter) or
  ``min(cap, U(base, 3 * prev))`` (decorrelated jitter). Jitter spreads
  synchronized clients apart. ``attempt`` is 1 for the first retry; huge
  attempt numbers saturate at ``cap`` instead of overflowing.
* **Retry budget** (Finagle's ``RetryBudget``, Envoy's
  ``retry_budget``, Google SRE book ch. 22 "Addressing Cascading Failures"):
  over a sliding window, a retry is allowed iff
  ``retries_in_window + 1 <= min_retries + ratio * requests_in_window``, so
  retries add at most ``ratio`` extra load plus a small floor for low-traffic
  clients. An event at ``t`` is in the window at ``now`` iff
  ``now - t < window_s``. Denied retries record nothing.
* **Attempt cap**: ``max_attempts`` counts every attempt, the first included
  (the SRE book's default of 3).

Which failures are retried at all is ``RetryConfig.retry_on``, a list of
error kinds; its default is every kind the shared table
(:data:`haif.contracts.ERROR_KINDS`) calls retryable. The caller's own
``retryable`` flag can only veto: an error is retried only if the flag is
set *and* its kind is listed.

Everything is pure: time is the ``now`` argument in seconds, randomness comes
from the ``random.Random`` passed in (only ``rng.uniform`` is drawn, and only
by the jittered kinds).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Annotated

from haif.contracts import RETRYABLE_ERRORS
from haif.policy.settings import (
    AtLeastOne,
    Count,
    NonNegative,
    NonNegativeCount,
    Positive,
    one_of,
    setting,
)

__all__ = [
    "BACKOFF_KINDS",
    "DEFAULT_BACKOFF",
    "DEFAULT_RETRY_ON",
    "Backoff",
    "RetryBudget",
    "RetryConfig",
    "RetryDecision",
    "RetryPolicy",
]

BACKOFF_KINDS: tuple[str, ...] = (
    "constant",
    "exponential",
    "full_jitter",
    "equal_jitter",
    "decorrelated",
)

# The kinds the shared error table (haif.contracts.ERROR_KINDS) calls
# retryable, as plain strings; a config may name others, or fewer.
DEFAULT_RETRY_ON: tuple[str, ...] = RETRYABLE_ERRORS


@setting
class Backoff:
    """A backoff schedule; see the module docstring for the formulas.

    ``kind`` is one of :data:`BACKOFF_KINDS`; ``base`` and ``cap`` are
    finite and ``>= 0``, ``multiplier`` finite and ``>= 1``.
    """

    kind: Annotated[str, one_of(*BACKOFF_KINDS)]
    base: NonNegative
    cap: NonNegative
    multiplier: AtLeastOne = 2.0

    def ceiling(self, attempt: int) -> float:
        """``min(cap, base * multiplier**(attempt-1))`` without overflowing."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int in [1, inf), got {attempt!r}")
        if self.base == 0.0 or self.cap == 0.0:
            return 0.0
        try:
            raw = self.base * self.multiplier ** (attempt - 1)
        except OverflowError:
            return self.cap
        return min(self.cap, raw)

    def delay(self, attempt: int, rng: random.Random, prev: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = first retry).

        ``prev`` is the previous delay, used only by ``decorrelated``
        (defaults to ``base``). Constant and exponential draw no randomness.
        """
        t = self.ceiling(attempt)
        if self.kind == "constant":
            return min(self.cap, self.base)
        if self.kind == "exponential":
            return t
        if self.kind == "full_jitter":
            return rng.uniform(0.0, t)
        if self.kind == "equal_jitter":
            half = t / 2.0
            return half + rng.uniform(0.0, half)
        # decorrelated
        last = self.base if prev is None else prev
        if not (math.isfinite(last) and last >= 0):
            raise ValueError(f"prev must be in [0, inf), got {prev!r}")
        return min(self.cap, rng.uniform(self.base, 3.0 * last))


DEFAULT_BACKOFF = Backoff("full_jitter", 0.1, 5.0)


@setting(title="RetryBudget")
class _BudgetArgs:
    """What :class:`RetryBudget` accepts (checked once, when it is built)."""

    ratio: NonNegative
    min_retries: NonNegativeCount
    window_s: Positive


class RetryBudget:
    """Sliding-window retry budget (Finagle / Envoy style).

    ``ratio`` must be finite and ``>= 0``, ``min_retries`` an int ``>= 0``,
    ``window_s`` finite and ``> 0``; anything else raises ``ValueError``
    naming the argument.

    Events are stored as ``[time, count]`` pairs (same-time events merge) in
    deques pruned on every call, so memory is bounded by the number of
    distinct timestamps inside one window. Time is expected not to go
    backwards; if it does, events are recorded at the latest time seen.
    """

    __slots__ = (
        "_last",
        "_min_retries",
        "_n_requests",
        "_n_retries",
        "_ratio",
        "_requests",
        "_retries",
        "_window_s",
    )

    def __init__(self, ratio: float = 0.1, min_retries: int = 3, window_s: float = 10.0) -> None:
        args = _BudgetArgs(ratio, min_retries, window_s)
        self._ratio = float(args.ratio)
        self._min_retries = args.min_retries
        self._window_s = float(args.window_s)
        self._requests: deque[list[float]] = deque()
        self._retries: deque[list[float]] = deque()
        self._n_requests = 0
        self._n_retries = 0
        self._last = -math.inf

    def _prune(self, now: float) -> float:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite number, got {now!r}")
        self._last = max(self._last, now)
        while self._requests and now - self._requests[0][0] >= self._window_s:
            self._n_requests -= int(self._requests.popleft()[1])
        while self._retries and now - self._retries[0][0] >= self._window_s:
            self._n_retries -= int(self._retries.popleft()[1])
        return self._last

    @staticmethod
    def _push(events: deque[list[float]], at: float) -> None:
        if events and events[-1][0] == at:
            events[-1][1] += 1
        else:
            events.append([at, 1])

    def record_request(self, now: float) -> None:
        """Count one original (non-retry) request."""
        at = self._prune(now)
        self._push(self._requests, at)
        self._n_requests += 1

    def requests_in_window(self, now: float) -> int:
        self._prune(now)
        return self._n_requests

    def retries_in_window(self, now: float) -> int:
        self._prune(now)
        return self._n_retries

    def can_spend(self, now: float) -> bool:
        """Whether one more retry fits the budget at ``now`` (records nothing)."""
        self._prune(now)
        return self._n_retries + 1 <= self._min_retries + self._ratio * self._n_requests

    def try_spend(self, now: float) -> bool:
        """Record one retry if the budget allows it; a denial records nothing."""
        if not self.can_spend(now):
            return False
        self._push(self._retries, self._last)
        self._n_retries += 1
        return True


@setting
class RetryConfig:
    """Retry settings; ``max_attempts`` counts the first attempt too.

    ``retry_on``: the error kinds worth retrying (default: the retryable
    kinds of :data:`haif.contracts.ERROR_KINDS`), stored as plain strings
    (an ``ErrorKind`` member becomes its string). ``backoff`` may be given
    as a mapping (e.g. straight from YAML).
    """

    max_attempts: Count = 3
    backoff: Backoff = DEFAULT_BACKOFF
    budget_ratio: NonNegative = 0.1
    budget_min_retries: NonNegativeCount = 3
    budget_window_s: Positive = 10.0
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """``reason`` is one of ``retry``, ``not_retryable``, ``attempts_exhausted``,
    ``budget_exhausted``; ``delay`` is 0.0 unless ``retry``."""

    retry: bool
    delay: float
    reason: str


class RetryPolicy:
    """Combines the attempt cap, the retryable-error list, backoff and budget."""

    __slots__ = ("_budget", "_config")

    def __init__(self, config: RetryConfig) -> None:
        self._config = config
        self._budget = RetryBudget(
            config.budget_ratio, config.budget_min_retries, config.budget_window_s
        )

    @property
    def config(self) -> RetryConfig:
        return self._config

    @property
    def budget(self) -> RetryBudget:
        return self._budget

    def record_request(self, now: float) -> None:
        """Count one original request towards the retry budget."""
        self._budget.record_request(now)

    def decide(
        self,
        attempt: int,
        error: str | None,
        retryable: bool,
        now: float,
        rng: random.Random,
        prev_delay: float | None = None,
    ) -> RetryDecision:
        """Decide whether to retry after ``attempt`` (1-based) failed with ``error``.

        Checks, in order: retryability, the attempt cap, then the budget,
        which is only spent (and the rng only drawn) when the answer is retry.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int in [1, inf), got {attempt!r}")
        if not retryable or error is None or error not in self._config.retry_on:
            return RetryDecision(False, 0.0, "not_retryable")
        if attempt >= self._config.max_attempts:
            return RetryDecision(False, 0.0, "attempts_exhausted")
        if not self._budget.try_spend(now):
            return RetryDecision(False, 0.0, "budget_exhausted")
        return RetryDecision(True, self._config.backoff.delay(attempt, rng, prev_delay), "retry")
