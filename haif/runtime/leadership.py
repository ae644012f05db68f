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

Times: the lease in the store is on the wall clock (``wall``), which both
processes read alike; how long this process may still lead is on its event
loop's clock.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
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
    """Take, renew and lose the lease; ``leading`` says whether to serve now."""

    def __init__(
        self,
        store: MetadataStore,
        holder: str,
        *,
        ttl_s: float = DEFAULT_LEASE_S,
        name: str = LEADERSHIP,
        wall: Callable[[], float] = time.time,
        on_elected: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the leader lease must be > 0 s, got {ttl_s}")
        self.store = store
        self.holder = holder
        self.ttl_s = ttl_s
        self.name = name
        self.wall = wall
        self._on_elected = on_elected
        #: The epoch this process leads under (None: it has not led yet).
        self.epoch: int | None = None
        self._until = -1.0  # event-loop time this process may lead until
        self._serving = False  # elected and its takeover done

    @property
    def leading(self) -> bool:
        return self._serving and asyncio.get_running_loop().time() < self._until

    async def step(self) -> None:
        """One try to take or renew the lease."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        now = self.wall()
        try:
            epoch = await self.store.acquire_leadership(
                self.name, self.holder, now, now + self.ttl_s
            )
        except Exception as exc:
            if self._serving and loop.time() >= self._until:
                self._depose(f"the store did not answer ({type(exc).__name__})")
            else:
                log.warning("leadership: the store did not answer: %s", type(exc).__name__)
            return
        if epoch is None:
            if self._serving:
                self._depose("another orchestrator holds the lease")
            return
        self._until = sent + self.ttl_s
        if self._serving and epoch == self.epoch:
            return
        if self._on_elected is not None:
            await self._on_elected(epoch)  # raises: not serving yet, the next step tries again
        self.epoch, self._serving = epoch, True
        log.warning("leadership: this orchestrator (%s) leads, epoch %d", self.holder, epoch)

    def _depose(self, why: str) -> None:
        self._serving = False
        log.warning("leadership: no longer leading (epoch %s): %s", self.epoch, why)

    async def run(self) -> None:
        """Step every ``ttl_s / 4`` until cancelled."""
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("leadership step failed")
            await asyncio.sleep(self.ttl_s / 4)

    async def release(self) -> None:
        """A clean stop: end the lease now, so the standby takes over without waiting."""
        if not self._serving:
            return
        self._serving = False
        try:
            await self.store.release_leadership(self.name, self.holder, self.wall())
        except Exception as exc:
            log.warning("leadership: could not release the lease: %s", type(exc).__name__)
