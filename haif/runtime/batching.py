"""The simulator's LLM engine models on the asyncio clock, for the synthetic engine.

With ``--timing profile`` (or ``profile-request``) the synthetic engine
(:mod:`haif.runtime.engines`) times its tokens by the same GPU x model
:class:`~haif.fleet.profiles.PerfProfile` and the same engine model as the
simulator, so a live cluster of synthetic workers can be compared with a
simulation of the same scenario. One timer per worker; each stream registers
a :class:`TimedSequence` and yields its tokens as they are emitted.

:class:`IterationTimer` is the asyncio driver of
:class:`haif.fleet.engine.BatchingEngine`, the very class the simulator
drives (:mod:`haif.sim.engine`): it arms ``loop.call_at`` at the engine's
next deadline and wakes the streams whose sequences got tokens. It asks the
engine for one decode step per deadline (``max_segment_steps=1``) so tokens
stream as they are made; the simulator advances a decode-only stretch as one
closed-form segment, cut at the next step boundary when an admissible
request arrives. The step times are the same (the closed form is their sum),
and so are the admissions.

Clock: each step ends at the previous step's end plus its step time (an
absolute deadline), never at the moment the loop happened to wake, so sleep
overshoot and a busy machine never make the schedule drift (late tokens come
out together, on time again after); arrivals are stamped with
``loop.time()``. The one exception is a process that was stopped: when a
SIGCONT arrived (a gray failure freezes the worker with SIGSTOP / SIGCONT,
:mod:`haif.runtime.faults`), the step in flight ends when the loop runs
again (:meth:`BatchingEngine.stall`), as a real engine cannot launch its
next step while frozen.

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

from haif.contracts import ErrorKind, Request
from haif.fleet.engine import BatchingEngine, Seq
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


class TimedSequence(Seq):
    """One stream's request at a timer: an engine sequence its reader can wait on.

    Token ``i`` exists once ``generated > i`` (``generated`` starts at the
    resumed count). Times are on the timer's clock (``loop.time()``).
    """

    __slots__ = ("_waiter", "arrived_s", "begin_s", "failure", "scale", "start", "step_s", "ttft_s")

    def __init__(self, request: Request, start: int, arrived_s: float) -> None:
        super().__init__(request, start)
        self.start = start
        self.arrived_s = arrived_s
        self.failure: RpcError | None = None
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
        self.failure = error
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
        # A restarted worker loads its warm model first (the simulator's
        # ``on_restart``); until then it is announced but not warm.
        self.loading_until = 0.0
        self.reset()

    def cold_start(self, now: float) -> None:
        """The worker (re)started at loop time ``now``: load the warm model's weights first."""
        self.loading_until = now + self.profiles[self.warm].load_time_s

    # ------------------------------------------------------------ subclass hooks

    @abstractmethod
    def reset(self) -> None:
        """Forget every sequence (a fresh engine, e.g. on another event loop)."""

    @abstractmethod
    def _add(self, seq: TimedSequence) -> None:
        """A new sequence reached the engine (at ``seq.arrived_s``)."""

    @abstractmethod
    def cancel(self, seq: TimedSequence) -> None:
        """The stream went away (or ended): release what the sequence holds."""

    @abstractmethod
    def _kick(self) -> None:
        """Time what the new state needs (a sequence arrived or left)."""

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
            raise RpcError(ErrorKind.MODEL_NOT_LOADED, f"{request.model} is not served here")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self.reset()
            watch_continue(loop)
        seq = TimedSequence(request, start, loop.time())
        self._add(seq)
        self._kick()
        return seq


class IterationTimer(Timer):
    """Continuous batching: the asyncio driver of :class:`BatchingEngine` (module docstring)."""

    def reset(self) -> None:
        handle = self.__dict__.get("_handle")
        if handle is not None:
            handle.cancel()
        options = self.options
        self.engine = BatchingEngine(
            self.profiles,
            self.warm,
            max_batch=self.max_batch,
            chunked_prefill_tokens=options.chunked_prefill_tokens,
            prefix_cache=options.prefix_cache,
            max_segment_steps=1,
            track_progress=True,
        )
        if self.loading_until > 0:  # restarted: the weights load until then
            self.engine.restart(self.loading_until - self.profiles[self.warm].load_time_s)
        self._handle: asyncio.Handle | None = None
        self._armed = math.inf
        self._continued = continued()

    @property
    def kv_capacity(self) -> int:
        return self.engine.kv_capacity

    def cold_start(self, now: float) -> None:
        super().cold_start(now)
        self.engine.restart(now)

    def occupancy(self) -> Occupancy:
        engine = self.engine
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not started: the engine's own clock
                loop = None
        now = loop.time() if loop is not None else engine.clock
        return Occupancy(
            len(engine.waiting), len(engine.batch), engine.free_kv_tokens(), engine.warm_models(now)
        )

    def _sequences(self) -> list[TimedSequence]:
        return [s for s in self.engine.sequences() if isinstance(s, TimedSequence)]

    def _add(self, seq: TimedSequence) -> None:
        self.engine.slow = self.slow
        self.engine.add(seq, seq.arrived_s)

    def cancel(self, seq: TimedSequence) -> None:
        self.engine.cancel(seq)

    def _kick(self) -> None:
        """Arm ``loop.call_at`` at the engine's deadline, if it moved earlier."""
        deadline = self.engine.next_deadline()
        if deadline is None or deadline >= self._armed:
            return
        if self._handle is not None:
            self._handle.cancel()
        assert self._loop is not None
        self._armed = deadline
        self._handle = self._loop.call_at(deadline, self._due)

    def _due(self) -> None:
        # One more turn of the loop: a SIGCONT that woke it runs its handler first.
        assert self._loop is not None
        self._handle = self._loop.call_soon(self._fire)

    def _fire(self) -> None:
        self._handle, self._armed = None, math.inf
        assert self._loop is not None
        now = self._loop.time()
        engine = self.engine
        if continued() != self._continued:  # stopped and continued since the last deadline
            self._continued = continued()
            engine.stall(now)
        engine.slow = self.slow
        try:
            left = engine.on_timer(now)
        except Exception:  # a bug here must not leave streams waiting forever
            log.exception("batching timer failed")
            for timed in self._sequences():
                timed.fail(RpcError(ErrorKind.INTERNAL, "the synthetic engine's timer failed"))
            self.reset()
            return
        assert engine.progressed is not None
        progressed, engine.progressed = engine.progressed, []
        for seq in progressed:
            assert isinstance(seq, TimedSequence)
            seq.notify()
        for seq in left:
            assert isinstance(seq, TimedSequence)
            if seq.error is None:
                seq.notify()
                continue
            need = seq.prompt_left + seq.context + 1
            message = (
                f"{need} tokens of context do not fit the KV cache ({engine.kv_capacity} tokens)"
            )
            seq.fail(RpcError(seq.error, message))
        self._kick()

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
                while seq.generated <= i and seq.failure is None:
                    await seq.changed()
                if seq.failure is not None:
                    raise seq.failure
                j = min(seq.generated, n, i + most)
                yield range(i, j)
                i = j
        finally:
            self.cancel(seq)


class RequestTimer(Timer):
    """One service time per request over ``max_batch`` slots (see the module docstring)."""

    def reset(self) -> None:
        self.active = self.warm
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[bool] | None = None
        self.holders: dict[TimedSequence, float] = {}  # slot holders -> when they free it
        self.finishes: list[tuple[float, int, TimedSequence]] = []
        self.queue: deque[TimedSequence] = deque()

    def _cold(self) -> bool:
        """Still loading the weights after a :meth:`cold_start`."""
        if self.loading_until <= 0:
            return False
        loop = self._loop or asyncio.get_running_loop()
        return loop.time() < self.loading_until

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
                seq.fail(RpcError(ErrorKind.INTERNAL, "the synthetic engine's timer failed"))
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
            while seq.begin_s is None and seq.failure is None:
                await seq.changed()
            if seq.failure is not None:
                raise seq.failure
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
