"""Shared contracts: the data both shells and the pure core exchange.

Everything here is a frozen, slotted dataclass of primitives and tuples, so
the same objects can be appended to a simulation's records, compared in the
parity test and msgpack'd on the wire (see :mod:`haif.wire`). Times are
seconds on the caller's clock (``env.now`` in the simulator,
``loop.time()`` in the runtime); nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Request priority: lower is more important (0 = critical, 1 = standard,
# 2 = sheddable), like Google's criticality classes.
CRITICAL, STANDARD, SHEDDABLE = 0, 1, 2

Status = Literal["ok", "rejected", "failed", "timeout", "dead_lettered"]
STATUSES: tuple[str, ...] = ("ok", "rejected", "failed", "timeout", "dead_lettered")


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request as the orchestrator sees it.

    ``max_tokens`` is also the simulator's true output length (trace replay
    runs with ``ignore_eos`` semantics, as vLLM's benchmarks do).
    ``deadline_s`` is absolute, on the same clock as ``arrival_s``.
    """

    request_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_tokens: int
    arrival_s: float
    origin_region: str = ""
    priority: int = STANDARD
    deadline_s: float | None = None
    stream: bool = False
    idempotency_key: str | None = None
    model_version: str | None = None
    adapter: str | None = None
    prompt: str | None = None
    prefix_hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """What a worker's heartbeat says about it (the discovery snapshot).

    ``last_seen`` is stamped by the receiver with its own clock, so policies
    judge staleness without trusting the worker's clock.
    """

    worker_id: str
    region: str
    gpu_class: str
    vram_gb: float = 0.0
    models_warm: tuple[str, ...] = ()
    models_loadable: tuple[str, ...] = ()
    queue_depth: int = 0
    running: int = 0
    capacity: int = 1
    free_kv_tokens: int = 0
    healthy: bool = True
    last_seen: float = 0.0
    price_per_hour: float = 0.0


# ---------------------------------------------------------------- events in


@dataclass(frozen=True, slots=True)
class Submit:
    """A client request reached the orchestrator."""

    request: Request


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A worker announced itself (presence + load)."""

    snapshot: WorkerSnapshot


@dataclass(frozen=True, slots=True)
class WorkerGone:
    """The shell learned a worker departed (deregistration, connection refused)."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """The outcome of one dispatched attempt.

    ``output_tokens`` counts the whole response so far (including tokens a
    resumed attempt was given), also when the attempt failed part-way.
    ``error`` is a short machine-readable kind (``worker_crashed``,
    ``connection_error``, ``overloaded``, ``bad_request``, ...); ``retryable``
    says whether running the request elsewhere could succeed.
    Times are absolute on the orchestrator's clock.
    """

    request_id: str
    attempt: int
    worker_id: str
    ok: bool
    started_s: float
    finish_s: float
    first_token_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    retryable: bool = True
    cold_start: bool = False
    cost: float = 0.0


Event = Submit | Heartbeat | WorkerGone | AttemptResult


# ------------------------------------------------------------ decisions out


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run ``attempt`` of a request on a worker (capacity already reserved).

    ``resume_tokens`` > 0 continues a response an earlier attempt had begun:
    the worker recomputes the prompt plus those tokens and generates the rest.
    """

    request_id: str
    worker_id: str
    attempt: int
    region: str
    gpu_class: str
    resume_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse a request before it ran; maps to an HTTP status.

    A quota refusal (429) carries the most constraining bucket's figures
    (``QuotaDecision``), which the gateway sends as ``x-ratelimit-*``:
    the per-minute limit, what remains, and seconds until it is full again;
    ``None`` where that budget is unlimited.
    """

    request_id: str
    status: int
    reason: str
    retry_after: float = 0.0
    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests: float | None = None
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Attempt ``attempt`` of the request will be placed at time ``at``."""

    request_id: str
    attempt: int
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop an attempt still running on a worker (deadline or attempt timeout)."""

    request_id: str
    worker_id: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The request exhausted its retries; park it for inspection / replay."""

    request_id: str
    reason: str
    attempts: int


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """ONE record schema written by both shells (see :mod:`haif.records`)."""

    request_id: str
    tenant: str
    model: str
    origin_region: str
    served_region: str | None
    worker_id: str | None
    gpu_class: str | None
    arrival_s: float
    admitted_s: float | None
    first_token_s: float | None
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    attempts: int
    status: str
    reason: str | None
    cold_start: bool
    cost: float

    @classmethod
    def never_served(
        cls, request: Request, finish_s: float, status: str, reason: str
    ) -> RequestRecord:
        """The record of a request no worker ever ran (refused, or never delivered)."""
        return cls(
            request_id=request.request_id,
            tenant=request.tenant,
            model=request.model,
            origin_region=request.origin_region,
            served_region=None,
            worker_id=None,
            gpu_class=None,
            arrival_s=request.arrival_s,
            admitted_s=None,
            first_token_s=None,
            finish_s=finish_s,
            prompt_tokens=request.prompt_tokens,
            output_tokens=0,
            attempts=0,
            status=status,
            reason=reason,
            cold_start=False,
            cost=0.0,
        )


@dataclass(frozen=True, slots=True)
class Finalize:
    """The request is finished for good; the shell persists the record."""

    record: RequestRecord


Decision = Dispatch | Reject | RetryAt | Cancel | DeadLetter | Finalize

WIRE_TYPES: tuple[type, ...] = (
    Request,
    WorkerSnapshot,
    Submit,
    Heartbeat,
    WorkerGone,
    AttemptResult,
    Dispatch,
    Reject,
    RetryAt,
    Cancel,
    DeadLetter,
    RequestRecord,
    Finalize,
)
