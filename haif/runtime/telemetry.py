"""Telemetry of the runtime: OpenTelemetry traces, Prometheus metrics, JSON logs.

Traces
------
One trace per gateway request, across gateway -> orchestrator -> worker:

- gateway: a ``SERVER`` span ``"<METHOD> <route>"`` per HTTP request
  (:func:`http_middleware`), child of the caller's W3C ``traceparent`` header
  when it sends one; the response carries ``traceparent`` of that span (same
  trace id), streaming responses included;
- RPC: :class:`~haif.runtime.rpc.RpcClient` writes the current context into
  the envelope's ``trace`` field (a W3C traceparent) and the RPC server starts
  a child span ``rpc.<method>`` per call (heartbeats are not traced);
- orchestrator: a span ``orchestrator.dispatch`` per dispatch attempt
  (attributes ``haif.request_id``, ``haif.attempt``, ``haif.worker_id``,
  ``haif.region``; events ``first_token`` and, on failure, ``attempt_failed``),
  parented on the request's ``rpc.submit_stream`` / ``rpc.submit`` span, and
  an event per core decision on that span;
- worker: a span ``worker.generate`` per generation (attributes
  ``haif.request_id``, ``haif.attempt``, ``haif.worker_id``,
  ``haif.resume_tokens``, ``haif.output_tokens``).

Every span has ``haif.service`` (gateway, orchestrator or worker). The
tracer provider is installed once per process by :func:`setup_tracing`
(``haif gateway|orchestrator|worker`` call it in
:func:`~haif.runtime.services.run_service`) with a ``BatchSpanProcessor``;
without it the OpenTelemetry API is a no-op and nothing is recorded.

Metrics
-------
Each app has its own ``prometheus_client.CollectorRegistry``, served as
Prometheus text at ``GET /metrics``; no ``_created`` series
(``disable_created_metrics``). ``model`` labels carry only models the core
answered for (``unknown`` for one it did not know) and ``tenant`` labels the
credential's tenant, each bounded (:data:`MAX_MODEL_LABELS`,
:data:`MAX_TENANT_LABELS`; beyond them ``other``), so no client can grow the
series. ``monitoring/`` has a Grafana dashboard and alert rules over these.

Gateway (:class:`GatewayMetrics`):

- ``haif_gateway_requests_total{route,method,status,model}`` (counter)
- ``haif_gateway_request_duration_seconds{route,model}`` (histogram, until
  the response is complete, streams included)
- ``haif_gateway_ttft_seconds{model,stream}`` (histogram: request arrival to
  the first token frame from the orchestrator)
- ``haif_gateway_inter_token_seconds{model}`` (histogram, streaming
  requests: gap between token frames divided by the tokens in the frame)
- ``haif_gateway_completions_total{model,tenant,outcome}`` (counter: the
  core's answers by the record's status: ok, failed, timeout, rejected,
  cancelled)
- ``haif_gateway_prompt_tokens_total{model,tenant}``,
  ``haif_gateway_completion_tokens_total{model,tenant}`` (counters)
- ``haif_gateway_in_flight_requests`` (gauge)
- ``haif_gateway_open_connections`` (gauge: client connections open) and
  ``haif_gateway_connections_refused_total`` (counter: connections refused
  by the gateway's connection cap, see :class:`~haif.runtime.gateway.GatewayLimits`)

Orchestrator (:class:`OrchestratorMetrics`):

- ``haif_orchestrator_decisions_total{type,model}`` (counter: ``Dispatch``,
  ``Reject``, ``RetryAt``, ``Cancel``, ``DeadLetter``, ``Finalize``)
- ``haif_orchestrator_retries_total`` (counter: dispatches of attempt > 1)
- ``haif_orchestrator_dead_letters_total`` (counter)
- ``haif_orchestrator_cancelled_total`` (counter: every caller left)
- ``haif_orchestrator_dlq_size`` (gauge, read from the store at scrape time)
  and ``haif_orchestrator_store_up`` (gauge: 1 when that read succeeded)
- ``haif_orchestrator_in_flight_requests`` (gauge: admitted, not finalized)
- ``haif_orchestrator_worker_outstanding{worker}`` (gauge: the core's
  attempts in flight per worker)
- ``haif_orchestrator_worker_queue_depth{worker}`` and
  ``haif_orchestrator_worker_running{worker}`` (gauges: last heartbeat)
- ``haif_orchestrator_worker_breaker_state{worker}`` (gauge: 0 closed,
  1 half-open, 2 open)
- ``haif_orchestrator_worker_cpu_percent{worker,scope}``,
  ``_memory_bytes{worker,kind}``, ``_gpu_utilization_percent{worker,gpu}``,
  ``_gpu_memory_bytes{worker,gpu,kind}`` (gauges: last heartbeat)
- ``haif_orchestrator_fresh_workers``, ``haif_orchestrator_stale_workers``
  (gauges), ``haif_orchestrator_evictions_total`` (counter)
- ``haif_orchestrator_leader`` (gauge: 1 while it takes requests; a standby
  0) and ``haif_orchestrator_leader_epoch`` (gauge: the fencing epoch)

Worker (:class:`WorkerMetrics`):

- ``haif_worker_running``, ``haif_worker_waiting``, ``haif_worker_capacity``
  (gauges)
- ``haif_worker_prompt_tokens_total{model}`` and
  ``haif_worker_generation_tokens_total{model}`` (counters, as vLLM's
  ``vllm:prompt_tokens_total`` / ``vllm:generation_tokens_total``), and
  ``haif_worker_tokens_generated_total`` (their sum over models)
- ``haif_worker_generations_total{outcome,model}`` (counter: ``ok``, ``error``)
- ``haif_worker_prefix_cache_queries_total`` and
  ``haif_worker_prefix_cache_hits_total`` (counters, as vLLM's
  ``vllm:prefix_cache_queries`` / ``_hits``: prompt tokens looked up in the
  engine's prefix cache, and those found there and not prefilled), when the
  engine has one (the synthetic engine's profile timing with ``prefix_cache``)

Logs
----
:func:`setup_logging` configures the root logger of a service process. With
``HAIF_LOG_FORMAT=json`` every record is one JSON object per line
(:class:`JsonFormatter`): ``time`` (ISO 8601 UTC), ``level``, ``service``,
``logger``, ``message``, ``trace_id`` / ``span_id`` (hex) when a span is
current, and ``exc_info`` when there is an exception. The default stays the
text format (``<time> <service> <LEVEL> <logger>: <message>``) so that
``haif up`` logs read as before.

The gateway logs one line per request (logger ``haif.gateway.requests``,
:func:`log_request`) instead of aiohttp's access lines: ``request_id``,
``method``, ``route``, ``status``, ``tenant``, ``model``, ``stream``,
``worker``, ``outcome``, ``attempts``, ``ttft_s``, ``latency_s``,
``prompt_tokens``, ``completion_tokens``, ``error`` and ``trace_id``, those
known, as logfmt ``key=value`` (a value with spaces or quotes is a JSON
string) or, in JSON, as keys of the object. Probes and scrapes only at DEBUG.
aiohttp's access lines appear in every service only at DEBUG.

Environment variables
---------------------
- ``HAIF_OTEL_EXPORTER``: ``none`` (default: spans get ids, so
  ``traceparent`` is propagated and logs carry trace ids, but nothing is
  recorded: :class:`RecordWhenExported`),
  ``console`` (one JSON span per line on stdout) or ``otlp`` (OTLP over
  HTTP/protobuf to a collector; needs the optional extra ``haif[otlp]``,
  i.e. ``opentelemetry-exporter-otlp-proto-http``). The ``otlp`` exporter
  reads the standard variables: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the
  full URL), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces`` (default
  ``http://localhost:4318/v1/traces``), and ``OTEL_EXPORTER_OTLP_HEADERS``,
  ``..._TIMEOUT``, ``..._COMPRESSION``.
- ``HAIF_OTEL_SERVICE_NAME``: the resource's ``service.name`` (default
  ``haif-<service>``).
- ``HAIF_LOG_FORMAT``: ``text`` (default) or ``json``.
- ``HAIF_LOG_LEVEL``: the root log level (default ``INFO``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from haif.configfile import ConfigError
from haif.runtime.resources import Resources

__all__ = [
    "BREAKER_STATES",
    "GatewayMetrics",
    "JsonFormatter",
    "OrchestratorMetrics",
    "WorkerMetrics",
    "current_traceparent",
    "exporter_from_env",
    "extract",
    "http_middleware",
    "inject",
    "metrics_handler",
    "new_provider",
    "setup_logging",
    "setup_tracing",
    "tracer",
]

ENV_EXPORTER = "HAIF_OTEL_EXPORTER"
ENV_SERVICE_NAME = "HAIF_OTEL_SERVICE_NAME"
ENV_LOG_FORMAT = "HAIF_LOG_FORMAT"
ENV_LOG_LEVEL = "HAIF_LOG_LEVEL"
TRACEPARENT = "traceparent"
#: The values of ``HAIF_OTEL_EXPORTER``.
EXPORTERS = ("none", "console", "otlp")
#: Where the ``otlp`` exporter lives (the optional extra ``haif[otlp]``).
OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
#: Breaker state -> gauge value.
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}

# Counters and histograms would each expose a `<name>_created` series beside
# their samples (the time they were made), doubling the series Prometheus
# stores for nothing a dashboard reads.
disable_created_metrics()  # type: ignore[no-untyped-call]

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER_NAME = "haif.runtime"


# ------------------------------------------------------------------ tracing


_TRACERS: dict[int, tuple[trace.TracerProvider, trace.Tracer]] = {}


def tracer() -> trace.Tracer:
    """The runtime's tracer (from the global provider; a no-op one without it).

    Cached per provider: the SDK builds a new tracer on every ``get_tracer``
    call, which showed in the profile of every request (a span or two each).
    """
    provider = trace.get_tracer_provider()
    cached = _TRACERS.get(id(provider))
    if cached is None or cached[0] is not provider:
        cached = (provider, provider.get_tracer(_TRACER_NAME))
        _TRACERS.clear()  # one global provider at a time
        _TRACERS[id(provider)] = cached
    return cached[1]


def exporter_from_env() -> SpanExporter | None:
    """The span exporter ``HAIF_OTEL_EXPORTER`` names (None: spans are not exported).

    Raises :class:`~haif.configfile.ConfigError` when ``otlp`` is chosen and
    the optional package is not installed; an unknown value is logged and
    exports nothing.
    """
    choice = os.environ.get(ENV_EXPORTER, "none").strip().lower() or "none"
    if choice == "console":
        return ConsoleSpanExporter(
            out=sys.stdout,
            formatter=lambda span: span.to_json(indent=None) + os.linesep,
        )
    if choice == "otlp":
        return _otlp_exporter()
    if choice != "none":
        logging.getLogger("haif.telemetry").warning(
            "%s=%r is not one of %s; not exporting spans",
            ENV_EXPORTER,
            choice,
            ", ".join(EXPORTERS),
        )
    return None


def _otlp_exporter() -> SpanExporter:
    """OTLP over HTTP/protobuf; the endpoint and options come from the OTEL_EXPORTER_OTLP_* env."""
    try:  # optional (haif[otlp]): imported by name so type checks pass without it
        module = importlib.import_module(OTLP_MODULE)
    except ImportError as exc:
        # No square brackets: the CLI prints this through rich, which reads them as markup.
        raise ConfigError(
            f"{ENV_EXPORTER}=otlp needs the optional package "
            f"opentelemetry-exporter-otlp-proto-http, which is not installed ({exc}): "
            "install haif's extra 'otlp' or `pip install opentelemetry-exporter-otlp-proto-http`, "
            f"or set {ENV_EXPORTER}=none or console"
        ) from None
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


class RecordWhenExported(Sampler):
    """Record spans only once an exporter is attached (:func:`setup_tracing`).

    A recorded span nobody exports costs tens of microseconds (attributes,
    events, locks) per span, several spans per request in every service.
    Unrecorded spans still get ids, so ``traceparent`` still travels and
    logs still carry trace ids. Once exporting, ``sampler`` decides (by
    default the SDK's, which reads ``OTEL_TRACES_SAMPLER``).
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.exporting = False

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        if not self.exporting:
            return SamplingResult(Decision.DROP)
        return self.sampler.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"RecordWhenExported({self.sampler.get_description()})"


def new_provider(service: str) -> TracerProvider:
    """A tracer provider whose resource names ``service`` (``HAIF_OTEL_SERVICE_NAME`` wins)."""
    name = os.environ.get(ENV_SERVICE_NAME) or f"haif-{service}"
    resource = Resource.create({"service.name": name})
    default = TracerProvider(resource=resource).sampler
    return TracerProvider(resource=resource, sampler=RecordWhenExported(default))


def setup_tracing(
    service: str,
    exporter: SpanExporter | None = None,
    *,
    batch: bool = True,
    provider: TracerProvider | None = None,
) -> TracerProvider | None:
    """Install the process's tracer provider (once) and an exporter.

    ``exporter`` defaults to the one ``HAIF_OTEL_EXPORTER`` names
    (:func:`exporter_from_env`; none: spans get ids but are not recorded).
    A second call (several services in one process, as in tests) reuses the
    provider and only adds the exporter. ``provider`` (tests) gets the
    exporter instead of the global one. Returns the provider, or None when
    another SDK-less provider is installed.
    """
    if exporter is None:
        exporter = exporter_from_env()
    if provider is None:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            provider = current
        else:
            provider = new_provider(service)
            trace.set_tracer_provider(provider)
            if trace.get_tracer_provider() is not provider:  # another provider won
                return None
    if exporter is not None:
        processor: SpanProcessor = (
            BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
        if isinstance(provider.sampler, RecordWhenExported):
            provider.sampler.exporting = True
    return provider


def inject(ctx: Context | None = None) -> str | None:
    """The W3C traceparent of ``ctx`` (default: the current context), if a span is valid.

    Formatted here as the W3C propagator does (version 00): its ``inject``,
    with a carrier dict and a setter, cost a percent of a request's CPU.
    """
    span = trace.get_current_span(ctx).get_span_context()
    if not span.is_valid:
        return None
    return f"00-{span.trace_id:032x}-{span.span_id:016x}-{span.trace_flags:02x}"


def extract(traceparent: str | None) -> Context | None:
    """The context a W3C traceparent names (None when absent or malformed)."""
    if not traceparent or not isinstance(traceparent, str):
        return None
    ctx = _PROPAGATOR.extract({TRACEPARENT: traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def current_traceparent() -> str | None:
    return inject()


def span_ids(span: Span | None = None) -> tuple[str, str] | None:
    """(trace id, span id) in hex of ``span`` (default: the current one), if valid."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def current_context() -> Context:
    return otel_context.get_current()


# ------------------------------------------------------------------ metrics


def _metrics_response(registry: CollectorRegistry) -> web.Response:
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def metrics_handler(
    registry: CollectorRegistry,
    before: Callable[[], Awaitable[None]] | None = None,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A ``GET /metrics`` handler for ``registry`` (``before`` refreshes gauges first)."""

    async def handler(_request: web.Request) -> web.Response:
        if before is not None:
            try:
                await before()
            except Exception:
                logging.getLogger("haif.telemetry").exception("metrics refresh failed")
        return _metrics_response(registry)

    return handler


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


#: Label value of a model the core does not know (``model_not_found``).
UNKNOWN_MODEL = "unknown"
#: Label value once a bounded label has seen its limit of distinct values.
OTHER_LABEL = "other"
#: Most distinct ``model`` / ``tenant`` label values a service exports; any
#: further value is counted as ``other``, so no client can grow the series
#: without bound (a model name is the client's text until the core knows it;
#: tenants come from credentials, but a JWT issuer may mint any number).
MAX_MODEL_LABELS = 64
MAX_TENANT_LABELS = 100


class BoundedLabel:
    """The values of one label, at most ``limit`` distinct; later new ones are ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER_LABEL


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.model_label = BoundedLabel(MAX_MODEL_LABELS)
        self.tenant_label = BoundedLabel(MAX_TENANT_LABELS)
        self.requests = Counter(
            "haif_gateway_requests",
            "HTTP requests answered, by route, method, status and model",
            ["route", "method", "status", "model"],
            registry=r,
        )
        self.duration = Histogram(
            "haif_gateway_request_duration_seconds",
            "HTTP request duration until the response is complete",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "haif_gateway_ttft_seconds",
            "Time from request arrival to the first token",
            ["model", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "haif_gateway_inter_token_seconds",
            "Inter-token latency of streaming responses",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.completions = Counter(
            "haif_gateway_completions",
            "Completion requests the core answered, by model, tenant and outcome "
            "(the record's status: ok, failed, timeout, rejected, cancelled)",
            ["model", "tenant", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "haif_gateway_prompt_tokens",
            "Prompt tokens of the requests answered, by model and tenant",
            ["model", "tenant"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "haif_gateway_completion_tokens",
            "Completion tokens sent to clients, by model and tenant",
            ["model", "tenant"],
            registry=r,
        )
        self.in_flight = Gauge(
            "haif_gateway_in_flight_requests", "HTTP requests being answered", registry=r
        )
        self.open_connections = Gauge(
            "haif_gateway_open_connections", "Client connections open", registry=r
        )
        self.connections_refused = Counter(
            "haif_gateway_connections_refused",
            "Client connections refused because the connection cap was reached",
            registry=r,
        )

    def model(self, info: RequestInfo) -> str:
        """The ``model`` label of a request: its model once the core answered for it or
        its tokens came (bounded by :data:`MAX_MODEL_LABELS`), ``unknown`` when the
        core did not know it, empty when the request never reached the core."""
        if info.model is None or (info.model_found is None and info.ttft_s is None):
            return ""
        if info.model_found is False:
            return UNKNOWN_MODEL
        return self.model_label(info.model)

    def finished(self, info: RequestInfo) -> None:
        """Count a completion the core answered: outcome and tokens, by model and tenant."""
        if info.outcome is None:
            return
        model, tenant = self.model(info), self.tenant_label(info.tenant)
        self.completions.labels(model, tenant, info.outcome).inc()
        if info.outcome == "rejected":  # refused before it ran: no tokens were processed
            return
        if info.prompt_tokens:
            self.prompt_tokens.labels(model, tenant).inc(info.prompt_tokens)
        if info.completion_tokens:
            self.completion_tokens.labels(model, tenant).inc(info.completion_tokens)


@dataclass
class RequestInfo:
    """What the gateway learnt of one HTTP request, for its log line and its metrics.

    The middleware puts one in each request (:data:`REQUEST_INFO`); the
    handler fills in what it knows. ``model_found`` is False when the core
    answered ``model_not_found``; ``outcome`` is the record's status.
    """

    request_id: str | None = None
    tenant: str | None = None
    model: str | None = None
    model_found: bool | None = None
    stream: bool | None = None
    worker: str | None = None
    outcome: str | None = None
    attempts: int | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


#: The :class:`RequestInfo` of a gateway request (set by :func:`http_middleware`).
REQUEST_INFO = web.RequestKey("haif_request_info", RequestInfo)


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.model_label = BoundedLabel(MAX_MODEL_LABELS)
        self.decisions = Counter(
            "haif_orchestrator_decisions",
            "Core decisions executed, by type and model",
            ["type", "model"],
            registry=r,
        )
        self.retries = Counter(
            "haif_orchestrator_retries", "Dispatches of a retry attempt (attempt > 1)", registry=r
        )
        self.dead_letters = Counter(
            "haif_orchestrator_dead_letters", "Requests dead-lettered", registry=r
        )
        self.cancelled = Counter(
            "haif_orchestrator_cancelled",
            "Requests cancelled because every caller went away before the answer ended",
            registry=r,
        )
        self.dlq_size = Gauge(
            "haif_orchestrator_dlq_size", "Entries in the dead-letter queue", registry=r
        )
        self.store_up = Gauge(
            "haif_orchestrator_store_up",
            "1 when the metadata store answered the last scrape's read, 0 when it failed",
            registry=r,
        )
        self.in_flight = Gauge(
            "haif_orchestrator_in_flight_requests", "Admitted requests not finalized", registry=r
        )
        self.outstanding = Gauge(
            "haif_orchestrator_worker_outstanding",
            "Attempts in flight per worker (the core's view)",
            ["worker"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "haif_orchestrator_worker_queue_depth",
            "Queue depth per worker (last heartbeat)",
            ["worker"],
            registry=r,
        )
        self.running = Gauge(
            "haif_orchestrator_worker_running",
            "Running requests per worker (last heartbeat)",
            ["worker"],
            registry=r,
        )
        self.breaker = Gauge(
            "haif_orchestrator_worker_breaker_state",
            "Circuit breaker state per worker: 0 closed, 1 half-open, 2 open",
            ["worker"],
            registry=r,
        )
        self.worker_cpu = Gauge(
            "haif_orchestrator_worker_cpu_percent",
            "CPU use per worker as its last heartbeat said: its process (100 = one core) "
            "and its host (all cores, 0-100)",
            ["worker", "scope"],
            registry=r,
        )
        self.worker_memory = Gauge(
            "haif_orchestrator_worker_memory_bytes",
            "Memory per worker as its last heartbeat said: process RSS, host available, host total",
            ["worker", "kind"],
            registry=r,
        )
        self.worker_gpu_utilization = Gauge(
            "haif_orchestrator_worker_gpu_utilization_percent",
            "GPU busy share per worker and GPU (NVML), as its last heartbeat said",
            ["worker", "gpu"],
            registry=r,
        )
        self.worker_gpu_memory = Gauge(
            "haif_orchestrator_worker_gpu_memory_bytes",
            "GPU memory per worker and GPU (NVML), as its last heartbeat said",
            ["worker", "gpu", "kind"],
            registry=r,
        )
        self.fresh_workers = Gauge(
            "haif_orchestrator_fresh_workers", "Workers with a fresh heartbeat", registry=r
        )
        self.stale_workers = Gauge(
            "haif_orchestrator_stale_workers",
            "Present workers that missed a heartbeat (not evicted yet)",
            registry=r,
        )
        self.evictions = Counter(
            "haif_orchestrator_evictions", "Workers evicted for missed heartbeats", registry=r
        )
        self.leader = Gauge(
            "haif_orchestrator_leader",
            "1 while this orchestrator takes requests (always without a standby), else 0",
            registry=r,
        )
        self.leader_epoch = Gauge(
            "haif_orchestrator_leader_epoch",
            "The leader lease's fencing epoch this orchestrator last led under (0: never)",
            registry=r,
        )

    def count_decision(self, decision: Any, pending: Mapping[str, Any]) -> None:
        """Count one core decision by type and model (``pending``: running requests by id,
        each with its ``request``; a ``Finalize`` carries its record)."""
        record = getattr(decision, "record", None)
        request = getattr(pending.get(getattr(decision, "request_id", "")), "request", None)
        model = getattr(record if record is not None else request, "model", None)
        if getattr(decision, "reason", None) == "model_not_found" or (
            record is not None and record.reason == "model_not_found"
        ):
            label = UNKNOWN_MODEL
        else:
            label = self.model_label(model if isinstance(model, str) else None)
        self.decisions.labels(type(decision).__name__, label).inc()

    async def refresh_store(self, store: Any, timeout_s: float = 5.0) -> None:
        """Read the dead-letter queue's size from ``store``; ``store_up`` says if it answered."""
        try:
            async with asyncio.timeout(timeout_s):
                size = len(await store.list_dead_letters())
        except Exception as exc:
            self.store_up.set(0)
            logging.getLogger("haif.telemetry").warning("the store did not answer: %r", exc)
            return
        self.dlq_size.set(size)
        self.store_up.set(1)

    def set_workers(self, rows: Iterable[tuple[str, int, int, int, str]]) -> None:
        """Replace the per-worker gauges: (worker, outstanding, queue, running, breaker)."""
        for gauge in (self.outstanding, self.queue_depth, self.running, self.breaker):
            gauge.clear()
        for wid, outstanding, queue, running, breaker in rows:
            self.outstanding.labels(wid).set(outstanding)
            self.queue_depth.labels(wid).set(queue)
            self.running.labels(wid).set(running)
            self.breaker.labels(wid).set(BREAKER_STATES.get(breaker, 2))

    def set_resources(self, rows: Iterable[tuple[str, Resources | None]]) -> None:
        """Replace the per-worker resource gauges: (worker, its last reported sample)."""
        gauges = (self.worker_cpu, self.worker_memory)
        for gauge in (*gauges, self.worker_gpu_utilization, self.worker_gpu_memory):
            gauge.clear()
        mb = 1024 * 1024
        for wid, res in rows:
            if res is None:
                continue
            self.worker_cpu.labels(wid, "process").set(res.process_cpu_pct)
            self.worker_cpu.labels(wid, "host").set(res.host_cpu_pct)
            self.worker_memory.labels(wid, "process_rss").set(res.process_rss_mb * mb)
            self.worker_memory.labels(wid, "host_available").set(res.host_memory_available_mb * mb)
            self.worker_memory.labels(wid, "host_total").set(res.host_memory_total_mb * mb)
            for gpu in res.gpus:
                index = str(gpu.index)
                self.worker_gpu_utilization.labels(wid, index).set(gpu.utilization_pct)
                self.worker_gpu_memory.labels(wid, index, "used").set(gpu.memory_used_mb * mb)
                self.worker_gpu_memory.labels(wid, index, "total").set(gpu.memory_total_mb * mb)


class WorkerMetrics:
    def __init__(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        capacity: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.running = Gauge("haif_worker_running", "Requests generating", registry=r)
        self.running.set_function(running)
        self.waiting = Gauge("haif_worker_waiting", "Requests waiting for a slot", registry=r)
        self.waiting.set_function(waiting)
        self.capacity = Gauge("haif_worker_capacity", "Generation slots", registry=r)
        self.capacity.set(capacity)
        self.tokens = Counter(
            "haif_worker_tokens_generated", "Tokens streamed to callers (all models)", registry=r
        )
        # As vLLM's vllm:prompt_tokens_total / vllm:generation_tokens_total.
        self.prompt_tokens = Counter(
            "haif_worker_prompt_tokens",
            "Prompt tokens of the generations started, by model",
            ["model"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "haif_worker_generation_tokens",
            "Tokens generated and streamed to callers, by model",
            ["model"],
            registry=r,
        )
        self.generations = Counter(
            "haif_worker_generations",
            "Generations ended, by outcome (ok, error) and model",
            ["outcome", "model"],
            registry=r,
        )

    def generated(self, model: str, tokens: int) -> None:
        """``tokens`` more were streamed for a request of ``model`` (a model this worker serves)."""
        self.tokens.inc(tokens)
        self.generation_tokens.labels(model).inc(tokens)

    def watch_prefix_cache(self, stats: Callable[[], tuple[int, int] | None]) -> None:
        """Export the engine's prefix cache counters: ``stats()`` is ``(query_tokens,
        hit_tokens)`` so far, or None while it has no prefix cache."""
        self.registry.register(_PrefixCacheCollector(stats))


class _PrefixCacheCollector:
    """``haif_worker_prefix_cache_{queries,hits}_total``, read from the engine at scrape time."""

    def __init__(self, stats: Callable[[], tuple[int, int] | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        got = self.stats()
        if got is None:
            return
        queries, hits = got
        for name, text, value in (
            ("queries", "Prompt tokens looked up in the prefix cache", queries),
            ("hits", "Prompt tokens found in the prefix cache (not prefilled)", hits),
        ):
            family = CounterMetricFamily(f"haif_worker_prefix_cache_{name}", text)
            family.add_metric([], value)
            yield family


# ------------------------------------------------------------------ HTTP

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UNTRACED_PATHS = frozenset({"/metrics", "/healthz"})


def _route(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None:
        return "unmatched"
    resource = info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def http_middleware(service: str, metrics: GatewayMetrics | None = None) -> Any:
    """An aiohttp middleware: a server span per request (W3C ``traceparent`` in and out)
    and, with ``metrics`` (the gateway), the request counter, duration histogram,
    in-flight gauge, per-model and per-tenant counters and one log line per request
    (:func:`log_request`), from the :class:`RequestInfo` the handler fills in."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route(request)
        started = time.perf_counter()
        status = 500
        info = RequestInfo()
        trace_id: str | None = None
        if metrics is not None:
            metrics.in_flight.inc()
            request[REQUEST_INFO] = info
        try:
            if request.path in _UNTRACED_PATHS:
                resp = await handler(request)
            else:
                parent = extract(request.headers.get(TRACEPARENT))
                with tracer().start_as_current_span(
                    f"{request.method} {route}",
                    context=parent,
                    kind=SpanKind.SERVER,
                    attributes={
                        "haif.service": service,
                        "http.request.method": request.method,
                        "http.route": route,
                        "url.path": request.path,
                    },
                ) as span:
                    ids = span_ids(span)
                    trace_id = ids[0] if ids is not None else None
                    try:
                        resp = await handler(request)
                    except web.HTTPException as exc:
                        span.set_attribute("http.response.status_code", exc.status)
                        status = exc.status
                        raise
                    span.set_attribute("http.response.status_code", resp.status)
                    if resp.status >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                    traceparent = inject()
                    if traceparent is not None and not resp.prepared:
                        resp.headers[TRACEPARENT] = traceparent
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's "client closed request")
            raise
        finally:
            if metrics is not None:
                elapsed = time.perf_counter() - started
                model = metrics.model(info)
                metrics.in_flight.dec()
                metrics.requests.labels(route, request.method, str(status), model).inc()
                metrics.duration.labels(route, model).observe(elapsed)
                metrics.finished(info)
                log_request(request, route, status, elapsed, info, trace_id)

    return middleware


#: The logger of the gateway's request lines (see :func:`log_request`).
REQUEST_LOGGER = "haif.gateway.requests"
#: Paths whose request lines are logged at DEBUG only (probes and scrapes).
_QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
_PLAIN_VALUE = re.compile(r"[\x21-\x7e]{1,200}")


def _logfmt(value: object) -> str:
    """A value as logfmt writes it: bare when it is plain, else a JSON string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
    text = str(value)
    if _PLAIN_VALUE.fullmatch(text) and '"' not in text and "=" not in text:
        return text
    return json.dumps(text[:200], ensure_ascii=True)


def request_fields(
    request: web.BaseRequest,
    route: str,
    status: int,
    latency_s: float,
    info: RequestInfo,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """The fields of one request's log line, in order; those not known are left out."""
    fields: dict[str, Any] = {
        "request_id": info.request_id,
        "method": request.method,
        "route": route,
        "status": status,
        "tenant": info.tenant,
        "model": info.model,
        "stream": info.stream,
        "worker": info.worker,
        "outcome": info.outcome,
        "attempts": info.attempts,
        "ttft_s": None if info.ttft_s is None else round(info.ttft_s, 6),
        "latency_s": round(latency_s, 6),
        "prompt_tokens": info.prompt_tokens,
        "completion_tokens": info.completion_tokens,
        "error": info.error,
        "trace_id": trace_id,
    }
    return {k: v for k, v in fields.items() if v is not None}


def log_request(
    request: web.BaseRequest,
    route: str,
    status: int,
    latency_s: float,
    info: RequestInfo,
    trace_id: str | None = None,
) -> None:
    """One line per request, logfmt (``request_id=... tenant=... model=... worker=...
    status=200 ttft_s=... latency_s=... prompt_tokens=... completion_tokens=...``);
    with ``HAIF_LOG_FORMAT=json`` the same fields are keys of the JSON object.
    Probes and scrapes (``/healthz``, ``/readyz``, ``/metrics``) only at DEBUG."""
    logger = logging.getLogger(REQUEST_LOGGER)
    level = logging.DEBUG if request.path in _QUIET_PATHS else logging.INFO
    if not logger.isEnabledFor(level):
        return
    fields = request_fields(request, route, status, latency_s, info, trace_id)
    text = " ".join(f"{key}={_logfmt(value)}" for key, value in fields.items())
    logger.log(level, "%s", text, extra={"request": fields})


# ------------------------------------------------------------------ logging

_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, service, logger, message, trace ids."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = span_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        fields = record.__dict__.get("request")
        if isinstance(fields, dict):  # a gateway request line: its fields as keys
            out["message"] = f"{fields.get('method')} {fields.get('route')} {fields.get('status')}"
            out.update(fields)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and key not in out:
                if key == "request" and isinstance(value, dict):
                    continue
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        return json.dumps(out, ensure_ascii=False, default=str)


def text_formatter(service: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


#: aiohttp's access logger (one line per HTTP request served).
ACCESS_LOGGER = "aiohttp.access"


def setup_logging(service: str, env: Mapping[str, str] | None = None) -> str:
    """Configure the root logger for ``service`` from ``HAIF_LOG_FORMAT`` / ``HAIF_LOG_LEVEL``.

    Returns the format used (``text`` or ``json``).
    """
    env = os.environ if env is None else env
    fmt = env.get(ENV_LOG_FORMAT, "text").strip().lower() or "text"
    if fmt not in ("text", "json"):
        fmt = "text"
    level = env.get(ENV_LOG_LEVEL, "INFO").strip().upper() or "INFO"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else text_formatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        root.setLevel(level)
    except ValueError:
        root.setLevel(logging.INFO)
    # One access-log line per RPC call (every request, every heartbeat) is noise
    # behind the gateway and costs ~0.1 ms each: the services behind it log
    # their calls at DEBUG only. The gateway logs every client request in a
    # line of its own instead (REQUEST_LOGGER: request id, tenant, model, ...).
    every_call = root.level <= logging.DEBUG
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if every_call else logging.WARNING)
    return fmt
