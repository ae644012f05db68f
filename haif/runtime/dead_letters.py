"""The dead-letter queue: requests the core gave up on, kept to be replayed.

A ``DeadLetter`` decision is stored with the request as its caller sent it
(the caller's id, not the internal one). ``replay`` resubmits a stored
request through the orchestrator's usual path (same tenant, a fresh internal
id, an ``Idempotency-Key`` derived from the entry, so a double replay runs
once) and removes the entry when the replay succeeds; a replay that fails
again updates its entry instead of adding a second one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from haif.contracts import DeadLetter, Request
from haif.runtime.messages import SubmitReply
from haif.runtime.relay import Pending
from haif.runtime.rpc import RpcError
from haif.runtime.store import DeadLetterRow, MetadataStore
from haif.runtime.write_queue import WriteQueue

log = logging.getLogger("haif.orchestrator")

#: Runs a stored request again: (request with its replay key, its entry) -> reply.
Resubmit = Callable[[Request, DeadLetterRow], Awaitable[SubmitReply]]


def view(row: DeadLetterRow) -> dict[str, Any]:
    """A dead letter as ``haif dlq`` shows it."""
    return {
        "request_id": row.request_id,
        "reason": row.reason,
        "attempts": row.attempts,
        "created_s": row.created_s,
        "request": row.request,
    }


class DeadLetters:
    """Store dead letters in decision order; list, show and replay them."""

    def __init__(
        self,
        store: MetadataStore,
        writes: WriteQueue,
        job_id: Callable[[str], str],
        resubmit: Resubmit,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._writes = writes
        self._job_id = job_id  # internal id -> its job row's id
        self._resubmit = resubmit
        self.wall = wall  # entries carry the wall clock (shared across processes)

    def record(self, dead: DeadLetter, pending: Pending | None) -> None:
        """Queue the store write of a ``DeadLetter`` decision (after the request's others)."""
        if pending is None:
            return
        request = replace(pending.request, request_id=pending.client_id)
        if pending.replay_of is not None:
            # A replay failed again: update its entry rather than add another.
            dead = replace(dead, request_id=pending.replay_of.request_id)
            request = pending.replay_of.request
        now = self.wall()
        rid = pending.request.request_id
        self._writes.put(
            rid,
            f"dead letter {dead.request_id}",
            lambda: self.store.add_dead_letter(
                replace(dead, request_id=self._job_id(dead.request_id)), request, now
            ),
        )

    async def list(self) -> list[dict[str, Any]]:
        return [view(row) for row in await self.store.list_dead_letters()]

    async def show(self, request_id: object) -> dict[str, Any]:
        return view(await self._get(request_id))

    async def _get(self, request_id: object) -> DeadLetterRow:
        if not isinstance(request_id, str) or not request_id:
            raise RpcError("bad_request", "expected a dead letter's request id")
        row = await self.store.get_dead_letter(request_id)
        if row is None:
            raise RpcError("not_found", f"no dead letter {request_id!r}")
        return row

    async def replay(self, request_id: object) -> dict[str, Any]:
        """Resubmit a dead letter; remove it from the queue if the replay succeeds."""
        row = await self._get(request_id)
        # The same entry replayed twice at once runs once; a later replay of
        # an entry that failed again (its created_s is renewed) runs anew.
        entry = hashlib.sha256(f"{row.request_id}\0{row.created_s!r}".encode()).hexdigest()
        key = f"dlq-replay:{entry[:32]}"
        reply = await self._resubmit(replace(row.request, idempotency_key=key), row)
        rec = reply.record
        ok = reply.reject is None and rec.status == "ok"
        removed = False
        if ok:
            removed = await self.store.remove_dead_letter(row.request_id)
            log.info("dead letter %s replayed as %s", row.request_id, rec.request_id)
        elif reply.reject is None:
            # It ran and failed: the entry stays, with the new reason and time.
            again = DeadLetter(row.request_id, rec.reason or rec.status, rec.attempts)
            await self.store.add_dead_letter(again, row.request, self.wall())
        return {
            "request_id": row.request_id,
            "replayed_as": rec.request_id,
            "ok": ok,
            "removed": removed,
            "reply": reply,
        }
