"""Which of two orchestrators sharing a store leads: a lease in the store, fenced by epoch.

A standby pair (``orchestrators: 2`` in a cluster file) shares one
PostgreSQL store. Each process tries every ``ttl_s / 4`` to take or renew
the store's ``leadership`` row (:meth:`MetadataStore.acquire_leadership`):
it succeeds while the row is free, lapsed or its own, and a change of holder
raises the row's epoch by one. The holder leads; the other answers submits
with 503 ``not_leader`` and the gateway turns to the leader.

Safety rests on two rules:

- **A leader stops on its own clock.** It leads only until ``ttl_s`` after
  it *sent* its last successful renewal (event-loop time), which is never
  later than the lease's end in the store, so a leader cut off from the
  store stops before the other may take over (clocks in step to well under
  ``ttl_s``, as NTP keeps them).
- **A new leader fences the old epoch.** Before it takes its first request
  it expires every open job reserved under an older epoch
  (:meth:`MetadataStore.expire_jobs_before_epoch`): a resend of one of them
  (the gateway resends what the dead leader left unanswered, under the same
  id and ``Idempotency-Key``) takes it over at once instead of waiting out
  its 30 s job lease, and the old leader can renew none of them again.

Billing does not depend on who leads: ``finalize`` is exactly-once by the
request id whoever writes it, so a settlement that the old leader's journal
replays later and the takeover's own settlement of the same request bill it
once.

Renewing off the event loop: the lease is taken and renewed by a thread of
its own, with its own event loop and its own connection to the store, never
by the orchestrator's loop. An orchestrator that has just taken over works
off everything the dead leader left, at once; on a busy machine its loop then
fell seconds behind, its renewal went out after the lease's end, the other
took the lease, and the two passed it back and forth, each takeover expiring
the other's open jobs (seen in the chaos suite's leader kill with mutual TLS
and one core busy: epochs 2 to 9 in 45 s, 536 of 4,500 requests failed).
The takeover itself (expiring older epochs' jobs) still runs on the
orchestrator's loop, and the thread keeps renewing while it does.

Times: the lease in the store is on the wall clock (``wall``), which both
processes read alike; how long this process may still lead is on the
monotonic clock (``time.monotonic``), which both threads read alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable

from haif.runtime.store import MetadataStore

log = logging.getLogger("haif.orchestrator")

#: The leadership row of a cluster's orchestrators.
LEADERSHIP = "orchestrator"
DEFAULT_LEASE_S = 2.0


def holder_id(name: str) -> str:
    """A holder name unique to this process's life: a restart is a new holder (new epoch)."""
    return f"{name}@{socket.gethostname()}:{secrets.token_hex(4)}"


class Leadership:
    """Take, renew and lose the lease; ``leading`` says whether to serve now.

    ``open_store`` opens the renewing thread's own connection to the shared
    store (called on that thread's loop); ``on_elected`` runs on the loop
    that called :meth:`run`.
    """

    def __init__(
        self,
        open_store: Callable[[], Awaitable[MetadataStore]],
        holder: str,
        *,
        ttl_s: float = DEFAULT_LEASE_S,
        name: str = LEADERSHIP,
        wall: Callable[[], float] = time.time,
        on_elected: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the leader lease must be > 0 s, got {ttl_s}")
        self.open_store = open_store
        self.holder = holder
        self.ttl_s = ttl_s
        self.name = name
        self.wall = wall
        self._on_elected = on_elected
        #: The epoch this process leads under (None: it has not led yet).
        self.epoch: int | None = None
        self._until = -1.0  # monotonic time this process may lead until
        self._serving = False  # elected and its takeover done
        # The epoch the lease was won under (its takeover under way or done; None: not won).
        self._electing: int | None = None
        self._release = False  # end the lease when the renewing stops
        self._thread: threading.Thread | None = None
        self._renewing: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None
        self._stopping = threading.Event()

    @property
    def leading(self) -> bool:
        return self._serving and time.monotonic() < self._until

    async def step(self, store: MetadataStore, main: asyncio.AbstractEventLoop) -> None:
        """One try to take or renew the lease (on the renewing thread); a new epoch's
        takeover is handed to ``main``, the orchestrator's loop."""
        sent = time.monotonic()
        now = self.wall()
        try:
            epoch = await store.acquire_leadership(self.name, self.holder, now, now + self.ttl_s)
        except Exception as exc:
            self._unanswered(exc)
            return
        if epoch is None:
            if self._electing is not None:  # electing or serving: lost
                self._depose("another orchestrator holds the lease")
            return
        self._until = sent + self.ttl_s
        if self._electing == epoch:  # a renewal, or its takeover is under way
            return
        self._electing = epoch
        try:
            asyncio.run_coroutine_threadsafe(self._elected(epoch), main)
        except RuntimeError:  # the orchestrator's loop is closed: it is stopping
            self._electing = None

    def _unanswered(self, exc: BaseException) -> None:
        if self._serving and time.monotonic() >= self._until:
            self._depose(f"the store did not answer ({type(exc).__name__})")
        else:
            log.warning("leadership: the store did not answer: %s", type(exc).__name__)

    async def _elected(self, epoch: int) -> None:
        """Take over under ``epoch`` (on the orchestrator's loop), then serve."""
        try:
            if self._on_elected is not None:
                await self._on_elected(epoch)
        except Exception:
            log.exception("leadership: the takeover under epoch %d failed; trying again", epoch)
            self._electing = None
            return
        if self._electing != epoch:  # the lease was lost meanwhile
            return
        self.epoch, self._serving = epoch, True
        log.warning("leadership: this orchestrator (%s) leads, epoch %d", self.holder, epoch)

    def _depose(self, why: str) -> None:
        self._serving, self._electing, self._until = False, None, -1.0
        log.warning("leadership: no longer leading (epoch %s): %s", self.epoch, why)

    async def run(self) -> None:
        """Renew on a thread of its own until cancelled (the lease is then left to
        lapse) or :meth:`release` d."""
        main = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._renew(main)), name="haif-lease", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self._stop_renewing()

    async def _renew(self, main: asyncio.AbstractEventLoop) -> None:
        """The renewing thread: step every ``ttl_s / 4``; on a clean stop, end the lease."""
        task = asyncio.current_task()
        assert task is not None
        self._renewing = (asyncio.get_running_loop(), task)
        store: MetadataStore | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if store is None:
                        store = await self.open_store()
                    await self.step(store, main)
                except Exception as exc:
                    self._unanswered(exc)
                await asyncio.sleep(self.ttl_s / 4)
        except asyncio.CancelledError:
            pass
        finally:
            if store is not None:
                if self._release:
                    try:
                        await store.release_leadership(self.name, self.holder, self.wall())
                    except Exception as exc:
                        log.warning(
                            "leadership: could not release the lease: %s", type(exc).__name__
                        )
                await store.close()

    async def _stop_renewing(self) -> None:
        self._stopping.set()
        if self._renewing is not None:
            loop, task = self._renewing
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    async def release(self) -> None:
        """A clean stop: stop renewing and end the lease now, so the standby takes
        over without waiting."""
        self._release = self._serving
        self._serving, self._until = False, -1.0  # no new requests from here on
        await self._stop_renewing()
