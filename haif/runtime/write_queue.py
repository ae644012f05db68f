"""The orchestrator's store writes: off the hot path, in order per request.

A request's store writes (its job row, ``running``, its finalization or
dead letter) must not delay its answer, and must reach the store in the
order the core decided them. Different requests' writes run concurrently:
that is what the store's group commit batches into one transaction.

:class:`WriteQueue` keeps one FIFO per key (a request's internal id) and one
task per non-empty FIFO. An ``interim`` write (a status on the way, such as
``running``) is skipped when a later write of the same key is already
queued: that one supersedes it. A write that raises is retried with
exponential backoff (``retry_first_s`` doubling up to ``retry_max_s``) until
it succeeds — a write is never dropped while the process lives — and the
key's later writes wait behind it, so their order holds. An orchestrator
that stops gives the queue a grace period (:meth:`WriteQueue.close`); what
is left then is logged as lost, except settlements, which the journal keeps
(:mod:`haif.runtime.journal`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
        *,
        on_drained: Callable[[str], None] | None = None,
        retry_first_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        #: Called with a key once its last queued write is done.
        self._on_drained = on_drained
        self.retry_first_s = retry_first_s
        self.retry_max_s = retry_max_s
        self._queues: dict[str, deque[_Queued]] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        #: Failed tries since the start (each was retried).
        self.failures = 0

    def put(self, key: str, what: str, op: Write, *, interim: bool = False) -> None:
        """Queue ``op`` after ``key``'s earlier writes."""
        item = _Queued(what, op, interim)
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(item)
            return
        self._queues[key] = deque([item])
        self._drains[key] = asyncio.create_task(self._drain(key))

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
                delay = self.retry_first_s
                tries = 0
                while not (item.interim and len(queue) > 1):
                    try:
                        await item.op()
                        break
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self.failures += 1
                        tries += 1
                        if tries == 1 or tries % 10 == 0:
                            log.warning(
                                "store write failed (try %d, retrying in %.2f s): %s: %s: %s",
                                tries,
                                delay,
                                item.what,
                                type(exc).__name__,
                                exc,
                            )
                        await asyncio.sleep(delay)
                        delay = min(self.retry_max_s, delay * 2)
                queue.popleft()
        finally:
            del self._queues[key]
            self._drains.pop(key, None)
            if self._on_drained is not None:
                self._on_drained(key)

    async def close(self, grace_s: float) -> list[str]:
        """Wait up to ``grace_s`` for every queued write; cancel the rest.

        Returns what was left undone (each logged as lost).
        """
        drains = list(self._drains.values())
        if drains:
            await asyncio.wait(drains, timeout=grace_s)
        lost = [item.what for q in self._queues.values() for item in q]
        for task in list(self._drains.values()):
            task.cancel()
        await asyncio.gather(*self._drains.values(), return_exceptions=True)
        for what in lost:
            log.error("store write lost at shutdown: %s", what)
        return lost
