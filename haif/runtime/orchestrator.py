"""The runtime orchestrator: the control core on the asyncio clock.

:class:`LoopDriver` is the whole difference from the simulator's driver:
``loop.time()`` instead of ``env.now`` and ``loop.call_at`` instead of a
SimPy timeout. :class:`Orchestrator` executes the core's decisions with
real I/O — msgpack RPC to workers, records and dead letters in the store —
and answers the gateway's ``submit`` calls when the core finalizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
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
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore
from haif.control.driver import CoreDriver, Sink
from haif.runtime.messages import Announce, InferReply, SubmitReply
from haif.runtime.rpc import RpcClient, RpcError, RpcUnavailable, add_rpc_routes
from haif.runtime.store import DuckDBStore

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
    text: str = ""
    reject: Reject | None = None


class Orchestrator:
    def __init__(
        self,
        config: CoreConfig,
        store: DuckDBStore,
        *,
        seed: int = 0,
        rpc_timeout_s: float = 300.0,
    ) -> None:
        from haif.seeding import derive_rng

        self.config = config
        self.store = store
        self._rng: random.Random = derive_rng(seed, "core")
        self._rpc_timeout_s = rpc_timeout_s
        self._workers: dict[str, str] = {}  # worker_id -> base URL
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
        self._session = aiohttp.ClientSession()
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

    async def rpc_submit(self, body: object) -> SubmitReply:
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
        self._pending[request.request_id] = _Pending(request, future)
        self.driver.feed(Submit(request))
        return await future

    async def rpc_heartbeat(self, body: object) -> bool:
        if not isinstance(body, Announce):
            raise RpcError("bad_request", "heartbeat expects an Announce")
        assert self.driver is not None
        self._workers[body.snapshot.worker_id] = body.url
        self.driver.feed(Heartbeat(body.snapshot))
        return True

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
        if pending is not None and not pending.future.done():
            pending.future.set_result(SubmitReply(record, pending.text, pending.reject))

    async def _attempt(self, dispatch: Dispatch) -> None:
        assert self.driver is not None and self._session is not None
        rid, attempt = dispatch.request_id, dispatch.attempt
        pending = self._pending[rid]
        started = self.driver.now()
        url = self._workers.get(dispatch.worker_id)
        try:
            if url is None:
                raise RpcUnavailable(f"unknown worker {dispatch.worker_id}")
            client = RpcClient(self._session, url, self._rpc_timeout_s)
            reply = await client.call("infer", pending.request)
            if not isinstance(reply, InferReply):
                raise RpcError("bad_reply", "infer did not return an InferReply")
            now = self.driver.now()
            pending.text = reply.text
            result = AttemptResult(
                request_id=rid,
                attempt=attempt,
                worker_id=dispatch.worker_id,
                ok=True,
                started_s=started,
                finish_s=now,
                first_token_s=now - (reply.service_s - reply.ttft_s),
                output_tokens=reply.output_tokens,
                cold_start=reply.cold_start,
                cost=reply.cost,
            )
        except RpcUnavailable as exc:
            log.warning("attempt %s/%d on %s: %s", rid, attempt, dispatch.worker_id, exc)
            result = self._failure(dispatch, started, "connection_error", True)
        except RpcError as exc:
            retryable = exc.code in ("overloaded", "unavailable", "internal")
            result = self._failure(dispatch, started, exc.code, retryable)
        finally:
            self._attempts.pop((rid, attempt), None)
        self.driver.feed(result)

    def _failure(
        self, dispatch: Dispatch, started: float, error: str, retryable: bool
    ) -> AttemptResult:
        assert self.driver is not None
        return AttemptResult(
            request_id=dispatch.request_id,
            attempt=dispatch.attempt,
            worker_id=dispatch.worker_id,
            ok=False,
            started_s=started,
            finish_s=self.driver.now(),
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


def decision_request_id(decision: Finalize | DeadLetter) -> str:
    return decision.record.request_id if isinstance(decision, Finalize) else decision.request_id


def build_app(orch: Orchestrator) -> web.Application:
    app = web.Application()
    add_rpc_routes(app, {"submit": orch.rpc_submit, "heartbeat": orch.rpc_heartbeat})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def on_startup(_app: web.Application) -> None:
        await orch.start()

    async def on_cleanup(_app: web.Application) -> None:
        with contextlib.suppress(Exception):
            await orch.stop()

    app.router.add_get("/healthz", healthz)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
