"""Malformed requests get a 4xx with an OpenAI error body, never a 5xx (Hypothesis)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from harness.api import MODEL
from harness.cluster import Up
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    up = Up(tmp_path_factory.mktemp("fuzz"))
    up.wait_ready()
    try:
        yield up.url
    finally:
        up.stop()


def post(
    url: str, path: str, body: bytes, content_type: str = "application/json"
) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{url}{path}", data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Bodies that look like requests but break them in every field.
near_miss = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.just(MODEL),
        "prompt": json_values,
        "messages": json_values
        | st.lists(
            st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values}),
            max_size=3,
        ),
        "max_tokens": json_values | st.integers(-5, 10**9),
        "stream": json_values,
        "stream_options": json_values,
        "priority": json_values,
    },
)

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def check(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        error = json.loads(body)["error"]
        assert {"message", "type", "param", "code"} <= set(error)


@FUZZ
@given(body=near_miss, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_near_miss_bodies_never_5xx(gateway: str, body: dict[str, Any], path: str) -> None:
    # Keep real generations short: a valid body must not ask for a billion tokens.
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
        body["max_tokens"] = 64
    status, raw = post(gateway, path, json.dumps(body).encode())
    if body.get("stream") is True and status == 200:
        return  # a valid streamed answer (SSE), checked elsewhere
    check(status, raw)


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_never_5xx(gateway: str, raw: bytes) -> None:
    status, body = post(gateway, "/v1/completions", raw)
    check(status, body)
