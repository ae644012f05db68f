"""The orchestrator's store writes: off the hot path, in order per request.

A request's store writes (its job row, ``running``, its finalization or
dead letter) must not delay its answer, and must reach the store in the
order the core decided them. Different requests' writes run concurrently:
that is what the store's group commit batches into one transaction.

:class:`WriteQueue` keeps one FIFO per key (a request's internal id) and one
task per non-empty FIFO. An ``interim`` write (a status on the way, such as
``running``) is skipped when a later write of the same key is already
queued: that one supersedes it. A write that raises is logged and the next
one runs: the store must not take the orchestrator down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("haif.orchestrator")

Write = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class _Queued:
    what: str  # for the log
    op: Write
    interim: bool


class WriteQueue:
    """Per-key ordered, cross-key concurrent store writes."""

    def __init__(
        self,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        *,
        on_drained: Callable[[str], None] | None = None,
    ) -> None:
        #: Starts a task the owner awaits at shutdown.
        self._spawn = spawn
        #: Called with a key once its last queued write is done.
        self._on_drained = on_drained
        self._queues: dict[str, deque[_Queued]] = {}

    def put(self, key: str, what: str, op: Write, *, interim: bool = False) -> None:
        """Queue ``op`` after ``key``'s earlier writes."""
        item = _Queued(what, op, interim)
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(item)
            return
        self._queues[key] = deque([item])
        self._spawn(self._drain(key))

    def __contains__(self, key: object) -> bool:
        """``key`` has writes queued or running."""
        return key in self._queues

    def __len__(self) -> int:
        """Keys with writes queued or running."""
        return len(self._queues)

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                item = queue[0]
                if not (item.interim and len(queue) > 1):
                    try:
                        await item.op()
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("store write failed: %s", item.what)
                queue.popleft()
        finally:
            del self._queues[key]
            if self._on_drained is not None:
                self._on_drained(key)
