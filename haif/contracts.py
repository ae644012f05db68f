"""Shared contracts: the data both shells and the pure core exchange.

Everything here is a frozen, slotted dataclass of primitives and tuples, so
the same objects can be appended to a simulation's records, compared in the
parity test and msgpack'd on the wire (see :mod:`haif.wire`). Times are
seconds on the caller's clock (``env.now`` in the simulator,
``loop.time()`` in the runtime); nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

# Request priority: lower is more important (0 = critical, 1 = standard,
# 2 = sheddable), like Google's criticality classes.
CRITICAL, STANDARD, SHEDDABLE = 0, 1, 2

Status = Literal["ok", "rejected", "failed", "timeout", "dead_lettered"]
STATUSES: tuple[str, ...] = ("ok", "rejected", "failed", "timeout", "dead_lettered")


# ------------------------------------------------------------------ errors


class ErrorKind(StrEnum):
    """Why an attempt failed: ``AttemptResult.error``, a worker's ``RpcError.code``.

    A ``StrEnum``: each member *is* its short string (``ErrorKind.TIMEOUT ==
    "timeout"``), so it can be passed wherever a kind is a ``str``; the wire,
    the records and the retry config carry the plain strings (the control
    core and ``RpcError`` normalize with ``str()``). What each kind means
    to the core is :data:`ERROR_KINDS`, the one table both shells share.
    """

    NO_ELIGIBLE_WORKER = "no_eligible_worker"
    STORE_UNAVAILABLE = "store_unavailable"
    WORKER_CRASHED = "worker_crashed"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    BAD_REPLY = "bad_reply"
    BAD_REQUEST = "bad_request"
    CONTEXT_TOO_LONG = "context_too_long"
    MODEL_NOT_LOADED = "model_not_loaded"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class ErrorTraits:
    """What one :class:`ErrorKind` tells the control core.

    ``worker_fault``: the worker (or the path to it) is unhealthy, not the
    request: the failure counts against the worker's and the route's circuit
    breakers and as a not-accepted call for adaptive throttling. Otherwise
    the breakers record nothing and the throttle counts the call as accepted
    (the backend took it; a client error counts, as in the SRE book).
    ``retryable``: running the request again, elsewhere, could succeed; the
    default ``RetryConfig.retry_on`` is exactly the retryable kinds.
    """

    worker_fault: bool
    retryable: bool
    meaning: str


_E = ErrorKind
ERROR_KINDS: Mapping[ErrorKind, ErrorTraits] = MappingProxyType(
    {
        # worker_fault, retryable
        _E.NO_ELIGIBLE_WORKER: ErrorTraits(
            False, True, "placement found no worker that can take the request now"
        ),
        _E.STORE_UNAVAILABLE: ErrorTraits(
            False, True, "the metadata store was out, so the attempt was never sent"
        ),
        _E.WORKER_CRASHED: ErrorTraits(
            True, True, "the worker died, or the connection broke, while it held the attempt"
        ),
        _E.CONNECTION_ERROR: ErrorTraits(True, True, "the worker could not be reached"),
        _E.TIMEOUT: ErrorTraits(
            True, True, "the worker did not answer in time (attempt or idle timeout)"
        ),
        _E.OVERLOADED: ErrorTraits(True, True, "the worker refused the attempt: it is full"),
        _E.UNAVAILABLE: ErrorTraits(
            True, True, "the worker cannot serve now (not loaded, shutting down, upstream down)"
        ),
        _E.INTERNAL: ErrorTraits(True, True, "the worker failed unexpectedly while serving"),
        _E.BAD_REPLY: ErrorTraits(True, True, "the worker's answer broke the protocol"),
        _E.BAD_REQUEST: ErrorTraits(False, False, "the request is invalid; no worker can serve it"),
        _E.CONTEXT_TOO_LONG: ErrorTraits(
            False, False, "the request can never fit the worker's KV cache"
        ),
        _E.MODEL_NOT_LOADED: ErrorTraits(
            False, False, "the worker does not serve the request's model"
        ),
        _E.DEADLINE: ErrorTraits(
            False, False, "the request's own deadline passed (finalized as a timeout)"
        ),
        _E.CANCELLED: ErrorTraits(
            False, False, "every caller of the request went away (finalized as cancelled)"
        ),
    }
)
del _E

# A kind this table does not know (a worker's auth or routing error, a code
# from a newer peer) is treated like a request error: not retried, which
# cannot start a retry storm, and not held against the worker, which cannot
# open a breaker on a code nobody has classified.
UNKNOWN_ERROR = ErrorTraits(False, False, "a kind this table does not know")

# Derived from the table, keyed by the plain strings: what the helpers read.
_TRAITS: dict[str, ErrorTraits] = {k.value: t for k, t in ERROR_KINDS.items()}
RETRYABLE_ERRORS: tuple[str, ...] = tuple(k for k, t in _TRAITS.items() if t.retryable)
WORKER_FAULT_ERRORS: frozenset[str] = frozenset(k for k, t in _TRAITS.items() if t.worker_fault)
_RETRYABLE = frozenset(RETRYABLE_ERRORS)


def error_traits(kind: str | None) -> ErrorTraits:
    """The table's row for ``kind`` (a member or its string); :data:`UNKNOWN_ERROR` otherwise."""
    return _TRAITS.get(kind, UNKNOWN_ERROR) if kind is not None else UNKNOWN_ERROR


def is_worker_fault(kind: str | None) -> bool:
    """Whether ``kind`` marks the worker unhealthy (False for None and unknown kinds)."""
    return kind in WORKER_FAULT_ERRORS


def is_retryable(kind: str | None) -> bool:
    """Whether the table calls ``kind`` retryable (False for None and unknown kinds)."""
    return kind in _RETRYABLE


#: Tokens per block of a trace's prefix hashes (Mooncake's ``hash_ids``): what
#: :attr:`Request.prefix_block_tokens` is unless the request says otherwise.
TRACE_BLOCK_TOKENS = 512

#: The sampling parameters a request may set (OpenAI's names, ``top_k`` and
#: ``ignore_eos`` as vLLM's), in the order a refusal names the first one.
SAMPLING_PARAMETERS: tuple[str, ...] = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a live request samples and when it stops (the gateway validated the values).

    ``None`` (and ``()``, ``False``) is "not given": the engine's default
    (OpenAI's: temperature 1, top_p 1, no top-k, no penalties, unseeded).
    ``top_k``: ``-1`` or ``0`` is no limit, as vLLM. ``stop``: at most four
    strings; the response ends before the first one and does not contain it.
    ``ignore_eos`` (a vLLM extension): keep generating past end-of-sequence,
    so the response is exactly ``max_tokens`` tokens (trace replay and the
    benchmarks set it).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False

    def requested(self) -> tuple[str, ...]:
        """The parameters given (in :data:`SAMPLING_PARAMETERS` order); ``0`` is given."""
        return tuple(name for name in SAMPLING_PARAMETERS if _given(getattr(self, name)))


def _given(value: object) -> bool:
    # Not `value in (None, (), False)`: 0 == False, and temperature 0 is a request.
    return value is not None and value is not False and value != ()


#: The roles a chat message may have (OpenAI's, less the deprecated ``function``).
CHAT_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One chat message: its role (one of :data:`CHAT_ROLES`) and its text.

    The gateway joined a content given as an array of text parts with
    newlines (as vLLM does).
    """

    role: str
    content: str


def chat_text(messages: tuple[ChatTurn, ...]) -> str:
    """A chat's message contents joined with newlines (the text without a chat template)."""
    return "\n".join(m.content for m in messages)


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request as the orchestrator sees it.

    ``max_tokens`` is the most tokens the response may have. ``sampling``:
    the live request's sampling and stopping (:class:`SamplingParams`; the
    gateway always sets it). ``None`` — the simulator and every request
    built without it — keeps the simulator's semantics: greedy, and
    ``max_tokens`` is the true output length (``ignore_eos``, as vLLM's
    benchmarks run trace replay).
    ``deadline_s`` is absolute, on the same clock as ``arrival_s``.
    ``messages``: a chat request's messages (the engine renders them, e.g.
    with the model's chat template); ``()`` for a completion, whose text is
    ``prompt``. :attr:`text` is the one text either way.
    ``prefix_hashes``: the chained hashes of the prompt's KV blocks of
    ``prefix_block_tokens`` tokens each (:mod:`haif.fleet.prefix`): the
    gateway's, from the prompt's token ids and the model profile's block size;
    a trace's ``hash_ids`` (Mooncake: 512-token blocks, the default).
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
    sampling: SamplingParams | None = None
    messages: tuple[ChatTurn, ...] = ()
    prefix_block_tokens: int = TRACE_BLOCK_TOKENS

    @property
    def text(self) -> str:
        """The prompt, or a chat's message contents joined with newlines (no template)."""
        return chat_text(self.messages) if self.messages else self.prompt or ""


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
    ``error`` is an :class:`ErrorKind` as a plain string (``worker_crashed``,
    ``connection_error``, ``overloaded``, ``bad_request``, ...); what it means
    for breakers, throttling and retries is the :data:`ERROR_KINDS` table,
    which the core consults, not the shell. ``retryable`` is the reporter's
    veto: ``False`` means "do not run this again, whatever its kind"; the
    default ``True`` defers to the table (and ``RetryConfig.retry_on``), so a
    request is retried only if both allow it. Shells leave it at ``True``.
    Times are absolute on the orchestrator's clock. ``prompt_tokens``: the
    prompt's length as the engine counted it (an upstream server's usage);
    ``None``: the request's own count stands.
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
    prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ClientGone:
    """Every caller of a request went away before its answer ended: stop it.

    ``output_tokens``: the response tokens generated and relayed towards them
    until then (a streaming client has them; a JSON client's gateway was
    collecting them), which is what the request is billed for.
    """

    request_id: str
    output_tokens: int = 0


Event = Submit | Heartbeat | WorkerGone | AttemptResult | ClientGone


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
    """ONE record schema written by both shells (see :mod:`haif.records`).

    ``first_token_s`` (ok requests only): when the first token of the response
    was produced by any attempt, a failed one included: what a streaming client
    received first (the core's definition, :meth:`ControlCore.on_result`).
    """

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
    SamplingParams,
    ChatTurn,
    Request,
    WorkerSnapshot,
    Submit,
    Heartbeat,
    WorkerGone,
    AttemptResult,
    ClientGone,
    Dispatch,
    Reject,
    RetryAt,
    Cancel,
    DeadLetter,
    RequestRecord,
    Finalize,
)
