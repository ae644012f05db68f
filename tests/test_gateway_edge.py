"""The gateway's edge, over real gateways on loopback (see "The edge" in
:mod:`haif.runtime.gateway`): malformed bodies, read deadlines, the
connection cap, failures behind the gateway, fail-closed authentication.

Behind the main gateway runs a real orchestrator (in this event loop, its own
DuckDB store) with no worker: a request that gets through the edge is refused
by the core with 503 ``no_eligible_worker`` and recorded with its tenant.
That is how these tests tell "reached the core, as tenant T" from "stopped at
the edge". Raw sockets play the clients no HTTP library would be: short and
trickled bodies, trickled heads, connections that say nothing.

Timed assertions here are deadlines only (an answer or a close no later than
the configured limit plus :data:`MARGIN_S`), never speed.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
import pytest_asyncio
from aiohttp import web
from harness.api import MODEL
from harness.cluster import serve
from multidict import CIMultiDict

from haif.contracts import RequestRecord
from haif.runtime import gateway as gateway_mod
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.gateway import MAX_JSON_DEPTH, Gateway, GatewayAuth, GatewayLimits
from haif.runtime.messages import TokenChunk
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.rpc import LocalClient, RpcError
from haif.runtime.security import JwtConfig, generate_api_key, hash_api_key
from haif.runtime.store import DuckDBStore

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMITS = GatewayLimits(
    header_timeout_s=1.0,
    body_timeout_s=2.0,
    read_idle_timeout_s=0.5,
    max_connections=64,
    max_body_bytes=64 * 1024,
    linger_s=1.0,
)
#: Slack on every deadline: the machine is two cores shared with other work.
MARGIN_S = 2.0
ISSUER = "https://issuer.test"
AUDIENCE = "haif-edge"
SECRET = "an-hs256-secret-that-is-long-enough-for-the-test"
JSON = "application/json"
VALID = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
#: The core's answer to a request that got through the edge (no worker behind it).
REACHED_CORE = (503, "no_eligible_worker")
#: Never in a client-visible error: addresses, exception names.
INTERNALS = ("127.0.0.1", "localhost", "Error", "Exception", "Traceback", "duckdb")


@dataclass
class Edge:
    url: str
    host: str
    port: int
    orch: Orchestrator
    orch_url: str
    gateway: Gateway
    keys: dict[str, str]  # name -> API key ("acme" valid, "gone" revoked)

    async def record(self, request_id: str, timeout_s: float = 10.0) -> RequestRecord:
        deadline = time.monotonic() + timeout_s
        while True:
            records = {r.request_id: r for r in await self.orch.store.records()}
            if request_id in records:
                return records[request_id]
            assert time.monotonic() < deadline, f"no record for {request_id}"
            await asyncio.sleep(0.05)


def jwt_auth(required: bool) -> GatewayAuth:
    jwt = JwtConfig(issuer=ISSUER, audience=AUDIENCE, algorithms=("HS256",), key=SECRET)
    return GatewayAuth(required=required, jwt=jwt, key_cache_s=0.0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge")
    orch = Orchestrator(ClusterConfig().policy, DuckDBStore(tmp / "store.duckdb"))
    orch_runner, orch_url = await serve(orchestrator_mod.build_app(orch), shutdown_timeout=1.0)
    keys = {"acme": generate_api_key(), "gone": generate_api_key()}
    for tenant, key in keys.items():
        assert await orch.store.add_api_key(hash_api_key(key), tenant, "test", time.time())
    assert await orch.store.revoke_api_key(hash_api_key(keys["gone"]))
    gw = Gateway(orch_url, "local", auth=jwt_auth(required=False), limits=LIMITS)
    runner, url = await serve(gateway_mod.build_app(gw), shutdown_timeout=1.0)
    host, port = runner.addresses[0][:2]
    try:
        yield Edge(url, host, port, orch, orch_url, gw, keys)
    finally:
        await runner.cleanup()
        await orch_runner.cleanup()


@asynccontextmanager
async def gateway_at(
    orchestrator_url: str, limits: GatewayLimits = LIMITS, **kwargs: Any
) -> AsyncIterator[tuple[Gateway, str]]:
    """Another gateway on loopback, for tests that need other settings."""
    gw = Gateway(orchestrator_url, "local", limits=limits, **kwargs)
    runner, url = await serve(gateway_mod.build_app(gw), shutdown_timeout=1.0)
    try:
        yield gw, url
    finally:
        await runner.cleanup()


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    content_type: str | None = JSON,
    path: str = "/v1/completions",
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], Any]:
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    # No Content-Type given: none is sent (aiohttp would add application/octet-stream).
    skip = () if content_type is not None else ("Content-Type",)
    async with session.post(
        f"{url}{path}", data=body, headers=sent, skip_auto_headers=skip
    ) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.json(content_type=None)


def assert_openai_error(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def assert_no_internals(text: str) -> None:
    for word in INTERNALS:
        assert word not in text, (word, text)


# ------------------------------------------------------------------ raw sockets


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, within_s: float) -> RawResponse | None:
    """The next response on ``reader``; ``None`` when the connection closes without one.

    Fails (TimeoutError) unless it comes or the connection closes within ``within_s``.
    """
    async with asyncio.timeout(within_s):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            partial = getattr(exc, "partial", b"")
            assert not partial, f"a torn response head: {partial!r}"
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawResponse(status, headers, body)


async def closed_within(reader: asyncio.StreamReader, within_s: float) -> None:
    """Until the server closes the connection (reading and dropping what it sends)."""
    async with asyncio.timeout(within_s):
        with suppress(ConnectionResetError):
            while await reader.read(1 << 16):
                pass


@asynccontextmanager
async def raw_connection(
    host: str, port: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


def request_head(
    content_length: int | None = None, extra: bytes = b"", path: bytes = b"/v1/completions"
) -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
    if content_length is not None:
        head += b"Content-Length: %d\r\n" % content_length
    return head + extra + b"\r\n"


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """Send ``data`` a byte at a time, ``every_s`` apart, until done or the peer is gone."""
    with suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)


# ------------------------------------------------------------------ settings


async def test_edge_flags_make_limits() -> None:
    parser = argparse.ArgumentParser()
    gateway_mod.add_edge_args(parser)
    assert gateway_mod.edge_limits(parser.parse_args([])) == GatewayLimits()
    flags = "--header-timeout-s 3 --body-timeout-s 4.5 --read-idle-timeout-s 1 --max-connections 0"
    args = parser.parse_args(flags.split())
    limits = gateway_mod.edge_limits(args)
    assert (limits.header_timeout_s, limits.body_timeout_s) == (3.0, 4.5)
    assert (limits.read_idle_timeout_s, limits.connection_cap) == (1.0, 0)
    assert 64 <= GatewayLimits().connection_cap <= 10_000
    assert 64 <= gateway_mod.default_max_connections() <= 10_000


@pytest.mark.parametrize(
    "bad",
    [
        {"header_timeout_s": 0.0},
        {"body_timeout_s": -1.0},
        {"read_idle_timeout_s": math.nan},
        {"linger_s": math.inf},
        {"max_connections": -1},
        {"max_body_bytes": 0},
    ],
)
async def test_bad_limits_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        GatewayLimits(**bad)


# ------------------------------------------------------------------ malformed bodies


def nested(depth: int) -> bytes:
    return b'{"model": "%s", "prompt": "x", "deep": %s%s}' % (
        MODEL.encode(),
        b"[" * depth,
        b"]" * depth,
    )


def with_prompt(raw_prompt: bytes) -> bytes:
    return b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), raw_prompt)


def with_extra(raw_value: bytes) -> bytes:
    """A body with ``raw_value`` in a field the gateway does not know (allowed, ignored)."""
    return b'{"model": "%s", "prompt": "x", "x_extra": %s}' % (MODEL.encode(), raw_value)


CHAT = "/v1/chat/completions"
# (id, path, body, content type, status, code, param)
BAD_BODIES: list[tuple[str, str, bytes, str | None, int, str, str | None]] = [
    ("empty", "/v1/completions", b"", JSON, 400, "invalid_json", None),
    ("whitespace", "/v1/completions", b" \r\n\t", JSON, 400, "invalid_json", None),
    ("not-json", "/v1/completions", b"{not json", JSON, 400, "invalid_json", None),
    ("trailing-bytes", "/v1/completions", with_prompt(b"x") + b" }", JSON, 400, "invalid_json",
     None),
    ("array", "/v1/completions", b'[{"model": "m"}]', JSON, 400, "invalid_type", None),
    ("string", "/v1/completions", b'"hello"', JSON, 400, "invalid_type", None),
    ("null", "/v1/completions", b"null", JSON, 400, "invalid_type", None),
    ("number", "/v1/completions", b"42", JSON, 400, "invalid_type", None),
    ("true", CHAT, b"true", JSON, 400, "invalid_type", None),
    ("lone-high-surrogate", "/v1/completions", with_prompt(b"a\\ud800b"), JSON, 400,
     "invalid_unicode", "prompt"),
    ("lone-low-surrogate", "/v1/completions", with_prompt(b"\\uDFFF"), JSON, 400,
     "invalid_unicode", "prompt"),
    ("swapped-pair", "/v1/completions", with_prompt(b"\\udc00\\ud800"), JSON, 400,
     "invalid_unicode", "prompt"),
    ("surrogate-in-chat", CHAT,
     b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d"}]}' % MODEL.encode(),
     JSON, 400, "invalid_unicode", "messages"),
    ("surrogate-in-model", "/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', JSON, 400,
     "invalid_unicode", "model"),
    ("surrogate-in-key", "/v1/completions",
     b'{"\\ud800": 1, "model": "%s", "prompt": "x"}' % MODEL.encode(), JSON, 400,
     "invalid_unicode", None),
    ("surrogate-in-extra", "/v1/completions", with_extra(b'{"a": ["\\udabc"]}'), JSON, 400,
     "invalid_unicode", "x_extra"),
    ("utf8-encoded-surrogate", "/v1/completions", with_prompt(b"\xed\xa0\x80"), JSON, 400,
     "invalid_json", None),
    ("invalid-utf8", "/v1/completions", with_prompt(b"\xff\xfe"), JSON, 400, "invalid_json", None),
    ("utf16", "/v1/completions", json.dumps(VALID).encode("utf-16"), JSON, 400, "invalid_json",
     None),
    ("nan", "/v1/completions", with_extra(b"NaN"), JSON, 400, "invalid_number", None),
    ("infinity", "/v1/completions", with_extra(b"Infinity"), JSON, 400, "invalid_number", None),
    ("minus-infinity", CHAT, with_extra(b"-Infinity"), JSON, 400, "invalid_number", None),
    ("float-overflow", "/v1/completions", with_extra(b"1e999"), JSON, 400, "invalid_number", None),
    ("huge-int", "/v1/completions", with_extra(b"9" * 5000), JSON, 400, "invalid_number", None),
    ("long-int", "/v1/completions", with_extra(b"-" + b"1" * 65), JSON, 400, "invalid_number",
     None),
    ("max-tokens-huge", "/v1/completions",
     b'{"model": "%s", "prompt": "x", "max_tokens": %s}' % (MODEL.encode(), b"9" * 60), JSON, 400,
     "invalid_value", "max_tokens"),
    ("nested-past-the-limit", "/v1/completions", nested(MAX_JSON_DEPTH), JSON, 400,
     "nesting_too_deep", None),
    ("nested-1000", "/v1/completions", nested(1000), JSON, 400, "nesting_too_deep", None),
    ("nested-20000", CHAT, nested(20_000), JSON, 400, "nesting_too_deep", None),
    ("text-plain", "/v1/completions", json.dumps(VALID).encode(), "text/plain", 415,
     "unsupported_media_type", None),
    ("form", "/v1/completions", b"model=m&prompt=x", "application/x-www-form-urlencoded", 415,
     "unsupported_media_type", None),
    ("octet-stream", "/v1/completions", json.dumps(VALID).encode(), "application/octet-stream",
     415, "unsupported_media_type", None),
    ("json-in-latin-1", "/v1/completions", json.dumps(VALID).encode(),
     "application/json; charset=latin-1", 415, "unsupported_media_type", None),
    ("too-large", "/v1/completions", with_prompt(b"x" * (LIMITS.max_body_bytes + 1)), JSON, 413,
     "payload_too_large", None),
    ("schema", "/v1/completions", b'{"model": "%s"}' % MODEL.encode(), JSON, 400, "invalid_value",
     "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "code", "param"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
async def test_a_malformed_body_gets_an_openai_4xx(
    edge: Edge,
    session: aiohttp.ClientSession,
    path: str,
    body: bytes,
    content_type: str | None,
    status: int,
    code: str,
    param: str | None,
) -> None:
    got, _, answer = await post(session, edge.url, body, content_type, path)
    assert got == status, answer
    error = assert_openai_error(answer)
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param), error


# Bodies at the edge of what is refused: these get through to the core.
GOOD_BODIES: list[tuple[str, bytes, str | None]] = [
    ("nested-to-the-limit", nested(MAX_JSON_DEPTH - 1), JSON),
    ("surrogate-pair", with_prompt(b"\\ud83d\\ude00 \\u00e9"), JSON),
    ("escaped-backslash-u", with_prompt(b"\\\\ud800"), JSON),
    ("no-content-type", json.dumps(VALID).encode(), None),
    ("json-utf8-charset", json.dumps(VALID).encode(), "Application/JSON; charset=UTF-8"),
    ("vendor-json", json.dumps(VALID).encode(), "application/vnd.api+json"),
    ("long-but-fine-int", with_extra(b"1" * 60), JSON),
    ("float", with_extra(b"1.5e300"), JSON),
]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [case[1:] for case in GOOD_BODIES],
    ids=[case[0] for case in GOOD_BODIES],
)
async def test_a_body_at_the_limits_gets_through(
    edge: Edge, session: aiohttp.ClientSession, body: bytes, content_type: str | None
) -> None:
    status, _, answer = await post(session, edge.url, body, content_type)
    assert (status, answer["error"]["code"]) == REACHED_CORE, answer


# (id, what is sent, status, code): HTTP that aiohttp's parser or the body reader refuses.
BAD_HTTP: list[tuple[str, bytes, int, str]] = [
    ("bad-chunk-size", request_head(extra=b"Transfer-Encoding: chunked\r\n")
     + b"zz\r\nab\r\n0\r\n\r\n", 400, "invalid_http"),
    ("bad-content-length", request_head(extra=b"Content-Length: 1x\r\n") + b"{}", 400,
     "invalid_http"),
    ("length-and-chunked", request_head(5, b"Transfer-Encoding: chunked\r\n") + b"{}", 400,
     "invalid_http"),
    ("header-too-long", request_head(2, b"X-Big: " + b"a" * 20_000 + b"\r\n") + b"{}", 400,
     "invalid_http"),
    ("not-http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "invalid_http"),
    ("bad-gzip", request_head(10, b"Content-Encoding: gzip\r\n") + b"0123456789", 400,
     "invalid_body"),
    ("gzip-bomb", request_head(len(gzip.compress(b" " * (1 << 20))), b"Content-Encoding: gzip\r\n")
     + gzip.compress(b" " * (1 << 20)), 413, "payload_too_large"),
    ("chunked-too-large", request_head(extra=b"Transfer-Encoding: chunked\r\n")
     + b"%x\r\n" % (LIMITS.max_body_bytes + 10) + b" " * (LIMITS.max_body_bytes + 10)
     + b"\r\n0\r\n\r\n", 413, "payload_too_large"),
    ("content-length-too-large", request_head(1 << 40), 413, "payload_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("sent", "status", "code"), [c[1:] for c in BAD_HTTP], ids=[c[0] for c in BAD_HTTP]
)
async def test_malformed_http_gets_an_openai_4xx(
    edge: Edge, sent: bytes, status: int, code: str
) -> None:
    async with raw_connection(edge.host, edge.port) as (reader, writer):
        writer.write(sent)
        with suppress(ConnectionError):
            await writer.drain()
        resp = await read_response(reader, LIMITS.read_idle_timeout_s + MARGIN_S)
        assert resp is not None, "closed without an answer"
        assert resp.status == status, resp
        error = assert_openai_error(resp.json())
        assert error["code"] == code, error
        assert resp.headers.get("connection", "").lower() == "close" or resp.status == 400
        await closed_within(reader, LIMITS.linger_s + MARGIN_S)


async def test_a_chunked_body_is_read_whole(edge: Edge) -> None:
    body = json.dumps(VALID).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    async with raw_connection(edge.host, edge.port) as (reader, writer):
        writer.write(request_head(extra=b"Transfer-Encoding: chunked\r\n") + chunks + b"0\r\n\r\n")
        resp = await read_response(reader, MARGIN_S + 5)
        assert resp is not None
        assert (resp.status, resp.json()["error"]["code"]) == REACHED_CORE


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/models", 404, "unknown_url"),
        ("POST", "/v1/embeddings", 404, "unknown_url"),
        ("GET", "/", 404, "unknown_url"),
        ("GET", "/v1/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/chat/completions", 405, "method_not_allowed"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
    ],
)
async def test_unknown_routes_get_openai_json(
    edge: Edge, session: aiohttp.ClientSession, method: str, path: str, status: int, code: str
) -> None:
    async with session.request(method, f"{edge.url}{path}") as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        error = assert_openai_error(await resp.json())
    assert error["code"] == code
    if status == 405:
        assert resp.headers["Allow"]


# ------------------------------------------------------------------ deadlines


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_shorter_than_announced_gets_408(edge: Edge, framing: str) -> None:
    async with raw_connection(edge.host, edge.port) as (reader, writer):
        if framing == "content-length":
            writer.write(request_head(100) + b'{"model": ')
        else:
            writer.write(request_head(extra=b"Transfer-Encoding: chunked\r\n") + b"40\r\n{")
        started = time.monotonic()
        resp = await read_response(reader, LIMITS.read_idle_timeout_s + MARGIN_S)
        waited = time.monotonic() - started
        assert resp is not None, "closed without an answer"
        assert resp.status == 408
        assert assert_openai_error(resp.json())["code"] == "request_timeout"
        assert resp.headers["connection"].lower() == "close"
        assert waited >= LIMITS.read_idle_timeout_s * 0.9  # the idle deadline, not before
        await closed_within(reader, LIMITS.linger_s + MARGIN_S)


async def test_a_trickled_body_gets_408_at_the_body_deadline(edge: Edge) -> None:
    body = json.dumps({**VALID, "prompt": "x" * 200}).encode()
    # A byte every 0.1 s never trips the 0.5 s idle deadline; it would take 20 s.
    every_s = LIMITS.read_idle_timeout_s / 5
    async with raw_connection(edge.host, edge.port) as (reader, writer):
        writer.write(request_head(len(body)))
        started = time.monotonic()
        sender = asyncio.create_task(trickle(writer, body, every_s))
        try:
            resp = await read_response(reader, LIMITS.body_timeout_s + MARGIN_S)
        finally:
            sender.cancel()
        waited = time.monotonic() - started
        assert resp is not None and resp.status == 408, resp
        assert waited >= LIMITS.body_timeout_s * 0.9  # the body deadline, not the idle one
        await closed_within(reader, LIMITS.linger_s + MARGIN_S)


async def test_a_trickled_head_is_closed_at_the_header_deadline(edge: Edge) -> None:
    head = request_head(2) + b"{}"
    async with raw_connection(edge.host, edge.port) as (reader, writer):
        sender = asyncio.create_task(trickle(writer, head, LIMITS.header_timeout_s / 10))
        try:
            resp = await read_response(reader, LIMITS.header_timeout_s + MARGIN_S)
        finally:
            sender.cancel()
        assert resp is None, f"answered instead of closed: {resp}"


async def test_a_silent_connection_is_closed(edge: Edge) -> None:
    async with raw_connection(edge.host, edge.port) as (reader, _writer):
        assert await read_response(reader, LIMITS.header_timeout_s + MARGIN_S) is None


async def test_an_idle_keep_alive_connection_is_closed(edge: Edge) -> None:
    async with raw_connection(edge.host, edge.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        resp = await read_response(reader, MARGIN_S + 5)
        assert resp is not None and resp.status == 200
        assert resp.headers.get("connection", "keep-alive").lower() != "close"
        assert await read_response(reader, LIMITS.header_timeout_s + MARGIN_S) is None


# ------------------------------------------------------------------ the connection cap


def metric(gw: Gateway, name: str) -> float:
    value = gw.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_connections_over_the_cap_get_503_and_are_closed(edge: Edge) -> None:
    limits = GatewayLimits(header_timeout_s=30.0, max_connections=3, linger_s=1.0)
    async with gateway_at(edge.orch_url, limits) as (gw, url):
        host, port = url.removeprefix("http://").split(":")
        held = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        try:
            deadline = time.monotonic() + 10
            while metric(gw, "haif_gateway_open_connections") < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            async with raw_connection(host, int(port)) as (reader, writer):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
                resp = await read_response(reader, MARGIN_S)
                assert resp is not None and resp.status == 503
                assert resp.headers["retry-after"].isdigit()
                assert resp.headers["connection"].lower() == "close"
                assert assert_openai_error(resp.json())["code"] == "too_many_connections"
                await closed_within(reader, 1.0 + MARGIN_S)
            assert metric(gw, "haif_gateway_connections_refused_total") == 1
            # A held connection is still served, and when one closes a new one gets in.
            reader, writer = held[0]
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
            resp = await read_response(reader, MARGIN_S + 5)
            assert resp is not None and resp.status == 200
            while metric(gw, "haif_gateway_open_connections") > 2:
                assert time.monotonic() < deadline + 10
                await asyncio.sleep(0.01)
            async with raw_connection(host, int(port)) as (reader, writer):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
                resp = await read_response(reader, MARGIN_S + 5)
                assert resp is not None and resp.status == 200
        finally:
            for _, writer in held:
                writer.close()


# ------------------------------------------------------------------ failures behind it


async def test_an_unreachable_orchestrator_is_503_without_internals(
    session: aiohttp.ClientSession,
) -> None:
    port = free_port()
    async with gateway_at(f"http://127.0.0.1:{port}", auth=jwt_auth(required=False)) as (_, url):
        body = json.dumps(VALID).encode()
        for headers in ({}, {"Authorization": f"Bearer {generate_api_key()}"}):
            status, got, answer = await post(
                session, url, body, headers={"x-request-id": "edge-down", **headers}
            )
            assert status == 503, answer
            error = assert_openai_error(answer)
            assert (error["type"], error["code"]) == ("service_unavailable", "unavailable")
            assert got["Retry-After"].isdigit()
            assert got["x-request-id"] == "edge-down"
            assert_no_internals(json.dumps(answer))
            assert str(port) not in json.dumps(answer)
        async with session.get(f"{url}/v1/models") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
            assert_no_internals(await resp.text())
        async with session.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            text = await resp.text()
            assert "orchestrator unavailable" in text and str(port) not in text
            assert_no_internals(text)


async def test_a_store_that_is_down_is_503_store_unavailable(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    store = DuckDBStore(tmp_path / "store.duckdb")
    orch = Orchestrator(ClusterConfig().policy, store)
    runner, orch_url = await serve(orchestrator_mod.build_app(orch), shutdown_timeout=1.0)
    try:
        async with gateway_at(orch_url, auth=jwt_auth(required=True)) as (_, url):
            await store.close()  # the key lookup now fails inside the orchestrator
            status, got, answer = await post(
                session,
                url,
                json.dumps(VALID).encode(),
                headers={"x-api-key": generate_api_key(), "x-request-id": "edge-store"},
            )
            assert status == 503, answer
            error = assert_openai_error(answer)
            assert (error["type"], error["code"]) == ("service_unavailable", "store_unavailable")
            assert got["Retry-After"].isdigit() and got["x-request-id"] == "edge-store"
            assert_no_internals(json.dumps(answer))
    finally:
        with suppress(Exception):
            await runner.cleanup()


def failing_orchestrator(error: RpcError, *, after_tokens: bool = False) -> LocalClient:
    """An in-process stand-in whose ``submit_stream`` fails with ``error``."""

    async def submit_stream(_body: object) -> AsyncIterator[Any]:
        if after_tokens:
            yield TokenChunk(0, ("hello",))
        raise error

    return LocalClient({}, {"submit_stream": submit_stream}, timeout_s=5.0)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("store_unavailable", "store_unavailable"),
        ("internal", "unavailable"),
        ("bad_reply", "unavailable"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_orchestrator_errors_reach_the_client_without_internals(
    session: aiohttp.ClientSession, code: str, expected: str, stream: bool
) -> None:
    secret = "postgresql://10.1.2.3:5432: ConnectionRefusedError: [Errno 111]"
    local = failing_orchestrator(RpcError(code, secret, 500), after_tokens=stream)
    async with gateway_at("http://127.0.0.1:9", local=local) as (_, url):
        body = json.dumps({**VALID, "stream": stream}).encode()
        async with session.post(
            f"{url}/v1/completions", data=body, headers={"Content-Type": JSON}
        ) as resp:
            text = await resp.text()
            if stream:  # the status line went out with the first token
                assert resp.status == 200
                error = json.loads(text.strip().split("data: ")[-1])["error"]
            else:
                assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
                error = assert_openai_error(json.loads(text))
    assert (error["type"], error["code"]) == ("service_unavailable", expected)
    assert "10.1.2.3" not in text and "Refused" not in text
    assert_no_internals(text)


async def test_an_unexpected_exception_is_a_json_500_without_its_text(
    session: aiohttp.ClientSession,
) -> None:
    class Boom(Exception):
        pass

    async def explode(_request: web.Request) -> web.Response:
        raise Boom("secret at 10.9.8.7")

    app = gateway_mod.build_app(Gateway("http://127.0.0.1:9", "local", limits=LIMITS))
    app.router.add_post("/v1/boom", explode)  # a handler with a bug, on the gateway's app
    runner, url = await serve(app, shutdown_timeout=1.0)
    try:
        async with session.post(f"{url}/v1/boom", headers={"x-request-id": "boom-1"}) as resp:
            assert resp.status == 500
            text = await resp.text()
            assert resp.headers["x-request-id"] == "boom-1"
    finally:
        await runner.cleanup()
    error = assert_openai_error(json.loads(text))
    assert (error["type"], error["code"]) == ("api_error", "internal_error")
    assert "10.9.8.7" not in text and "Boom" not in text


# ------------------------------------------------------------------ fail closed


def token(**overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "tenant": "jwt-tenant", "iat": now, "exp": now + 300}
    claims.update(overrides)
    return pyjwt.encode(claims, SECRET, algorithm="HS256")


Credentials = Callable[[Edge], dict[str, str]]
# (id, the headers, expected tenant or (401, code)); auth is NOT required here.
FAIL_CLOSED: list[tuple[str, Credentials, str | tuple[int, str]]] = [
    ("none", lambda e: {}, "anonymous"),
    ("empty-bearer", lambda e: {"Authorization": "Bearer "}, "anonymous"),
    ("placeholder-unused", lambda e: {"Authorization": "Bearer unused"}, "anonymous"),
    ("placeholder-EMPTY", lambda e: {"Authorization": "Bearer EMPTY"}, "anonymous"),
    ("placeholder-sk", lambda e: {"x-api-key": "sk-" + "a" * 48}, "anonymous"),
    ("basic-auth", lambda e: {"Authorization": "Basic dXNlcjpwYXNz"}, "anonymous"),
    ("valid-key", lambda e: {"Authorization": f"Bearer {e.keys['acme']}"}, "acme"),
    ("valid-key-x-api-key", lambda e: {"x-api-key": e.keys["acme"]}, "acme"),
    ("valid-key-and-placeholder", lambda e: {"Authorization": f"Bearer {e.keys['acme']}",
                                             "x-api-key": "unused"}, "acme"),
    ("valid-jwt", lambda e: {"Authorization": f"Bearer {token()}"}, "jwt-tenant"),
    ("revoked-key", lambda e: {"Authorization": f"Bearer {e.keys['gone']}"},
     (401, "invalid_api_key")),
    ("revoked-key-x-api-key", lambda e: {"x-api-key": e.keys["gone"]}, (401, "invalid_api_key")),
    ("unknown-key", lambda e: {"Authorization": f"Bearer {generate_api_key()}"},
     (401, "invalid_api_key")),
    ("unknown-key-other-prefix", lambda e: {"x-api-key": generate_api_key("acme_prod")},
     (401, "invalid_api_key")),
    ("two-different-keys", lambda e: {"Authorization": f"Bearer {e.keys['acme']}",
                                      "x-api-key": e.keys["gone"]}, (401, "ambiguous_credentials")),
    ("expired-jwt", lambda e: {"Authorization": f"Bearer {token(exp=int(time.time()) - 600)}"},
     (401, "token_expired")),
    ("jwt-wrong-audience", lambda e: {"Authorization": f"Bearer {token(aud='other')}"},
     (401, "invalid_audience")),
    ("forged-jwt", lambda e: {"Authorization": "Bearer " + pyjwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "tenant": "x", "exp": time.time() + 60},
        "another-secret-that-is-long-enough-for-hs256", algorithm="HS256")},
     (401, "invalid_token")),
    ("garbage-jwt", lambda e: {"Authorization": "Bearer a.b.c"}, (401, "invalid_token")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [case[1:] for case in FAIL_CLOSED],
    ids=[case[0] for case in FAIL_CLOSED],
)
async def test_a_presented_invalid_credential_is_refused_even_when_auth_is_optional(
    edge: Edge,
    session: aiohttp.ClientSession,
    request: pytest.FixtureRequest,
    credentials: Credentials,
    expected: str | tuple[int, str],
) -> None:
    assert not edge.gateway.auth.required
    rid = f"fail-closed-{request.node.callspec.id}"
    headers = {**credentials(edge), "x-request-id": rid}
    status, got, answer = await post(session, edge.url, json.dumps(VALID).encode(), headers=headers)
    if isinstance(expected, tuple):
        assert (status, answer["error"]["code"]) == expected, answer
        assert answer["error"]["type"] == "authentication_error"
        assert got["WWW-Authenticate"].startswith("Bearer")
        return
    assert (status, answer["error"]["code"]) == REACHED_CORE, answer
    assert (await edge.record(rid)).tenant == expected


async def test_non_utf8_credentials_are_refused_not_crashed(edge: Edge) -> None:
    body = json.dumps(VALID).encode()
    async with raw_connection(edge.host, edge.port) as (reader, writer):
        writer.write(
            request_head(len(body), b"Authorization: Bearer haif-\xff\xfe\r\nx-api-key: \xfe\r\n")
            + body
        )
        resp = await read_response(reader, MARGIN_S + 5)
    # Not shaped like a HAIF credential: a placeholder, so anonymous here.
    assert resp is not None and (resp.status, resp.json()["error"]["code"]) == REACHED_CORE
    async with gateway_at(edge.orch_url, auth=jwt_auth(required=True)) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        async with raw_connection(host, int(port)) as (reader, writer):
            writer.write(
                request_head(len(body), b"Authorization: Bearer \xff\xfe\r\nx-api-key: \xfd\r\n")
                + body
            )
            resp = await read_response(reader, MARGIN_S + 5)
        assert resp is not None and resp.status == 401, resp


# ------------------------------------------------------------------ a seeded raw fuzz

INTERESTING = [
    b"\\ud800",
    b"\\udfff",
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"9" * 80,
    b"[" * 300,
    b"\xff",
    b"\xed\xa0\x80",
    b"\x00",
    b'"',
    b"\\",
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: 999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Encoding: gzip\r\n",
    b"Content-Type: text/plain\r\n",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out) + 1)
        op = rng.randrange(5)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 1:
            out[pos:pos] = rng.choice(INTERESTING)
        elif op == 2:
            del out[pos : pos + rng.randint(1, 8)]
        elif op == 3:
            out = out[: max(1, pos)]
        else:
            start = rng.randrange(len(out) + 1)
            out[pos:pos] = out[start : start + rng.randint(1, 16)]
    return bytes(out)


def fuzz_case(rng: random.Random) -> bytes:
    path = rng.choice([b"/v1/completions", b"/v1/chat/completions"])
    if path == b"/v1/completions":
        body = json.dumps({**VALID, "stream": rng.random() < 0.3}).encode()
    else:
        messages = [{"role": "user", "content": "hi"}]
        body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2}).encode()
    if rng.random() < 0.6:  # the body only, framed right: the JSON checks
        body = mutate(rng, body)
        return request_head(len(body), path=path) + body
    return mutate(rng, request_head(len(body), path=path) + body)  # the whole message


async def test_seeded_raw_fuzz_never_5xx_never_hangs(edge: Edge) -> None:
    rng = random.Random(20261205)
    cases = [fuzz_case(rng) for _ in range(240)]
    # Worst case: a head that never ends, or a body that stalls.
    within_s = LIMITS.header_timeout_s + LIMITS.body_timeout_s + MARGIN_S
    outcomes: dict[str, int] = {}
    gate = asyncio.Semaphore(24)

    async def one(sent: bytes) -> None:
        async with gate, raw_connection(edge.host, edge.port) as (reader, writer):
            writer.write(sent)
            with suppress(ConnectionError):
                await writer.drain()
            resp = await read_response(reader, within_s)
            if resp is None:
                outcomes["closed"] = outcomes.get("closed", 0) + 1
                return
            outcomes[str(resp.status)] = outcomes.get(str(resp.status), 0) + 1
            if resp.status >= 400:
                error = assert_openai_error(resp.json())
                assert resp.status < 500 or (resp.status, error["code"]) == REACHED_CORE, (
                    sent,
                    resp,
                )

    await asyncio.gather(*(one(sent) for sent in cases))
    assert sum(outcomes.values()) == len(cases)
    assert outcomes.get("400", 0) > len(cases) // 4, outcomes  # the fuzz reaches the checks
