"""The gateway's request log line and the bounded, model-labelled metrics behind it."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client import generate_latest

from haif.contracts import DeadLetter, Dispatch, Finalize, Reject, Request, RequestRecord
from haif.runtime import telemetry
from haif.runtime.telemetry import (
    OTHER_LABEL,
    UNKNOWN_MODEL,
    BoundedLabel,
    GatewayMetrics,
    OrchestratorMetrics,
    RequestInfo,
    WorkerMetrics,
)


def _value(registry: Any, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def test_bounded_label_keeps_the_first_values_and_folds_the_rest() -> None:
    label = BoundedLabel(2)
    assert [label(v) for v in ("a", "b", "c", "a", None, "")] == [
        "a",
        "b",
        OTHER_LABEL,
        "a",
        "",
        "",
    ]


def test_model_label_only_for_what_the_core_knew() -> None:
    m = GatewayMetrics()
    assert m.model(RequestInfo()) == ""
    assert m.model(RequestInfo(model="never-reached-the-core")) == ""
    assert m.model(RequestInfo(model="made-up", model_found=False)) == UNKNOWN_MODEL
    assert m.model(RequestInfo(model="llama", model_found=True)) == "llama"
    assert m.model(RequestInfo(model="llama", ttft_s=0.1)) == "llama"


def test_finished_counts_outcomes_and_tokens_by_model_and_tenant() -> None:
    m = GatewayMetrics()
    ok = RequestInfo(
        model="llama", model_found=True, tenant="acme", outcome="ok",
        prompt_tokens=7, completion_tokens=5,
    )  # fmt: skip
    refused = RequestInfo(
        model="nope", model_found=False, tenant="acme", outcome="rejected", prompt_tokens=3
    )
    for info in (ok, ok, refused, RequestInfo(model="llama")):  # the last never got an answer
        m.finished(info)
    r = m.registry
    assert (
        _value(r, "haif_gateway_completions_total", model="llama", tenant="acme", outcome="ok") == 2
    )
    assert (
        _value(
            r, "haif_gateway_completions_total", model="unknown", tenant="acme", outcome="rejected"
        )
        == 1
    )
    assert _value(r, "haif_gateway_prompt_tokens_total", model="llama", tenant="acme") == 14
    assert _value(r, "haif_gateway_completion_tokens_total", model="llama", tenant="acme") == 10
    assert _value(r, "haif_gateway_prompt_tokens_total", model="unknown", tenant="acme") == 0


def test_no_created_series() -> None:
    m = GatewayMetrics()
    m.requests.labels("/v1/completions", "POST", "200", "llama").inc()
    m.ttft.labels("llama", "true").observe(0.1)
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    assert 'haif_gateway_requests_total{method="POST",model="llama"' in text


def _request(model: str) -> Request:
    return Request("r1", "acme", model, 3, 5, 0.0)


def _record(model: str, status: str = "ok", reason: str | None = None) -> RequestRecord:
    return RequestRecord(
        "r1", "acme", model, "local", "local", "w1", "A100-80G", 0.0, 0.0, 0.1, 0.2,
        3, 5, 1, status, reason, False, 0.0,
    )  # fmt: skip


class _Pending:
    def __init__(self, request: Request) -> None:
        self.request = request


def test_orchestrator_decisions_by_type_and_model() -> None:
    m = OrchestratorMetrics()
    pending = {"r1": _Pending(_request("llama"))}
    m.count_decision(Dispatch("r1", "w1", 1, "local", "A100-80G"), pending)
    m.count_decision(Finalize(_record("llama")), {})
    m.count_decision(DeadLetter("r1", "worker_crashed", 3), pending)
    m.count_decision(Reject("r2", 404, "model_not_found"), {"r2": _Pending(_request("junk"))})
    m.count_decision(Finalize(_record("junk", "rejected", "model_not_found")), {})
    r = m.registry
    assert _value(r, "haif_orchestrator_decisions_total", type="Dispatch", model="llama") == 1
    assert _value(r, "haif_orchestrator_decisions_total", type="Finalize", model="llama") == 1
    assert _value(r, "haif_orchestrator_decisions_total", type="DeadLetter", model="llama") == 1
    assert _value(r, "haif_orchestrator_decisions_total", type="Reject", model="unknown") == 1
    assert _value(r, "haif_orchestrator_decisions_total", type="Finalize", model="unknown") == 1
    assert "junk" not in generate_latest(r).decode()


class _Store:
    def __init__(self, rows: int | None) -> None:
        self.rows = rows

    async def list_dead_letters(self) -> list[int]:
        if self.rows is None:
            raise ConnectionError("store down")
        return list(range(self.rows))


async def test_store_up_says_whether_the_store_answered() -> None:
    m = OrchestratorMetrics()
    await m.refresh_store(_Store(3))
    assert _value(m.registry, "haif_orchestrator_store_up") == 1
    assert _value(m.registry, "haif_orchestrator_dlq_size") == 3
    await m.refresh_store(_Store(None))
    assert _value(m.registry, "haif_orchestrator_store_up") == 0
    assert _value(m.registry, "haif_orchestrator_dlq_size") == 3  # the last size known


def test_worker_tokens_by_model_and_in_total() -> None:
    m = WorkerMetrics(lambda: 0, lambda: 0, 4)
    m.prompt_tokens.labels("llama").inc(9)
    m.generated("llama", 3)
    m.generated("qwen", 2)
    r = m.registry
    assert _value(r, "haif_worker_tokens_generated_total") == 5
    assert _value(r, "haif_worker_generation_tokens_total", model="llama") == 3
    assert _value(r, "haif_worker_prompt_tokens_total", model="llama") == 9


# ------------------------------------------------------------------ the log line


def _info() -> RequestInfo:
    return RequestInfo(
        request_id="req-1",
        tenant="acme corp",
        model='we"ird\nmodel',
        model_found=True,
        stream=True,
        worker="w2",
        outcome="ok",
        attempts=1,
        ttft_s=0.0123456789,
        prompt_tokens=12,
        completion_tokens=34,
    )


def test_request_line_is_logfmt(caplog: pytest.LogCaptureFixture) -> None:
    request = make_mocked_request("POST", "/v1/completions")
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        telemetry.log_request(request, "/v1/completions", 200, 0.5, _info(), "ab" * 16)
    [record] = caplog.records
    line = record.getMessage()
    assert line.startswith("request_id=req-1 method=POST route=/v1/completions status=200 ")
    assert ' tenant="acme corp" ' in line
    assert ' model="we\\"ird\\nmodel" ' in line  # quoted: one line, parseable
    for field in (
        "stream=true",
        "worker=w2",
        "outcome=ok",
        "attempts=1",
        "ttft_s=0.012346",
        "latency_s=0.5",
        "prompt_tokens=12",
        "completion_tokens=34",
        f"trace_id={'ab' * 16}",
    ):
        assert f" {field}" in line, field
    assert "\n" not in line


def test_request_line_as_json(caplog: pytest.LogCaptureFixture) -> None:
    request = make_mocked_request("POST", "/v1/chat/completions")
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        telemetry.log_request(request, "/v1/chat/completions", 200, 0.25, _info())
    out = json.loads(telemetry.JsonFormatter("gateway").format(caplog.records[0]))
    assert out["message"] == "POST /v1/chat/completions 200"
    assert out["request_id"] == "req-1" and out["tenant"] == "acme corp"
    assert out["worker"] == "w2" and out["status"] == 200 and out["latency_s"] == 0.25
    assert out["prompt_tokens"] == 12 and out["completion_tokens"] == 34
    assert out["stream"] is True and "request" not in out


def test_probes_and_scrapes_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        for path in ("/healthz", "/readyz", "/metrics"):
            telemetry.log_request(make_mocked_request("GET", path), path, 200, 0.0, RequestInfo())
    assert caplog.records == []
    with caplog.at_level(logging.DEBUG, logger=telemetry.REQUEST_LOGGER):
        telemetry.log_request(
            make_mocked_request("GET", "/metrics"), "/metrics", 200, 0.0, RequestInfo()
        )
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
