"""Runtime-only RPC messages (the core's contracts live in haif.contracts).

Streams (see :mod:`haif.runtime.rpc` for the framing):

- worker ``infer_stream(InferCall)`` -> ``TokenChunk``... then one ``InferEnd``;
- orchestrator ``submit_stream(Request)`` -> ``TokenChunk``... then one
  ``SubmitReply`` (the final record, or the core's ``Reject``). The chunks the
  orchestrator relays form one gap-free, duplicate-free sequence of token
  indexes across every attempt of the request; the ``SubmitReply`` of a stream
  carries ``text=""`` (the text is the concatenation of the chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

from haif import wire
from haif.contracts import Reject, Request, RequestRecord, WorkerSnapshot
from haif.runtime.resources import GpuUsage, Resources


@dataclass(frozen=True, slots=True)
class Announce:
    """A worker's heartbeat: its snapshot, where to reach it, what its host uses.

    ``sampling``: the sampling parameters its engine honours (names of
    :data:`~haif.contracts.SAMPLING_PARAMETERS`); ``None`` from a worker that
    does not say (the orchestrator then assumes it honours them all).
    """

    snapshot: WorkerSnapshot
    url: str
    resources: Resources | None = None
    sampling: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class InferReply:
    """A worker's answer to ``infer``; times are seconds since it received the call."""

    text: str
    output_tokens: int
    ttft_s: float
    service_s: float
    cold_start: bool = False
    cost: float = 0.0


@dataclass(frozen=True, slots=True)
class SubmitReply:
    """The orchestrator's answer to ``submit``: the final record (and why, if refused)."""

    record: RequestRecord
    text: str = ""
    reject: Reject | None = None
    #: Why the response ended: ``"stop"`` (end of sequence or a stop string) or
    #: ``"length"`` (``max_tokens``), as the engine said; None when unknown.
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class InferCall:
    """Run (or continue) a request on a worker.

    ``resume_tokens`` > 0: the response's first ``resume_tokens`` tokens were
    already delivered by an earlier attempt; generate from that index on.
    """

    request: Request
    resume_tokens: int = 0
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Consecutive response tokens ``start, start + 1, ...`` as text deltas.

    ``texts[i]`` is the text of token ``start + i`` exactly as it appears in
    the response (separators included), so concatenating every chunk's texts
    in order gives the whole response text. ``finish_reason``: set on an
    engine's last chunk when it knows why the response ended (``"stop"``: end
    of sequence or a stop string; ``"length"``: ``max_tokens``).
    ``usage``: ``(prompt_tokens, completion_tokens)`` as the engine counted
    them (an upstream server's reported usage), on its last chunk; ``None``:
    the worker counts (the request's prompt count, the tokens streamed).
    ``cold_start``: the response waited for the engine to load weights (a
    restarted worker's reload, a swap of models), as the simulator records it;
    the worker's :class:`InferEnd` carries it to the request's record.
    """

    start: int
    texts: tuple[str, ...]
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None
    cold_start: bool = False


@dataclass(frozen=True, slots=True)
class InferEnd:
    """The last frame of ``infer_stream``; times are seconds since the worker got the call.

    ``output_tokens`` counts the whole response (resumed tokens included);
    ``finish_reason``: ``"stop"`` or ``"length"`` (see :class:`TokenChunk`).
    ``usage``: the engine's own count (see :class:`TokenChunk`), what is billed.
    """

    output_tokens: int
    ttft_s: float
    service_s: float
    cold_start: bool = False
    cost: float = 0.0
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class OrchestratorStatus:
    """The orchestrator's ``status`` answer (readiness and load).

    ``fresh_workers``: healthy workers whose last heartbeat is younger than the
    core's ``stale_after_s``; ``models``: what those workers can serve;
    ``outstanding``: attempts in flight per known worker; ``in_flight``:
    admitted requests not finalized yet.
    """

    fresh_workers: tuple[str, ...]
    models: tuple[str, ...]
    outstanding: dict[str, int]
    in_flight: int

    @property
    def ready(self) -> bool:
        return bool(self.fresh_workers)


for _cls in (
    GpuUsage,
    Resources,
    Announce,
    InferReply,
    SubmitReply,
    InferCall,
    TokenChunk,
    InferEnd,
    OrchestratorStatus,
):
    wire.register(_cls)
