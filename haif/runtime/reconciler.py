"""Store upkeep: leases of requests running here, and reservations others leaked.

Every job row carries a lease (``expires_s``, on the wall clock, which every
orchestrator sharing the store reads alike). :class:`Reconciler` renews the
leases of the requests running in this process every ``lease_ttl_s / 2``,
and every ``interval_s`` (and once at start) expires the reservations whose
lease lapsed: those of an orchestrator that died mid-request, whose keys a
resend may then claim.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from haif.runtime.relay import Pending
from haif.runtime.store import JobStatus, MetadataStore

log = logging.getLogger("haif.orchestrator")


class Reconciler:
    """Renew this process's leases; expire the lapsed ones."""

    def __init__(
        self,
        store: MetadataStore,
        running: Mapping[str, Pending],
        job_id: Callable[[str], str],
        *,
        lease_ttl_s: float,
        interval_s: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        if interval_s <= 0:
            raise ValueError(f"reconcile_interval_s must be > 0, got {interval_s}")
        self.store = store
        self._running = running
        self._job_id = job_id
        self.lease_ttl_s = lease_ttl_s
        self.interval_s = interval_s
        self.wall = wall

    async def reconcile(self) -> list[str]:
        """Expire reservations whose lease ended (leaked by a dead orchestrator)."""
        expired = await self.store.expire_reservations(self.wall())
        if expired:
            log.warning(
                "reconciler expired %d leaked reservation(s): %s", len(expired), ", ".join(expired)
            )
        return expired

    async def renew_leases(self) -> None:
        """Extend the lease of every request still running here."""
        for rid, pending in list(self._running.items()):
            now = self.wall()
            status: JobStatus = "running" if pending.attempt else "reserved"
            await self.store.set_job_status(
                self._job_id(rid), status, now, expires_s=now + self.lease_ttl_s
            )

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The two periodic tasks (the owner runs and cancels them)."""
        return [
            _every(self.interval_s, self.reconcile, "reconciler pass", first=True),
            _every(self.lease_ttl_s / 2, self.renew_leases, "lease renewal", first=False),
        ]


async def _every(
    period_s: float, job: Callable[[], Coroutine[Any, Any, object]], what: str, *, first: bool
) -> None:
    if not first:
        await asyncio.sleep(period_s)
    while True:
        try:
            await job()
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(period_s)
