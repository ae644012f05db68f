"""Configuration of the control core: one frozen object built once at the edge.

The shells (scenario YAML, cluster YAML) validate user input with pydantic
and hand the core a :class:`CoreConfig`; the core never reads files or the
environment. Defaults follow ``REFERENCE.md`` (SRE: 3 attempts, retry budget
10 %, adaptive throttling K = 2 over 2 minutes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field
from typing import Any

from pydantic import ValidationInfo, field_validator

from haif.policy.admission import ShedConfig, ThrottleConfig
from haif.policy.breaker import BreakerConfig
from haif.policy.placement import ParameterError, make_placement, strategy_class
from haif.policy.ratelimit import QuotaConfig
from haif.policy.retry import RetryConfig
from haif.policy.settings import Flag, NonNegative, Positive, setting


def _worker_breaker() -> BreakerConfig:
    # Per worker: trip fast on a dead host (5 of the last 10 calls failed),
    # probe again after 5 s; repeated re-opens back off up to 60 s.
    return BreakerConfig(
        window="count",
        window_size=10,
        min_calls=5,
        failure_threshold=0.5,
        open_s=5.0,
        open_multiplier=2.0,
        open_max_s=60.0,
        half_open_permits=1,
        half_open_max_s=30.0,
    )


def _route_breaker() -> BreakerConfig:
    # Per (model, region): a 10-second time window over the whole region,
    # so a region-wide outage stops attracting traffic as a unit.
    return BreakerConfig(
        window="time",
        window_size=10.0,
        min_calls=20,
        failure_threshold=0.5,
        open_s=10.0,
        open_multiplier=2.0,
        open_max_s=120.0,
        half_open_permits=3,
        half_open_max_s=30.0,
    )


@setting
class CoreConfig:
    """Everything the orchestrator's decision loop needs to decide.

    A settings dataclass (:mod:`haif.policy.settings`): validated once,
    with the scenario or cluster file that holds it or when constructed; an
    error names the field (``placement``, ``placement_params.<name>``,
    ``worker_breaker.open_s``, ...).
    """

    placement: str = "p2c"
    placement_params: Mapping[str, Any] = field(default_factory=dict)
    retry: RetryConfig = field(default_factory=RetryConfig)
    worker_breaker: BreakerConfig = field(default_factory=_worker_breaker)
    route_breaker: BreakerConfig = field(default_factory=_route_breaker)
    tenant_quotas: Mapping[str, QuotaConfig] = field(default_factory=dict)
    default_quota: QuotaConfig | None = None
    global_quota: QuotaConfig | None = None
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    # Shed by priority when fleet load / slots reaches: critical 4 (the
    # queue limit), standard 2 (a queue as deep as the running set),
    # sheddable 1 (any queueing at all).
    shedding: ShedConfig = field(default_factory=lambda: ShedConfig(thresholds=(4.0, 2.0, 1.0)))
    # A worker whose last heartbeat is older than this is not placed on.
    stale_after_s: Positive = 3.0
    # An attempt running longer than this is cancelled and retried elsewhere.
    attempt_timeout_s: Positive | None = 120.0
    # Deadline given to requests that carry none (None: no deadline).
    default_timeout_s: Positive | None = None
    # A worker is full when the orchestrator's outstanding count reaches
    # capacity x this factor (queueing at the worker beyond that is refused).
    max_queue_factor: Positive = 4.0
    # When an attempt fails after generating tokens, continue from them on the
    # next worker (migration) instead of starting the response over.
    resume_partial: Flag = False
    # Round-trip times between regions in milliseconds: {"a": {"b": 70.0}}.
    rtt_ms: Mapping[str, Mapping[str, NonNegative]] = field(default_factory=dict)

    @field_validator("placement")
    @classmethod
    def _known_placement(cls, name: str) -> str:
        strategy_class(name)  # ValueError lists the allowed names
        return name

    @field_validator("placement_params")
    @classmethod
    def _valid_placement_params(
        cls, params: Mapping[str, Any], info: ValidationInfo
    ) -> Mapping[str, Any]:
        name = info.data.get("placement")
        if name is None:
            return params  # the name itself is invalid, and reported
        try:
            make_placement(name, params)  # fail at load time, not at the first request
        except ParameterError as exc:
            # "<parameter>: ..." puts the error at placement_params.<parameter>.
            raise ValueError(f"{exc.parameter}: {exc}") from None
        return params

    def rtt(self, a: str, b: str) -> float:
        """RTT between two regions in ms (symmetric; 0 within a region)."""
        if a == b:
            return 0.0
        row = self.rtt_ms.get(a, {})
        if b in row:
            return float(row[b])
        return float(self.rtt_ms.get(b, {}).get(a, 100.0))
