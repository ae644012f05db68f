"""Telemetry end to end: traces, Prometheus metrics and JSON logs.

Gateway, orchestrator and one synthetic worker run in the test's event loop
on loopback (real HTTP and msgpack), with an in-memory span exporter on the
process's tracer provider.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from harness.api import MODEL
from harness.cluster import running, serve, shut_down
from harness.require import require
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from haif.configfile import ConfigError
from haif.runtime import gateway as gateway_mod
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime import telemetry
from haif.runtime import worker as worker_mod
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.gateway import Gateway
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.store import DuckDBStore
from haif.runtime.worker import Worker, WorkerSpec

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXPORTER = InMemorySpanExporter()


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runners: list[web.AppRunner] = []
        self.orch: Orchestrator | None = None
        self.orch_url = self.worker_url = self.url = ""

    async def _serve(self, app: web.Application, port: int = 0) -> str:
        runner, url = await serve(app, port=port, shutdown_timeout=1.0)
        self.runners.append(runner)
        return url

    async def start(self) -> Cluster:
        policy = ClusterConfig().policy
        self.orch = Orchestrator(policy, DuckDBStore(self.tmp / "store.duckdb"), idle_timeout_s=3.0)
        self.orch_url = await self._serve(orchestrator_mod.build_app(self.orch))
        port = free_port()
        spec = WorkerSpec(
            worker_id="w1",
            region="local",
            url=f"http://127.0.0.1:{port}",
            orchestrator_url=self.orch_url,
            mean_s=0.1,
            ttft_s=0.01,
            heartbeat_s=0.1,
        )
        self.worker_url = await self._serve(worker_mod.build_app(Worker(spec)), port)
        gw = Gateway(self.orch_url, "local", idle_timeout_s=5.0)
        self.url = await self._serve(gateway_mod.build_app(gw))
        deadline = time.monotonic() + 10.0
        while "w1" not in self.orch.status().fresh_workers:
            assert time.monotonic() < deadline, "the worker never announced itself"
            await asyncio.sleep(0.05)
        return self

    async def stop(self) -> None:
        await shut_down((), self.runners)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    assert telemetry.setup_tracing("test", EXPORTER, batch=False) is not None
    async with running(Cluster(tmp_path_factory.mktemp("telemetry"))) as c:
        yield c


def _trace_id(traceparent: str) -> str:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16 and flags
    return trace_id


async def _spans(trace_id: str, names: set[str], timeout_s: float = 5.0) -> list[ReadableSpan]:
    """The finished spans of ``trace_id`` once all of ``names`` are among them."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [
            s
            for s in EXPORTER.get_finished_spans()
            if s.context is not None and format(s.context.trace_id, "032x") == trace_id
        ]
        if names <= {s.name for s in spans}:
            return spans
        assert time.monotonic() < deadline, f"spans {sorted(s.name for s in spans)}"
        await asyncio.sleep(0.05)


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


_TRACE_NAMES = {
    "POST /v1/completions",
    "rpc.submit_stream",
    "orchestrator.dispatch",
    "rpc.infer_stream",
    "worker.generate",
}


@pytest.mark.cluster
async def test_one_trace_across_services(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 4}
    headers = {"x-request-id": "trace-1"}
    async with session.post(f"{cluster.url}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        traceparent = resp.headers["traceparent"]
    trace_id = _trace_id(traceparent)
    spans = await _spans(trace_id, _TRACE_NAMES)
    root = _one(spans, "POST /v1/completions")
    assert root.parent is None
    assert root.attributes is not None and root.attributes["haif.service"] == "gateway"
    assert root.context is not None
    assert format(root.context.span_id, "016x") == traceparent.split("-")[2]
    by_id = {s.context.span_id: s for s in spans if s.context is not None}

    def parent_name(span: ReadableSpan) -> str:
        assert span.parent is not None
        return by_id[span.parent.span_id].name

    submit = _one(spans, "rpc.submit_stream")
    dispatch = _one(spans, "orchestrator.dispatch")
    infer = _one(spans, "rpc.infer_stream")
    generate = _one(spans, "worker.generate")
    assert parent_name(submit) == "POST /v1/completions"
    assert parent_name(dispatch) == "rpc.submit_stream"
    assert parent_name(infer) == "orchestrator.dispatch"
    assert parent_name(generate) == "rpc.infer_stream"
    services = {s.name: (s.attributes or {}).get("haif.service") for s in spans}
    assert services["rpc.submit_stream"] == "orchestrator"
    assert services["orchestrator.dispatch"] == "orchestrator"
    assert services["rpc.infer_stream"] == "worker"
    assert services["worker.generate"] == "worker"
    attrs = dispatch.attributes or {}
    assert attrs["haif.request_id"] == "trace-1"
    assert attrs["haif.attempt"] == 1
    assert attrs["haif.worker_id"] == "w1"
    assert attrs["haif.region"] == "local"
    assert "first_token" in {e.name for e in dispatch.events}
    assert (generate.attributes or {})["haif.output_tokens"] == 4


@pytest.mark.cluster
async def test_client_traceparent_is_kept_and_echoed(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    async with session.post(f"{cluster.url}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        echoed = resp.headers["traceparent"]
        text = await resp.text()
    assert "data: [DONE]" in text
    assert _trace_id(echoed) == trace_id
    assert echoed.split("-")[2] != parent_id
    spans = await _spans(trace_id, _TRACE_NAMES)
    root = _one(spans, "POST /v1/completions")
    assert root.parent is not None and format(root.parent.span_id, "016x") == parent_id
    assert root.parent.is_remote


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


async def _metrics(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return _samples(await resp.text())


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if labels.items() <= got.items())


@pytest.mark.cluster
async def test_metrics(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    before = await _metrics(session, cluster.url)
    body = {"model": MODEL, "prompt": "count me", "max_tokens": 5, "stream": True}
    async with session.post(f"{cluster.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        await resp.read()
    # The middleware counts once the response is complete, which may be just
    # after the client has read it: poll (with a deadline) for the count.
    route = {"route": "/v1/completions", "status": "200", "method": "POST"}
    expected = _value(before, "haif_gateway_requests_total", **route) + 1
    deadline = time.monotonic() + 10.0
    while True:
        gw = await _metrics(session, cluster.url)
        if _value(gw, "haif_gateway_requests_total", **route) >= expected:
            break
        assert time.monotonic() < deadline, "the request was never counted"
        await asyncio.sleep(0.01)
    assert _value(gw, "haif_gateway_requests_total", **route) == expected  # once, not twice
    assert _value(gw, "haif_gateway_ttft_seconds_count", stream="true") >= 1
    assert _value(gw, "haif_gateway_inter_token_seconds_count") >= 1
    assert _value(gw, "haif_gateway_request_duration_seconds_count", route="/v1/completions") >= 1
    assert "haif_gateway_in_flight_requests" in gw

    orch = await _metrics(session, cluster.orch_url)
    assert _value(orch, "haif_orchestrator_decisions_total", type="Dispatch") >= 1
    assert _value(orch, "haif_orchestrator_decisions_total", type="Finalize") >= 1
    assert _value(orch, "haif_orchestrator_worker_breaker_state", worker="w1") == 0
    assert ({"worker": "w1"}, 0.0) in orch["haif_orchestrator_worker_outstanding"]
    assert "haif_orchestrator_worker_queue_depth" in orch
    assert _value(orch, "haif_orchestrator_fresh_workers") == 1
    assert _value(orch, "haif_orchestrator_stale_workers") == 0
    assert _value(orch, "haif_orchestrator_dlq_size") == 0
    assert "haif_orchestrator_retries_total" in orch
    assert "haif_orchestrator_dead_letters_total" in orch
    # The worker's heartbeat carries its resource sample (haif.runtime.resources).
    memory = {
        kind: _value(orch, "haif_orchestrator_worker_memory_bytes", worker="w1", kind=kind)
        for kind in ("process_rss", "host_available", "host_total")
    }
    assert 0 < memory["process_rss"] < memory["host_total"]
    assert 0 < memory["host_available"] <= memory["host_total"]
    host_cpu = _value(orch, "haif_orchestrator_worker_cpu_percent", worker="w1", scope="host")
    assert 0 <= host_cpu <= 100

    wk = await _metrics(session, cluster.worker_url)
    assert _value(wk, "haif_worker_running") == 0
    assert _value(wk, "haif_worker_waiting") == 0
    assert _value(wk, "haif_worker_tokens_generated_total") >= 5
    assert _value(wk, "haif_worker_generations_total", outcome="ok") >= 1


@pytest.mark.cluster
async def test_json_log_carries_trace_id(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(telemetry.JsonFormatter("gateway"))
    logger = logging.getLogger("haif.gateway")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        body = {"model": MODEL, "prompt": "log me", "max_tokens": 2}
        headers = {"x-request-id": "log-1"}
        url = f"{cluster.url}/v1/completions"
        async with session.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200
            trace_id = _trace_id(resp.headers["traceparent"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    mine = [line for line in lines if "log-1" in line["message"]]
    assert mine, lines
    line = mine[0]
    assert line["trace_id"] == trace_id
    assert len(line["span_id"]) == 16
    assert line["service"] == "gateway"
    assert line["logger"] == "haif.gateway"
    assert line["level"] == "DEBUG"
    assert "time" in line


async def test_json_formatter_without_span() -> None:
    record = logging.LogRecord("haif.x", logging.WARNING, __file__, 1, "hi %s", ("there",), None)
    out = json.loads(telemetry.JsonFormatter("worker").format(record))
    assert out["message"] == "hi there"
    assert out["level"] == "WARNING" and out["service"] == "worker"
    assert "trace_id" not in out


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put the root logger (handlers, level) and aiohttp's access logger back afterwards."""
    root, access = logging.getLogger(), logging.getLogger(telemetry.ACCESS_LOGGER)
    handlers, root_level, access_level = list(root.handlers), root.level, access.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(root_level)
        access.setLevel(access_level)


@pytest.mark.usefixtures("restored_logging")
async def test_setup_logging_formats() -> None:
    root = logging.getLogger()
    assert telemetry.setup_logging("gateway", {"HAIF_LOG_FORMAT": "json"}) == "json"
    assert isinstance(root.handlers[-1].formatter, telemetry.JsonFormatter)
    assert telemetry.setup_logging("gateway", {}) == "text"
    assert not isinstance(root.handlers[-1].formatter, telemetry.JsonFormatter)


async def test_spans_are_recorded_only_once_something_exports_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without an exporter spans are not recorded (they would be thrown away) but still
    have ids: the traceparent travels and logs name the trace. An exporter turns them on."""
    monkeypatch.delenv(telemetry.ENV_EXPORTER, raising=False)
    provider = telemetry.new_provider("sampling-test")
    assert telemetry.setup_tracing("sampling-test", provider=provider) is provider
    tracer = provider.get_tracer("haif.test")
    with tracer.start_as_current_span("quiet") as span:
        assert not span.is_recording()
        traceparent = telemetry.current_traceparent()
        assert traceparent is not None
        assert int(traceparent.rsplit("-", 1)[1], 16) & 1 == 0  # the sampled flag is off
        assert telemetry.span_ids() is not None
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("sampling-test", exporter, batch=False, provider=provider)
    with tracer.start_as_current_span("heard") as span:
        assert span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["heard"]


@pytest.mark.parametrize(
    ("service", "level", "logged"),
    [
        ("gateway", "INFO", False),  # its own request lines instead (test_request_log.py)
        ("orchestrator", "INFO", False),
        ("worker", "INFO", False),
        ("worker", "DEBUG", True),
        ("gateway", "ERROR", False),
    ],
)
@pytest.mark.usefixtures("restored_logging")
async def test_aiohttp_access_lines_only_when_debugging(
    service: str, level: str, logged: bool
) -> None:
    """aiohttp logs each request it serves at INFO (``aiohttp.access``): only when
    debugging (the gateway logs each client request in a structured line of its own)."""
    telemetry.setup_logging(service, {"HAIF_LOG_LEVEL": level})
    assert logging.getLogger(telemetry.ACCESS_LOGGER).isEnabledFor(logging.INFO) is logged


# ------------------------------------------------------------------ OTLP


class Collector:
    """A tiny OTLP/HTTP receiver on loopback: keeps the bodies POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        self.received = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        self.bodies.append((request.content_type, await request.read()))
        self.received.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> Collector:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_otlp_exporter_sends_spans_to_a_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    require(telemetry.OTLP_MODULE, extra="otlp")
    trace_service = require(
        "opentelemetry.proto.collector.trace.v1.trace_service_pb2", extra="otlp"
    )
    collector = await Collector().start()
    provider = telemetry.new_provider("otlp-test")
    try:
        monkeypatch.setenv(telemetry.ENV_EXPORTER, "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)  # + /v1/traces
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        assert telemetry.setup_tracing("otlp-test", provider=provider) is provider
        tracer = provider.get_tracer("haif.test")
        with tracer.start_as_current_span("haif-otlp-probe", attributes={"haif.request_id": "r1"}):
            pass
        # The exporter posts from its own thread with a blocking client: flush off the loop.
        assert await asyncio.to_thread(provider.force_flush, 10_000)
        await asyncio.wait_for(collector.received.wait(), timeout=10.0)
    finally:
        await asyncio.to_thread(provider.shutdown)
        await collector.stop()
    content_type, body = collector.bodies[0]
    assert content_type == "application/x-protobuf"
    request = trace_service.ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "haif-otlp-test"
    spans = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert [span.name for span in spans] == ["haif-otlp-probe"]
    attributes = {a.key: a.value.string_value for a in spans[0].attributes}
    assert attributes == {"haif.request_id": "r1"}


async def test_otlp_without_the_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(telemetry.ENV_EXPORTER, "otlp")
    monkeypatch.setitem(sys.modules, telemetry.OTLP_MODULE, None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install opentelemetry-exporter-otlp-proto-http"):
        telemetry.exporter_from_env()


async def test_exporter_from_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(telemetry.ENV_EXPORTER, raising=False)
    assert telemetry.exporter_from_env() is None
    monkeypatch.setenv(telemetry.ENV_EXPORTER, " Console ")
    assert isinstance(telemetry.exporter_from_env(), ConsoleSpanExporter)
    monkeypatch.setenv(telemetry.ENV_EXPORTER, "zipkin")
    assert telemetry.exporter_from_env() is None  # logged, not exported


@settings(max_examples=200, deadline=None)
@given(
    trace_id=st.integers(1, 2**128 - 1),
    span_id=st.integers(1, 2**64 - 1),
    flags=st.sampled_from([0, 1]),
)
def test_inject_writes_what_the_w3c_propagator_writes(
    trace_id: int, span_id: int, flags: int
) -> None:
    """``inject`` formats the traceparent itself: the same header as the SDK's propagator."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = NonRecordingSpan(SpanContext(trace_id, span_id, False, TraceFlags(flags)))
    ctx = set_span_in_context(span)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=ctx)
    assert telemetry.inject(ctx) == carrier["traceparent"]
    assert telemetry.extract(carrier["traceparent"]) is not None


def test_inject_without_a_valid_span_is_none() -> None:
    from opentelemetry.context import Context

    assert telemetry.inject(Context()) is None
