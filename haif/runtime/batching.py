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
import logging
import math
import signal
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from haif.contracts import ErrorKind, Request
from haif.fleet.engine import (
    BatchingEngine,
    Engine,
    RequestLevelEngine,
    Seq,
    check_prefix_cache_max_tokens,
)
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
    prefix_cache_max_tokens: int | None = None  # cap on the evictable cache (None: the KV pool)

    def __post_init__(self) -> None:
        for name in ("max_batch", "chunked_prefill_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check_prefix_cache_max_tokens(self.prefix_cache_max_tokens, self.prefix_cache)


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
    resumed count); at request level, once ``due_s(i)`` has passed. Times are
    on the timer's clock (``loop.time()``).
    """

    __slots__ = ("_waiter", "arrived_s", "failure")

    def __init__(self, request: Request, start: int, arrived_s: float) -> None:
        super().__init__(request, start)
        self.arrived_s = arrived_s
        self.failure: RpcError | None = None
        self._waiter: asyncio.Future[None] | None = None

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
    """The asyncio driver of an engine of :mod:`haif.fleet.engine` (module docstring).

    It arms ``loop.call_at`` at the engine's next deadline, feeds it
    arrivals and cancellations stamped with ``loop.time()``, and wakes the
    streams whose sequences changed.
    """

    engine: Engine

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None
        # A restarted worker loads its warm model first (the simulator's
        # ``on_restart``); until then it is announced but not warm.
        self.loading_until = 0.0
        self.reset()

    @abstractmethod
    def _make_engine(self) -> Engine:
        """A fresh engine of this timer's kind."""

    @abstractmethod
    def emissions(
        self, request: Request, start: int, most: int
    ) -> AsyncGenerator[tuple[range, bool], None]:
        """Token index ranges (at most ``most`` long) as they are emitted, until the last,
        each with whether the sequence waited for weights to load (``cold_start``, as the
        simulator records it: a restarted worker's reload, a swap of models)."""

    def reset(self) -> None:
        """Forget every sequence (a fresh engine, e.g. on another event loop)."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle, self._armed = None, math.inf
        self.engine = self._make_engine()
        if self.loading_until > 0:  # restarted: the weights load until then
            self.engine.restart(self.loading_until - self.profiles[self.warm].load_time_s)
        self._continued = continued()

    def cold_start(self, now: float) -> None:
        """The worker (re)started at loop time ``now``: load the warm model's weights first."""
        self.loading_until = now + self.profiles[self.warm].load_time_s
        self.engine.restart(now)

    def _now(self) -> float:
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not started: the engine's own clock
                return self.engine.clock
        return loop.time()

    def occupancy(self) -> Occupancy:
        """Queue, batch, free KV and warm models now."""
        engine = self.engine
        return Occupancy(
            engine.queue_depth(),
            engine.running(),
            engine.free_kv_tokens(),
            engine.warm_models(self._now()),
        )

    def register(self, request: Request, start: int) -> TimedSequence:
        """A stream for ``request`` from token ``start`` on begins now."""
        if request.model not in self.profiles:
            raise RpcError(ErrorKind.MODEL_NOT_LOADED, f"{request.model} is not served here")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self.reset()
            watch_continue(loop)
        now = loop.time()
        self._advance(now)  # what was due by now happened before this arrival
        seq = TimedSequence(request, start, now)
        self.engine.slow = self.slow
        self.engine.add(seq, now)
        self._kick()
        return seq

    def cancel(self, seq: TimedSequence) -> None:
        """The stream went away (or ended): release what the sequence holds."""
        if self._loop is not None:
            now = self._loop.time()
            self._advance(now)  # a sequence that ended by now is done, not cancelled
            self.engine.cancel(seq, now)
            self._notify([])  # whom the freed room let in
            self._kick()

    # ------------------------------------------------------------ the clock

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
        self._advance(self._loop.time())
        self._kick()

    def _advance(self, now: float) -> None:
        """Run the engine to ``now`` and wake the streams it changed."""
        engine = self.engine
        deadline = engine.next_deadline()
        if deadline is None or deadline > now:
            return
        if continued() != self._continued:  # stopped and continued since the last deadline
            self._continued = continued()
            engine.stall(now)
        engine.slow = self.slow
        try:
            left = engine.on_timer(now)
        except Exception:  # a bug here must not leave streams waiting forever
            log.exception("batching timer failed")
            for seq in engine.sequences():
                if isinstance(seq, TimedSequence):
                    seq.fail(RpcError(ErrorKind.INTERNAL, "the synthetic engine's timer failed"))
            self.reset()
            return
        self._notify(left)

    def _notify(self, left: list[Seq]) -> None:
        """Wake the readers of the sequences that got tokens or left."""
        engine = self.engine
        assert engine.progressed is not None
        progressed, engine.progressed = engine.progressed, []
        for seq in [*progressed, *left]:
            assert isinstance(seq, TimedSequence)
            if seq.error is None:
                seq.notify()
                continue
            need = seq.prompt_left + seq.context + 1
            capacity = engine.kv_capacity if isinstance(engine, BatchingEngine) else 0
            message = f"{need} tokens of context do not fit the KV cache ({capacity} tokens)"
            seq.fail(RpcError(seq.error, message))


class IterationTimer(Timer):
    """Continuous batching, one decode step per deadline (:class:`BatchingEngine`)."""

    engine: BatchingEngine

    def _make_engine(self) -> BatchingEngine:
        return BatchingEngine(
            self.profiles,
            self.warm,
            max_batch=self.max_batch,
            chunked_prefill_tokens=self.options.chunked_prefill_tokens,
            prefix_cache=self.options.prefix_cache,
            prefix_cache_max_tokens=self.options.prefix_cache_max_tokens,
            max_segment_steps=1,
            track_progress=True,
        )

    @property
    def kv_capacity(self) -> int:
        return self.engine.kv_capacity

    async def emissions(
        self, request: Request, start: int, most: int
    ) -> AsyncGenerator[tuple[range, bool], None]:
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
                yield range(i, j), seq.cold_start
                i = j
        finally:
            self.cancel(seq)


class RequestTimer(Timer):
    """One service time per request over ``max_batch`` slots (:class:`RequestLevelEngine`)."""

    engine: RequestLevelEngine

    def _make_engine(self) -> RequestLevelEngine:
        return RequestLevelEngine(
            self.profiles, self.warm, max_batch=self.max_batch, track_progress=True
        )

    async def emissions(
        self, request: Request, start: int, most: int
    ) -> AsyncGenerator[tuple[range, bool], None]:
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
                yield range(i, j), seq.cold_start
                i = j
        finally:
            self.cancel(seq)
