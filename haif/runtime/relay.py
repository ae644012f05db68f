"""One running request's token stream, relayed to every caller attached to it.

A request may run several attempts (retries, resumes) and have several
callers (the first, and idempotent resends attached to it). Its callers must
see one sequence of tokens without gaps or duplicates, whichever attempt
produced them, then one final reply. :class:`Pending` keeps the tokens
delivered so far and forwards only the next indexes of the attempt the core
runs now; a caller that attaches late gets what was delivered, then the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from opentelemetry.context import Context

from haif.contracts import Reject, Request, RequestRecord
from haif.runtime.messages import SubmitReply, TokenChunk
from haif.runtime.rpc import RpcError
from haif.runtime.store import DeadLetterRow

Frame = TokenChunk | SubmitReply


@dataclass
class Pending:
    """One running request and the callers attached to it."""

    request: Request  # as the core sees it (internal request id)
    client_id: str  # the id its first caller sent; what workers see
    result: asyncio.Future[SubmitReply]  # the final reply with the whole text
    texts: list[str] = field(default_factory=list)  # response tokens relayed so far
    listeners: list[asyncio.Queue[Frame]] = field(default_factory=list)
    attempt: int = 0  # the attempt whose tokens are relayed now
    reject: Reject | None = None
    final: SubmitReply | None = None  # the last stream frame, once finalized
    replay_of: DeadLetterRow | None = None  # a dead-letter replay: the entry
    trace_ctx: Context | None = None  # the submitting call's trace context
    callers: int = 0  # callers waiting for its answer now (streams and unary)
    finish_reason: str | None = None  # why the last attempt's response ended

    @property
    def delivered(self) -> int:
        return len(self.texts)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def listen(self) -> asyncio.Queue[Frame]:
        """A queue of this request's frames from token 0 on (late joiners included)."""
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        if self.texts:
            queue.put_nowait(TokenChunk(0, tuple(self.texts)))
        if self.final is not None:
            queue.put_nowait(self.final)
        else:
            self.listeners.append(queue)
        return queue

    def unlisten(self, queue: asyncio.Queue[Frame]) -> None:
        with contextlib.suppress(ValueError):
            self.listeners.remove(queue)

    def relay(self, attempt: int, chunk: TokenChunk) -> None:
        """Forward the tokens of ``chunk`` the callers have not seen yet.

        Chunks of an attempt the core has moved on from are dropped; a chunk
        that would leave a gap raises ``bad_reply`` (the attempt fails).
        """
        if self.attempt != attempt:
            return
        if chunk.start > self.delivered:
            raise RpcError(
                "bad_reply", f"token {chunk.start} arrived before token {self.delivered}"
            )
        room = self.request.max_tokens - self.delivered
        new = chunk.texts[self.delivered - chunk.start :][: max(0, room)]
        if not new:
            return
        out = TokenChunk(self.delivered, tuple(new))
        self.texts.extend(new)
        for queue in self.listeners:
            queue.put_nowait(out)

    def finish(self, record: RequestRecord) -> None:
        """The core finalized the request: end every stream and answer the callers."""
        self.final = SubmitReply(record, "", self.reject, self.finish_reason)
        for queue in self.listeners:
            queue.put_nowait(self.final)
        self.listeners.clear()
        if not self.result.done():
            self.result.set_result(SubmitReply(record, self.text, self.reject, self.finish_reason))
