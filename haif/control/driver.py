"""The glue every shell shares: feed the core, execute decisions, arm its timer.

A shell subclasses :class:`CoreDriver` with two methods — what time it is
and how to call a function at a later time — and passes a ``sink`` that
carries out each decision (SimPy processes in the simulator, RPCs in the
runtime). Nothing else differs between the shells, which is what makes the
simulator's decisions transfer to production (``tests/test_parity.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from haif.contracts import Decision, Event
from haif.control.core import ControlCore

Sink = Callable[[Decision], None]


class CoreDriver(ABC):
    def __init__(self, core: ControlCore, sink: Sink, *, keep_log: bool = False) -> None:
        self.core = core
        self.sink = sink
        self._armed: float | None = None
        # (time, event) fed and (time, decision) taken, for parity checks.
        self.events: list[tuple[float, Event]] | None = [] if keep_log else None
        self.decisions: list[tuple[float, Decision]] | None = [] if keep_log else None

    @abstractmethod
    def now(self) -> float:
        """The shell's clock, in seconds."""

    @abstractmethod
    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        """Call ``fn(when)`` once the shell's clock reaches ``when``."""

    def feed(self, event: Event) -> None:
        """Hand one event to the core and carry out what it decides."""
        self._feed_at(self.now(), event)

    def _feed_at(self, now: float, event: Event) -> None:
        if self.events is not None:
            self.events.append((now, event))
        self._execute(now, self.core.handle(event, now))

    def _fire(self, when: float) -> None:
        if when != self._armed:
            return  # superseded by an earlier deadline that already fired
        self._armed = None
        now = self.now()
        self._execute(now, self.core.on_timer(now))
        # Armed again even when nothing was decided: the timer may have run a
        # little before its time (uvloop's timers count whole milliseconds), or
        # its deadline was stale (an attempt's timeout after the attempt ended)
        # with a later one behind it. Left unarmed, the next deadline would wait
        # for some other decision, and with no other traffic for ever.
        self._arm()

    def _execute(self, now: float, decisions: list[Decision]) -> None:
        if not decisions:
            return  # the core arms timers only alongside decisions
        for decision in decisions:
            if self.decisions is not None:
                self.decisions.append((now, decision))
            self.sink(decision)
        self._arm()

    def _arm(self) -> None:
        deadline = self.core.next_deadline()
        if deadline is not None and (self._armed is None or deadline < self._armed):
            self._armed = deadline
            self.call_at(deadline, self._fire)
