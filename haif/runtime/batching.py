"""The simulator's LLM engine models on the asyncio clock, for the synthetic engine.

With ``--timing profile`` (or ``profile-request``) the synthetic engine
(:mod:`haif.runtime.engines`) times its tokens by the same GPU x model
:class:`~haif.fleet.profiles.PerfProfile` and the same batching model as the
simulator (:mod:`haif.sim.engine`), so a live cluster of synthetic workers can
be compared with a simulation of the same scenario. One timer per worker; each
stream registers a :class:`TimedSequence` and yields its tokens as they are emitted.

:class:`IterationTimer` follows :class:`~haif.sim.engine.BatchingWorker` rule
by rule: a request joins the queue ``api_overhead_s`` after it reached the
engine; admission is FIFO while the batch has room (``max_batch``) and the KV
cache holds the prompt (+1); a step prefills the admitted prompts
(prefill-only steps) or, with ``chunked_prefill_tokens``, decodes every
running sequence plus prompt chunks up to the budget, and takes
``profile.step_time(N, C, B)``; a token is emitted at the end of the step
that produced it (the first at the end of the prompt's last prefill chunk);
when decoding would overflow the KV cache the newest sequence is preempted
and later recomputed; the prefix cache is the simulator's own LRU; a request
for another model waits for the batch to drain, then the weights load.
A resumed stream (``start`` tokens already delivered) prefills prompt +
``start`` tokens, as the simulator does.

Same timing, different form: the simulator advances a decode-only stretch
as one closed-form segment, cut at the next step boundary when an admissible
request arrives. The timer runs those steps one by one and admits at every
boundary: the same step times (the closed form is their sum) and the same
admissions, since between composition changes the queue head only becomes
admissible through an arrival, which is what cuts a segment. They differ only
after a cancellation: the timer frees the sequence's KV exactly and may admit
at the next boundary; the simulator waits for the segment to end.

Clock: each step ends at the previous step's end plus its step time (an
absolute deadline, ``loop.call_at``), never at the moment the loop happened to
wake, so sleep overshoot and a busy machine never make the schedule drift
(late tokens come out together, on time again after); arrivals are stamped
with ``loop.time()``. The one exception is a process that was stopped: when
a SIGCONT arrived (a gray failure freezes the worker with SIGSTOP / SIGCONT,
:mod:`haif.runtime.faults`), the step in flight ends when the loop runs
again, as a real engine cannot launch its next step while frozen.

:class:`RequestTimer` follows :class:`~haif.sim.engine.RequestLevelWorker`:
FIFO over ``max_batch`` slots; a request holds one for ``ttft + (output - 1)
x decode_step_time(batch, prompt + output // 2)`` with ``ttft = load +
api_overhead_s + prefill_time(prompt)`` and ``batch`` the slots in use when
it starts; its first token comes ``ttft`` after it starts and the others
evenly, one per decode step, the last when it frees the slot.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import signal
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from haif.contracts import Request
from haif.fleet.engine import BLOCK_TOKENS, PrefixCache, plan_prefill_step
from haif.fleet.profiles import PerfProfile
from haif.runtime.rpc import RpcError

__all__ = [
    "BatchingOptions",
    "IterationTimer",
    "Occupancy",
    "RequestTimer",
    "TimedSequence",
    "Timer",
    "continued",
    "sleep_until",
    "watch_continue",
]

log = logging.getLogger("haif.batching")

_continued = 0  # SIGCONTs this process received (see the module docstring)
_watched: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _on_continue() -> None:
    global _continued
    _continued += 1


def continued() -> int:
    """How many times this process was continued after a stop (SIGCONT)."""
    return _continued


def watch_continue(loop: asyncio.AbstractEventLoop) -> None:
    """Count SIGCONTs on ``loop`` (where signals can be handled: the main thread, POSIX)."""
    if loop in _watched:
        return
    try:
        loop.add_signal_handler(signal.SIGCONT, _on_continue)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return  # no stop detection here; the clock still never drifts
    _watched.add(loop)


@dataclass(frozen=True, slots=True)
class BatchingOptions:
    """The simulator's per-worker options that change timing (``WorkerGroup``'s)."""

    max_batch: int | None = None  # default: the warm model's profile
    chunked_prefill_tokens: int | None = None  # None: prefill-only steps (vLLM v0)
    prefix_cache: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "chunked_prefill_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True, slots=True)
class Occupancy:
    """What the simulated worker reports in its heartbeat, for the live worker to report."""

    queue_depth: int
    running: int
    free_kv_tokens: int
    warm_models: tuple[str, ...]


class TimedSequence:
    """One stream's request at a timer: its progress and the times its tokens came out.

    Token ``i`` exists once ``generated > i`` (``generated`` starts at the
    resumed count). Times are on the timer's clock (``loop.time()``).
    """

    __slots__ = (
        "_waiter",
        "arrived_s",
        "begin_s",
        "cancelled",
        "context",
        "done",
        "error",
        "finish_s",
        "first_token_s",
        "generated",
        "prompt_left",
        "ready_s",
        "request",
        "scale",
        "start",
        "step_s",
        "ttft_s",
    )

    def __init__(self, request: Request, start: int, arrived_s: float) -> None:
        self.request = request
        self.start = start
        self.arrived_s = arrived_s
        self.ready_s = arrived_s  # in the queue (after the API overhead)
        self.prompt_left = request.prompt_tokens + start  # resumed tokens are recomputed
        self.context = 0
        self.generated = start
        self.first_token_s: float | None = None  # when its first token came out
        self.finish_s: float | None = None  # when its last did (request level: will)
        self.done = False
        self.cancelled = False
        self.error: RpcError | None = None
        # Request level: when the slot was granted and the service times.
        self.begin_s: float | None = None
        self.ttft_s = 0.0
        self.step_s = 0.0
        self.scale = 1.0
        self._waiter: asyncio.Future[None] | None = None

    def due_s(self, index: int) -> float:
        """Request level: when token ``index`` is emitted (once the slot is granted)."""
        assert self.begin_s is not None
        return self.begin_s + (self.ttft_s + (index - self.start) * self.step_s) * self.scale

    async def changed(self) -> None:
        """Wait until the timer next updates this sequence."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def notify(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, error: RpcError) -> None:
        self.error = error
        self.done = True
        self.notify()


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


async def sleep_until(when: float) -> None:
    """Sleep until ``loop.time()`` reaches ``when`` (an absolute deadline, no drift)."""
    loop = asyncio.get_running_loop()
    if loop.time() >= when:
        return
    future: asyncio.Future[bool] = loop.create_future()
    handle = loop.call_at(when, _resolve, future, True)
    try:
        await future
    finally:
        handle.cancel()


class Timer(ABC):
    """What both engine models share: profiles, the loaded model, the driver task."""

    def __init__(
        self,
        profiles: Mapping[str, PerfProfile],
        warm: str,
        options: BatchingOptions = BatchingOptions(),
    ) -> None:
        if warm not in profiles:
            raise ValueError(f"warm model {warm!r} has no profile (have: {', '.join(profiles)})")
        self.profiles = dict(profiles)
        self.warm = warm
        self.options = options
        self.max_batch = options.max_batch or profiles[warm].max_batch
        self.slow = 1.0  # gray-failure factor, as the simulator's ``BaseWorker.slow``
        self._order = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[bool] | None = None
        # A restarted worker loads its warm model first (the simulator's
        # ``on_restart``); until then it is announced but not warm.
        self.loading_until = 0.0
        self.reset()

    def cold_start(self, now: float) -> None:
        """The worker (re)started at loop time ``now``: load the warm model's weights first."""
        self.loading_until = now + self.profiles[self.warm].load_time_s

    def _cold(self) -> bool:
        """Still loading the weights after a :meth:`cold_start`."""
        if self.loading_until <= 0:
            return False
        loop = self._loop or asyncio.get_running_loop()
        return loop.time() < self.loading_until

    # ------------------------------------------------------------ subclass hooks

    def reset(self) -> None:
        """Forget every sequence (a fresh engine, e.g. on another event loop)."""
        self.active: str | None = self.warm
        self.loading = False

    @abstractmethod
    def _add(self, seq: TimedSequence) -> None:
        """A new sequence reached the engine (at ``seq.arrived_s``)."""

    @abstractmethod
    def cancel(self, seq: TimedSequence) -> None:
        """The stream went away (or ended): release what the sequence holds."""

    @abstractmethod
    async def _drive(self) -> None:
        """Advance the model until nothing is left to time."""

    @abstractmethod
    def emissions(self, request: Request, start: int, most: int) -> AsyncGenerator[range, None]:
        """Token index ranges (at most ``most`` long) as they are emitted, until the last."""

    @abstractmethod
    def occupancy(self) -> Occupancy:
        """Queue, batch, free KV and warm models now."""

    @abstractmethod
    def _sequences(self) -> list[TimedSequence]:
        """Every sequence the timer holds."""

    # ------------------------------------------------------------ the driver

    def register(self, request: Request, start: int) -> TimedSequence:
        """A stream for ``request`` from token ``start`` on begins now."""
        if request.model not in self.profiles:
            raise RpcError("model_not_loaded", f"{request.model} is not served here")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.reset()
            self._loop, self._task, self._wake = loop, None, None
            watch_continue(loop)
        seq = TimedSequence(request, start, loop.time())
        self._add(seq)
        self._kick()
        return seq

    def _kick(self) -> None:
        """Start the driver, or wake it from a wait it may cut short."""
        if self._task is None or self._task.done():
            assert self._loop is not None
            self._task = self._loop.create_task(self._guarded())
        elif self._wake is not None:
            _resolve(self._wake, False)

    async def _guarded(self) -> None:
        try:
            await self._drive()
        except Exception:  # a bug here must not leave streams waiting forever
            log.exception("batching timer failed")
            for seq in self._sequences():
                seq.fail(RpcError("internal", "the synthetic engine's timer failed"))
            self.reset()
        finally:
            self._task = None

    async def _sleep(self, when: float, wakeable: bool = False) -> bool:
        """Sleep until ``when``; True when it was reached, False when :meth:`_kick` woke us.

        A deadline already past returns at once, so overdue steps are caught up
        in one go and their tokens reach the streams together.
        """
        loop = asyncio.get_running_loop()
        if loop.time() >= when:
            return True
        future: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_at(when, _resolve, future, True)
        if wakeable:
            self._wake = future
        try:
            return await future
        finally:
            handle.cancel()
            self._wake = None


class IterationTimer(Timer):
    """Continuous batching step by step (see the module docstring)."""

    def __init__(
        self,
        profiles: Mapping[str, PerfProfile],
        warm: str,
        options: BatchingOptions = BatchingOptions(),
    ) -> None:
        self.chunk = options.chunked_prefill_tokens
        self.kv_capacity = profiles[warm].kv_capacity_tokens if warm in profiles else 0
        self._continued = continued()
        super().__init__(profiles, warm, options)

    def reset(self) -> None:
        super().reset()
        self.pending: list[tuple[float, int, TimedSequence]] = []  # in the API overhead
        self.waiting: deque[TimedSequence] = deque()
        self.batch: list[TimedSequence] = []
        self.kv_used = 0
        self.now = 0.0  # the timer's clock: when the last step ended
        self.steps = 0
        self.preemptions = 0
        self.prefix = (
            PrefixCache(self.kv_capacity // BLOCK_TOKENS) if self.options.prefix_cache else None
        )

    def occupancy(self) -> Occupancy:
        loading = self.loading or self._cold()
        warm = (self.active,) if self.active is not None and not loading else ()
        return Occupancy(len(self.waiting), len(self.batch), self.kv_capacity - self.kv_used, warm)

    def _sequences(self) -> list[TimedSequence]:
        return [*(s for _, _, s in self.pending), *self.waiting, *self.batch]

    def _add(self, seq: TimedSequence) -> None:
        # API server overhead (tokenize, schedule) before the engine sees it.
        overhead = self.profiles[seq.request.model].api_overhead_s
        if overhead > 0:
            seq.ready_s = seq.arrived_s + overhead * self.slow
        heapq.heappush(self.pending, (seq.ready_s, next(self._order), seq))

    def cancel(self, seq: TimedSequence) -> None:
        if seq.done or seq.cancelled:
            return
        seq.cancelled = True
        if seq in self.batch:
            self.batch.remove(seq)
            self.kv_used -= seq.context + seq.prompt_left
        elif seq in self.waiting:
            self.waiting.remove(seq)
        # Still in the API overhead: skipped when it comes due.

    async def emissions(
        self, request: Request, start: int, most: int
    ) -> AsyncGenerator[range, None]:
        n = request.max_tokens
        if start >= n:
            return
        seq = self.register(request, start)
        try:
            i = start
            while i < n:
                while seq.generated <= i and seq.error is None:
                    await seq.changed()
                if seq.error is not None:
                    raise seq.error
                j = min(seq.generated, n, i + most)
                yield range(i, j)
                i = j
        finally:
            self.cancel(seq)

    # ------------------------------------------------------------ clock

    def _reach(self, when: float) -> None:
        """The clock reaches ``when`` (or, after a stop, the moment the loop ran again)."""
        if continued() != self._continued:  # stopped and continued since the last deadline
            self._continued = continued()
            when = max(when, asyncio.get_running_loop().time())
        self.now = max(self.now, when)

    async def _run_for(self, duration: float) -> None:
        end = self.now + duration
        await self._sleep(end)
        self._reach(end)

    # ------------------------------------------------------------ the engine loop

    async def _drive(self) -> None:
        while True:
            if self.now < self.loading_until:  # restarted: the warm model loads first
                self.active, self.loading = self.warm, True
                await self._sleep(self.loading_until)
                self._reach(self.loading_until)
                self.loading = False
                continue
            self._arrivals()
            head = self.waiting[0] if self.waiting else None
            if head is not None and head.request.model != self.active and not self.batch:
                await self._load(head.request.model)
                continue
            self._admit()
            if not self.batch:
                while self.pending and self.pending[0][2].cancelled:
                    heapq.heappop(self.pending)
                if not self.pending:
                    assert not self.waiting, "an empty batch admits or fails the queue head"
                    return
                when = self.pending[0][0]
                if await self._sleep(when, wakeable=True):
                    self._reach(when)
                continue
            if any(s.prompt_left > 0 for s in self.batch):
                await self._prefill_step()
            elif self.kv_capacity - self.kv_used < len(self.batch):
                self._preempt()
            else:
                await self._decode_step()

    def _arrivals(self) -> None:
        while self.pending and self.pending[0][0] <= self.now:
            seq = heapq.heappop(self.pending)[2]
            if not seq.cancelled:
                self.waiting.append(seq)

    async def _load(self, model: str) -> None:
        self.active = model
        self.loading = True
        await self._run_for(self.profiles[model].load_time_s)
        self.loading = False

    def _admit(self) -> None:
        while self.waiting and len(self.batch) < self.max_batch:
            head = self.waiting[0]
            if head.request.model != self.active:
                break
            need = head.prompt_left + head.context + 1
            if self.kv_used + need > self.kv_capacity:
                if not self.batch and need > self.kv_capacity:
                    # Can never fit: fail it rather than block the queue forever.
                    self.waiting.popleft()
                    head.fail(
                        RpcError(
                            "context_too_long",
                            f"{need} tokens of context do not fit the KV cache "
                            f"({self.kv_capacity} tokens)",
                        )
                    )
                    continue
                break
            self.waiting.popleft()
            if self.prefix is not None and head.context == 0:
                hits = self.prefix.hit_blocks(head.request.prefix_hashes)
                cached = min(hits * BLOCK_TOKENS, head.prompt_left - 1)
                head.prompt_left -= max(0, cached)
                head.context += max(0, cached)
            # KV for the whole prompt is reserved at admission; each token adds one.
            self.kv_used += head.prompt_left + head.context
            self.batch.append(head)

    async def _prefill_step(self) -> None:
        assert self.active is not None
        profile = self.profiles[self.active]
        chunks, decoding, duration = plan_prefill_step(profile, self.batch, self.chunk)
        await self._run_for(duration * self.slow)
        self.steps += 1
        for seq, n in chunks:
            if seq.cancelled:
                continue
            seq.prompt_left -= n
            seq.context += n
            if seq.prompt_left == 0:
                self._emit(seq)
                if self.prefix is not None:
                    self.prefix.insert(seq.request.prefix_hashes)
        for seq in decoding:
            if not seq.cancelled:
                self._emit(seq)
        self._finish_done()

    async def _decode_step(self) -> None:
        assert self.active is not None
        profile = self.profiles[self.active]
        members = list(self.batch)
        context = sum(s.context for s in members)
        await self._run_for(profile.step_time(0, context, len(members)) * self.slow)
        self.steps += 1
        for seq in members:
            if not seq.cancelled:
                self._emit(seq)
        self._finish_done()
        if self.batch and self.kv_capacity - self.kv_used < len(self.batch):
            self._preempt()

    def _emit(self, seq: TimedSequence) -> None:
        seq.generated += 1
        seq.context += 1
        self.kv_used += 1
        if seq.first_token_s is None:
            seq.first_token_s = self.now
        seq.notify()

    def _finish_done(self) -> None:
        for seq in [s for s in self.batch if s.generated >= s.request.max_tokens]:
            self.batch.remove(seq)
            self.kv_used -= seq.context
            seq.finish_s = self.now
            seq.done = True
            seq.notify()

    def _preempt(self) -> None:
        """KV cache full: the newest sequence goes back to the queue (recompute)."""
        victim = self.batch.pop()
        self.kv_used -= victim.context + victim.prompt_left
        victim.prompt_left = victim.request.prompt_tokens + victim.generated
        victim.context = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1


class RequestTimer(Timer):
    """One service time per request over ``max_batch`` slots (see the module docstring)."""

    def reset(self) -> None:
        super().reset()
        self.holders: dict[TimedSequence, float] = {}  # slot holders -> when they free it
        self.finishes: list[tuple[float, int, TimedSequence]] = []
        self.queue: deque[TimedSequence] = deque()

    def occupancy(self) -> Occupancy:
        queued = sum(1 for s in self.queue if not s.cancelled)
        warm = (self.active,) if self.active and not self._cold() else ()
        return Occupancy(queued, len(self.holders), 0, warm)

    def _sequences(self) -> list[TimedSequence]:
        return [*self.holders, *self.queue]

    def _add(self, seq: TimedSequence) -> None:
        self._settle(seq.arrived_s)
        self.queue.append(seq)
        self._fill(seq.arrived_s)

    def cancel(self, seq: TimedSequence) -> None:
        if self._loop is None:
            return
        now = self._loop.time()
        self._settle(now)
        if seq.done or seq.cancelled:
            return
        seq.cancelled = True
        if self.holders.pop(seq, None) is not None:
            self._fill(now)
            self._kick()

    async def emissions(
        self, request: Request, start: int, most: int
    ) -> AsyncGenerator[range, None]:
        n = request.max_tokens
        if start >= n:
            return
        loop = asyncio.get_running_loop()
        seq = self.register(request, start)
        try:
            while seq.begin_s is None and seq.error is None:
                await seq.changed()
            if seq.error is not None:
                raise seq.error
            i = start
            while i < n:
                await sleep_until(seq.due_s(i))
                now = loop.time()
                j = i + 1
                while j < n and j - i < most and seq.due_s(j) <= now:
                    j += 1
                yield range(i, j)
                i = j
        finally:
            self.cancel(seq)

    async def _drive(self) -> None:
        while self.finishes:
            when = self.finishes[0][0]
            if await self._sleep(when, wakeable=True):
                self._settle(when)

    def _settle(self, now: float) -> None:
        """Free the slots whose requests finished by ``now``, in time order."""
        while self.finishes and self.finishes[0][0] <= now:
            finish, _, seq = heapq.heappop(self.finishes)
            if self.holders.get(seq) == math.inf:  # held a slot while the weights loaded
                if not seq.cancelled:
                    self._start(seq, finish, len(self.holders))
            elif self.holders.pop(seq, None) is not None:
                seq.done = True
                self._fill(finish)

    def _fill(self, now: float) -> None:
        while self.queue and len(self.holders) < self.max_batch:
            seq = self.queue.popleft()
            if not seq.cancelled:
                self._grant(seq, now)

    def _grant(self, seq: TimedSequence, now: float) -> None:
        if now < self.loading_until:
            # Restarted: it holds a slot now and starts when the weights are in,
            # timed by the slots in use then (the simulator's SlotWorker).
            self.holders[seq] = math.inf
            heapq.heappush(self.finishes, (self.loading_until, next(self._order), seq))
            self._kick()
            return
        self._start(seq, now, len(self.holders) + 1)  # the slots in use, this one included

    def _start(self, seq: TimedSequence, now: float, batch: int) -> None:
        req = seq.request
        profile = self.profiles[req.model]
        load = 0.0
        if req.model != self.active:
            # Swap weights in (the approximation charges the load to this request).
            self.active = req.model
            load = profile.load_time_s
        prefill = profile.prefill_time(seq.prompt_left, 1)  # prompt (+ resumed tokens)
        context = req.prompt_tokens + req.max_tokens // 2
        decode_steps = max(0, req.max_tokens - seq.generated - 1)
        seq.step_s = profile.decode_step_time(batch, context)
        seq.ttft_s = load + profile.api_overhead_s + prefill
        seq.scale = self.slow
        seq.begin_s = now
        seq.first_token_s = seq.due_s(seq.start)
        seq.finish_s = seq.due_s(seq.start + decode_steps)
        self.holders[seq] = seq.finish_s
        heapq.heappush(self.finishes, (seq.finish_s, next(self._order), seq))
        seq.notify()
        self._kick()
