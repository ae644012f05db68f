"""The runtime orchestrator: the control core on the asyncio clock.

:class:`LoopDriver` is the whole difference from the simulator's driver:
``loop.time()`` instead of ``env.now`` and ``loop.call_at`` instead of a
SimPy timeout. :class:`Orchestrator` executes the core's decisions with
real I/O — msgpack RPC to workers, records and dead letters in the store —
and answers the gateway when the core finalizes.

RPC methods (framing in :mod:`haif.runtime.rpc`)
-------------------------------------------------
- ``submit_stream(Request)`` (streaming): ``TokenChunk`` frames as the
  request's attempts produce tokens, then one ``SubmitReply`` (the final
  record, with the core's ``Reject`` if it refused). The gateway uses it for
  streaming and non-streaming requests alike.
- ``submit(Request) -> SubmitReply`` (unary): the same, text collected.
- ``heartbeat(Announce) -> True``: a worker's presence and load.
- ``auth_key(key_hash) -> tenant | None``: API-key lookup by SHA-256 hex
  digest in the store (unknown and revoked keys answer ``None``).
- ``status(None) -> OrchestratorStatus``: fresh workers, models, load; the
  gateway's ``/readyz`` is ready when at least one worker is fresh.
  ``GET /readyz`` answers the same as JSON (503 when no worker is fresh).

Streaming and mid-stream failure
--------------------------------
Each ``Dispatch`` runs as one task that calls the worker's ``infer_stream``
with the ``resume_tokens`` the core chose and relays its ``TokenChunk``s to
the request's ``submit_stream`` caller. The relay keeps, per request, the
number of tokens already delivered and forwards only the next indexes, so
the client sees one sequence without gaps or duplicates whichever attempt
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
import logging
import random
import re
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web

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
    WorkerSnapshot,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore
from haif.control.driver import CoreDriver, Sink
from haif.runtime.messages import (
    Announce,
    InferCall,
    InferEnd,
    OrchestratorStatus,
    SubmitReply,
    TokenChunk,
)
from haif.runtime.rpc import RpcClient, RpcError, RpcUnavailable, add_rpc_routes
from haif.runtime.store import MetadataStore

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


@dataclass
class _Pending:
    request: Request
    future: asyncio.Future[SubmitReply]
    frames: asyncio.Queue[TokenChunk | SubmitReply] = field(default_factory=asyncio.Queue)
    listening: bool = True  # a submit_stream caller still reads ``frames``
    collect: bool = False  # keep the text (unary submit)
    pieces: list[str] = field(default_factory=list)
    delivered: int = 0  # response tokens relayed so far, across attempts
    attempt: int = 0  # the attempt whose tokens are relayed now
    reject: Reject | None = None


class Orchestrator:
    def __init__(
        self,
        config: CoreConfig,
        store: MetadataStore,
        *,
        seed: int = 0,
        rpc_timeout_s: float = 300.0,
        idle_timeout_s: float = 10.0,
    ) -> None:
        from haif.seeding import derive_rng

        self.config = config
        self.store = store
        self._rng: random.Random = derive_rng(seed, "core")
        self._rpc_timeout_s = rpc_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._workers: dict[str, str] = {}  # worker_id -> base URL
        self._seen: dict[str, tuple[WorkerSnapshot, float]] = {}  # last heartbeat, our clock
        self._pending: dict[str, _Pending] = {}
        self._attempts: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writes: asyncio.Queue[tuple[Decision, Request | None] | None] = asyncio.Queue()
        self.driver: LoopDriver | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.driver = LoopDriver(loop, ControlCore(self.config, self._rng), self.execute)
        # No connection cap: every running attempt holds one worker connection.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._spawn(self._writer())

    async def stop(self) -> None:
        for task in list(self._attempts.values()):
            task.cancel()
        await self._writes.put(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await self.store.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ RPC handlers

    def _admit(self, body: object, *, collect: bool) -> _Pending:
        if not isinstance(body, Request):
            raise RpcError("bad_request", "submit expects a Request")
        assert self.driver is not None
        if body.request_id in self._pending:
            raise RpcError("conflict", f"request {body.request_id} is already running")
        now = self.driver.now()
        # Arrival and deadline on this process's clock.
        deadline = None
        if body.deadline_s is not None:
            deadline = now + max(0.0, body.deadline_s - body.arrival_s)
        request = replace(body, arrival_s=now, deadline_s=deadline)
        future: asyncio.Future[SubmitReply] = asyncio.get_running_loop().create_future()
        pending = _Pending(request, future, collect=collect, listening=not collect)
        self._pending[request.request_id] = pending
        self.driver.feed(Submit(request))
        return pending

    async def rpc_submit(self, body: object) -> SubmitReply:
        pending = self._admit(body, collect=True)
        return await pending.future

    async def rpc_submit_stream(
        self, body: object
    ) -> AsyncGenerator[TokenChunk | SubmitReply, None]:
        pending = self._admit(body, collect=False)
        try:
            while True:
                frame = await pending.frames.get()
                yield frame
                if isinstance(frame, SubmitReply):
                    return
        finally:
            # The caller left (or the stream ended): stop queueing frames; the
            # request itself runs to its end and is recorded as usual.
            pending.listening = False

    async def rpc_heartbeat(self, body: object) -> bool:
        if not isinstance(body, Announce):
            raise RpcError("bad_request", "heartbeat expects an Announce")
        assert self.driver is not None
        wid = body.snapshot.worker_id
        self._workers[wid] = body.url
        self._seen[wid] = (body.snapshot, self.driver.now())
        self.driver.feed(Heartbeat(body.snapshot))
        return True

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
            for wid, (snap, seen) in self._seen.items()
            if snap.healthy and now - seen <= self.config.stale_after_s
        )
        models = sorted(
            {
                m
                for wid in fresh
                for m in (*self._seen[wid][0].models_warm, *self._seen[wid][0].models_loadable)
            }
        )
        core = self.driver.core
        return OrchestratorStatus(
            fresh_workers=tuple(fresh),
            models=tuple(models),
            outstanding={wid: core.outstanding(wid) for wid in sorted(self._seen)},
            in_flight=core.in_flight(),
        )

    # ------------------------------------------------------------ decisions

    def execute(self, decision: Decision) -> None:
        if isinstance(decision, Dispatch):
            key = (decision.request_id, decision.attempt)
            self._attempts[key] = self._spawn(self._attempt(decision))
        elif isinstance(decision, Cancel):
            task = self._attempts.pop((decision.request_id, decision.attempt), None)
            if task is not None:
                task.cancel()
        elif isinstance(decision, Reject):
            pending = self._pending.get(decision.request_id)
            if pending is not None:
                pending.reject = decision
        elif isinstance(decision, Finalize | DeadLetter):
            pending = self._pending.get(decision_request_id(decision))
            self._writes.put_nowait((decision, pending.request if pending else None))
            if isinstance(decision, Finalize):
                self._resolve(decision.record)

    def _resolve(self, record: RequestRecord) -> None:
        pending = self._pending.pop(record.request_id, None)
        if pending is None:
            return
        if pending.listening:
            pending.frames.put_nowait(SubmitReply(record, "", pending.reject))
        if not pending.future.done():
            text = "".join(pending.pieces)
            pending.future.set_result(SubmitReply(record, text, pending.reject))

    def _relay(self, pending: _Pending, attempt: int, chunk: TokenChunk) -> None:
        """Forward the tokens of ``chunk`` the client has not seen yet."""
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
        pending.delivered += len(new)
        if pending.collect:
            pending.pieces.extend(new)
        if pending.listening:
            pending.frames.put_nowait(out)

    async def _attempt(self, dispatch: Dispatch) -> None:
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
            client = RpcClient(self._session, url, self._rpc_timeout_s)
            call = InferCall(pending.request, dispatch.resume_tokens, attempt)
            end: InferEnd | None = None
            frames = client.stream("infer_stream", call, idle_timeout_s=self._idle_timeout_s)
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if isinstance(frame, TokenChunk):
                        if first_token is None:
                            first_token = self.driver.now()
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

    async def _writer(self) -> None:
        """Persist records and dead letters in decision order, off the hot path."""
        while (item := await self._writes.get()) is not None:
            decision, request = item
            try:
                if isinstance(decision, Finalize):
                    await self.store.write_record(decision.record)
                elif isinstance(decision, DeadLetter) and request is not None:
                    now = self.driver.now() if self.driver else 0.0
                    await self.store.add_dead_letter(decision, request, now)
            except Exception:  # the store must not take the orchestrator down
                log.exception("store write failed for %r", decision)


_KEY_HASH = re.compile(r"[0-9a-f]{64}")
_UNAVAILABLE_ERRORS = {
    "connect": "connection_error",
    "timeout": "timeout",
    "disconnected": "worker_crashed",
}


def decision_request_id(decision: Finalize | DeadLetter) -> str:
    return decision.record.request_id if isinstance(decision, Finalize) else decision.request_id


def build_app(orch: Orchestrator) -> web.Application:
    app = web.Application()
    add_rpc_routes(
        app,
        {
            "submit": orch.rpc_submit,
            "heartbeat": orch.rpc_heartbeat,
            "auth_key": orch.rpc_auth_key,
            "status": orch.rpc_status,
        },
        {"submit_stream": orch.rpc_submit_stream},
    )

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_request: web.Request) -> web.Response:
        status = orch.status()
        return web.json_response(
            {
                "ready": status.ready,
                "fresh_workers": list(status.fresh_workers),
                "in_flight": status.in_flight,
            },
            status=200 if status.ready else 503,
        )

    async def on_startup(_app: web.Application) -> None:
        await orch.start()

    async def on_cleanup(_app: web.Application) -> None:
        with contextlib.suppress(Exception):
            await orch.stop()

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
