"""The runtime worker: hosts an engine, serves ``infer``, sends heartbeats.

The skeleton's engine is :class:`SyntheticEngine`: deterministic tokens
timed like the simulator's service model (first token after ``ttft_s``, done
after ``mean_s``), so a live cluster behaves like the simulated one. Real
engines (transformers, vLLM, OpenAI upstream) come with the runtime issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from haif.contracts import Request, WorkerSnapshot
from haif.runtime.messages import Announce, InferReply
from haif.runtime.rpc import RpcClient, RpcError, RpcUnavailable, add_rpc_routes

log = logging.getLogger("haif.worker")


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


class SyntheticEngine:
    """Deterministic text, timed by a fixed service model."""

    def __init__(self, mean_s: float, ttft_s: float) -> None:
        self.mean_s = mean_s
        self.ttft_s = min(ttft_s, mean_s)

    @staticmethod
    def tokens(request: Request) -> list[str]:
        seed = hashlib.sha256(request.request_id.encode()).digest()
        return [f"tok{seed[i % len(seed)] + i}" for i in range(request.max_tokens)]

    async def generate(self, request: Request) -> tuple[str, float, float]:
        """Return (text, ttft_s, service_s) after the modelled service time."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(self.ttft_s)
        ttft = loop.time() - start
        await asyncio.sleep(self.mean_s - self.ttft_s)
        return " ".join(self.tokens(request)), ttft, loop.time() - start


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.engine = SyntheticEngine(spec.mean_s, spec.ttft_s)
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

    async def rpc_infer(self, body: object) -> InferReply:
        if not isinstance(body, Request):
            raise RpcError("bad_request", "infer expects a Request")
        if body.model not in self.spec.models:
            raise RpcError("model_not_loaded", f"{body.model} is not served here")
        loop = asyncio.get_running_loop()
        received = loop.time()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            started = loop.time()
            text, ttft, service = await self.engine.generate(body)
        finally:
            self._running -= 1
            self._slots.release()
        queued = started - received
        cost = service * self.spec.price_per_hour / 3600.0 / self.spec.capacity
        return InferReply(
            text=text,
            output_tokens=body.max_tokens,
            ttft_s=queued + ttft,
            service_s=queued + service,
            cost=cost,
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
    add_rpc_routes(app, {"infer": worker.rpc_infer})

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
