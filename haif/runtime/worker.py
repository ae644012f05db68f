"""The runtime worker: hosts an engine, streams ``infer_stream``, sends heartbeats.

Engine interface
----------------
An engine is anything with ``stream(request, start) -> AsyncIterator[TokenChunk]``
(:class:`Engine`): it yields the response's tokens from index ``start`` on,
in order, as :class:`~haif.runtime.messages.TokenChunk` text deltas. The
worker wraps it with queueing (``capacity`` slots), accounting and the RPC.

:class:`SyntheticEngine` yields deterministic tokens timed like the
simulator's service model: the first token ``ttft_s`` after the call (the
prefill of the prompt, plus the already-produced tokens when resuming), the
rest spread evenly so that a full response takes ``mean_s``. Token ``i`` of a
request depends only on the request id and ``i`` — the same on every worker —
so a response resumed on another worker continues exactly where the first
one stopped.

RPC
---
``infer_stream(InferCall)`` streams ``TokenChunk`` frames then one
``InferEnd`` (framing in :mod:`haif.runtime.rpc`; keepalives while queued or
in prefill). ``infer(Request | InferCall)`` is the unary form returning an
``InferReply`` with the whole text. If the caller goes away mid-stream the
generation stops and the slot is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp import web

from haif.contracts import Request, WorkerSnapshot
from haif.runtime.messages import Announce, InferCall, InferEnd, InferReply, TokenChunk
from haif.runtime.rpc import RpcClient, RpcError, RpcUnavailable, add_rpc_routes

log = logging.getLogger("haif.worker")

#: Most tokens one frame carries (tokens due at the same instant are batched).
MAX_CHUNK_TOKENS = 256


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker_id: str
    region: str
    url: str
    orchestrator_url: str
    gpu_class: str = "A100-80G"
    capacity: int = 8
    models: tuple[str, ...] = ("llama-3-8b",)
    mean_s: float = 0.05
    ttft_s: float = 0.01
    heartbeat_s: float = 0.5
    price_per_hour: float = 2.21


class Engine(Protocol):
    """What a worker hosts: a token stream for a request, from a token index on."""

    def stream(self, request: Request, start: int = 0) -> AsyncIterator[TokenChunk]: ...


def _seed(request_id: str) -> bytes:
    return hashlib.sha256(request_id.encode()).digest()


def synthetic_token(seed: bytes, index: int) -> str:
    return f"tok{seed[index % len(seed)] + index}"


def synthetic_piece(seed: bytes, index: int) -> str:
    """Token ``index`` as it appears in the text (space-separated tokens)."""
    token = synthetic_token(seed, index)
    return token if index == 0 else " " + token


class SyntheticEngine:
    """Deterministic text, timed by a fixed service model."""

    def __init__(self, mean_s: float, ttft_s: float) -> None:
        self.mean_s = mean_s
        self.ttft_s = min(ttft_s, mean_s)

    @staticmethod
    def tokens(request: Request) -> list[str]:
        seed = _seed(request.request_id)
        return [synthetic_token(seed, i) for i in range(request.max_tokens)]

    @staticmethod
    def text(request: Request) -> str:
        """The whole response text (what the concatenated stream must equal)."""
        return " ".join(SyntheticEngine.tokens(request))

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        """Tokens ``start..max_tokens-1``: the first after ``ttft_s``, then evenly paced."""
        n = request.max_tokens
        if start >= n:
            return
        seed = _seed(request.request_id)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        step = (self.mean_s - self.ttft_s) / max(1, n - 1)
        i = start
        while i < n:
            due = t0 + self.ttft_s + (i - start) * step
            now = loop.time()
            if now < due:
                await asyncio.sleep(due - now)
                now = loop.time()
            late = int((now - due) / step) if step > 0 else n
            j = min(n, i + 1 + late, i + MAX_CHUNK_TOKENS)
            yield TokenChunk(i, tuple(synthetic_piece(seed, k) for k in range(i, j)))
            i = j

    async def generate(self, request: Request) -> tuple[str, float, float]:
        """Return (text, ttft_s, service_s) after the modelled service time."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        ttft: float | None = None
        pieces: list[str] = []
        async for chunk in self.stream(request):
            if ttft is None:
                ttft = loop.time() - start
            pieces.extend(chunk.texts)
        return "".join(pieces), ttft or 0.0, loop.time() - start


class Worker:
    def __init__(self, spec: WorkerSpec, engine: Engine | None = None) -> None:
        self.spec = spec
        self.engine: Engine = engine or SyntheticEngine(spec.mean_s, spec.ttft_s)
        self._slots = asyncio.Semaphore(spec.capacity)
        self._waiting = 0
        self._running = 0
        self._session: aiohttp.ClientSession | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    def snapshot(self) -> WorkerSnapshot:
        s = self.spec
        return WorkerSnapshot(
            worker_id=s.worker_id,
            region=s.region,
            gpu_class=s.gpu_class,
            models_warm=s.models,
            models_loadable=s.models,
            queue_depth=self._waiting,
            running=self._running,
            capacity=s.capacity,
            healthy=True,
            price_per_hour=s.price_per_hour,
        )

    def _call(self, body: object) -> InferCall:
        if isinstance(body, Request):
            body = InferCall(body)
        if not isinstance(body, InferCall) or not isinstance(body.request, Request):
            raise RpcError("bad_request", "infer expects an InferCall or a Request")
        if body.request.model not in self.spec.models:
            raise RpcError("model_not_loaded", f"{body.request.model} is not served here")
        if not 0 <= body.resume_tokens <= body.request.max_tokens:
            raise RpcError("bad_request", f"resume_tokens {body.resume_tokens} out of range")
        return body

    async def rpc_infer_stream(self, body: object) -> AsyncGenerator[TokenChunk | InferEnd, None]:
        call = self._call(body)
        request = call.request
        loop = asyncio.get_running_loop()
        received = loop.time()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        first: float | None = None
        try:
            started = loop.time()
            async for chunk in self.engine.stream(request, call.resume_tokens):
                if first is None:
                    first = loop.time()
                yield chunk
            finished = loop.time()
        finally:
            self._running -= 1
            self._slots.release()
        service = finished - started
        cost = service * self.spec.price_per_hour / 3600.0 / self.spec.capacity
        yield InferEnd(
            output_tokens=request.max_tokens,
            ttft_s=(first if first is not None else finished) - received,
            service_s=finished - received,
            cost=cost,
        )

    async def rpc_infer(self, body: object) -> InferReply:
        pieces: list[str] = []
        end: InferEnd | None = None
        async for frame in self.rpc_infer_stream(body):
            if isinstance(frame, TokenChunk):
                pieces.extend(frame.texts)
            else:
                end = frame
        assert end is not None
        return InferReply(
            text="".join(pieces),
            output_tokens=end.output_tokens,
            ttft_s=end.ttft_s,
            service_s=end.service_s,
            cold_start=end.cold_start,
            cost=end.cost,
        )

    async def _heartbeats(self) -> None:
        assert self._session is not None
        client = RpcClient(self._session, self.spec.orchestrator_url, timeout_s=2.0)
        while True:
            try:
                await client.call("heartbeat", Announce(self.snapshot(), self.spec.url))
            except (RpcUnavailable, RpcError) as exc:
                log.warning("heartbeat to %s failed: %s", self.spec.orchestrator_url, exc)
            await asyncio.sleep(self.spec.heartbeat_s)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._heartbeat_task = asyncio.create_task(self._heartbeats())

    async def stop(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        if self._session is not None:
            await self._session.close()


def build_app(worker: Worker) -> web.Application:
    app = web.Application()
    add_rpc_routes(app, {"infer": worker.rpc_infer}, {"infer_stream": worker.rpc_infer_stream})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "worker_id": worker.spec.worker_id})

    async def on_startup(_app: web.Application) -> None:
        await worker.start()

    async def on_cleanup(_app: web.Application) -> None:
        await worker.stop()

    app.router.add_get("/healthz", healthz)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
