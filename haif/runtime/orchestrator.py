"""The runtime orchestrator: the control core on the asyncio clock.

:class:`LoopDriver` is the whole difference from the simulator's driver:
``loop.time()`` instead of ``env.now`` and ``loop.call_at`` instead of a
SimPy timeout. :class:`Orchestrator` executes the core's decisions with
real I/O — msgpack RPC to workers, jobs, usage, records and dead letters in
the metadata store — and answers the gateway when the core finalizes.
Every admission, placement, retry and dead-letter decision is the core's.

RPC methods (framing in :mod:`haif.runtime.rpc`)
-------------------------------------------------
- ``submit_stream(Request)`` (streaming): ``TokenChunk`` frames as the
  request's attempts produce tokens, then one ``SubmitReply`` (the final
  record, with the core's ``Reject`` if it refused). The gateway uses it for
  streaming and non-streaming requests alike.
- ``submit(Request) -> SubmitReply`` (unary): the same, text collected.
- ``heartbeat(Announce) -> True``: a worker's presence and load (see
  "Presence and cluster keys" below).
- ``auth_key(key_hash) -> tenant | None``: API-key lookup by SHA-256 hex
  digest in the store (unknown and revoked keys answer ``None``).
- ``status(None) -> OrchestratorStatus``: fresh workers, models, load; the
  gateway's ``/readyz`` is ready when at least one worker is fresh.
  ``GET /readyz`` answers the same as JSON (503 when no worker is fresh) and
  ``GET /status`` adds presence: fresh, stale and evicted workers.
- ``dlq_list(None)``, ``dlq_show(request_id)``, ``dlq_replay(request_id)``:
  the dead-letter queue (``haif dlq``, :mod:`haif.runtime.dlq_cli`).

Request ids
-----------
The id a caller sends (``x-request-id``) is echoed back and is what workers
see (the synthetic engine derives its text from it). Internally — the core,
the job row, usage, the record — a request is keyed by an id that is unique
in the store: the caller's id when it is free, else the caller's id plus a
random ``~suffix`` (another tenant, or the same one, already used it). So
two tenants sending the same ``x-request-id`` never share a job or a record,
and a reused id without an ``Idempotency-Key`` simply runs again.

Idempotent reservations
-----------------------
Before the core sees a ``Submit``, the request gets a job row
(:meth:`MetadataStore.reserve`) holding its tenant, its ``Idempotency-Key``
(if any) and :func:`request_body_hash`, with a lease (``lease_ttl_s``)
renewed every ``lease_ttl_s / 2`` while it runs. Keys are scoped per tenant.
A request without a key has nothing to look up: whatever the store holds,
it runs. So it runs at once (unless its id is running here already), and
its job row is its first store write, off the hot path; the store's writes
are ordered per request and concurrent across requests, so its group commit
batches them. Should its id turn out to be taken in the store (an earlier
request's), the job row, usage and record go under a fresh ``~suffix`` id
(:meth:`Orchestrator._job_id`) while the request runs on as it started.

- ``created``: the request runs.
- ``existing``, still running here: the caller is attached to the running
  request — it receives the tokens relayed so far, then the rest, then the
  same final reply. A resent request never runs twice.
- ``existing``, running in another orchestrator (or leaked by one that died):
  the caller waits for it to finish (then it is replayed) or for its lease
  to lapse (then the reconciler expires it, the key is released and the
  request runs here).
- ``existing``, finished: the stored reply (record, text, refusal) is
  replayed without running anything.
- ``conflict`` (same key, different body): ``RpcError("idempotency_conflict")``,
  which the gateway answers with HTTP 409.

When the core emits ``Finalize`` the orchestrator settles the job with
:meth:`MetadataStore.finalize` — job done/failed, the reply as the job's
``result``, one usage row and the record, in one transaction that the store
makes exactly-once. A request the core *refused* (``status == "rejected"``:
it never ran) has nothing to bill: its record is written, its job is marked
``expired`` so its key is released and a resend after ``Retry-After`` runs.

Dead letters
------------
``DeadLetter`` decisions are stored with the request as the caller sent it.
``dlq_replay`` resubmits a stored request through the same path (same
tenant, a fresh internal id, an idempotency key derived from the entry so a
double replay runs once) and removes the entry when the replay succeeds; a
replay that fails again updates the entry instead of adding a second one.

Reconciler and presence
-----------------------
Every ``reconcile_interval_s`` (and once at start) the reconciler calls
:meth:`MetadataStore.expire_reservations` and logs the ids it expired:
reservations leaked by an orchestrator that died mid-request. A worker whose
heartbeats stop is evicted (``WorkerGone`` to the core) after
``evict_after_missed`` of its heartbeat intervals (estimated from the gaps
between its heartbeats); one that missed a heartbeat is counted as stale.

Presence and cluster keys
-------------------------
With a :class:`~haif.runtime.cluster_keys.ClusterAuth` every RPC in and out
is sealed (:mod:`haif.runtime.rpc`): the orchestrator serves only calls
sealed by a key of its keyring for :data:`~haif.runtime.rpc.ORCHESTRATOR_AUDIENCE`
(an unsigned, forged, tampered, expired or replayed announcement gets 401
and is logged; the worker is not registered), and seals its calls to a
worker for that worker's id. An announcement for worker id ``W`` is
accepted only under the key named ``W`` in the keyring (the file
``W.pub``); any other trusted key gets 403 ``wrong_worker`` and a warning,
so a stolen worker key cannot draw another worker's traffic. Without
cluster keys, announcements are taken as they come (loopback use).

Streaming and mid-stream failure
--------------------------------
Each ``Dispatch`` runs as one task that calls the worker's ``infer_stream``
with the ``resume_tokens`` the core chose and relays its ``TokenChunk``s to
the request's ``submit_stream`` callers. The relay keeps, per request, the
tokens already delivered and forwards only the next indexes, so every
caller sees one sequence without gaps or duplicates whichever attempt
produced it (a chunk that would leave a gap fails the attempt). Reads from
the worker use an idle timeout (``idle_timeout_s``; the worker sends
keepalives while queued), so a worker that dies or hangs mid-stream becomes
a failed ``AttemptResult`` — ``worker_crashed`` (connection broken),
``timeout`` (silent) or ``connection_error`` (unreachable) — whose
``output_tokens`` is the number of tokens already delivered. The core then
decides (retry elsewhere with ``resume_tokens`` under
``CoreConfig.resume_partial``, dead-letter, fail); the orchestrator only
executes that decision. A ``Cancel`` from the core cancels the task, which
closes the worker connection and so stops the generation there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode

from haif.contracts import (
    AttemptResult,
    Cancel,
    DeadLetter,
    Decision,
    Dispatch,
    Finalize,
    Heartbeat,
    Reject,
    Request,
    RequestRecord,
    Submit,
    WorkerGone,
    WorkerSnapshot,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore
from haif.control.driver import CoreDriver, Sink
from haif.runtime import telemetry
from haif.runtime.cluster_keys import ClusterAuth
from haif.runtime.messages import (
    Announce,
    InferCall,
    InferEnd,
    OrchestratorStatus,
    SubmitReply,
    TokenChunk,
)
from haif.runtime.resources import Resources
from haif.runtime.rpc import (
    ORCHESTRATOR_AUDIENCE,
    EnvelopeAuth,
    Handler,
    LogThrottle,
    RpcClient,
    RpcError,
    RpcUnavailable,
    StreamHandler,
    add_rpc_routes,
    caller_key_id,
)
from haif.runtime.store import DeadLetterRow, JobRow, JobStatus, MetadataStore, Reservation
from haif.wire import WireError, decode, encode

log = logging.getLogger("haif.orchestrator")

#: Longest ``Idempotency-Key`` accepted (Stripe's limit).
MAX_IDEMPOTENCY_KEY = 255
#: Assumed heartbeat interval of a worker until two heartbeats were seen
#: (the worker's default ``heartbeat_s``).
DEFAULT_HEARTBEAT_S = 0.5
_MIN_HEARTBEAT_S = 0.05
_PRESENCE_TICK_S = 0.1
_FOLLOW_POLL_S = 0.05
_FOLLOW_POLL_MAX_S = 0.5
_RESERVE_ROUNDS = 5


def _suffixed(request_id: str) -> str:
    """A fresh internal id for a request whose own id another request holds."""
    return f"{request_id}~{secrets.token_hex(4)}"


def request_body_hash(request: Request) -> str:
    """SHA-256 of the canonical request body: what the request asks to run.

    Covers the model (version, adapter), the prompt, the token counts and the
    priority; leaves out who sent it and when (tenant, ids, arrival,
    deadline, origin) and how the answer travels (``stream``), so an
    idempotent resend may switch between streaming and not.
    """
    canonical = {
        "model": request.model,
        "model_version": request.model_version,
        "adapter": request.adapter,
        "prompt": request.prompt,
        "prompt_tokens": request.prompt_tokens,
        "max_tokens": request.max_tokens,
        "priority": request.priority,
        "prefix_hashes": list(request.prefix_hashes),
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


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


Frame = TokenChunk | SubmitReply


@dataclass
class _Pending:
    """One running request and the callers attached to it."""

    request: Request  # as the core sees it (internal request id)
    client_id: str  # the id its first caller sent; what workers see
    result: asyncio.Future[SubmitReply]  # the final reply with the whole text
    texts: list[str] = field(default_factory=list)  # response tokens relayed so far
    listeners: list[asyncio.Queue[Frame]] = field(default_factory=list)
    attempt: int = 0  # the attempt whose tokens are relayed now
    reject: Reject | None = None
    final: SubmitReply | None = None  # the last stream frame, once finalized
    replay_of: DeadLetterRow | None = None  # a dead-letter replay: the entry
    trace_ctx: Context | None = None  # the submitting call's trace context

    @property
    def delivered(self) -> int:
        return len(self.texts)

    def listen(self) -> asyncio.Queue[Frame]:
        """A queue of this request's frames from token 0 on (late joiners included)."""
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        if self.texts:
            queue.put_nowait(TokenChunk(0, tuple(self.texts)))
        if self.final is not None:
            queue.put_nowait(self.final)
        else:
            self.listeners.append(queue)
        return queue

    def unlisten(self, queue: asyncio.Queue[Frame]) -> None:
        with contextlib.suppress(ValueError):
            self.listeners.remove(queue)


@dataclass
class _Presence:
    snapshot: WorkerSnapshot
    seen: float  # our clock
    interval: float | None = None  # estimated heartbeat interval
    resources: Resources | None = None  # what its host used, as it last said


class Orchestrator:
    def __init__(
        self,
        config: CoreConfig,
        store: MetadataStore,
        *,
        seed: int = 0,
        rpc_timeout_s: float = 300.0,
        idle_timeout_s: float = 10.0,
        lease_ttl_s: float = 30.0,
        reconcile_interval_s: float = 5.0,
        evict_after_missed: int = 3,
        cluster_auth: ClusterAuth | None = None,
        region: str = "",
    ) -> None:
        from haif.seeding import derive_rng

        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        if reconcile_interval_s <= 0:
            raise ValueError(f"reconcile_interval_s must be > 0, got {reconcile_interval_s}")
        if evict_after_missed < 1:
            raise ValueError(f"evict_after_missed must be >= 1, got {evict_after_missed}")
        self.config = config
        self.store = store
        self.lease_ttl_s = lease_ttl_s
        self.reconcile_interval_s = reconcile_interval_s
        self.evict_after_missed = evict_after_missed
        self.cluster_auth = cluster_auth
        #: What every RPC to this orchestrator must carry (None: nothing).
        self.envelope_auth = (
            EnvelopeAuth(cluster_auth.keyring, ORCHESTRATOR_AUDIENCE)
            if cluster_auth is not None
            else None
        )
        self._refusals = LogThrottle()
        # The simulator's core of a region draws from "core:<region>": the same
        # seed and region give the same placement draws in both shells.
        self._rng: random.Random = derive_rng(seed, f"core:{region}" if region else "core")
        self._rpc_timeout_s = rpc_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._workers: dict[str, str] = {}  # worker_id -> base URL
        self._seen: dict[str, _Presence] = {}  # last heartbeat of each present worker
        self._evicted: set[str] = set()  # evicted and not back since
        self.evictions = 0  # workers evicted since start
        self._pending: dict[str, _Pending] = {}  # by internal request id
        # Internal id -> the id of its job row, where they differ (see _admit_then_reserve).
        self._job_ids: dict[str, str] = {}
        self._attempts: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        #: Store writes not yet done, per request, in decision order (see :meth:`_write`).
        self._writes: dict[str, deque[tuple[str, Callable[[], Awaitable[object]], bool]]] = {}
        self.driver: LoopDriver | None = None
        self._session: aiohttp.ClientSession | None = None
        self.metrics = telemetry.OrchestratorMetrics()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.driver = LoopDriver(loop, ControlCore(self.config, self._rng), self.execute)
        # No connection cap: every running attempt holds one worker connection.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        for coro in (self._reconciler(), self._lease_renewer(), self._presence_watch()):
            self._loops.append(asyncio.create_task(coro))
        log.info(
            "orchestrator started: placement %s, store %s%s",
            self.config.placement,
            type(self.store).__name__,
            ", RPC sealed with cluster keys" if self.cluster_auth is not None else "",
        )

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for task in list(self._attempts.values()):
            task.cancel()
        while self._tasks:  # attempts and the store writes their ends queued
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await self.store.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ submission

    async def _enter(
        self, body: object, *, replay_of: DeadLetterRow | None = None
    ) -> _Pending | SubmitReply:
        """Reserve ``body`` and run it, attach to its running twin, or replay its result."""
        if not isinstance(body, Request):
            raise RpcError("bad_request", "submit expects a Request")
        key = body.idempotency_key
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise RpcError(
                "bad_request", f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters"
            )
        digest = request_body_hash(body)
        if key is None and replay_of is None and body.request_id not in self._pending:
            return self._admit_then_reserve(body, digest)
        for _ in range(_RESERVE_ROUNDS):
            # Shielded: a caller that leaves now must not leave a job row
            # without its request (the request runs, as if it had left later).
            reservation, admitted = await asyncio.shield(self._claim(body, digest, replay_of))
            if admitted is not None:
                return admitted
            if reservation.outcome == "conflict":
                raise RpcError(
                    "idempotency_conflict",
                    f"Idempotency-Key {key!r} was already used with a different request body",
                )
            found = await self._follow(reservation.job)
            if found is not None:
                return found
            # The job it matched expired meanwhile: reserving again releases its key.
        raise RpcError("conflict", f"could not reserve request {body.request_id!r}")

    async def _claim(
        self, body: Request, digest: str, replay_of: DeadLetterRow | None
    ) -> tuple[Reservation, _Pending | None]:
        """Reserve ``body``; admit it to the core if the reservation is new."""
        rid, reservation = await self._reserve(body, digest)
        if not reservation.created:
            return reservation, None
        return reservation, self._admit(body, rid, replay_of)

    async def _reserve(
        self, request: Request, digest: str, *, admitted: bool = False
    ) -> tuple[str, Reservation]:
        """Reserve a job under a request id unique in the store; return both.

        ``admitted``: the request already runs here under its own id.
        """
        rid = request.request_id
        key = request.idempotency_key
        if rid in self._pending and not admitted:
            # Another request runs here under this id; its row may not be written yet.
            rid = _suffixed(request.request_id)
        for _ in range(_RESERVE_ROUNDS):
            now = time.time()
            job = JobRow(rid, request.tenant, key, digest, expires_s=now + self.lease_ttl_s)
            try:
                reservation = await self.store.reserve(job, now)
            except Exception as exc:
                log.exception("reserve %s failed", rid)
                raise RpcError(
                    "store_unavailable", f"cannot reserve the request: {type(exc).__name__}"
                ) from None
            if reservation.created:
                return rid, reservation
            found = reservation.job
            if key is not None and found.tenant == request.tenant and found.idempotency_key == key:
                return rid, reservation  # the key matched: existing or conflict
            # The id belongs to another request (another tenant's, or an earlier one).
            rid = _suffixed(request.request_id)
        raise RpcError("internal", f"no free request id for {request.request_id!r}")

    async def _follow(self, job: JobRow) -> _Pending | SubmitReply | None:
        """The running request to attach to, the stored reply, or None (expired)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._rpc_timeout_s
        poll = _FOLLOW_POLL_S
        while True:
            pending = self._pending.get(job.request_id)
            if pending is not None:
                return pending
            if job.status in ("done", "failed"):
                return self._stored_reply(job)
            if job.status == "expired":
                return None
            if loop.time() >= give_up:
                raise RpcError(
                    "conflict",
                    f"the request with this Idempotency-Key ({job.request_id}) is still running",
                )
            # Running elsewhere, or finished here and not settled in the store yet.
            await asyncio.sleep(poll)
            poll = min(_FOLLOW_POLL_MAX_S, poll * 1.5)
            latest = await self.store.get_job(job.request_id)
            if latest is None:
                return None
            job = latest

    @staticmethod
    def _stored_reply(job: JobRow) -> SubmitReply:
        reply: object = None
        if job.result is not None:
            with contextlib.suppress(WireError):
                reply = decode(job.result)
        if not isinstance(reply, SubmitReply):
            raise RpcError("conflict", f"request {job.request_id} finished without a stored reply")
        return reply

    def _admit_then_reserve(self, body: Request, digest: str) -> _Pending:
        """Run a request without a key at once; its job row follows.

        Without a key nothing in the store can change what happens to it, so
        there is nothing to wait for: the reserve is its first write, ahead
        of its others (:meth:`_write`), off the hot path. If its id is taken
        in the store (an earlier request's, or another tenant's), the row goes
        under a fresh id that its later writes use (:meth:`_job_id`). Should
        the orchestrator die before that write, the request leaves no job
        behind, and none to expire.
        """
        rid = body.request_id

        async def reserve() -> None:
            job_id, _ = await self._reserve(body, digest, admitted=True)
            if job_id == rid:
                self._job_ids.pop(rid, None)
            else:
                self._job_ids[rid] = job_id

        self._write(rid, f"reserve {rid}", reserve)
        return self._admit(body, rid, None)

    def _job_id(self, rid: str) -> str:
        """The id of the job row (usage, record) of the request the core knows as ``rid``."""
        return self._job_ids.get(rid, rid)

    def _admit(self, body: Request, rid: str, replay_of: DeadLetterRow | None) -> _Pending:
        assert self.driver is not None
        now = self.driver.now()
        # Arrival and deadline on this process's clock.
        deadline = None
        if body.deadline_s is not None:
            deadline = now + max(0.0, body.deadline_s - body.arrival_s)
        request = replace(body, request_id=rid, arrival_s=now, deadline_s=deadline)
        future: asyncio.Future[SubmitReply] = asyncio.get_running_loop().create_future()
        pending = _Pending(
            request,
            body.request_id,
            future,
            replay_of=replay_of,
            trace_ctx=telemetry.current_context(),
        )
        self._pending[rid] = pending
        self.driver.feed(Submit(request))
        return pending

    async def _submit(self, body: object, *, replay_of: DeadLetterRow | None = None) -> SubmitReply:
        entered = await self._enter(body, replay_of=replay_of)
        if isinstance(entered, SubmitReply):
            return entered
        # Shielded: a caller that leaves must not cancel what other callers await.
        return await asyncio.shield(entered.result)

    async def rpc_submit(self, body: object) -> SubmitReply:
        return await self._submit(body)

    async def rpc_submit_stream(self, body: object) -> AsyncGenerator[Frame, None]:
        entered = await self._enter(body)
        if isinstance(entered, SubmitReply):  # a finished request, replayed
            if entered.text:
                yield TokenChunk(0, (entered.text,))
            yield replace(entered, text="")
            return
        pending = entered
        queue = pending.listen()
        try:
            while True:
                frame = await queue.get()
                yield frame
                if isinstance(frame, SubmitReply):
                    return
        finally:
            # The caller left (or the stream ended): stop queueing frames; the
            # request itself runs to its end and is recorded as usual.
            pending.unlisten(queue)

    # ------------------------------------------------------------ presence

    def _check_announcer(self, wid: str) -> None:
        """With cluster keys: refuse ``wid`` unless the call was sealed by the key named ``wid``."""
        if self.cluster_auth is None:
            return
        kid = caller_key_id()
        name = self.cluster_auth.keyring.name_of(kid) if kid is not None else None
        if name == wid:
            return
        if self._refusals.due((wid, kid)):
            log.warning(
                "refused the announcement of worker %r: sealed with key %s (%s), "
                "not with the key named %r",
                wid,
                kid,
                f"named {name!r}" if name is not None else "unnamed",
                wid,
            )
        raise RpcError(
            "wrong_worker", f"worker {wid!r} may only be announced with its own key", 403
        )

    async def rpc_heartbeat(self, body: object) -> bool:
        if not isinstance(body, Announce):
            raise RpcError("bad_request", "heartbeat expects an Announce")
        assert self.driver is not None
        wid = body.snapshot.worker_id
        self._check_announcer(wid)
        now = self.driver.now()
        self._workers[wid] = body.url
        presence = self._seen.get(wid)
        if presence is None:
            self._seen[wid] = _Presence(body.snapshot, now, resources=body.resources)
            if wid in self._evicted:
                self._evicted.discard(wid)
                log.info("worker %s is back after its eviction", wid)
        else:
            gap = now - presence.seen
            if gap > 0:
                est = presence.interval
                # A long silence counts at most double, so one stall does not
                # stretch the estimate for good.
                presence.interval = gap if est is None else 0.7 * est + 0.3 * min(gap, 2 * est)
            presence.snapshot, presence.seen = body.snapshot, now
            presence.resources = body.resources
        self.driver.feed(Heartbeat(body.snapshot))
        return True

    def _interval(self, presence: _Presence) -> float:
        est = presence.interval if presence.interval is not None else DEFAULT_HEARTBEAT_S
        return max(_MIN_HEARTBEAT_S, est)

    def evict_stale(self) -> list[str]:
        """Evict workers silent for ``evict_after_missed`` heartbeat intervals."""
        assert self.driver is not None
        now = self.driver.now()
        gone = sorted(
            wid
            for wid, p in self._seen.items()
            if now - p.seen > self.evict_after_missed * self._interval(p)
        )
        for wid in gone:
            p = self._seen.pop(wid)
            self._evicted.add(wid)
            self.evictions += 1
            self.metrics.evictions.inc()
            log.warning(
                "evicting worker %s: no heartbeat for %.2f s (%d intervals of %.2f s)",
                wid,
                now - p.seen,
                self.evict_after_missed,
                self._interval(p),
            )
            self.driver.feed(WorkerGone(wid))
        return gone

    async def _presence_watch(self) -> None:
        while True:
            await asyncio.sleep(_PRESENCE_TICK_S)
            try:
                self.evict_stale()
            except Exception:
                log.exception("presence check failed")

    def stale_workers(self) -> list[str]:
        """Present workers that missed at least one heartbeat (not evicted yet)."""
        assert self.driver is not None
        now = self.driver.now()
        return sorted(
            wid for wid, p in self._seen.items() if now - p.seen > 1.5 * self._interval(p)
        )

    def presence(self) -> dict[str, Any]:
        status = self.status()
        return {
            "ready": status.ready,
            "fresh_workers": list(status.fresh_workers),
            "stale_workers": self.stale_workers(),
            "evicted_workers": sorted(self._evicted),
            "evictions": self.evictions,
            "in_flight": status.in_flight,
        }

    # ------------------------------------------------------------ other RPCs

    async def rpc_auth_key(self, body: object) -> str | None:
        if not isinstance(body, str) or not _KEY_HASH.fullmatch(body):
            raise RpcError("bad_request", "auth_key expects a SHA-256 hex digest")
        return await self.store.tenant_for_key(body)

    async def rpc_status(self, _body: object) -> OrchestratorStatus:
        return self.status()

    def status(self) -> OrchestratorStatus:
        assert self.driver is not None
        now = self.driver.now()
        fresh = sorted(
            wid
            for wid, p in self._seen.items()
            if p.snapshot.healthy and now - p.seen <= self.config.stale_after_s
        )
        models = sorted(
            {
                m
                for wid in fresh
                for m in (
                    *self._seen[wid].snapshot.models_warm,
                    *self._seen[wid].snapshot.models_loadable,
                )
            }
        )
        core = self.driver.core
        return OrchestratorStatus(
            fresh_workers=tuple(fresh),
            models=tuple(models),
            outstanding={wid: core.outstanding(wid) for wid in sorted(self._seen)},
            in_flight=core.in_flight(),
        )

    async def refresh_metrics(self) -> None:
        """Set the gauges of ``GET /metrics`` from the core, presence and the store."""
        if self.driver is None:
            return
        core, now, m = self.driver.core, self.driver.now(), self.metrics
        m.in_flight.set(core.in_flight())
        m.set_workers(
            (
                wid,
                core.outstanding(wid),
                p.snapshot.queue_depth,
                p.snapshot.running,
                core.breaker_state(wid, now),
            )
            for wid, p in sorted(self._seen.items())
        )
        m.set_resources((wid, p.resources) for wid, p in sorted(self._seen.items()))
        m.fresh_workers.set(len(self.status().fresh_workers))
        m.stale_workers.set(len(self.stale_workers()))
        m.dlq_size.set(len(await self.store.list_dead_letters()))

    # ------------------------------------------------------------ dead letters

    async def rpc_dlq_list(self, _body: object) -> list[dict[str, Any]]:
        return [_dead_letter_view(row) for row in await self.store.list_dead_letters()]

    async def rpc_dlq_show(self, body: object) -> dict[str, Any]:
        return _dead_letter_view(await self._dead_letter(body))

    async def _dead_letter(self, body: object) -> DeadLetterRow:
        if not isinstance(body, str) or not body:
            raise RpcError("bad_request", "expected a dead letter's request id")
        row = await self.store.get_dead_letter(body)
        if row is None:
            raise RpcError("not_found", f"no dead letter {body!r}")
        return row

    async def rpc_dlq_replay(self, body: object) -> dict[str, Any]:
        """Resubmit a dead letter; remove it from the queue if the replay succeeds."""
        row = await self._dead_letter(body)
        # The same entry replayed twice at once runs once; a later replay of
        # an entry that failed again (its created_s is renewed) runs anew.
        entry = hashlib.sha256(f"{row.request_id}\0{row.created_s!r}".encode()).hexdigest()
        key = f"dlq-replay:{entry[:32]}"
        reply = await self._submit(replace(row.request, idempotency_key=key), replay_of=row)
        rec = reply.record
        ok = reply.reject is None and rec.status == "ok"
        removed = False
        if ok:
            removed = await self.store.remove_dead_letter(row.request_id)
            log.info("dead letter %s replayed as %s", row.request_id, rec.request_id)
        elif reply.reject is None:
            # It ran and failed: the entry stays, with the new reason and time.
            again = DeadLetter(row.request_id, rec.reason or rec.status, rec.attempts)
            await self.store.add_dead_letter(again, row.request, time.time())
        return {
            "request_id": row.request_id,
            "replayed_as": reply.record.request_id,
            "ok": ok,
            "removed": removed,
            "reply": reply,
        }

    # ------------------------------------------------------------ decisions

    def execute(self, decision: Decision) -> None:
        self.metrics.decisions.labels(type(decision).__name__).inc()
        if isinstance(decision, Dispatch):
            if decision.attempt > 1:
                self.metrics.retries.inc()
            key = (decision.request_id, decision.attempt)
            self._attempts[key] = self._spawn(self._attempt(decision))
            self._write_running(decision.request_id, decision.worker_id)
        elif isinstance(decision, Cancel):
            task = self._attempts.pop((decision.request_id, decision.attempt), None)
            if task is not None:
                task.cancel()
        elif isinstance(decision, Reject):
            pending = self._pending.get(decision.request_id)
            if pending is not None:
                pending.reject = decision
        elif isinstance(decision, DeadLetter):
            self.metrics.dead_letters.inc()
            self._write_dead_letter(decision, self._pending.get(decision.request_id))
        elif isinstance(decision, Finalize):
            self._settle(decision.record, self._pending.get(decision.record.request_id))
            self._resolve(decision.record)

    def _write(
        self, rid: str, what: str, op: Callable[[], Awaitable[object]], *, interim: bool = False
    ) -> None:
        """Persist off the hot path: in order per request, concurrently across requests.

        Concurrent writes are what the store's group commit batches (one
        transaction for many requests' finalizations); one request's writes
        stay in decision order (running before done, done before dead letter).
        An ``interim`` write (a status on the way) is skipped when a later
        write of the request is already queued: that one supersedes it.
        """
        queue = self._writes.get(rid)
        if queue is not None:
            queue.append((what, op, interim))
            return
        self._writes[rid] = deque([(what, op, interim)])
        self._spawn(self._drain_writes(rid))

    async def _drain_writes(self, rid: str) -> None:
        queue = self._writes[rid]
        try:
            while queue:
                what, op, interim = queue[0]
                if not (interim and len(queue) > 1):
                    try:
                        await op()
                    except Exception:  # the store must not take the orchestrator down
                        log.exception("store write failed: %s", what)
                queue.popleft()
        finally:
            del self._writes[rid]
            if rid not in self._pending:  # its last write is done
                self._job_ids.pop(rid, None)

    def _write_running(self, rid: str, worker_id: str) -> None:
        now = time.time()
        self._write(
            rid,
            f"job {rid} running",
            lambda: self.store.set_job_status(
                self._job_id(rid), "running", now, worker_id, expires_s=now + self.lease_ttl_s
            ),
            interim=True,
        )

    def _write_dead_letter(self, dead: DeadLetter, pending: _Pending | None) -> None:
        if pending is None:
            return
        request = replace(pending.request, request_id=pending.client_id)
        if pending.replay_of is not None:
            # A replay failed again: update its entry rather than add another.
            dead = replace(dead, request_id=pending.replay_of.request_id)
            request = pending.replay_of.request
        now = time.time()
        rid = pending.request.request_id
        self._write(
            rid,
            f"dead letter {dead.request_id}",
            lambda: self.store.add_dead_letter(
                replace(dead, request_id=self._job_id(dead.request_id)), request, now
            ),
        )

    def _settle(self, record: RequestRecord, pending: _Pending | None) -> None:
        rid = record.request_id
        now = time.time()
        if record.status == "rejected":
            # Refused before it ran: nothing to bill; release the job (and its key).
            async def release() -> None:
                job_id = self._job_id(rid)
                await self.store.write_record(replace(record, request_id=job_id))
                await self.store.set_job_status(job_id, "expired", now)

            self._write(rid, f"refused {rid}", release)
            return
        text = "".join(pending.texts) if pending is not None else ""
        reject = pending.reject if pending is not None else None
        blob = encode(SubmitReply(record, text, reject))

        async def finalize() -> None:
            job_id = self._job_id(rid)
            if not await self.store.finalize(job_id, replace(record, request_id=job_id), blob, now):
                log.warning("request %s was already finalized; usage left as it was", rid)

        self._write(rid, f"finalize {rid}", finalize)

    def _resolve(self, record: RequestRecord) -> None:
        pending = self._pending.pop(record.request_id, None)
        if pending is None:
            return
        pending.final = SubmitReply(record, "", pending.reject)
        for queue in pending.listeners:
            queue.put_nowait(pending.final)
        pending.listeners.clear()
        if not pending.result.done():
            text = "".join(pending.texts)
            pending.result.set_result(SubmitReply(record, text, pending.reject))

    def _relay(self, pending: _Pending, attempt: int, chunk: TokenChunk) -> None:
        """Forward the tokens of ``chunk`` the callers have not seen yet."""
        if pending.attempt != attempt:
            return  # an attempt the core has moved on from
        if chunk.start > pending.delivered:
            raise RpcError(
                "bad_reply", f"token {chunk.start} arrived before token {pending.delivered}"
            )
        room = pending.request.max_tokens - pending.delivered
        new = chunk.texts[pending.delivered - chunk.start :][: max(0, room)]
        if not new:
            return
        out = TokenChunk(pending.delivered, tuple(new))
        pending.texts.extend(new)
        for queue in pending.listeners:
            queue.put_nowait(out)

    async def _attempt(self, dispatch: Dispatch) -> None:
        """Run one dispatch attempt in a span ``orchestrator.dispatch`` of its request's trace."""
        pending = self._pending.get(dispatch.request_id)
        with telemetry.tracer().start_as_current_span(
            "orchestrator.dispatch",
            context=pending.trace_ctx if pending is not None else None,
            kind=SpanKind.CLIENT,
            attributes={
                "haif.service": "orchestrator",
                "haif.request_id": dispatch.request_id,
                "haif.attempt": dispatch.attempt,
                "haif.worker_id": dispatch.worker_id,
                "haif.region": dispatch.region,
                "haif.resume_tokens": dispatch.resume_tokens,
            },
        ) as span:
            log.debug(
                "dispatch %s/%d to %s", dispatch.request_id, dispatch.attempt, dispatch.worker_id
            )
            await self._run_attempt(dispatch, span)

    async def _run_attempt(self, dispatch: Dispatch, span: Span) -> None:
        assert self.driver is not None and self._session is not None
        rid, attempt = dispatch.request_id, dispatch.attempt
        pending = self._pending.get(rid)
        started = self.driver.now()
        first_token: float | None = None
        url = self._workers.get(dispatch.worker_id)
        try:
            if pending is None:
                raise RpcError("internal", f"no pending request {rid}")
            pending.attempt = attempt
            if url is None:
                raise RpcUnavailable(f"unknown worker {dispatch.worker_id}", "connect")
            client = RpcClient(
                self._session,
                url,
                self._rpc_timeout_s,
                signer=self.cluster_auth.signer if self.cluster_auth is not None else None,
                audience=dispatch.worker_id,
            )
            # Workers see the caller's request id (see "Request ids" above).
            request = pending.request
            if pending.client_id != request.request_id:
                request = replace(request, request_id=pending.client_id)
            call = InferCall(request, dispatch.resume_tokens, attempt)
            end: InferEnd | None = None
            frames = client.stream("infer_stream", call, idle_timeout_s=self._idle_timeout_s)
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if isinstance(frame, TokenChunk):
                        if first_token is None:
                            first_token = self.driver.now()
                            span.add_event("first_token")
                        self._relay(pending, attempt, frame)
                    elif isinstance(frame, InferEnd):
                        end = frame
                    else:
                        raise RpcError("bad_reply", f"unexpected frame {type(frame).__name__}")
            if end is None:
                raise RpcUnavailable("worker stream ended without a result", "disconnected")
            now = self.driver.now()
            if (
                pending.delivered < pending.request.max_tokens
                and end.output_tokens > pending.delivered
            ):
                raise RpcError("bad_reply", "worker ended before its last token")
            result = AttemptResult(
                request_id=rid,
                attempt=attempt,
                worker_id=dispatch.worker_id,
                ok=True,
                started_s=started,
                finish_s=now,
                first_token_s=first_token if first_token is not None else now,
                output_tokens=max(end.output_tokens, pending.delivered),
                cold_start=end.cold_start,
                cost=end.cost,
            )
        except RpcUnavailable as exc:
            log.warning("attempt %s/%d on %s: %s", rid, attempt, dispatch.worker_id, exc)
            error = _UNAVAILABLE_ERRORS.get(exc.kind, "connection_error")
            result = self._failure(dispatch, started, error, True, pending, first_token)
        except RpcError as exc:
            log.warning("attempt %s/%d on %s: %s", rid, attempt, dispatch.worker_id, exc)
            retryable = exc.code in ("overloaded", "unavailable", "internal", "bad_reply")
            result = self._failure(dispatch, started, exc.code, retryable, pending, first_token)
        finally:
            self._attempts.pop((rid, attempt), None)
        span.set_attribute("haif.output_tokens", result.output_tokens)
        if not result.ok:
            span.set_status(StatusCode.ERROR, result.error or "failed")
            span.add_event(
                "attempt_failed", {"error": result.error or "", "retryable": result.retryable}
            )
        self.driver.feed(result)

    def _failure(
        self,
        dispatch: Dispatch,
        started: float,
        error: str,
        retryable: bool,
        pending: _Pending | None = None,
        first_token: float | None = None,
    ) -> AttemptResult:
        assert self.driver is not None
        return AttemptResult(
            request_id=dispatch.request_id,
            attempt=dispatch.attempt,
            worker_id=dispatch.worker_id,
            ok=False,
            started_s=started,
            finish_s=self.driver.now(),
            # Tokens the client already has: the core resumes from here.
            first_token_s=first_token,
            output_tokens=pending.delivered if pending is not None else 0,
            error=error,
            retryable=retryable,
        )

    # ------------------------------------------------------------ store upkeep

    async def reconcile(self) -> list[str]:
        """Expire reservations whose lease ended (leaked by a dead orchestrator)."""
        expired = await self.store.expire_reservations(time.time())
        if expired:
            log.warning(
                "reconciler expired %d leaked reservation(s): %s", len(expired), ", ".join(expired)
            )
        return expired

    async def _reconciler(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciler pass failed")
            await asyncio.sleep(self.reconcile_interval_s)

    async def renew_leases(self) -> None:
        """Extend the lease of every request still running here."""
        for rid, pending in list(self._pending.items()):
            now = time.time()
            status: JobStatus = "running" if pending.attempt else "reserved"
            await self.store.set_job_status(
                self._job_id(rid), status, now, expires_s=now + self.lease_ttl_s
            )

    async def _lease_renewer(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_s / 2)
            try:
                await self.renew_leases()
            except Exception:
                log.exception("lease renewal failed")


_KEY_HASH = re.compile(r"[0-9a-f]{64}")
_UNAVAILABLE_ERRORS = {
    "connect": "connection_error",
    "timeout": "timeout",
    "disconnected": "worker_crashed",
}


def _dead_letter_view(row: DeadLetterRow) -> dict[str, Any]:
    return {
        "request_id": row.request_id,
        "reason": row.reason,
        "attempts": row.attempts,
        "created_s": row.created_s,
        "request": row.request,
    }


def decision_request_id(decision: Finalize | DeadLetter) -> str:
    return decision.record.request_id if isinstance(decision, Finalize) else decision.request_id


#: The app's orchestrator (for code that embeds or inspects it).
ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)


def rpc_methods(orch: Orchestrator) -> tuple[dict[str, Handler], dict[str, StreamHandler]]:
    """The orchestrator's RPC methods: unary and streaming, by name."""
    unary: dict[str, Handler] = {
        "submit": orch.rpc_submit,
        "heartbeat": orch.rpc_heartbeat,
        "auth_key": orch.rpc_auth_key,
        "status": orch.rpc_status,
        "dlq_list": orch.rpc_dlq_list,
        "dlq_show": orch.rpc_dlq_show,
        "dlq_replay": orch.rpc_dlq_replay,
    }
    return unary, {"submit_stream": orch.rpc_submit_stream}


def build_app(orch: Orchestrator) -> web.Application:
    app = web.Application()
    app[ORCHESTRATOR] = orch
    unary, streams = rpc_methods(orch)
    add_rpc_routes(app, unary, streams, service="orchestrator", auth=orch.envelope_auth)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_request: web.Request) -> web.Response:
        view = orch.presence()
        return web.json_response(view, status=200 if view["ready"] else 503)

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(orch.presence())

    async def on_startup(_app: web.Application) -> None:
        await orch.start()

    async def on_cleanup(_app: web.Application) -> None:
        with contextlib.suppress(Exception):
            await orch.stop()

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get(
        "/metrics", telemetry.metrics_handler(orch.metrics.registry, orch.refresh_metrics)
    )
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
