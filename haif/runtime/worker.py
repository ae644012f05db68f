"""The runtime worker: hosts an engine, streams ``infer_stream``, sends heartbeats.

Engine interface
----------------
An engine is anything with ``stream(request, start) -> AsyncIterator[TokenChunk]``
(:class:`Engine`): it yields the response's tokens from index ``start`` on,
in order, as :class:`~haif.runtime.messages.TokenChunk` text deltas. The
worker wraps it with queueing (``capacity`` slots), accounting and the RPC.
The engines (synthetic, transformers, vLLM, OpenAI upstream) live in the
package :mod:`haif.runtime.engines`, one adapter per module; the worker's
engine options and the engine they build are in :mod:`haif.runtime.engines_cli`.
:class:`SyntheticEngine` is re-exported here.

:class:`SyntheticEngine` yields deterministic tokens timed like the
simulator's service model: the first token ``ttft_s`` after the call (the
prefill of the prompt, plus the already-produced tokens when resuming), the
rest spread evenly so that a full response takes ``mean_s``. Token ``i`` of a
request depends only on the request id and ``i`` — the same on every worker —
so a response resumed on another worker continues exactly where the first
one stopped.

Readiness
---------
An engine that loads a model (:class:`~haif.runtime.engines.ManagedEngine`)
is loaded in :meth:`Worker.start`, before the first heartbeat: a model whose
artifact does not verify (signature or digest) is never announced, and the
worker process exits non-zero (:func:`run_worker`).

Cluster keys
------------
With a :class:`~haif.runtime.cluster_keys.ClusterAuth` (``--cluster-key`` /
``--cluster-keyring``) the worker seals its heartbeats with its own key — the
orchestrator accepts them only under the key named after the worker's id —
and serves only calls sealed by a key of its keyring for its worker id
(:mod:`haif.runtime.rpc`). Without it, nothing is signed or checked.

RPC
---
``infer_stream(InferCall)`` streams ``TokenChunk`` frames then one
``InferEnd`` (framing in :mod:`haif.runtime.rpc`; keepalives while queued or
in prefill). ``InferEnd.output_tokens`` is the length of the response the
engine produced (``max_tokens`` unless it stopped early: end of sequence, a
stop string, an upstream that stopped) and ``InferEnd.finish_reason`` why it
ended (``stop`` / ``length``, from the engine's last chunk).
``infer(Request | InferCall)`` is the unary form returning an ``InferReply``
with the whole text. If the caller goes away mid-stream the generation stops
and the slot is released.

Draining
--------
:meth:`Worker.drain` (``SIGUSR1`` to ``haif worker``) takes the worker out of
placement before it stops: its heartbeats say ``healthy: false`` from then on
(one is sent at once, so the orchestrator stops placing on it within a
round trip), ``/readyz`` answers 503 while ``/healthz`` stays 200, and the
attempts it already runs finish. ``/healthz`` reports ``in_flight``, so a
supervisor (``haif supervise``, ``haif deploy upgrade``) waits for 0 before
its SIGTERM.

Sampling
--------
Each engine declares the sampling parameters it honours
(``SUPPORTED_SAMPLING``; :func:`~haif.runtime.engines.supported_sampling`);
the worker announces them in its heartbeats and refuses a call that sets any
other with ``bad_request`` naming the parameter, never ignoring it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from opentelemetry.trace import StatusCode

from haif.configfile import ConfigError
from haif.contracts import ErrorKind, Request, WorkerSnapshot
from haif.runtime import telemetry
from haif.runtime.artifacts import ArtifactError, ModelCacheFull
from haif.runtime.cluster_keys import ClusterAuth, add_cluster_auth_args, cluster_auth_from_args
from haif.runtime.cluster_tls import (
    ServiceTls,
    add_cluster_tls_args,
    export_expiry,
    service_tls_from_args,
)
from haif.runtime.engines import (
    MAX_CHUNK_TOKENS,
    Engine,
    EngineError,
    ManagedEngine,
    SyntheticEngine,
    supported_sampling,
    synthetic_piece,
    synthetic_token,
    unsupported_parameter,
)
from haif.runtime.engines_cli import add_worker_engine_args, engine_from_args
from haif.runtime.event_loop import LISTEN_BACKLOG, new_loop
from haif.runtime.gc_pauses import freeze_after_startup
from haif.runtime.messages import Announce, InferCall, InferEnd, InferReply, TokenChunk
from haif.runtime.resources import ResourceMonitor
from haif.runtime.roles import WORKER_METHODS
from haif.runtime.rpc import (
    ORCHESTRATOR_AUDIENCE,
    EnvelopeAuth,
    PeerAuth,
    RpcClient,
    RpcError,
    RpcUnavailable,
    add_rpc_routes,
)

__all__ = [
    "MAX_CHUNK_TOKENS",
    "Engine",
    "SyntheticEngine",
    "Worker",
    "WorkerSpec",
    "build_app",
    "main",
    "run_worker",
    "synthetic_piece",
    "synthetic_token",
    "worker_from_args",
]

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
    #: The standby orchestrator of a pair: announced to as well, so it knows the
    #: fleet the moment it takes over.
    standby_url: str | None = None

    @property
    def orchestrator_urls(self) -> tuple[str, ...]:
        return (self.orchestrator_url, *((self.standby_url,) if self.standby_url else ()))


class Worker:
    def __init__(
        self,
        spec: WorkerSpec,
        engine: Engine | None = None,
        *,
        cluster_auth: ClusterAuth | None = None,
        service_tls: ServiceTls | None = None,
    ) -> None:
        self.spec = spec
        #: Mutual TLS: served with its server context, heartbeats with its client one.
        self.service_tls = service_tls
        self.engine: Engine = engine or SyntheticEngine(spec.mean_s, spec.ttft_s)
        self.cluster_auth = cluster_auth
        self._slots = asyncio.Semaphore(spec.capacity)
        self._waiting = 0
        self._running = 0
        self._session: aiohttp.ClientSession | None = None
        self._heartbeat_tasks: list[asyncio.Task[None]] = []
        self.resources = ResourceMonitor()
        self.ready = False
        #: Set by :meth:`drain`: heartbeats say unhealthy, /readyz answers 503.
        self.draining = False
        # Replaced (and the old one set) to wake every heartbeat loop at once.
        self._beat = asyncio.Event()
        self.metrics = telemetry.WorkerMetrics(
            lambda: self._running, lambda: self._waiting, spec.capacity
        )
        prefix_cache_stats = getattr(self.engine, "prefix_cache_stats", None)
        if callable(prefix_cache_stats):
            self.metrics.watch_prefix_cache(prefix_cache_stats)

    @property
    def _engine_queues(self) -> bool:
        """The engine queues and batches itself (profile timings): no slot limit here."""
        return bool(getattr(self.engine, "queues_internally", False))

    def snapshot(self) -> WorkerSnapshot:
        s = self.spec
        snap = WorkerSnapshot(
            worker_id=s.worker_id,
            region=s.region,
            gpu_class=s.gpu_class,
            models_warm=s.models,
            models_loadable=s.models,
            queue_depth=self._waiting,
            running=self._running,
            capacity=s.capacity,
            healthy=not self.draining,
            price_per_hour=s.price_per_hour,
        )
        occupancy = getattr(self.engine, "occupancy", lambda: None)()
        if occupancy is None:
            return snap
        # The engine's own view (profile timings), as the simulated worker reports it.
        return dataclasses.replace(
            snap,
            models_warm=occupancy.warm_models,
            queue_depth=occupancy.queue_depth,
            running=occupancy.running,
            free_kv_tokens=occupancy.free_kv_tokens,
        )

    def _call(self, body: object) -> InferCall:
        if isinstance(body, Request):
            body = InferCall(body)
        if not isinstance(body, InferCall) or not isinstance(body.request, Request):
            raise RpcError(ErrorKind.BAD_REQUEST, "infer expects an InferCall or a Request")
        if body.request.model not in self.spec.models:
            raise RpcError(ErrorKind.MODEL_NOT_LOADED, f"{body.request.model} is not served here")
        if not 0 <= body.resume_tokens <= body.request.max_tokens:
            raise RpcError(
                ErrorKind.BAD_REQUEST, f"resume_tokens {body.resume_tokens} out of range"
            )
        param = unsupported_parameter(body.request, supported_sampling(self.engine))
        if param is not None:
            # Never silently ignored (the orchestrator refuses such a request with a
            # 400 before it runs when no worker of the model honours the parameter).
            raise RpcError(
                ErrorKind.BAD_REQUEST,
                f"{param}: the {self.engine_name} engine cannot honour it",
            )
        return body

    @property
    def sampling(self) -> frozenset[str]:
        """The sampling parameters the engine honours (announced in heartbeats)."""
        return supported_sampling(self.engine)

    @property
    def engine_name(self) -> str:
        return str(getattr(self.engine, "name", type(self.engine).__name__))

    async def rpc_infer_stream(self, body: object) -> AsyncGenerator[TokenChunk | InferEnd, None]:
        call = self._call(body)
        request = call.request
        loop = asyncio.get_running_loop()
        received = loop.time()
        slots = None if self._engine_queues else self._slots
        if slots is not None:
            self._waiting += 1
            try:
                await slots.acquire()
            finally:
                self._waiting -= 1
        self._running += 1
        first: float | None = None
        produced = call.resume_tokens
        finish: str | None = None
        usage: tuple[int, int] | None = None
        cold = False
        # Not made current: this generator's steps run in different tasks.
        span = telemetry.tracer().start_span(
            "worker.generate",
            attributes={
                "haif.service": "worker",
                "haif.request_id": request.request_id,
                "haif.attempt": call.attempt,
                "haif.worker_id": self.spec.worker_id,
                "haif.model": request.model,
                "haif.resume_tokens": call.resume_tokens,
            },
        )
        outcome = "error"
        self.metrics.prompt_tokens.labels(request.model).inc(request.prompt_tokens)
        try:
            started = loop.time()
            async for chunk in self.engine.stream(request, call.resume_tokens):
                if first is None:
                    first = loop.time()
                    span.add_event("first_token")
                produced = max(produced, chunk.start + len(chunk.texts))
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
                cold = cold or chunk.cold_start
                self.metrics.generated(request.model, len(chunk.texts))
                yield chunk
            finished = loop.time()
            outcome = "ok"
        finally:
            self._running -= 1
            if slots is not None:
                slots.release()
            self.metrics.generations.labels(outcome, request.model).inc()
            span.set_attribute("haif.output_tokens", produced)
            if outcome != "ok":
                span.set_status(StatusCode.ERROR, "generation did not complete")
            span.end()
        service = finished - started
        cost = service * self.spec.price_per_hour / 3600.0 / self.spec.capacity
        output = min(produced, request.max_tokens)
        if finish is None:  # the engine did not say: it stopped early, or ran to the end
            finish = "length" if output >= request.max_tokens else "stop"
        yield InferEnd(
            output_tokens=output,
            ttft_s=(first if first is not None else finished) - received,
            service_s=finished - received,
            cold_start=cold,
            cost=cost,
            finish_reason=finish,
            usage=usage,
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
            # The engine's own count when it has one (an upstream's usage).
            output_tokens=end.usage[1] if end.usage is not None else end.output_tokens,
            ttft_s=end.ttft_s,
            service_s=end.service_s,
            cold_start=end.cold_start,
            cost=end.cost,
        )

    async def _heartbeats(self, url: str) -> None:
        """Announce this worker to the orchestrator at ``url`` every ``heartbeat_s``."""
        assert self._session is not None
        signer = self.cluster_auth.signer if self.cluster_auth is not None else None
        client = RpcClient(
            self._session,
            url,
            timeout_s=2.0,
            signer=signer,
            audience=ORCHESTRATOR_AUDIENCE,
            tls=self.service_tls,
        )
        while True:
            try:
                announce = Announce(
                    self.snapshot(),
                    self.spec.url,
                    self.resources.sample(),
                    tuple(sorted(self.sampling)),
                )
                await client.call("heartbeat", announce)
            except (RpcUnavailable, RpcError) as exc:
                log.warning("heartbeat to %s failed: %s", url, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat.wait(), self.spec.heartbeat_s)

    @property
    def in_flight(self) -> int:
        """Attempts queued or running here."""
        return self._waiting + self._running

    def drain(self) -> None:
        """Stop taking new attempts (heartbeats say unhealthy, one sent now); the
        running ones finish. There is no undoing it: the process is about to stop."""
        if not self.draining:
            log.info("worker %s draining (%d in flight)", self.spec.worker_id, self.in_flight)
        self.draining = True
        woken, self._beat = self._beat, asyncio.Event()
        woken.set()

    async def start(self) -> None:
        """Load the engine's model (verifying its artifact), then start heartbeating.

        A failed load is logged and re-raised: nothing is announced.
        """
        if isinstance(self.engine, ManagedEngine):
            try:
                await self.engine.load()
            except Exception as exc:
                log.error(
                    "worker %s: engine failed to load; not announcing %s: %s",
                    self.spec.worker_id,
                    ",".join(self.spec.models),
                    exc,
                )
                raise
        self.ready = True
        self._session = aiohttp.ClientSession()
        # One loop per orchestrator: one that is down delays no other's heartbeats.
        self._heartbeat_tasks = [
            asyncio.create_task(self._heartbeats(url)) for url in self.spec.orchestrator_urls
        ]
        if self.service_tls is not None:  # new certificates, without a restart
            self._heartbeat_tasks.append(asyncio.create_task(self.service_tls.watch()))
        spec = self.spec
        log.info(
            "worker %s (%s, %s) serves %s on %s (engine %s); announcing to %s",
            spec.worker_id,
            spec.region,
            spec.gpu_class,
            ",".join(spec.models),
            spec.url,
            type(self.engine).__name__,
            " and ".join(spec.orchestrator_urls),
        )

    async def stop(self) -> None:
        self.ready = False
        log.info("worker %s stopping", self.spec.worker_id)
        for task in self._heartbeat_tasks:
            task.cancel()
        await asyncio.gather(*self._heartbeat_tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.resources.close()
        if isinstance(self.engine, ManagedEngine):
            await self.engine.close()


def build_app(worker: Worker, *, drain_signal: bool = False) -> web.Application:
    """The worker's HTTP app (``drain_signal``: :meth:`Worker.drain` on SIGUSR1)."""
    app = web.Application()
    if worker.service_tls is not None:
        export_expiry(worker.metrics.registry, worker.service_tls)
    keys = worker.cluster_auth
    add_rpc_routes(
        app,
        {"infer": worker.rpc_infer},
        {"infer_stream": worker.rpc_infer_stream},
        service="worker",
        auth=(
            EnvelopeAuth(keys.keyring, worker.spec.worker_id, methods=WORKER_METHODS)
            if keys is not None
            else None
        ),
        peer_auth=PeerAuth(WORKER_METHODS) if worker.service_tls is not None else None,
    )

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(
            {
                "ok": True,
                "worker_id": worker.spec.worker_id,
                "engine": type(worker.engine).__name__,
                "ready": worker.ready,
                "draining": worker.draining,
                "in_flight": worker.in_flight,
            }
        )

    async def readyz(_request: web.Request) -> web.Response:
        ready = worker.ready and not worker.draining
        body = {"ready": ready, **({"reason": "draining"} if worker.draining else {})}
        return web.json_response(body, status=200 if ready else 503)

    async def on_startup(_app: web.Application) -> None:
        await worker.start()
        if drain_signal:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, worker.drain)

    async def on_cleanup(_app: web.Application) -> None:
        await worker.stop()

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", telemetry.metrics_handler(worker.metrics.registry))
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


# --------------------------------------------------------------- entry points


def worker_from_args(args: argparse.Namespace) -> Worker:
    """The worker ``haif worker`` describes (engine options: :func:`add_worker_engine_args`)."""
    service_tls = service_tls_from_args(args)
    if service_tls is not None and service_tls.identity.name != args.worker_id:
        raise ConfigError(
            f"--cluster-tls-cert {service_tls.cert} names {service_tls.identity.name!r}, "
            f"not this worker ({args.worker_id!r})"
        )
    from haif.runtime.services import check_peer_scheme

    check_peer_scheme(service_tls, "--orchestrator", args.orchestrator)
    check_peer_scheme(service_tls, "--standby", args.standby)
    spec = WorkerSpec(
        worker_id=args.worker_id,
        region=args.region,
        url=f"{'https' if service_tls is not None else 'http'}://{args.host}:{args.port}",
        orchestrator_url=args.orchestrator,
        standby_url=args.standby,
        gpu_class=args.gpu_class,
        capacity=args.capacity,
        models=tuple(m for m in args.models.split(",") if m),
        mean_s=args.mean_s,
        ttft_s=args.ttft_s,
        heartbeat_s=args.heartbeat_s,
    )
    cluster_auth = cluster_auth_from_args(args)
    return Worker(spec, engine_from_args(args), cluster_auth=cluster_auth, service_tls=service_tls)


def run_worker(args: argparse.Namespace, shutdown_timeout: float = 5.0) -> int:
    """Serve a worker until stopped.

    Returns 1 (logged) if its engine cannot be built or loaded, 2 (logged)
    if its cluster keys cannot be read.
    """
    try:
        worker = worker_from_args(args)
        web.run_app(
            freeze_after_startup(build_app(worker, drain_signal=True)),
            host=args.host,
            port=args.port,
            print=None,
            shutdown_timeout=shutdown_timeout,
            ssl_context=worker.service_tls.server if worker.service_tls is not None else None,
            loop=new_loop(),
            backlog=LISTEN_BACKLOG,
        )
    except (ArtifactError, EngineError, ModelCacheFull) as exc:
        log.error("worker %s not started: %s", getattr(args, "worker_id", "?"), exc)
        return 1
    except ConfigError as exc:
        log.error("worker %s not started: %s", getattr(args, "worker_id", "?"), exc)
        return 2
    return 0


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``haif worker`` (and ``python -m haif.runtime.worker``)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--id", required=True, dest="worker_id")
    parser.add_argument("--region", required=True)
    parser.add_argument("--orchestrator", required=True, help="orchestrator base URL")
    parser.add_argument(
        "--standby", metavar="URL", help="the standby orchestrator's base URL (also announced to)"
    )
    parser.add_argument("--gpu-class", default="A100-80G")
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--models", default="llama-3-8b", help="comma-separated")
    parser.add_argument("--mean-s", type=float, default=0.05, help="synthetic service time")
    parser.add_argument("--ttft-s", type=float, default=0.01)
    parser.add_argument("--heartbeat-s", type=float, default=0.5)
    add_worker_engine_args(parser)
    add_cluster_auth_args(parser)
    add_cluster_tls_args(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m haif.runtime.worker``: one worker with any engine."""
    parser = argparse.ArgumentParser(
        prog="python -m haif.runtime.worker",
        description="Run one HAIF worker with any engine (synthetic, transformers, vllm, openai).",
    )
    add_worker_args(parser)
    args = parser.parse_args(argv)
    telemetry.setup_logging("worker")
    try:
        telemetry.setup_tracing("worker")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
