"""The control core and presence on the asyncio event loop's clock.

The runtime's whole difference from the simulator's drivers
(:mod:`haif.sim.driver`): ``loop.time()`` instead of ``env.now`` and
``loop.call_at`` instead of a SimPy timeout. Decisions and evictions are the
pure state machines' (:mod:`haif.control.core`, :mod:`haif.control.presence`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from haif.contracts import Heartbeat, WorkerSnapshot
from haif.control.core import ControlCore
from haif.control.driver import CoreDriver, Sink
from haif.control.presence import Evicted, Presence, Rejoined

log = logging.getLogger("haif.orchestrator")


class LoopDriver(CoreDriver):
    """The core on the asyncio event loop's clock."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        core: ControlCore,
        sink: Sink,
        *,
        keep_log: bool = False,
    ) -> None:
        super().__init__(core, sink, keep_log=keep_log)
        self.loop = loop

    def now(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        self.loop.call_at(when, fn, when)


class LoopPresence:
    """The presence driver: :class:`~haif.control.presence.Presence` on the loop's clock.

    Every heartbeat goes to the presence state machine, then to the core as a
    ``Heartbeat``; its timer is ``loop.call_at(next_deadline())``, and each
    eviction it decides is fed to the core as ``WorkerGone``. The rule (when a
    worker is stale, when it is evicted) is the state machine's; the
    simulator drives the same one (:class:`haif.sim.driver.SimDriver`).
    """

    def __init__(
        self,
        driver: LoopDriver,
        presence: Presence,
        *,
        on_evicted: Callable[[Evicted], None] | None = None,
        on_rejoined: Callable[[Rejoined], None] | None = None,
    ) -> None:
        self.driver = driver
        self.presence = presence
        self.on_evicted = on_evicted
        self.on_rejoined = on_rejoined
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0.0

    def heartbeat(self, snapshot: WorkerSnapshot) -> None:
        """A worker's heartbeat arrived now."""
        rejoined = self.presence.heartbeat(snapshot.worker_id, self.driver.now())
        if rejoined is not None and self.on_rejoined is not None:
            self.on_rejoined(rejoined)
        self.driver.feed(Heartbeat(snapshot))
        self._arm()

    def check(self) -> list[Evicted]:
        """Evict the workers due now (the timer does this by itself)."""
        evicted = self.presence.on_timer(self.driver.now())
        for notice in evicted:
            try:
                if self.on_evicted is not None:
                    self.on_evicted(notice)
                self.driver.feed(notice.gone)
            except Exception:  # one failure must not stop the watch
                log.exception("presence check failed")
        self._arm()
        return evicted

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        deadline = self.presence.next_deadline()
        if deadline is None or (self._timer is not None and self._armed <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._armed = deadline
        self._timer = self.driver.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.check()
