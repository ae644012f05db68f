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

Composed parts
--------------
:class:`Orchestrator` is the composition root; each concern is a module with
a small interface, and each names its clock (the core's is the event loop's,
``loop.time()``; whatever is written to the store and compared across
processes — leases, row times — is the wall clock, ``time.time()``):

- :mod:`haif.runtime.drivers`: the core (``LoopDriver``) and presence
  (``LoopPresence``) on the loop's clock.
- :mod:`haif.runtime.reservations`: idempotent reservations (run, attach,
  replay, conflict, wait, rename), the I/O around the pure
  :func:`haif.control.idempotency.next_step`.
- :mod:`haif.runtime.attempts`: one task per ``Dispatch``, streaming from
  the worker; failures reported as :class:`~haif.contracts.ErrorKind`.
- :mod:`haif.runtime.relay`: one request's token stream to every attached
  caller, without gaps or duplicates across attempts.
- :mod:`haif.runtime.write_queue`: store writes off the hot path, in
  decision order per request, concurrent across requests (group commit).
- :mod:`haif.runtime.dead_letters`: the dead-letter queue and its replay.
- :mod:`haif.runtime.reconciler`: lease renewal and expiry of leaked
  reservations.
- :mod:`haif.runtime.leadership`: with a standby (``leader_lease_s``), the
  leader lease and its fencing epoch; a standby answers submits with 503
  ``not_leader`` and takes over when the leader's lease lapses.

Idempotent reservations
-----------------------
Before the core sees a ``Submit``, the request gets a job row holding its
tenant, its ``Idempotency-Key`` (if any, scoped per tenant) and
:func:`~haif.runtime.reservations.request_body_hash`, with a lease
(``lease_ttl_s``) renewed every ``lease_ttl_s / 2`` while it runs. A resend
with the same key and body attaches to the running request (it receives the
tokens relayed so far, then the rest, then the same final reply) or, once it
finished, gets the stored reply; one running in another orchestrator is
waited for until it finishes or its lease lapses; the same key with another
body is ``RpcError("idempotency_conflict")`` (HTTP 409). A request without a
key runs at once; its job row is its first queued store write.

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
The rule is the pure :class:`~haif.control.presence.Presence` (the simulator
runs the same one); :class:`LoopPresence` drives it on the loop's clock.

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
See :mod:`haif.runtime.attempts` and :mod:`haif.runtime.relay`: every caller
sees one token sequence whichever attempt produced it; a worker that dies or
hangs mid-stream becomes a failed ``AttemptResult`` with the tokens already
delivered, and the core decides what follows (retry elsewhere with
``resume_tokens`` under ``CoreConfig.resume_partial``, dead-letter, fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from haif.contracts import (
    SAMPLING_PARAMETERS,
    Cancel,
    ClientGone,
    DeadLetter,
    Decision,
    Dispatch,
    Event,
    Finalize,
    Reject,
    Request,
    RequestRecord,
    Submit,
    WorkerSnapshot,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore
from haif.control.presence import (
    DEFAULT_HEARTBEAT_S,
    Evicted,
    Presence,
    PresenceConfig,
    Rejoined,
)
from haif.runtime import api_keys, telemetry
from haif.runtime.attempts import Attempts
from haif.runtime.cluster_keys import ClusterAuth
from haif.runtime.cluster_tls import ServiceTls, export_expiry
from haif.runtime.dead_letters import DeadLetters
from haif.runtime.drivers import LoopDriver, LoopPresence
from haif.runtime.journal import Found, Journal, Settlement
from haif.runtime.leadership import Leadership, holder_id
from haif.runtime.messages import Announce, OrchestratorStatus, SubmitReply, TokenChunk
from haif.runtime.reconciler import Reconciler
from haif.runtime.relay import Frame, Pending
from haif.runtime.reservations import Reservations, request_body_hash, suffixed
from haif.runtime.resources import Resources
from haif.runtime.roles import ORCHESTRATOR_METHODS
from haif.runtime.rpc import (
    ORCHESTRATOR_AUDIENCE,
    EnvelopeAuth,
    Handler,
    LogThrottle,
    PeerAuth,
    RpcError,
    StreamHandler,
    add_rpc_routes,
    caller_identity,
    caller_key_id,
)
from haif.runtime.store import DeadLetterRow, JobRow, MetadataStore
from haif.runtime.write_queue import WriteQueue
from haif.wire import encode

__all__ = ["ORCHESTRATOR", "LoopDriver", "LoopPresence", "Orchestrator", "build_app", "rpc_methods"]

log = logging.getLogger("haif.orchestrator")

_KEY_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass
class _Seen:
    """What a present worker last said (whether it is present: ``Presence``)."""

    snapshot: WorkerSnapshot
    resources: Resources | None = None  # what its host used, as it last said
    sampling: tuple[str, ...] | None = None  # the parameters it honours (None: all)


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
        default_heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        cluster_auth: ClusterAuth | None = None,
        service_tls: ServiceTls | None = None,
        region: str = "",
        wall: Callable[[], float] = time.time,
        journal: Journal | None = None,
        shutdown_grace_s: float = 5.0,
        leader_lease_s: float | None = None,
        lease_store: Callable[[], Awaitable[MetadataStore]] | None = None,
        name: str = "orchestrator",
    ) -> None:
        """``leader_lease_s``: one of a standby pair sharing the store, leading while it
        holds the store's leader lease of this length (:mod:`haif.runtime.leadership`),
        which a thread of its own renews over ``lease_store`` (a second connection to
        the same store); ``None``: the only orchestrator, always serving."""
        if leader_lease_s is not None and lease_store is None:
            raise ValueError("a standby pair's orchestrator needs lease_store")
        from haif.seeding import derive_rng

        self.config = config
        self.store = store
        #: The store's clock (leases, row times), shared by every orchestrator.
        self.wall = wall
        self.evict_after_missed = evict_after_missed
        self.cluster_auth = cluster_auth
        #: What every RPC to this orchestrator must carry (None: nothing).
        self.envelope_auth = (
            EnvelopeAuth(cluster_auth.keyring, ORCHESTRATOR_AUDIENCE, methods=ORCHESTRATOR_METHODS)
            if cluster_auth is not None
            else None
        )
        #: Mutual TLS: the server context it is served with, its client context
        #: to the workers, and the role check of every caller's certificate.
        self.service_tls = service_tls
        self.peer_auth = PeerAuth(ORCHESTRATOR_METHODS) if service_tls is not None else None
        self._refusals = LogThrottle()
        # The simulator's core of a region draws from "core:<region>": the same
        # seed and region give the same placement draws in both shells.
        self._rng: random.Random = derive_rng(seed, f"core:{region}" if region else "core")
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._pending: dict[str, Pending] = {}  # running requests, by internal id
        self._workers: dict[str, str] = {}  # worker_id -> base URL
        self._seen: dict[str, _Seen] = {}  # last heartbeat of each present worker
        # What every present worker honours (None: to recompute after a change).
        self._sampling_everywhere: frozenset[str] | None = None
        # Which workers are present, stale, evicted: the pure rule (until a
        # worker's second heartbeat its interval is assumed default_heartbeat_s).
        self._presence = Presence(
            PresenceConfig(
                evict_after_missed=evict_after_missed, default_interval_s=default_heartbeat_s
            )
        )
        self.reconciler = Reconciler(
            store,
            self._pending,
            self._job_id,
            lease_ttl_s=lease_ttl_s,
            interval_s=reconcile_interval_s,
            wall=wall,
        )
        self.lease_ttl_s = lease_ttl_s
        self.leadership = (
            Leadership(
                lease_store,
                holder_id(name),
                ttl_s=leader_lease_s,
                wall=wall,
                on_elected=self._take_over,
            )
            if leader_lease_s is not None and lease_store is not None
            else None
        )
        self._writes = WriteQueue(on_drained=self._drained)
        #: Where settlements are durable before the answer ends (None: the store is).
        self.journal = journal
        self.shutdown_grace_s = shutdown_grace_s
        self.reservations = Reservations(
            store,
            self._pending,
            self._admit,
            self._writes,
            lease_ttl_s=lease_ttl_s,
            wait_limit_s=rpc_timeout_s,
            wall=wall,
            epoch=self._epoch,
        )
        self.dead_letters = DeadLetters(
            store, self._writes, self._job_id, self._resubmit, wall=wall
        )
        self.attempts = Attempts(
            now=self._now,
            feed=self._feed,
            running=self._pending,
            workers=self._workers,
            spawn=self._spawn,
            rpc_timeout_s=rpc_timeout_s,
            idle_timeout_s=idle_timeout_s,
            signer=cluster_auth.signer if cluster_auth is not None else None,
            tls=service_tls,
        )
        self.driver: LoopDriver | None = None
        self._presence_driver: LoopPresence | None = None
        self.metrics = telemetry.OrchestratorMetrics()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.driver = LoopDriver(loop, ControlCore(self.config, self._rng), self.execute)
        self._presence_driver = LoopPresence(
            self.driver,
            self._presence,
            on_evicted=self._on_evicted,
            on_rejoined=self._on_rejoined,
        )
        self.attempts.open()
        if self.journal is not None:
            for found in self.journal.open():
                self._writes.put(
                    f"journal:{found.settlement.job_id}",
                    f"journaled settlement {found.settlement.job_id}",
                    functools.partial(self._replay_settlement, found),
                )
        self._loops.extend(asyncio.create_task(c) for c in self.reconciler.loops())
        if self.leadership is not None:
            self._loops.append(asyncio.create_task(self.leadership.run()))
        if self.service_tls is not None:  # new certificates, without a restart
            self._loops.append(asyncio.create_task(self.service_tls.watch()))
        log.info(
            "orchestrator started: placement %s, store %s%s%s",
            self.config.placement,
            type(self.store).__name__,
            ", RPC sealed with cluster keys" if self.cluster_auth is not None else "",
            ", mutual TLS as " + self.service_tls.identity.name if self.service_tls else "",
        )

    async def stop(self) -> None:
        if self.leadership is not None:
            await self.leadership.release()  # the standby takes new requests at once
        if self._presence_driver is not None:
            self._presence_driver.close()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.attempts.close()
        while self._tasks:  # attempts, and answers waiting for their settlements
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._writes.close(self.shutdown_grace_s)
        if self.journal is not None:
            left = await self.journal.close()
            if left:
                log.warning(
                    "journal: %d settlement(s) not in the store yet; next start writes them", left
                )
        await self.store.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _now(self) -> float:
        """The core's clock."""
        assert self.driver is not None
        return self.driver.now()

    def _feed(self, event: Event) -> None:
        assert self.driver is not None
        self.driver.feed(event)

    def _job_id(self, rid: str) -> str:
        return self.reservations.job_id(rid)

    def _epoch(self) -> int | None:
        return self.leadership.epoch if self.leadership is not None else None

    @property
    def leading(self) -> bool:
        """Does this orchestrator take requests (always, without a standby)?"""
        return self.leadership is None or self.leadership.leading

    async def _take_over(self, epoch: int) -> None:
        """Elected under ``epoch``: expire what older leaders left open, before serving."""
        expired = await self.store.expire_jobs_before_epoch(epoch, self.wall())
        self.metrics.leader_epoch.set(epoch)
        log.warning(
            "taking over as leader (epoch %d): expired %d open job(s) of older epochs%s",
            epoch,
            len(expired),
            f": {', '.join(expired[:20])}" if expired else "",
        )

    def _drained(self, rid: str) -> None:
        if rid not in self._pending:  # its last write is done
            self.reservations.forget(rid)

    # ------------------------------------------------------------ submission

    async def _enter(
        self, body: object, *, replay_of: DeadLetterRow | None = None
    ) -> Pending | SubmitReply:
        if not isinstance(body, Request):
            raise RpcError("bad_request", "submit expects a Request")
        if not self.leading:
            raise RpcError("not_leader", "this orchestrator is the standby", 503)
        self._check_sampling(body)
        return await self.reservations.enter(body, replay_of=replay_of)

    def _check_sampling(self, request: Request) -> None:
        """Refuse (400 ``unsupported_parameter``) a sampling parameter that no fresh
        worker of the request's model honours, before the request runs.

        Why here: the orchestrator is the one place that knows the fleet, from
        the heartbeats (each worker announces what its engine honours), and a
        refusal before admission costs no attempt, no retry and no dead letter.
        With a mixed fleet the request runs when some fresh worker of its model
        honours every parameter it sets; placement does not look at sampling,
        so a worker that cannot honour one still refuses the attempt
        (``bad_request``, not retried: a 400 at the gateway) rather than ignore
        it. The message starts with the parameter's name and a colon (the
        gateway's ``param``). With no fresh worker of the model the core
        decides as for any request.
        """
        if request.sampling is None:
            return
        wanted = request.sampling.requested()
        everywhere = self._sampling_everywhere
        if everywhere is None:
            everywhere = self._sampling_everywhere = frozenset(SAMPLING_PARAMETERS).intersection(
                *(p.sampling for p in self._seen.values() if p.sampling is not None)
            )
        if everywhere.issuperset(wanted):  # the common case, without a pass over the fleet
            return
        serving = [
            self._seen[wid]
            for wid in self.status().fresh_workers
            if request.model
            in (*self._seen[wid].snapshot.models_warm, *self._seen[wid].snapshot.models_loadable)
        ]
        if not serving or any(
            p.sampling is None or set(wanted) <= set(p.sampling) for p in serving
        ):
            return
        # Named: the first parameter no worker honours, else one the first worker lacks.
        lacking = [n for n in wanted if not any(n in (p.sampling or ()) for p in serving)]
        name = (
            lacking[0]
            if lacking
            else next(n for n in wanted if n not in (serving[0].sampling or ()))
        )
        raise RpcError(
            "unsupported_parameter",
            f"{name}: no worker serving {request.model} can honour it",
            400,
        )

    def _admit(self, body: Request, rid: str, replay_of: DeadLetterRow | None) -> Pending:
        now = self._now()
        # Arrival and deadline on this process's clock.
        deadline = None
        if body.deadline_s is not None:
            deadline = now + max(0.0, body.deadline_s - body.arrival_s)
        request = replace(body, request_id=rid, arrival_s=now, deadline_s=deadline)
        future: asyncio.Future[SubmitReply] = asyncio.get_running_loop().create_future()
        pending = Pending(
            request,
            body.request_id,
            future,
            replay_of=replay_of,
            trace_ctx=telemetry.current_context(),
        )
        self._pending[rid] = pending
        self._feed(Submit(request))
        return pending

    async def _submit(self, body: object, *, replay_of: DeadLetterRow | None = None) -> SubmitReply:
        entered = await self._enter(body, replay_of=replay_of)
        if isinstance(entered, SubmitReply):
            return entered
        entered.callers += 1
        try:
            # Shielded: a caller that leaves must not cancel what other callers await.
            return await asyncio.shield(entered.result)
        finally:
            self._left(entered)

    async def _resubmit(self, request: Request, entry: DeadLetterRow) -> SubmitReply:
        return await self._submit(request, replay_of=entry)

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
        pending.callers += 1
        try:
            while True:
                frame = await queue.get()
                yield frame
                if isinstance(frame, SubmitReply):
                    return
        finally:
            # The stream ended, or the caller left: stop queueing its frames.
            pending.unlisten(queue)
            self._left(pending)

    def _left(self, pending: Pending) -> None:
        """A caller stopped waiting; if it was the last and no answer came, stop the request.

        The core cancels its running attempt (the worker aborts it when its
        connection closes) and finalizes it as ``cancelled``, billed for the
        tokens relayed until then.
        """
        pending.callers -= 1
        rid = pending.request.request_id
        if pending.callers <= 0 and pending.final is None and self._pending.get(rid) is pending:
            self.metrics.cancelled.inc()
            log.info("request %s: every caller left; cancelling it", rid)
            self._feed(ClientGone(rid, pending.delivered))

    # ------------------------------------------------------------ presence

    def _check_announcer(self, wid: str, url: str) -> None:
        """Refuse ``wid`` unless the caller is worker ``wid``: its certificate (mutual TLS)
        names ``wid``, and (cluster keys) the call was sealed by the key named ``wid``."""
        if self.service_tls is not None:
            identity = caller_identity()
            if identity is None or identity.name != wid:
                name = identity.name if identity is not None else None
                if self._refusals.due((wid, name)):
                    log.warning(
                        "refused the announcement of worker %r: the caller's certificate names %r",
                        wid,
                        name,
                    )
                raise RpcError(
                    "wrong_worker",
                    f"worker {wid!r} may only be announced with its own certificate",
                    403,
                )
            if not url.startswith("https://"):
                raise RpcError(
                    "bad_request",
                    f"worker {wid!r} announced {url!r}: this cluster's workers serve https://",
                )
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
        assert self._presence_driver is not None
        wid = body.snapshot.worker_id
        self._check_announcer(wid, body.url)
        self._workers[wid] = body.url
        presence = self._seen.get(wid)
        if presence is None:
            self._seen[wid] = _Seen(body.snapshot, body.resources, body.sampling)
            self._sampling_everywhere = None
        else:
            presence.snapshot, presence.resources = body.snapshot, body.resources
            if presence.sampling != body.sampling:
                presence.sampling = body.sampling
                self._sampling_everywhere = None
        self._presence_driver.heartbeat(body.snapshot)  # presence, then the core
        return True

    @property
    def evictions(self) -> int:
        """Workers evicted since start."""
        return self._presence.evictions

    def _on_evicted(self, evicted: Evicted) -> None:
        self._seen.pop(evicted.worker_id, None)
        self._sampling_everywhere = None
        self.metrics.evictions.inc()
        log.warning(
            "evicting worker %s: no heartbeat for %.2f s (%d intervals of %.2f s)",
            evicted.worker_id,
            evicted.silent_s,
            self.evict_after_missed,
            evicted.interval_s,
        )

    def _on_rejoined(self, rejoined: Rejoined) -> None:
        log.info("worker %s is back after its eviction", rejoined.worker_id)

    def evict_stale(self) -> list[str]:
        """Evict workers silent for ``evict_after_missed`` heartbeat intervals.

        The presence timer does this by itself at each eviction's time.
        """
        assert self._presence_driver is not None
        return sorted(e.worker_id for e in self._presence_driver.check())

    def stale_workers(self) -> list[str]:
        """Present workers that missed at least one heartbeat (not evicted yet)."""
        assert self.driver is not None
        return self._presence.stale(self.driver.now())

    def presence(self) -> dict[str, Any]:
        status = self.status()
        return {
            "ready": status.ready and self.leading,
            "leader": self.leading,
            "epoch": self._epoch(),
            "fresh_workers": list(status.fresh_workers),
            "stale_workers": self.stale_workers(),
            "evicted_workers": self._presence.evicted(),
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
            if p.snapshot.healthy and now - self._last_seen(wid) <= self.config.stale_after_s
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

    def _last_seen(self, wid: str) -> float:
        seen = self._presence.last_seen(wid)
        return seen if seen is not None else -math.inf

    async def refresh_metrics(self) -> None:
        """Set the gauges of ``GET /metrics`` from the core, presence and the store."""
        if self.driver is None:
            return
        core, now, m = self.driver.core, self.driver.now(), self.metrics
        m.in_flight.set(core.in_flight())
        m.leader.set(1 if self.leading else 0)
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
        await m.refresh_store(self.store)  # dlq_size, and store_up: did the store answer

    # ------------------------------------------------------------ dead letters

    async def rpc_dlq_list(self, _body: object) -> list[dict[str, Any]]:
        return await self.dead_letters.list()

    async def rpc_dlq_show(self, body: object) -> dict[str, Any]:
        return await self.dead_letters.show(body)

    async def rpc_dlq_replay(self, body: object) -> dict[str, Any]:
        """Resubmit a dead letter; remove it from the queue if the replay succeeds."""
        return await self.dead_letters.replay(body)

    # ------------------------------------------------------------ decisions

    def execute(self, decision: Decision) -> None:
        self.metrics.count_decision(decision, self._pending)
        if isinstance(decision, Dispatch):
            if decision.attempt > 1:
                self.metrics.retries.inc()
            self.attempts.start(decision)
            self._write_running(decision.request_id, decision.worker_id)
        elif isinstance(decision, Cancel):
            self.attempts.cancel(decision.request_id, decision.attempt)
        elif isinstance(decision, Reject):
            pending = self._pending.get(decision.request_id)
            if pending is not None:
                pending.reject = decision
        elif isinstance(decision, DeadLetter):
            self.metrics.dead_letters.inc()
            self.dead_letters.record(decision, self._pending.get(decision.request_id))
        elif isinstance(decision, Finalize):
            self._settle(decision.record, self._pending.get(decision.record.request_id))

    def _write_running(self, rid: str, worker_id: str) -> None:
        now = self.wall()
        self._writes.put(
            rid,
            f"job {rid} running",
            lambda: self.store.set_job_status(
                self._job_id(rid), "running", now, worker_id, expires_s=now + self.lease_ttl_s
            ),
            interim=True,
        )

    def _settle(self, record: RequestRecord, pending: Pending | None) -> None:
        """The request is over: its callers are answered, its settlement goes to the store.

        A refused request (it never ran) bills nothing: its record is written,
        its job released, and its callers answered at once. Any other request
        is answered only once its settlement is durable, and billed in the
        store only once its answer left:

        - with a journal: fsync the settlement, answer, mark it delivered,
          then write it to the store (retried until it succeeds);
        - without one: write it to the store, answer once it committed.
        """
        rid = record.request_id
        now = self.wall()
        if record.status == "rejected":
            # Refused before it ran: nothing to bill; release the job (and its key).
            async def release() -> None:
                job_id = self._job_id(rid)
                await self.store.write_record(replace(record, request_id=job_id))
                await self.store.set_job_status(job_id, "expired", now)

            self._writes.put(rid, f"refused {rid}", release)
            self._answer(record)
            return
        text = pending.text if pending is not None else ""
        reject = pending.reject if pending is not None else None
        finish = pending.finish_reason if pending is not None else None
        blob = encode(SubmitReply(record, text, reject, finish))
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def finalize() -> None:
            job_id = self._job_id(rid)
            if not await self.store.finalize(job_id, replace(record, request_id=job_id), blob, now):
                log.warning("request %s was already finalized; usage left as it was", rid)
            if not committed.done():
                committed.set_result(None)

        if self.journal is None or pending is None:
            self._writes.put(rid, f"finalize {rid}", finalize)
            self._spawn(self._answer_when(record, committed))
            return
        request = pending.request
        settlement = Settlement(
            self._job_id(rid),
            request.tenant,
            request.idempotency_key,
            request_body_hash(request),
            replace(record, request_id=self._job_id(rid)),
            blob,
            now,
        )
        self._spawn(self._journal_then_answer(settlement, record, finalize, committed))

    async def _answer_when(self, record: RequestRecord, committed: asyncio.Future[None]) -> None:
        await asyncio.shield(committed)
        self._answer(record)

    async def _journal_then_answer(
        self,
        settlement: Settlement,
        record: RequestRecord,
        finalize: Callable[[], Coroutine[Any, Any, None]],
        committed: asyncio.Future[None],
    ) -> None:
        rid = record.request_id
        journal = self.journal
        assert journal is not None
        try:
            segment = await journal.append(settlement)
        except Exception:
            log.exception("journal append failed for %s; the store decides", rid)
            self._writes.put(rid, f"finalize {rid}", finalize)
            await self._answer_when(record, committed)
            return
        self._answer(record)
        journal.delivered(settlement.job_id)
        committed.add_done_callback(lambda _f: journal.settle(segment))
        self._writes.put(rid, f"finalize {rid}", finalize)

    def _answer(self, record: RequestRecord) -> None:
        pending = self._pending.pop(record.request_id, None)
        if pending is not None:
            pending.finish(record)

    async def _replay_settlement(self, found: Found) -> None:
        """Write an earlier run's journaled settlement to the store (exactly once there).

        One whose answer never left (the process died between its fsync and
        its answer) is recorded as failed and billed nothing; its job is
        expired, so a resend with its key runs again.
        """
        s = found.settlement
        job = JobRow(s.job_id, s.tenant, s.idempotency_key, s.body_hash, expires_s=s.at_s)
        held = (await self.store.reserve(job, s.at_s)).job
        job_id = s.job_id
        if held.request_id != s.job_id or (held.tenant, held.body_hash) != (s.tenant, s.body_hash):
            # Its id (or key) went to another request meanwhile: settle under a fresh id.
            job_id = suffixed(s.job_id)
            await self.store.reserve(replace(job, request_id=job_id, idempotency_key=None), s.at_s)
        if found.delivered:
            await self.store.finalize(job_id, replace(s.record, request_id=job_id), s.reply, s.at_s)
        elif held.status not in ("done", "failed"):
            lost = replace(s.record, request_id=job_id, status="failed", reason="answer_lost")
            await self.store.write_record(replace(lost, output_tokens=0, cost=0.0))
            await self.store.set_job_status(job_id, "expired", s.at_s)
            log.warning("request %s: its answer died with the process; not billed", job_id)
        assert self.journal is not None
        self.journal.settle(found.segment)

    # ------------------------------------------------------------ store upkeep

    async def reconcile(self) -> list[str]:
        """Expire reservations whose lease ended (leaked by a dead orchestrator)."""
        return await self.reconciler.reconcile()

    async def renew_leases(self) -> None:
        """Extend the lease of every request still running here."""
        await self.reconciler.renew_leases()


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
        **api_keys.rpc_methods(orch.store),
    }
    return unary, {"submit_stream": orch.rpc_submit_stream}


def build_app(orch: Orchestrator) -> web.Application:
    app = web.Application()
    app[ORCHESTRATOR] = orch
    if orch.service_tls is not None:
        export_expiry(orch.metrics.registry, orch.service_tls)
    unary, streams = rpc_methods(orch)
    add_rpc_routes(
        app,
        unary,
        streams,
        service="orchestrator",
        auth=orch.envelope_auth,
        peer_auth=orch.peer_auth,
    )

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
