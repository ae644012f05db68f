"""Runtime-only RPC messages (the core's contracts live in haif.contracts)."""

from __future__ import annotations

from dataclasses import dataclass

from haif import wire
from haif.contracts import Reject, RequestRecord, WorkerSnapshot


@dataclass(frozen=True, slots=True)
class Announce:
    """A worker's heartbeat: its snapshot and where to reach it."""

    snapshot: WorkerSnapshot
    url: str


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


for _cls in (Announce, InferReply, SubmitReply):
    wire.register(_cls)
