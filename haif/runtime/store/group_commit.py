"""Group commit: concurrent store writes queued and committed one transaction per batch.

Each write used to be its own transaction, so under load the store spent its
time on per-statement and per-commit overhead (DuckDB: milliseconds per
statement on its single thread; PostgreSQL: a round trip per statement).
:class:`GroupCommit` queues the operations callers submit and hands every
batch to one ``commit`` callable that applies the whole batch in one
transaction with set-based statements.

Batches form by themselves: an operation that finds a free slot and nothing
queued is committed at once in its caller's task (no hop through the event
loop: at low load the store costs what it did without batching); otherwise
it is queued, the queue is flushed one event-loop turn later, and while
``max_in_flight`` batches are being committed new operations wait and join
the next one, so the batch grows with the load and nothing waits on a timer.

With ``lane``, a batch holds the operations of one lane only (lanes take
turns, oldest first), so a short operation on the request path does not
share a transaction with long ones; with ``per_lane`` each lane also has its
own ``max_in_flight`` batches, so it does not wait for a slot behind them
either (for a backend with several connections).

With ``linger_s`` a lane that nobody waits on (writes after a request) is
committed at most that often: its first queued operation starts a timer and
the batch is taken when it fires (or when ``max_batch`` operations are
queued). A backend whose cost is per statement rather than per row (DuckDB:
milliseconds per statement, microseconds per row) then pays it once for
many requests; the price is that those writes land up to ``linger_s`` later.
``drain`` and ``close`` do not wait for the timers.

Every caller still gets its own result or exception: when a batch's
transaction fails, its operations are retried one by one, each in its own
transaction, so one bad operation fails alone and the others still commit.
``commit`` may also return :class:`Failed` for an operation whose own,
separate transaction failed while the rest of the batch stood.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchStats", "Failed", "GroupCommit"]

Op = TypeVar("Op")
log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchStats:
    """What the committer has done so far (for tests and benchmarks)."""

    batches: int = 0
    operations: int = 0
    largest: int = 0
    #: Batches whose transaction failed and whose operations were retried one by one.
    split: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    """What ``commit`` returns for an operation that failed on its own (raised to its caller)."""

    error: Exception


class GroupCommit(Generic[Op]):
    """Queue operations and commit them in batches through ``commit``.

    ``commit(ops)`` applies ``ops`` in one transaction and returns one result
    per operation, in order; if it raises, nothing of the batch was committed.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[Op]], Awaitable[Sequence[object]]],
        *,
        max_batch: int = 128,
        max_in_flight: int = 1,
        lane: Callable[[Op], Hashable] = lambda _op: None,
        per_lane: bool = False,
        linger_s: Mapping[Hashable, float] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError(
                f"max_batch and max_in_flight must be >= 1, got {max_batch}, {max_in_flight}"
            )
        self._linger = {lane: s for lane, s in (linger_s or {}).items() if s > 0}
        if any(s != s or s > 60 for s in self._linger.values()):
            raise ValueError(f"linger_s must be between 0 and 60 s, got {linger_s}")
        self._commit = commit
        self._lane = lane
        self._per_lane = per_lane
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.stats = BatchStats()
        self._queue: list[tuple[Op, asyncio.Future[object]]] = []
        # Batches being committed (a task, or a caller committing its own) -> their lane.
        self._flushes: dict[asyncio.Future[None], Hashable] = {}
        self._kick_pending = False
        self._closed = False
        # Lingering lanes whose timer runs, and those whose batch is due.
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._due: set[Hashable] = set()
        self._draining = False

    async def submit(self, op: Op) -> object:
        """Commit ``op`` with whatever else is queued; return its own result."""
        if self._closed:
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        lane = self._lane(op)
        if lane in self._linger:
            self._queue.append((op, future))
            self._linger_on(lane, loop)
            return await future
        if self._has_slot(lane) and all(self._lane(queued) != lane for queued, _ in self._queue):
            # Nothing to batch with and a slot free: commit it now, in the caller's task
            # (a batch of its own, so cancelling the caller touches no one else's write).
            done: asyncio.Future[None] = loop.create_future()
            self._flushes[done] = lane
            try:
                await self._flush([(op, future)])
            finally:
                done.set_result(None)
                self._flushed(done)
            return future.result()
        self._queue.append((op, future))
        if not self._kick_pending:
            # One loop turn later: operations submitted in this turn share the batch.
            self._kick_pending = True
            loop.call_soon(self._kick)
        return await future

    def _linger_on(self, lane: Hashable, loop: asyncio.AbstractEventLoop) -> None:
        """Start ``lane``'s timer, or make its batch due now if it is full."""
        if lane in self._due:
            return
        if sum(1 for op, _ in self._queue if self._lane(op) == lane) >= self.max_batch:
            self._expire(lane)
        elif lane not in self._timers:
            self._timers[lane] = loop.call_later(self._linger[lane], self._expire, lane)

    def _expire(self, lane: Hashable) -> None:
        self._stop_timer(lane)
        if any(self._lane(op) == lane for op, _ in self._queue):
            self._due.add(lane)
            self._kick()

    def _stop_timer(self, lane: Hashable) -> None:
        timer = self._timers.pop(lane, None)
        if timer is not None:
            timer.cancel()

    def _ready(self, lane: Hashable) -> bool:
        return lane not in self._linger or lane in self._due or self._draining

    def _has_slot(self, lane: Hashable) -> bool:
        busy = list(self._flushes.values())
        return (busy.count(lane) if self._per_lane else len(busy)) < self.max_in_flight

    def _kick(self) -> None:
        """Start a batch for every lane with queued operations and a free slot."""
        self._kick_pending = False
        started = True
        while started and self._queue:
            started = False
            for lane in dict.fromkeys(self._lane(op) for op, _ in self._queue):  # oldest first
                if self._ready(lane) and self._has_slot(lane):
                    self._start(lane)
                    started = True

    def _start(self, lane: Hashable) -> None:
        batch: list[tuple[Op, asyncio.Future[object]]] = []
        rest: list[tuple[Op, asyncio.Future[object]]] = []
        for item in self._queue:
            if len(batch) < self.max_batch and self._lane(item[0]) == lane:
                if not item[1].done():  # done: its caller was cancelled before it ran
                    batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        if all(self._lane(op) != lane for op, _ in rest):
            self._due.discard(lane)  # what comes next lingers again
            self._stop_timer(lane)  # (a drain took the batch before its timer fired)
        if batch:
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._flushes[task] = lane
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Future[None]) -> None:
        self._flushes.pop(task, None)
        if self._queue:
            self._kick()

    async def _flush(self, batch: list[tuple[Op, asyncio.Future[object]]]) -> None:
        self.stats.batches += 1
        self.stats.operations += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            await self._commit_batch(batch)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # a bug: nobody may wait forever
            log.exception("group commit of %d store writes failed", len(batch))
            for _, future in batch:
                _fail(future, exc)

    async def _commit_batch(self, batch: list[tuple[Op, asyncio.Future[object]]]) -> None:
        try:
            results = await self._commit([op for op, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0][1], exc)
                return
            self.stats.split += 1
            log.warning(
                "a batch of %d store writes failed (%s: %s); retrying them one by one",
                len(batch),
                type(exc).__name__,
                exc,
            )
            for op, future in batch:
                try:
                    [result] = await self._commit([op])
                except Exception as one:
                    _fail(future, one)
                else:
                    _deliver(future, result)
            return
        if len(results) != len(batch):
            raise RuntimeError(f"commit returned {len(results)} results for {len(batch)} writes")
        for (_, future), result in zip(batch, results, strict=True):
            _deliver(future, result)

    async def drain(self) -> None:
        """Wait until every submitted operation is committed (or failed)."""
        self._draining = True
        try:
            while self._queue or self._flushes:
                if self._flushes:
                    await asyncio.gather(*list(self._flushes), return_exceptions=True)
                else:
                    self._kick()
                    await asyncio.sleep(0)
        finally:
            self._draining = False

    async def close(self) -> None:
        """Refuse new operations and finish the queued ones."""
        self._closed = True
        await self.drain()


def _deliver(future: asyncio.Future[object], result: object) -> None:
    if isinstance(result, Failed):
        _fail(future, result.error)
    elif not future.done():  # done: the caller was cancelled; the write stands
        future.set_result(result)


def _fail(future: asyncio.Future[object], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
