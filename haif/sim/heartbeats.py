"""Heartbeats without a SimPy event each: one clock for the whole fleet's beats.

Theory of operation
-------------------
Every worker beats every ``interval_s`` (the cadence is
:meth:`~haif.sim.fleet.BaseWorker.heartbeats`'). At 10,000 workers that is
10,000 process wake-ups per simulated second, which used to cost more than
everything else the simulator does. Yet a beat only *reads*: its worker's
state (up or not, its snapshot) and the partitions in force; it draws from
its worker's own generator (loss), and what it sends waits in the
orchestrators' inboxes until they next decide
(:class:`~haif.sim.driver.SimDriver`). So a beat need not run at its own
instant, only before anything at a later instant changes what it reads or
reads what it sends.

:class:`HeartbeatClock` keeps every worker's next beat in one heap
``(time, order, worker, cadence)``, and :class:`Environment` (SimPy's, with
one hook, the way SimPy's own documentation traces events) runs the beats
due by the time of the next event before processing that event. Every
change of state happens in some event, so a beat run late sees exactly what
it would have seen at its own instant: the same snapshot (a worker's
time-dependent part, the weights still loading, is read at the beat's
time), the same draws in the same order per worker, the same delivery
times; beats at one instant run in the order they were scheduled, as SimPy
orders events. The one difference from an event per beat: a beat at
exactly the instant of another event runs before it, where SimPy would have
used the order they were scheduled in. A beat's time is a random phase plus
whole intervals, so such a tie needs it to equal another event's time to the
last bit (the check that every simulated number is unchanged, over the
shipped scenarios with and without faults, found none).

A worker driven by its own process (:meth:`~haif.sim.fleet.BaseWorker.heartbeats`,
on a plain ``simpy.Environment``: the test harnesses) beats the same way,
one event per beat.

:func:`call_in` is the shells' other frequent event, a callback after a
delay (a message on the wire, an engine's next step): a ``Timeout`` with
its callback, made in one step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from heapq import heappop, heappush, heapreplace
from typing import Protocol

import simpy
from simpy.events import NORMAL


class Beating(Protocol):
    """A worker on the clock: one tick of a cadence, and when its next is due."""

    def beat(self, at: float, cadence: int) -> float | None:
        """Tick at ``at`` (beat if up); the next tick's time, None once the cadence ended."""


class HeartbeatClock:
    """The next beat of every worker, run in time order when the environment asks."""

    __slots__ = ("_heap", "_order", "due")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Beating, int]] = []
        self._order = itertools.count()  # ties in time keep the order beats were scheduled in
        #: When the earliest beat is due (inf: none).
        self.due = math.inf

    def add(self, at: float, worker: Beating, cadence: int) -> None:
        """Schedule a tick of ``worker``'s cadence ``cadence`` at ``at``."""
        heappush(self._heap, (at, next(self._order), worker, cadence))
        if at < self.due:
            self.due = at

    def catch_up(self, now: float) -> None:
        """Run every tick due at or before ``now``, in time order."""
        heap, order = self._heap, self._order
        while heap and heap[0][0] <= now:
            at, _, worker, cadence = heap[0]
            following = worker.beat(at, cadence)
            if following is None:
                heappop(heap)
            else:
                heapreplace(heap, (following, next(order), worker, cadence))
        self.due = heap[0][0] if heap else math.inf


class _Call(simpy.events.Event):
    """A timed callback: a :class:`simpy.Timeout` without a value, made in one step."""

    def __init__(self, env: simpy.Environment, fn: Callable[[simpy.Event], None]) -> None:
        self.env = env
        self.callbacks: list[Callable[[simpy.Event], None]] = [fn]
        self._value = None
        self._ok = True


def call_in(env: simpy.Environment, delay: float, fn: Callable[[simpy.Event], None]) -> None:
    """Call ``fn(event)`` ``delay`` seconds from now, ordered as ``env.timeout(delay)`` with
    ``fn`` as its callback would be (the simulator's most frequent event)."""
    if delay < 0:
        raise ValueError(f"negative delay {delay}")
    env.schedule(_Call(env, fn), NORMAL, delay)


class Environment(simpy.Environment):
    """SimPy's environment, running the beats due before each event (see the module)."""

    def __init__(self, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self.heartbeats = HeartbeatClock()

    def step(self) -> None:
        clock = self.heartbeats
        if clock.due <= self.peek() < math.inf:
            clock.catch_up(self.peek())
        super().step()
