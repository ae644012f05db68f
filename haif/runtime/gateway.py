"""The gateway: an OpenAI-shaped HTTP front door that submits to the orchestrator.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /healthz`` (the process is up) and ``GET /readyz``
(ready: not draining, the orchestrator answers and knows at least one fresh
worker; 503 otherwise); ``GET /metrics`` (Prometheus; every request
runs in an OpenTelemetry span whose W3C ``traceparent`` is returned: see
:mod:`haif.runtime.telemetry`). The body is validated with pydantic, turned into a
:class:`~haif.contracts.Request` and submitted with the orchestrator's
streaming ``submit_stream`` RPC; every decision (quota, placement, retry) is
the control core's, the gateway only maps it to HTTP.

Streaming (``"stream": true``)
------------------------------
Server-sent events in OpenAI's chunk shapes, one event per token frame the
orchestrator relays: ``data: {json}\\n\\n`` with ``object`` ``text_completion``
(``choices[0].text``) or ``chat.completion.chunk`` (``choices[0].delta``; the
first chunk carries ``{"role": "assistant", "content": ""}``), then a chunk
with an empty delta and ``finish_reason``, then — only when
``stream_options.include_usage`` is true — a chunk with ``"choices": []`` and
``usage`` (other chunks then carry ``"usage": null``), then
``data: [DONE]\\n\\n``. The HTTP status line is sent with the first token, so
a request refused or failed before any token gets an ordinary JSON error with
its status; an error after streaming began is one final
``data: {"error": {message, type, param, code}}`` event (status stays 200,
no ``[DONE]`` follows). When a worker dies mid-stream the core retries the
request elsewhere from the tokens already sent (``resume_partial``), and the
client's stream continues without a gap or a repeated token.
Non-streaming requests take the same path and get the collected text.

Authentication
--------------
Credentials: ``Authorization: Bearer <API key or JWT>`` or
``x-api-key: <API key>`` (see :func:`haif.runtime.security.authenticate`).
API keys are looked up by SHA-256 digest through the orchestrator's
``auth_key`` RPC (the store keeps only digests; ``haif keys add`` creates
keys); positive answers are cached for ``key_cache_s`` seconds, so a revoked
key stops working within that time. JWTs are verified locally against the
cluster YAML's ``auth.jwt`` (issuer, audience, key, algorithms). The
principal's tenant becomes ``Request.tenant``. With ``auth.required: false``
(the default of ``haif up``) a request without a valid credential acts as
tenant ``anonymous`` (SDKs always send some key: the OpenAI SDK refuses to
start without one), and a valid one still sets the tenant. Refusals use
OpenAI error shapes: 401 (with ``WWW-Authenticate: Bearer``) or 403.

Rate limits
-----------
A 429 from the core gets ``Retry-After`` (whole seconds, rounded up) and
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` from the quota
figures the core's ``Reject`` carries (the most constraining bucket, tenant
or fleet; a budget without a limit sends none). The limit is OpenAI's
"permitted before exhausting the rate limit": the bucket's capacity,
``per_minute x burst_s / 60``. The exhausted budget
(named by the reason, ``..._requests_per_min`` / ``..._tokens_per_min``)
shows ``remaining: 0`` and resets after ``Retry-After``. Admitted requests
get no ``x-ratelimit-*`` headers (their quota is decided in the
orchestrator after the response headers are due).

Idempotency
-----------
``Idempotency-Key`` (1-255 printable ASCII characters) goes to the
orchestrator with the request, which reserves it per tenant: a resend with
the same key and body attaches to the running request or replays its stored
result instead of running it again; the same key with a different body is
answered 409 ``idempotency_conflict`` (see :mod:`haif.runtime.orchestrator`).

Shutdown: on SIGTERM aiohttp stops listening and closes idle connections
first, the gateway answers new requests on open connections with 503 and
``/readyz`` with 503, and in-flight requests and streams get up to the
service's ``shutdown_timeout`` to finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from haif.contracts import Reject, Request, RequestRecord
from haif.runtime import telemetry
from haif.runtime.messages import OrchestratorStatus, SubmitReply, TokenChunk
from haif.runtime.rpc import (
    ORCHESTRATOR_AUDIENCE,
    LocalClient,
    RpcClient,
    RpcError,
    RpcUnavailable,
)
from haif.runtime.security import AuthError, JwtConfig, Signer, authenticate

MAX_BODY_BYTES = 1 << 20
ANONYMOUS_TENANT = "anonymous"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_KEY_CACHE_MAX = 10_000

log = logging.getLogger("haif.gateway")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=32768)] = 16
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=32768)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Annotated[int, Field(ge=0, le=2)] = 1

    @property
    def output_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


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
    return web.json_response(
        _error_body(message, kind, code, param), status=status, headers=headers
    )


def _error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_REJECT_TYPES = {
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    529: "overloaded",
    409: "conflict",
}


#: Orchestrator errors raised before a request ran, by HTTP status. 409: the
#: ``Idempotency-Key`` was used with another body (``idempotency_conflict``),
#: or its request is still running elsewhere (``conflict``).
_RPC_STATUS = {"conflict": 409, "idempotency_conflict": 409, "bad_request": 400}


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``."""
    if seconds < 1.0:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    return f"{round(seconds, 3):g}s"


def reject_headers(reject: Reject) -> dict[str, str]:
    """``Retry-After`` and the ``x-ratelimit-*`` headers of a refusal (from the core's quota)."""
    headers: dict[str, str] = {}
    if reject.retry_after > 0:
        headers["Retry-After"] = str(max(1, math.ceil(reject.retry_after)))
    if reject.status != 429:
        return headers
    for kind in ("requests", "tokens"):
        limit = getattr(reject, f"limit_{kind}")
        remaining = getattr(reject, f"remaining_{kind}")
        reset = getattr(reject, f"reset_{kind}")
        if limit is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(math.floor(limit))
        if reject.reason.endswith(f"{kind}_per_min"):
            remaining, reset = 0.0, reject.retry_after if reject.retry_after > 0 else reset
        if remaining is not None:
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(remaining)))
        if reset is not None and reset > 0:
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset)
    return headers


@dataclass(frozen=True)
class GatewayAuth:
    """How the gateway authenticates callers (built from the cluster YAML's ``auth``)."""

    required: bool = False
    jwt: JwtConfig | None = None
    key_cache_s: float = 5.0


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _SseStream:
    """Writes one request's OpenAI-shaped server-sent events."""

    def __init__(self, resp: web.StreamResponse, rid: str, body: _Body, chat: bool) -> None:
        self.resp = resp
        self.rid = rid
        self.model = body.model
        self.chat = chat
        self.include_usage = body.include_usage
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        return choice

    async def open(self) -> None:
        if self.chat:
            choice = self._choice(None, None)
            choice["delta"] = {"role": "assistant", "content": ""}
            await self.resp.write(_sse(self._chunk([choice])))

    async def tokens(self, texts: tuple[str, ...]) -> None:
        await self.resp.write(_sse(self._chunk([self._choice("".join(texts), None)])))

    async def finish(self, record: RequestRecord, max_tokens: int) -> None:
        finish = "length" if record.output_tokens >= max_tokens else "stop"
        await self.resp.write(_sse(self._chunk([self._choice(None, finish)])))
        if self.include_usage:
            chunk = self._chunk([])
            chunk["usage"] = _usage(record)
            await self.resp.write(_sse(chunk))
        await self.resp.write(b"data: [DONE]\n\n")
        await self.resp.write_eof()

    async def error(self, message: str, kind: str, code: str | None) -> None:
        await self.resp.write(_sse(_error_body(message, kind, code)))
        await self.resp.write_eof()


def _usage(record: RequestRecord) -> dict[str, int]:
    return {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.output_tokens,
        "total_tokens": record.prompt_tokens + record.output_tokens,
    }


class Gateway:
    def __init__(
        self,
        orchestrator_url: str,
        region: str,
        timeout_s: float = 600.0,
        *,
        auth: GatewayAuth | None = None,
        idle_timeout_s: float = 15.0,
        signer: Signer | None = None,
        local: LocalClient | None = None,
    ) -> None:
        """``local``: the orchestrator runs in this process; call it directly, not at
        ``orchestrator_url`` (see :func:`haif.runtime.services.run_service`)."""
        self.orchestrator_url = orchestrator_url
        self.local = local
        self.signer = signer  # cluster key: seals every RPC to the orchestrator
        self.region = region
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.auth = auth or GatewayAuth()
        self.draining = False
        self._session: aiohttp.ClientSession | None = None
        self._key_cache: dict[str, tuple[str, float]] = {}  # key hash -> (tenant, expiry)
        self.metrics = telemetry.GatewayMetrics()

    async def start(self) -> None:
        # No connection cap: every open stream holds one connection.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> RpcClient | LocalClient:
        if self.local is not None:
            return self.local
        assert self._session is not None
        return RpcClient(
            self._session,
            self.orchestrator_url,
            self.timeout_s,
            signer=self.signer,
            audience=ORCHESTRATOR_AUDIENCE,
        )

    # ------------------------------------------------------------------ auth

    async def _lookup_key(self, key_hash: str) -> str | None:
        now = time.monotonic()
        cached = self._key_cache.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        answer = await self._client().call("auth_key", key_hash, timeout_s=5.0)
        if answer is not None and not isinstance(answer, str):
            raise RpcError("bad_reply", "auth_key did not return a tenant")
        tenant: str | None = answer
        if tenant is not None and self.auth.key_cache_s > 0:
            if len(self._key_cache) >= _KEY_CACHE_MAX:
                self._key_cache.clear()
            self._key_cache[key_hash] = (tenant, now + self.auth.key_cache_s)
        return tenant

    async def _tenant(self, request: web.Request) -> str | web.Response:
        """The caller's tenant, or the refusal to send."""
        authorization = request.headers.get("Authorization")
        api_key = request.headers.get("x-api-key")
        anonymous = not (authorization or "").strip() and not (api_key or "").strip()
        if anonymous and not self.auth.required:
            return ANONYMOUS_TENANT
        try:
            principal = await authenticate(
                authorization,
                api_key,
                lookup_key=self._lookup_key,
                jwt=self.auth.jwt,
                now=time.time(),
            )
        except AuthError as exc:
            if not self.auth.required and exc.status == 401:
                return ANONYMOUS_TENANT
            headers = {}
            if exc.status == 401:
                headers["WWW-Authenticate"] = (
                    'Bearer realm="haif"'
                    if exc.code == "missing_credentials"
                    else 'Bearer realm="haif", error="invalid_token"'
                )
            return web.json_response(exc.to_error_body(), status=exc.status, headers=headers)
        except RpcUnavailable as exc:
            return openai_error(503, f"cannot check credentials: {exc}", "service_unavailable")
        except RpcError as exc:
            return openai_error(502, f"cannot check credentials: {exc}", "api_error")
        return principal.tenant

    # --------------------------------------------------------------- requests

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
            parsed = model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return openai_error(
                400, f"{param}: {first['msg']}", "invalid_request_error", "invalid_value", param
            )
        if parsed.stream_options is not None and not parsed.stream:
            return openai_error(
                400,
                "stream_options is only allowed when stream is true",
                "invalid_request_error",
                "invalid_value",
                "stream_options",
            )
        return parsed

    def _unavailable(self) -> web.Response | None:
        if self.draining:
            return openai_error(
                503,
                "the gateway is shutting down",
                "service_unavailable",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        return None

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = time.perf_counter()
        if (refusal := self._unavailable()) is not None:
            return refusal
        tenant = await self._tenant(request)
        if isinstance(tenant, web.Response):
            return tenant
        parsed = await self._parse(request, ChatBody if chat else CompletionBody)
        if isinstance(parsed, web.Response):
            return parsed
        if isinstance(parsed, ChatBody):
            prompt = "\n".join(m.content for m in parsed.messages)
        else:
            assert isinstance(parsed, CompletionBody)
            prompt = parsed.prompt
        given_id = request.headers.get("x-request-id")
        request_id = given_id or f"req-{uuid.uuid4().hex}"
        if not _REQUEST_ID.fullmatch(request_id):
            return openai_error(
                400,
                "x-request-id must be 1-200 printable ASCII characters",
                "invalid_request_error",
                "invalid_value",
                "x-request-id",
            )
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            return openai_error(
                400,
                "Idempotency-Key must be 1-255 printable ASCII characters",
                "invalid_request_error",
                "invalid_value",
                "Idempotency-Key",
            )
        req = Request(
            request_id=request_id,
            tenant=tenant,
            model=parsed.model,
            prompt_tokens=max(1, len(prompt.split())),
            max_tokens=parsed.output_limit,
            arrival_s=time.monotonic(),
            origin_region=self.region,
            priority=parsed.priority,
            stream=parsed.stream,
            prompt=prompt,
            idempotency_key=key,
        )
        return await self._run(request, req, parsed, chat, arrived=arrived)

    async def _run(
        self,
        request: web.Request,
        req: Request,
        body: _Body,
        chat: bool,
        *,
        arrived: float | None = None,
    ) -> web.StreamResponse:
        headers = {"x-request-id": req.request_id}
        if (traceparent := telemetry.current_traceparent()) is not None:
            headers[telemetry.TRACEPARENT] = traceparent
        log.debug(
            "request %s: tenant %s, model %s, stream %s",
            req.request_id,
            req.tenant,
            req.model,
            req.stream,
        )
        metrics = self.metrics
        last_token = arrived if arrived is not None else time.perf_counter()
        first = True
        sse: _SseStream | None = None
        pieces: list[str] = []
        final: SubmitReply | None = None
        frames = self._client().stream("submit_stream", req, idle_timeout_s=self.idle_timeout_s)
        try:
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if isinstance(frame, TokenChunk):
                        now = time.perf_counter()
                        if first:
                            first = False
                            metrics.ttft.labels(str(body.stream).lower()).observe(now - last_token)
                        elif body.stream and frame.texts:
                            metrics.inter_token.observe((now - last_token) / len(frame.texts))
                        last_token = now
                        if not body.stream:
                            pieces.extend(frame.texts)
                            continue
                        if sse is None:
                            sse = await self._open_sse(request, req.request_id, body, chat, headers)
                        await sse.tokens(frame.texts)
                    elif isinstance(frame, SubmitReply):
                        final = frame
                    else:
                        raise RpcError("bad_reply", f"unexpected frame {type(frame).__name__}")
        except ConnectionResetError:
            # The client went away; the request still runs to its end and is recorded.
            return sse.resp if sse is not None else web.Response(status=499)
        except RpcUnavailable as exc:
            message = f"orchestrator unavailable: {exc}"
            if sse is not None:
                await self._stream_error(sse, message, "service_unavailable", "unavailable")
                return sse.resp
            return openai_error(503, message, "service_unavailable", headers=headers)
        except RpcError as exc:
            if sse is not None:
                await self._stream_error(sse, exc.message, "api_error", exc.code)
                return sse.resp
            status = _RPC_STATUS.get(exc.code, 502)
            kind = "api_error" if status == 502 else "invalid_request_error"
            return openai_error(status, exc.message, kind, exc.code, headers=headers)
        if final is None:
            if sse is not None:
                await self._stream_error(sse, "no final record", "api_error", "bad_reply")
                return sse.resp
            return openai_error(502, "bad reply from orchestrator", "api_error", headers=headers)
        if body.stream and final.reject is None and final.record.status == "ok":
            if sse is None:
                sse = await self._open_sse(request, req.request_id, body, chat, headers)
            with contextlib.suppress(ConnectionResetError):
                await sse.finish(final.record, req.max_tokens)
            return sse.resp
        if sse is not None:
            rec = final.record
            await self._stream_error(
                sse, f"request {rec.status}: {rec.reason}", "api_error", rec.status
            )
            return sse.resp
        return self._answer(final, "".join(pieces), body, chat, headers)

    async def _open_sse(
        self,
        request: web.Request,
        rid: str,
        body: _Body,
        chat: bool,
        headers: dict[str, str],
    ) -> _SseStream:
        resp = web.StreamResponse(
            status=200,
            headers={
                **headers,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        await resp.prepare(request)
        sse = _SseStream(resp, rid, body, chat)
        await sse.open()
        return sse

    @staticmethod
    async def _stream_error(sse: _SseStream, message: str, kind: str, code: str | None) -> None:
        with contextlib.suppress(ConnectionResetError):
            await sse.error(message, kind, code)

    def _answer(
        self, reply: SubmitReply, text: str, body: _Body, chat: bool, headers: dict[str, str]
    ) -> web.Response:
        rec = reply.record
        if reply.reject is not None:
            rej = reply.reject
            headers.update(reject_headers(rej))
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
        finish = "length" if rec.output_tokens >= body.output_limit else "stop"
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        return web.json_response(
            {
                "id": rec.request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [choice],
                "usage": _usage(rec),
            },
            headers=headers,
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    # ------------------------------------------------------------ status

    async def _status(self) -> OrchestratorStatus:
        status = await self._client().call("status", None, timeout_s=2.0)
        if not isinstance(status, OrchestratorStatus):
            raise RpcError("bad_reply", "status did not return an OrchestratorStatus")
        return status

    async def models(self, request: web.Request) -> web.Response:
        if (refusal := self._unavailable()) is not None:
            return refusal
        tenant = await self._tenant(request)
        if isinstance(tenant, web.Response):
            return tenant
        try:
            status = await self._status()
        except (RpcUnavailable, RpcError) as exc:
            return openai_error(503, f"orchestrator unavailable: {exc}", "service_unavailable")
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "haif"} for m in status.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        try:
            status = await self._status()
        except (RpcUnavailable, RpcError) as exc:
            return web.json_response(
                {"ready": False, "reason": f"orchestrator unavailable: {exc}"}, status=503
            )
        if not status.ready:
            return web.json_response(
                {"ready": False, "reason": "no fresh worker", "fresh_workers": 0}, status=503
            )
        return web.json_response({"ready": True, "fresh_workers": len(status.fresh_workers)})


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[telemetry.http_middleware("gateway", gateway.metrics)],
    )

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def on_startup(_app: web.Application) -> None:
        await gateway.start()

    async def on_shutdown(_app: web.Application) -> None:
        # Listening sockets are closed already; refuse what still arrives on
        # open connections while in-flight requests finish.
        gateway.draining = True

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.stop()

    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", gateway.readyz)
    app.router.add_get("/metrics", telemetry.metrics_handler(gateway.metrics.registry))
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
