"""Malformed requests get a 4xx with an OpenAI error body, never a 5xx (Hypothesis).

Against a whole ``haif up`` cluster with its default edge settings. The
table-driven cases, the deadlines and a seeded raw-socket fuzz are in
``tests/test_gateway_edge.py``.
"""

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


# What once got a 500 (issue 13): lone surrogates, deep nesting, NaN /
# Infinity, numbers Python will not convert. Each is JSON text put as the
# value of a field of an otherwise valid body: every such body is refused.
# All high or all low: never a valid pair (which JSON decodes to one character).
surrogates = st.text(
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDBFF), min_size=1, max_size=3
) | st.text(
    alphabet=st.characters(min_codepoint=0xDC00, max_codepoint=0xDFFF), min_size=1, max_size=3
)
hostile_json = st.one_of(
    st.integers(65, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(65, 3000).map(lambda n: '{"a": ' * n + "1" + "}" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "[NaN]"]),
    st.integers(65, 6000).map(lambda n: "9" * n),
    surrogates.map(json.dumps),  # ASCII JSON: "\ud800" escapes
    st.tuples(st.text(max_size=5), surrogates).map(lambda t: json.dumps({"k": "".join(t)})),
)
hostile_field = st.sampled_from(
    ["prompt", "model", "max_tokens", "temperature", "stream", "user", "messages", "extra"]
)


@FUZZ
@given(
    value=hostile_json,
    field=hostile_field,
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
)
def test_hostile_json_values_get_400(gateway: str, value: str, field: str, path: str) -> None:
    head = {"model": MODEL, "max_tokens": 4, "prompt": "x"}
    if path.endswith("chat/completions"):
        head = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    text = json.dumps(head)[:-1] + f', "{field}": {value}}}'
    status, raw = post(gateway, path, text.encode())
    assert 400 <= status < 500, (status, raw[:300])
    check(status, raw)


@FUZZ
@given(
    content_type=st.sampled_from(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "application/json; charset=utf-16",
            "application/octet-stream",
        ]
    ),
    raw=st.binary(max_size=100)
    | st.just(json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 4}).encode()),
)
def test_wrong_content_types_get_415(gateway: str, content_type: str, raw: bytes) -> None:
    status, body = post(gateway, "/v1/completions", raw, content_type)
    assert status == 415, (status, body[:300])
    check(status, body)
