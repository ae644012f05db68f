"""RPC transport: streams on a real aiohttp server on loopback (frames, batching,
keepalives, errors), and the in-process client a colocated gateway uses.

The server writes the frames that are ready together in one HTTP chunk (one
send), and the last ones with the end frame and the chunked terminator; an
item that comes later still goes out at once, and a failure after some items
delivers those items first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from haif.runtime.rpc import (
    CONTENT_TYPE,
    LocalClient,
    RpcClient,
    RpcError,
    RpcUnavailable,
    add_rpc_routes,
    ready_batches,
)

Stream = Callable[[object], AsyncIterator[object]]


class Server:
    """One streaming method ``s`` served on a free loopback port."""

    def __init__(self, stream: Stream, keepalive_s: float = 1.0) -> None:
        self.app = web.Application()
        add_rpc_routes(self.app, {}, {"s": stream}, keepalive_s=keepalive_s)
        self.runner = web.AppRunner(self.app)
        self.url = ""

    async def __aenter__(self) -> Server:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def _http_chunks(url: str, session: aiohttp.ClientSession) -> list[object]:
    """The stream's frames grouped by the HTTP chunk each came in (one chunk: one write)."""
    body = RpcClient(session, url, 5.0).envelope("s", None)
    chunks: list[object] = []
    async with session.post(
        f"{url}/rpc/s", data=body, headers={"Content-Type": CONTENT_TYPE}
    ) as resp:
        data = b""
        async for piece, end_of_chunk in resp.content.iter_chunks():
            data += piece
            if end_of_chunk and data:
                chunks.append([frame.get("body", frame) for frame in _frames(data)])
                data = b""
    return chunks


def _frames(data: bytes) -> list[dict[str, object]]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return list(unpacker)


async def test_items_ready_together_go_out_in_one_write_with_the_end() -> None:
    async def burst(_body: object) -> AsyncIterator[object]:
        for i in range(5):
            yield i

    async with Server(burst) as server, aiohttp.ClientSession() as session:
        chunks = await _http_chunks(server.url, session)
        assert chunks == [[0, 1, 2, 3, 4, {"ok": True, "end": True}]]
        items = RpcClient(session, server.url, 5.0).stream("s", None, idle_timeout_s=5.0)
        assert [item async for item in items] == [0, 1, 2, 3, 4]


async def test_an_item_that_comes_later_is_sent_at_once() -> None:
    first_seen = asyncio.Event()

    async def slow(_body: object) -> AsyncIterator[object]:
        yield "a"
        await asyncio.wait_for(first_seen.wait(), 5.0)  # only once the client has "a"
        yield "b"

    async with Server(slow) as server, aiohttp.ClientSession() as session:
        got = []
        async for item in RpcClient(session, server.url, 5.0).stream("s", None, idle_timeout_s=5.0):
            got.append(item)
            first_seen.set()
        assert got == ["a", "b"]


async def test_keepalives_while_the_handler_is_silent() -> None:
    async def quiet(_body: object) -> AsyncIterator[object]:
        await asyncio.sleep(0.35)
        yield "late"

    async with Server(quiet, keepalive_s=0.1) as server, aiohttp.ClientSession() as session:
        chunks = await _http_chunks(server.url, session)
        keepalives = [c for c in chunks if c == [{"ok": True, "keepalive": True}]]
        assert len(keepalives) >= 2
        assert chunks[-1] == ["late", {"ok": True, "end": True}]
        # The client skips them (and they keep its idle timeout from firing).
        items = RpcClient(session, server.url, 5.0).stream("s", None, idle_timeout_s=0.3)
        assert [item async for item in items] == ["late"]


async def test_items_before_a_failure_are_delivered_then_the_error() -> None:
    async def failing(_body: object) -> AsyncIterator[object]:
        yield 1
        yield 2
        raise RpcError("boom", "it broke")

    async with Server(failing) as server, aiohttp.ClientSession() as session:
        got = []
        with pytest.raises(RpcError, match="boom: it broke"):
            async for item in RpcClient(session, server.url, 5.0).stream(
                "s", None, idle_timeout_s=5.0
            ):
                got.append(item)
        assert got == [1, 2]


async def test_ready_batches_closes_its_source_when_left_early() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    batches = ready_batches(endless(), 1.0)
    batch, last = await batches.__anext__()
    assert (batch, last) == ([0], False)
    await batches.aclose()
    assert closed.is_set()


# ------------------------------------------------------------- in-process client


def _local(
    handlers: dict[str, Callable[[object], Any]] | None = None,
    streams: dict[str, Stream] | None = None,
) -> LocalClient:
    return LocalClient(handlers or {}, streams or {}, timeout_s=5.0, service="test")


async def test_local_client_calls_and_streams_like_the_http_one() -> None:
    async def double(body: object) -> object:
        assert isinstance(body, int)
        return body * 2

    async def count(body: object) -> AsyncIterator[object]:
        assert isinstance(body, int)
        for i in range(body):
            yield i

    local = _local({"double": double}, {"count": count})
    assert await local.call("double", 21) == 42
    assert [i async for i in local.stream("count", 3, idle_timeout_s=1.0)] == [0, 1, 2]
    async with Server(count) as server, aiohttp.ClientSession() as session:  # as "s" over HTTP
        remote = RpcClient(session, server.url, 5.0)
        assert [i async for i in remote.stream("s", 3, idle_timeout_s=1.0)] == [0, 1, 2]


async def test_local_client_errors() -> None:
    async def refuses(_body: object) -> object:
        raise RpcError("nope", "refused", 409)

    async def crashes(_body: object) -> object:
        raise KeyError("bug")

    async def hangs(_body: object) -> object:
        await asyncio.sleep(30)
        return None

    async def breaks(_body: object) -> AsyncIterator[object]:
        yield 1
        raise ValueError("bug")

    local = _local({"refuses": refuses, "crashes": crashes, "hangs": hangs}, {"breaks": breaks})
    with pytest.raises(RpcError) as refused:
        await local.call("refuses", None)
    assert (refused.value.code, refused.value.status) == ("nope", 409)
    with pytest.raises(RpcError) as crashed:
        await local.call("crashes", None)
    assert (crashed.value.code, crashed.value.message) == ("internal", "KeyError")
    with pytest.raises(RpcUnavailable) as late:
        await local.call("hangs", None, timeout_s=0.05)
    assert late.value.kind == "timeout"
    with pytest.raises(RpcError, match="unknown_method"):
        await local.call("missing", None)
    got: list[object] = []
    with pytest.raises(RpcError, match="internal: ValueError"):
        async for item in local.stream("breaks", None, idle_timeout_s=1.0):
            got.append(item)
    assert got == [1]
    with pytest.raises(RpcError, match="unknown_method"):
        async for _ in local.stream("missing", None, idle_timeout_s=1.0):
            pass


async def test_leaving_a_local_stream_early_closes_the_service_side() -> None:
    closed = asyncio.Event()

    async def endless(_body: object) -> AsyncIterator[object]:
        try:
            while True:
                yield "x"
                await asyncio.sleep(0)
        finally:
            closed.set()

    items = _local(streams={"endless": endless}).stream("endless", None, idle_timeout_s=1.0)
    async with contextlib.aclosing(items):
        async for _ in items:
            break
    assert closed.is_set()
