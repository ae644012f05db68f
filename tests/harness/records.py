"""A request record for tests that need one (a finished, successful request)."""

from __future__ import annotations

from typing import Any

from haif.contracts import RequestRecord


def ok_record(request_id: str, **overrides: Any) -> RequestRecord:
    """A served request's record: 10 prompt tokens, 2 output tokens, worker w1."""
    fields: dict[str, Any] = {
        "request_id": request_id,
        "tenant": "acme",
        "model": "llama-3-8b",
        "origin_region": "",
        "served_region": "us-east",
        "worker_id": "w1",
        "gpu_class": "a100",
        "arrival_s": 0.0,
        "admitted_s": 0.01,
        "first_token_s": 0.1,
        "finish_s": 0.2,
        "prompt_tokens": 10,
        "output_tokens": 2,
        "attempts": 1,
        "status": "ok",
        "reason": None,
        "cold_start": False,
        "cost": 0.1,
    }
    return RequestRecord(**{**fields, **overrides})


def timed_record(i: int, ttft: float, e2e: float, **overrides: Any) -> RequestRecord:
    """Request ``r{i}``, arrived at ``i`` s, first token ``ttft`` and end ``e2e`` s later."""
    fields: dict[str, Any] = {
        "request_id": f"r{i}",
        "tenant": "t",
        "model": "m",
        "origin_region": "a",
        "served_region": "a",
        "worker_id": "w",
        "gpu_class": "g",
        "arrival_s": float(i),
        "admitted_s": None,
        "first_token_s": i + ttft,
        "finish_s": i + e2e,
        "prompt_tokens": 1,
        "output_tokens": 1,
        "attempts": 1,
        "status": "ok",
        "reason": None,
        "cold_start": False,
        "cost": 0.0,
    }
    return RequestRecord(**{**fields, **overrides})
