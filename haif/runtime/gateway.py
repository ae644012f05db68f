"""The gateway: an OpenAI-shaped HTTP front door that submits to the orchestrator.

The skeleton serves non-streaming ``/v1/completions`` and
``/v1/chat/completions``; it validates the body with pydantic, turns it into
a :class:`~haif.contracts.Request`, submits it over msgpack RPC and maps the
core's verdict to an HTTP answer (OpenAI error shapes, ``Retry-After``).
Authentication, quotas at the edge and streaming come with the runtime issue.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from haif.contracts import Request
from haif.runtime.messages import SubmitReply
from haif.runtime.rpc import RpcClient, RpcError, RpcUnavailable

MAX_BODY_BYTES = 1 << 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=32768)] = 16
    stream: bool = False
    user: str | None = None
    priority: Annotated[int, Field(ge=0, le=2)] = 1


class CompletionBody(_Body):
    prompt: str


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


def openai_error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


_REJECT_TYPES = {
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    529: "overloaded",
    409: "conflict",
}


class Gateway:
    def __init__(self, orchestrator_url: str, region: str, timeout_s: float = 600.0) -> None:
        self.orchestrator_url = orchestrator_url
        self.region = region
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _parse(self, request: web.Request, model: type[_Body]) -> _Body | web.Response:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return openai_error(
                413,
                f"body larger than {MAX_BODY_BYTES} bytes",
                "invalid_request_error",
                "payload_too_large",
            )
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return openai_error(400, f"body is not valid JSON: {exc}", "invalid_request_error")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return openai_error(
                400, f"{param}: {first['msg']}", "invalid_request_error", "invalid_value", param
            )

    async def _complete(self, request: web.Request, chat: bool) -> web.Response:
        parsed = await self._parse(request, ChatBody if chat else CompletionBody)
        if isinstance(parsed, web.Response):
            return parsed
        if parsed.stream:
            return openai_error(
                400,
                "streaming is not supported yet",
                "invalid_request_error",
                "unsupported",
                "stream",
            )
        if isinstance(parsed, ChatBody):
            prompt = "\n".join(m.content for m in parsed.messages)
        else:
            assert isinstance(parsed, CompletionBody)
            prompt = parsed.prompt
        request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        now = time.monotonic()
        req = Request(
            request_id=request_id,
            tenant=request.headers.get("x-haif-tenant", "default"),
            model=parsed.model,
            prompt_tokens=max(1, len(prompt.split())),
            max_tokens=parsed.max_tokens,
            arrival_s=now,
            origin_region=self.region,
            priority=parsed.priority,
            prompt=prompt,
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        assert self._session is not None
        client = RpcClient(self._session, self.orchestrator_url, self.timeout_s)
        headers = {"x-request-id": request_id}
        try:
            reply = await client.call("submit", req)
        except RpcUnavailable as exc:
            return openai_error(
                503, f"orchestrator unavailable: {exc}", "service_unavailable", headers=headers
            )
        except RpcError as exc:
            status = 409 if exc.code == "conflict" else 400
            return openai_error(
                status, exc.message, "invalid_request_error", exc.code, headers=headers
            )
        if not isinstance(reply, SubmitReply):
            return openai_error(502, "bad reply from orchestrator", "api_error", headers=headers)
        return self._answer(reply, parsed, chat, headers)

    def _answer(
        self, reply: SubmitReply, body: _Body, chat: bool, headers: dict[str, str]
    ) -> web.Response:
        rec = reply.record
        if reply.reject is not None:
            rej = reply.reject
            if rej.retry_after > 0:
                headers["Retry-After"] = str(max(1, math.ceil(rej.retry_after)))
            return openai_error(
                rej.status,
                f"request refused: {rej.reason}",
                _REJECT_TYPES.get(rej.status, "api_error"),
                rej.reason,
                headers=headers,
            )
        if rec.status != "ok":
            status = 504 if rec.status == "timeout" else 502
            return openai_error(
                status,
                f"request {rec.status}: {rec.reason}",
                "api_error",
                rec.status,
                headers=headers,
            )
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": reply.text}
        else:
            choice["text"] = reply.text
        usage = {
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.output_tokens,
            "total_tokens": rec.prompt_tokens + rec.output_tokens,
        }
        return web.json_response(
            {
                "id": rec.request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            },
            headers=headers,
        )

    async def completions(self, request: web.Request) -> web.Response:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.Response:
        return await self._complete(request, chat=True)


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def on_startup(_app: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.stop()

    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
