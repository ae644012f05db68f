"""The shells' shared driver keeps the core's timer armed, whatever a firing decides.

A timer that fires and decides nothing (it came a little early, or it was an
attempt's timeout whose attempt had finished) must still leave the next
deadline armed: otherwise a retry waits for some unrelated decision to arm it,
and with no other traffic it waits for ever (seen in the three-host deploy
test: four retries armed at the same instant, none ever sent). uvloop's timers
have millisecond resolution, so a ``call_at`` routinely runs up to a
millisecond before its time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop
from test_core import core, fail, ok, req, snap

from haif.contracts import Decision, Dispatch, Finalize, Submit
from haif.control.driver import CoreDriver
from haif.policy.retry import RetryConfig
from haif.runtime.drivers import LoopDriver


class HandClock(CoreDriver):
    """The driver on a clock the test advances; ``call_at`` is recorded, not run."""

    def __init__(self, **config: object) -> None:
        self.taken: list[Decision] = []
        super().__init__(core(placement="round_robin", **config), self.taken.append)
        self.core.on_heartbeat(snap("w1"), 0.0)
        self.core.on_heartbeat(snap("w2"), 0.0)
        self.t = 0.0
        self.calls: list[tuple[float, Callable[[float], None]]] = []

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        self.calls.append((when, fn))

    def run_call(self, at: float) -> None:
        """Run the earliest recorded call with the clock at ``at``."""
        self.calls.sort(key=lambda c: c[0])
        when, fn = self.calls.pop(0)
        self.t = at
        fn(when)

    def next_call(self) -> float:
        return min(w for w, _ in self.calls)

    def dispatched(self) -> list[Dispatch]:
        return [d for d in self.taken if isinstance(d, Dispatch)]


def test_a_timer_that_fires_early_is_armed_again() -> None:
    driver = HandClock()
    driver.feed(Submit(req("r1")))
    [first] = driver.dispatched()
    driver.t = 0.1
    driver.feed(fail(first, 0.0, 0.1))  # RetryAt 0.6 (constant 0.5 s backoff)
    assert driver.next_call() == pytest.approx(0.6)
    driver.run_call(at=0.5996)  # a millisecond timer, run just before its time
    assert len(driver.dispatched()) == 1  # not due yet: nothing decided...
    assert driver.next_call() == pytest.approx(0.6)  # ...but armed again
    driver.run_call(at=0.6)
    retry = driver.dispatched()[-1]
    assert retry.request_id == "r1" and retry.attempt == 2


def test_a_stale_timer_does_not_hide_a_later_one() -> None:
    """r1's attempt timeout (1.0) is armed; r1 finishes; r2 fails and its retry (1.3)
    comes after that stale deadline. Firing the stale one must arm the retry."""
    driver = HandClock(attempt_timeout_s=1.0)
    driver.feed(Submit(req("r1")))
    [d1] = driver.dispatched()
    assert driver.next_call() == 1.0
    driver.t = 0.2
    driver.feed(ok(d1, 0.0, 0.2))
    driver.t = 0.7
    driver.feed(Submit(req("r2", 0.7)))
    d2 = driver.dispatched()[-1]
    driver.t = 0.8
    driver.feed(fail(d2, 0.7, 0.8))  # RetryAt 1.3, later than the armed 1.0
    driver.run_call(at=1.0)  # r1's finished attempt: nothing to do...
    assert driver.next_call() == pytest.approx(1.3)  # ...but r2's retry armed
    driver.run_call(at=1.3)
    retry = driver.dispatched()[-1]
    assert (retry.request_id, retry.attempt) == ("r2", 2)


def test_on_uvloop_every_retry_is_sent_with_no_other_traffic() -> None:
    """The live shell, on the loop the services run, as in the deploy test: four
    requests fail at once and nothing else happens; each is retried and finishes.
    Ten rounds, each with a fresh core: one early timer would leave a round hung."""
    loop = uvloop.new_event_loop()

    async def round_trip() -> list[Decision]:
        taken: list[Decision] = []
        # The default backoff (full jitter: deadlines between milliseconds), budget ample.
        c = core(placement="round_robin", retry=RetryConfig(budget_min_retries=100))
        driver = LoopDriver(loop, c, taken.append)
        now = loop.time()
        c.on_heartbeat(snap("w1"), now)
        c.on_heartbeat(snap("w2"), now)
        for i in range(4):
            driver.feed(Submit(req(f"r{i}", now)))
        firsts = [d for d in taken if isinstance(d, Dispatch)]
        await asyncio.sleep(0.0003)
        for d in firsts:
            driver.feed(fail(d, now, loop.time()))
        retries: list[Dispatch] = []
        for _ in range(40):  # given up on after 2 s
            await asyncio.sleep(0.05)
            retries = [d for d in taken if isinstance(d, Dispatch) and d.attempt == 2]
            if len(retries) == 4:
                break
        for d in retries:
            driver.feed(ok(d, loop.time(), loop.time()))
        assert c.in_flight() == 0, f"{4 - len(retries)} retries never sent"
        return taken

    try:
        for _ in range(10):
            taken = loop.run_until_complete(round_trip())
            retried = [d.request_id for d in taken if isinstance(d, Dispatch) and d.attempt == 2]
            assert sorted(retried) == ["r0", "r1", "r2", "r3"], taken
            assert sum(isinstance(d, Finalize) for d in taken) == 4
    finally:
        loop.close()
