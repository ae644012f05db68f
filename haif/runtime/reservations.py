"""Idempotent reservations: the store calls and the waiting around one pure rule.

Before the core sees a request, it gets a job row in the metadata store
(:meth:`MetadataStore.reserve`). What happens next — run, attach to its
running twin, replay a stored reply, refuse a conflicting body, wait for a
twin running elsewhere, reserve again, rename — is decided by
:func:`haif.control.idempotency.next_step` from the store's answer and
whether the twin runs in this process; :class:`Reservations` only does the
I/O each step asks for.

A request without an ``Idempotency-Key`` has nothing to look up: it runs at
once (unless its id runs here already) and its job row is its first queued
store write, off the hot path (:meth:`Reservations.admit_then_reserve`).
Should the id turn out to be taken in the store, the row, usage and record
go under a fresh ``~suffix`` id (:meth:`Reservations.job_id`).

Clocks: leases are compared across processes, so rows carry the wall clock
(``wall``, :func:`time.time`); how long a caller waits for a twin is the
event loop's business (``loop.time()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from haif.contracts import Request
from haif.control.idempotency import Claim, Held, Next, next_step
from haif.runtime.messages import SubmitReply
from haif.runtime.relay import Pending
from haif.runtime.rpc import RpcError
from haif.runtime.store import DeadLetterRow, JobRow, MetadataStore
from haif.runtime.write_queue import WriteQueue
from haif.wire import WireError, decode, to_plain

log = logging.getLogger("haif.orchestrator")

#: Longest ``Idempotency-Key`` accepted (Stripe's limit).
MAX_IDEMPOTENCY_KEY = 255
#: Polling a twin that runs elsewhere: first gap, longest gap.
_WAIT_POLL_S = 0.05
_WAIT_POLL_MAX_S = 0.5
#: Renames (ids taken by other requests) and fresh reservations after an
#: expiry before giving up: each needs a race lost to another request.
_ROUNDS = 5

T = TypeVar("T")

Admit = Callable[[Request, str, DeadLetterRow | None], Pending]


def request_body_hash(request: Request) -> str:
    """SHA-256 of the canonical request body: what the request asks to run.

    Covers the model (version, adapter), the prompt, the token counts, the
    priority and the sampling parameters; leaves out who sent it and when (tenant, ids, arrival,
    deadline, origin) and how the answer travels (``stream``), so an
    idempotent resend may switch between streaming and not.
    """
    canonical: dict[str, Any] = {
        "model": request.model,
        "model_version": request.model_version,
        "adapter": request.adapter,
        "prompt": request.prompt,
        "prompt_tokens": request.prompt_tokens,
        "max_tokens": request.max_tokens,
        "priority": request.priority,
        "prefix_hashes": list(request.prefix_hashes),
    }
    if request.messages:  # absent: the digest completions always had
        canonical["messages"] = [[m.role, m.content] for m in request.messages]
    if request.sampling is not None:  # absent: the digest requests always had
        canonical["sampling"] = to_plain(request.sampling)
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def suffixed(request_id: str) -> str:
    """A fresh internal id for a request whose own id another request holds."""
    return f"{request_id}~{secrets.token_hex(4)}"


def stored_reply(job: JobRow) -> SubmitReply:
    """The reply a finished job stored (what a resend is answered with)."""
    reply: object = None
    if job.result is not None:
        with contextlib.suppress(WireError):
            reply = decode(job.result)
    if not isinstance(reply, SubmitReply):
        raise RpcError("conflict", f"request {job.request_id} finished without a stored reply")
    return reply


def _held(job: JobRow) -> Held:
    return Held(job.tenant, job.idempotency_key, job.status)


def _own_row(row: JobRow, stored: JobRow, stamp: float) -> bool:
    """Is ``stored`` the row an earlier try of this very reserve wrote?

    Same id, tenant, body and no key, still reserved, stamped with this
    reserve's own time: a retry after a commit whose answer was lost.
    """
    return (
        stored.request_id == row.request_id
        and stored.tenant == row.tenant
        and stored.idempotency_key is None
        and stored.body_hash == row.body_hash
        and stored.status == "reserved"
        and stored.created_s == stamp
    )


class Reservations:
    """Reserve each request's job row; run, attach, replay or wait as :func:`next_step` says."""

    def __init__(
        self,
        store: MetadataStore,
        running: Mapping[str, Pending],
        admit: Admit,
        writes: WriteQueue,
        *,
        lease_ttl_s: float,
        wait_limit_s: float,
        wall: Callable[[], float] = time.time,
        epoch: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``epoch``: the fencing epoch new job rows carry (:mod:`haif.runtime.leadership`)."""
        self.store = store
        self.epoch = epoch
        self._running = running  # internal id -> the request running here
        self._admit = admit
        self._writes = writes
        self.lease_ttl_s = lease_ttl_s
        self.wait_limit_s = wait_limit_s  # longest wait for a twin running elsewhere
        self.wall = wall
        # Internal id -> the id of its job row, where they differ (admit_then_reserve).
        self._job_ids: dict[str, str] = {}

    def job_id(self, rid: str) -> str:
        """The id of the job row (usage, record) of the request the core knows as ``rid``."""
        return self._job_ids.get(rid, rid)

    def forget(self, rid: str) -> None:
        """``rid`` ended and its last write is done: its job id is needed no more."""
        self._job_ids.pop(rid, None)

    async def enter(
        self, body: Request, *, replay_of: DeadLetterRow | None = None
    ) -> Pending | SubmitReply:
        """Reserve ``body`` and run it, attach to its running twin, or replay its result."""
        key = body.idempotency_key
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise RpcError(
                "bad_request", f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters"
            )
        digest = request_body_hash(body)
        if key is None and replay_of is None and body.request_id not in self._running:
            return self.admit_then_reserve(body, digest)
        claim = Claim(body.tenant, key, digest)
        # Another request runs here under this id; its row may not be written yet.
        rid = body.request_id if body.request_id not in self._running else suffixed(body.request_id)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.wait_limit_s
        poll = _WAIT_POLL_S
        renames = reserves = 0
        # Shielded: a caller that leaves now must not leave a job row without
        # its request (the request runs, as if the caller had left later).
        step, job, admitted = await asyncio.shield(self._reserve(claim, body, rid, replay_of))
        while True:
            if step is Next.RUN:
                assert admitted is not None
                return admitted
            if step is Next.ATTACH:
                return self._running[job.request_id]
            if step is Next.REPLAY:
                return stored_reply(job)
            if step is Next.CONFLICT:
                raise RpcError(
                    "idempotency_conflict",
                    f"Idempotency-Key {key!r} was already used with a different request body",
                )
            if step is Next.WAIT:
                if loop.time() >= give_up:
                    raise RpcError(
                        "conflict",
                        f"the request with this Idempotency-Key ({job.request_id}) "
                        "is still running",
                    )
                # Running elsewhere, or finished here and not settled in the store yet.
                await asyncio.sleep(poll)
                poll = min(_WAIT_POLL_MAX_S, poll * 1.5)
                latest = await self._store_call("read", self.store.get_job(job.request_id))
                if latest is not None:
                    job = latest
                    step = next_step(claim, "existing", _held(job), job.request_id in self._running)
                    continue
                step = Next.RESERVE_AGAIN  # gone: as good as expired
            if step is Next.RENAME:
                renames += 1
                if renames > _ROUNDS:
                    raise RpcError("internal", f"no free request id for {body.request_id!r}")
                rid = suffixed(body.request_id)
            elif step is Next.RESERVE_AGAIN:  # its twin expired: reserving releases the key
                reserves += 1
                if reserves > _ROUNDS:
                    raise RpcError("conflict", f"could not reserve request {body.request_id!r}")
            step, job, admitted = await asyncio.shield(self._reserve(claim, body, rid, replay_of))

    async def _reserve(
        self, claim: Claim, body: Request, rid: str, replay_of: DeadLetterRow | None
    ) -> tuple[Next, JobRow, Pending | None]:
        """One reservation under ``rid``; the request is admitted if it is to run."""
        now = self.wall()
        row = JobRow(
            rid,
            body.tenant,
            claim.idempotency_key,
            claim.body_hash,
            expires_s=now + self.lease_ttl_s,
            epoch=self.epoch(),
        )
        reservation = await self._store_call("reserve", self.store.reserve(row, now))
        job = reservation.job
        step = next_step(claim, reservation.outcome, _held(job), job.request_id in self._running)
        if step is Next.RUN:
            return step, job, self._admit(body, rid, replay_of)
        return step, job, None

    async def _store_call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as exc:
            log.exception("%s failed", what)
            raise RpcError(
                "store_unavailable", f"cannot {what} the request: {type(exc).__name__}"
            ) from None

    def admit_then_reserve(self, body: Request, digest: str) -> Pending:
        """Run a request without a key at once; its job row follows.

        Without a key nothing in the store can change what happens to it, so
        there is nothing to wait for: the reserve is its first write, ahead
        of its others, off the hot path. If its id is taken in the store (an
        earlier request's, or another tenant's), the row goes under a fresh
        id that its later writes use (:meth:`job_id`). Should the
        orchestrator die before that write, the request leaves no job
        behind, and none to expire.
        """
        rid = body.request_id
        claim = Claim(body.tenant, None, digest)
        # One stamp for every try: a retried write whose first try did commit
        # (the connection died before its answer) finds its own row by it.
        stamp = self.wall()

        async def reserve() -> None:
            job_id = rid
            for _ in range(_ROUNDS):
                expires = self.wall() + self.lease_ttl_s
                row = JobRow(
                    job_id, body.tenant, None, digest, expires_s=expires, epoch=self.epoch()
                )
                reservation = await self.store.reserve(row, stamp)
                step = next_step(claim, reservation.outcome, _held(reservation.job), False)
                if step is Next.RUN or _own_row(row, reservation.job, stamp):
                    if job_id != rid:
                        self._job_ids[rid] = job_id
                    return
                job_id = suffixed(rid)  # RENAME: the only other step without a key
            raise RpcError("internal", f"no free request id for {rid!r}")

        self._writes.put(rid, f"reserve {rid}", reserve)
        return self._admit(body, rid, None)
