"""Streaming RPC on a real aiohttp server on loopback: frames, batching, keepalives, errors.

The server writes the frames that are ready together in one HTTP chunk (one
send), and the last ones with the end frame and the chunked terminator; an
item that comes later still goes out at once, and a failure after some items
delivers those items first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import msgpack
import pytest
from aiohttp import web

from haif.runtime.rpc import (
    CONTENT_TYPE,
    RpcClient,
    RpcError,
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
