"""msgpack RPC over aiohttp between gateway, orchestrator and workers.

A call is ``POST /rpc/<method>`` whose body is a msgpack envelope::

    {"v": 1, "type": method, "id": message id, "trace": traceparent | None,
     "body": <contract encoded by haif.wire>}

and whose reply is ``{"ok": true, "body": ...}`` or
``{"ok": false, "error": {"code": ..., "message": ...}}``. Every call has a
timeout, so a dead peer turns into :class:`RpcUnavailable` instead of a hang.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from haif import wire

CONTENT_TYPE = "application/msgpack"
Handler = Callable[[Any], Awaitable[Any]]


class RpcError(Exception):
    """The peer answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RpcUnavailable(Exception):
    """The peer could not be reached or did not answer in time."""


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


class RpcClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    async def call(
        self,
        method: str,
        body: Any,
        *,
        timeout_s: float | None = None,
        trace: str | None = None,
    ) -> Any:
        envelope = {
            "v": 1,
            "type": method,
            "id": uuid.uuid4().hex,
            "trace": trace,
            "body": wire.to_plain(body),
        }
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self.session.post(
                f"{self.base_url}/rpc/{method}",
                data=_pack(envelope),
                headers={"Content-Type": CONTENT_TYPE},
                timeout=timeout,
            ) as resp:
                payload = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RpcUnavailable(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
        try:
            reply = msgpack.unpackb(payload, raw=False)
        except (msgpack.UnpackException, ValueError):
            raise RpcError("bad_reply", f"HTTP {resp.status}, not msgpack") from None
        if not isinstance(reply, dict):
            raise RpcError("bad_reply", "reply is not a map")
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RpcError(str(error.get("code", "error")), str(error.get("message", "")))
        return wire.from_plain(reply.get("body"))


def _reply(status: int, obj: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=_pack(obj), content_type=CONTENT_TYPE)


def error_reply(status: int, code: str, message: str) -> web.Response:
    return _reply(status, {"ok": False, "error": {"code": code, "message": message}})


def add_rpc_routes(app: web.Application, handlers: Mapping[str, Handler]) -> None:
    """Serve ``handlers`` (method name -> coroutine taking the decoded body)."""

    async def dispatch(request: web.Request) -> web.Response:
        method = request.match_info["method"]
        handler = handlers.get(method)
        if handler is None:
            return error_reply(404, "unknown_method", f"no RPC method {method!r}")
        try:
            envelope = msgpack.unpackb(await request.read(), raw=False)
            if not isinstance(envelope, dict) or envelope.get("v") != 1:
                raise wire.WireError("not a v1 envelope")
            body = wire.from_plain(envelope.get("body"))
        except (msgpack.UnpackException, ValueError) as exc:
            return error_reply(400, "bad_request", str(exc))
        try:
            result = await handler(body)
        except RpcError as exc:
            return error_reply(400, exc.code, exc.message)
        return _reply(200, {"ok": True, "body": wire.to_plain(result)})

    app.router.add_post("/rpc/{method}", dispatch)
