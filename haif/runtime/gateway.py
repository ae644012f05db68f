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

Sampling and stopping
---------------------
The sampling parameters (:class:`_Body`: ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop``, the penalties, ``ignore_eos``) are validated
here and travel in ``Request.sampling``; an engine that cannot honour one
never ignores it: the orchestrator refuses the request before it runs
(400 ``unsupported_parameter``, ``param`` naming it) when no fresh worker of
the model honours it, and a worker that cannot refuses its attempt (400
``bad_request``). ``finish_reason`` is the engine's (``SubmitReply``).

Chat
----
``messages`` are validated by :func:`chat_turns` (OpenAI's roles; a content
string or an array of text parts, joined with newlines; any other part is a 400 naming
``messages[i].content[j].type``) and travel in ``Request.messages``: the
engine renders them (the model's chat template, or its own way).

Prompt tokens and prefix hashes
-------------------------------
``prompt_tokens`` is the prompt's (or the rendered chat's) token count under
the model's tokenizer, and ``prefix_hashes`` the chained hashes of its full
KV blocks (the model profile's block size), for prefix-aware placement:
:mod:`haif.runtime.prompt_tokens` (``prompts``), which says which tokenizer
is a model's. A chat the model's tokenizer cannot render (no chat template)
is a 400 naming ``messages``. An engine that reports its own count (the
``openai`` engine's upstream usage, the transformers engine) is billed
that, which the record then carries.

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
(the default of ``haif up``) a request without a credential acts as tenant
``anonymous``, and so does one that sends only a placeholder (SDKs always
send some key: the OpenAI SDK refuses to start without one, vLLM's examples
use ``EMPTY``): anything not shaped like a HAIF API key or a JWT
(:func:`haif.runtime.security.issued_credentials`). A credential that is
presented and invalid — an unknown or revoked API key, an expired or forged
JWT — is refused with 401 whether or not authentication is required (fail
closed), and a valid one still sets the tenant. Refusals use OpenAI error
shapes: 401 (with ``WWW-Authenticate: Bearer``) or 403. When the key lookup
itself fails (the orchestrator or its store is down) the answer is 503
``store_unavailable`` (``unavailable`` when the orchestrator cannot be
reached) with ``Retry-After``, never a tenant.

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

A standby orchestrator
----------------------
With a standby (``standby_url``: a pair sharing PostgreSQL, see
:mod:`haif.runtime.leadership`), the gateway sends to the one it last found
leading and turns to the other when a call cannot reach it, breaks, or is
answered 503 ``not_leader``, retrying for up to ``failover_s`` (backoff
50-500 ms, jittered) while the standby takes the lease over. A call the
orchestrator refused because its seal lapsed while it waited in line (one
that has just taken over, working off what the dead leader left) is sent
again, sealed afresh, within the same window. So that a request the
dead leader left unanswered can be sent again safely, every request then
carries an ``Idempotency-Key`` (the client's, else one the gateway makes
up): its resend takes its job over under the same id, and it is billed once
whichever orchestrator settles it. Text the client already has is not sent
twice: the resend's frames are skipped up to the characters passed on
before. (This continues the same text where generation is deterministic —
the synthetic engine, greedy or seeded sampling; sampled text may differ
after the cut, so the client sees the start of one answer and the end of
another, and the usage is the new answer's.)

The edge
--------
Everything a client sends is hostile until parsed (:class:`GatewayLimits`):

- A request's head (request line and headers) must be complete within
  ``header_timeout_s`` of the connection opening or of the previous response
  on it, or the connection is closed; that is also how long an idle
  keep-alive connection stays open.
- Its body must arrive within ``body_timeout_s`` of the handler starting to
  read it, with no gap between two reads longer than ``read_idle_timeout_s``
  (a ``Content-Length`` larger than the body, or a body trickled a byte at a
  time): otherwise 408 ``request_timeout``, and the connection is closed
  once the rest of the body has been drained for at most ``linger_s``.
  Larger than ``max_body_bytes``: 413; bad chunked framing or compression:
  400 ``invalid_body``.
- At most ``max_connections`` client connections are open at once; one more
  gets a 503 ``too_many_connections`` (``Retry-After``) and is closed at once.
- A body must be JSON (a ``Content-Type`` other than ``application/json`` or
  ``application/*+json`` in UTF-8: 415), strict UTF-8, an object, nested at
  most ``MAX_JSON_DEPTH`` deep, without ``NaN`` / ``Infinity`` (or a number
  that overflows to one), integers of at most ``MAX_INT_DIGITS`` digits and
  strings without lone UTF-16 surrogates (``"\\ud800"``): otherwise an
  OpenAI-shaped 400 naming the problem (``invalid_json``, ``invalid_type``,
  ``invalid_unicode``, ``nesting_too_deep``, ``invalid_number``).
- What aiohttp's HTTP parser refuses (a bad request line or header) gets a
  JSON 400 ``invalid_http``; unknown routes a JSON 404 ``unknown_url``, a
  wrong method a 405 ``method_not_allowed``; an unexpected exception a 500
  ``internal_error`` without its text.
- Failures behind the gateway (orchestrator unreachable, store down) answer
  503 with code ``unavailable`` or ``store_unavailable`` and ``Retry-After``;
  the message says nothing of addresses or exceptions: those are logged
  with the request id (returned as ``x-request-id``).

Shutdown: on SIGTERM aiohttp stops listening and closes idle connections
first, the gateway answers new requests on open connections with 503 and
``/readyz`` with 503, and in-flight requests and streams get up to the
service's ``shutdown_timeout`` to finish.

Hand-off (``haif gateway --listen-fd``, SIGUSR1): a supervisor holds the
listening socket and starts a new gateway on it beside this one; SIGUSR1 then
makes every response of this one close its connection (``Connection:
close``) and ``/readyz`` answer 503, so clients open their next connection,
which either gateway accepts from the one queue, and none finds an idle
connection closed under it when this one stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import signal
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from haif.contracts import (
    CHAT_ROLES,
    ChatTurn,
    Reject,
    Request,
    RequestRecord,
    SamplingParams,
)
from haif.runtime import telemetry
from haif.runtime.cluster_tls import ServiceTls, export_expiry
from haif.runtime.messages import OrchestratorStatus, SubmitReply, TokenChunk
from haif.runtime.prompt_tokens import PromptError, PromptTokens
from haif.runtime.relay import Frame
from haif.runtime.rpc import (
    ORCHESTRATOR_AUDIENCE,
    LocalClient,
    RpcClient,
    RpcError,
    RpcUnavailable,
)
from haif.runtime.security import (
    AuthError,
    JwtConfig,
    Signer,
    authenticate,
    issued_credentials,
)

MAX_BODY_BYTES = 1 << 20
#: Deepest nesting of arrays / objects a body may have (the top object is 1).
MAX_JSON_DEPTH = 64
#: Most digits an integer in a body may have.
MAX_INT_DIGITS = 64
#: ``Retry-After`` (seconds) of a 503 for a failure behind the gateway.
UNAVAILABLE_RETRY_AFTER_S = 2
ANONYMOUS_TENANT = "anonymous"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_KEY_CACHE_MAX = 10_000
#: How long a connection refused by the cap is drained before it is closed.
_REFUSED_LINGER_S = 1.0
_STREAMING = web.RequestKey("haif_gateway_streaming", bool)
_JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

log = logging.getLogger("haif.gateway")


@dataclass(frozen=True)
class GatewayLimits:
    """Deadlines and caps of the gateway's edge (see "The edge" above).

    ``max_connections``: ``None`` sizes the cap from the process's open-file
    limit (:func:`default_max_connections`); ``0`` means no cap.
    ``linger_s``: after an answer sent before the body was read (408, 413, a
    401), how long the rest of the body is read and dropped so the client
    sees the answer (aiohttp's lingering close); then the connection closes.
    """

    header_timeout_s: float = 20.0
    body_timeout_s: float = 30.0
    read_idle_timeout_s: float = 10.0
    max_connections: int | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    linger_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "read_idle_timeout_s", "linger_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_connections is not None and self.max_connections < 0:
            raise ValueError(f"max_connections must be >= 0, got {self.max_connections}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")

    @property
    def connection_cap(self) -> int:
        """The cap on open client connections; 0: none."""
        if self.max_connections is None:
            return default_max_connections()
        return self.max_connections


def default_max_connections() -> int:
    """Half the process's open-file limit less a reserve, between 64 and 10,000.

    Half, because a streaming request holds two descriptors: the client's
    connection and the one to the orchestrator.
    """
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(64, min(10_000, (soft - 64) // 2))


def add_edge_args(parser: argparse.ArgumentParser) -> None:
    """The ``--header-timeout-s`` ... flags of :class:`GatewayLimits` (see :func:`edge_limits`)."""
    default = GatewayLimits()
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=default.header_timeout_s,
        help="close a connection whose request head is not complete this long after it "
        f"opened or after its previous response; also the keep-alive idle time "
        f"(default {default.header_timeout_s:g})",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=default.body_timeout_s,
        help=f"answer 408 when a request body takes longer (default {default.body_timeout_s:g})",
    )
    parser.add_argument(
        "--read-idle-timeout-s",
        type=float,
        default=default.read_idle_timeout_s,
        help="answer 408 when a request body stalls this long between two reads "
        f"(default {default.read_idle_timeout_s:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="most client connections open at once, 0 for no cap "
        "(default: half the open-file limit, at most 10000)",
    )


def edge_limits(args: argparse.Namespace) -> GatewayLimits:
    """The :class:`GatewayLimits` of the flags :func:`add_edge_args` added."""
    return GatewayLimits(
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        read_idle_timeout_s=args.read_idle_timeout_s,
        max_connections=args.max_connections,
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


#: At most this many stop strings (OpenAI's limit).
MAX_STOP = 4


class _Body(BaseModel):
    """The fields of a completion both endpoints share.

    Sampling (OpenAI's ranges; strict types: ``"0.5"`` is not a number):
    ``temperature`` 0-2, ``top_p`` in (0, 1], ``top_k`` an integer >= -1
    (vLLM's extension; -1 and 0 mean no limit), ``seed`` a 64-bit integer,
    ``stop`` a string or up to four non-empty strings, ``presence_penalty`` /
    ``frequency_penalty`` -2 to 2, ``n`` 1 (one choice only), and
    ``ignore_eos`` (vLLM's extension, default false: generate exactly
    ``max_tokens`` tokens, past end-of-sequence). A value outside its range
    is a 400 naming the parameter. Values that ask for nothing (``top_p`` 1,
    ``top_k`` -1 or 0, penalties 0) are dropped: every engine honours them.
    Other unknown fields are allowed (SDKs send some) and ignored.
    """

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=32768)] = 16
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=32768)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Annotated[int, Field(ge=0, le=2)] = 1
    temperature: Annotated[float | None, Field(ge=0, le=2, strict=True)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1, strict=True)] = None
    top_k: Annotated[int | None, Field(ge=-1, strict=True)] = None
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**64 - 1, strict=True)] = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float | None, Field(ge=-2, le=2, strict=True)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2, le=2, strict=True)] = None
    n: Annotated[int | None, Field(ge=1, le=1, strict=True)] = None
    ignore_eos: Annotated[bool, Field(strict=True)] = False

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, value: Any) -> str | list[str] | None:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if (
            not isinstance(items, list)
            or not all(isinstance(v, str) and v for v in items)
            or len(items) > MAX_STOP
        ):
            raise ValueError(f"a non-empty string or a list of at most {MAX_STOP} of them")
        return value if isinstance(value, str) else list(items)

    @property
    def output_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self) -> SamplingParams:
        """The request's :class:`~haif.contracts.SamplingParams` (neutral values dropped)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p if self.top_p != 1 else None,
            top_k=self.top_k if self.top_k not in (-1, 0) else None,
            seed=self.seed,
            stop=stop,
            presence_penalty=self.presence_penalty or None,
            frequency_penalty=self.frequency_penalty or None,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_Body):
    prompt: str


class BadParam(Exception):
    """A body value refused with a 400 naming ``param`` exactly (``messages[1].content[0].type``).

    Raised from a validator: pydantic passes exceptions other than
    ``ValueError`` through, so the parameter's name is not pydantic's.
    """

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.code = code


def chat_turns(value: Any) -> tuple[ChatTurn, ...]:
    """A chat body's ``messages`` as :class:`~haif.contracts.ChatTurn` (raises :class:`BadParam`).

    Each message is an object with a ``role`` among OpenAI's (``system``,
    ``developer``, ``user``, ``assistant``, ``tool``; the deprecated
    ``function`` is refused) and a ``content``: a string, or an array of text
    parts ``{"type": "text", "text": ...}`` joined with newlines (as vLLM
    joins them). Any other part (``image_url``, ``input_audio``, ...) is
    a 400 naming ``messages[i].content[j].type``: there is no multimodal
    engine. Other keys of a message (``name``, ...) are ignored.
    """
    if not isinstance(value, list) or not value:
        raise BadParam("messages", "a non-empty array of messages")
    turns: list[ChatTurn] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadParam(where, "a message is an object with a role and a content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise BadParam(
                f"{where}.role",
                f"{role!r} is not a role; one of {', '.join(CHAT_ROLES)}",
                "unsupported_value" if isinstance(role, str) else "invalid_value",
            )
        content = message.get("content")
        if isinstance(content, str):
            turns.append(ChatTurn(role, content))
            continue
        if not isinstance(content, list):
            raise BadParam(f"{where}.content", "a string or an array of text parts")
        texts: list[str] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise BadParam(at, 'a content part is an object {"type": "text", "text": ...}')
            kind = part.get("type")
            if kind != "text":
                raise BadParam(
                    f"{at}.type",
                    f"content parts of type {kind!r} are not supported; only 'text'",
                    "unsupported_value",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise BadParam(f"{at}.text", "a string")
            texts.append(text)
        turns.append(ChatTurn(role, "\n".join(texts)))
    return tuple(turns)


class ChatBody(_Body):
    messages: tuple[ChatTurn, ...]

    @field_validator("messages", mode="plain")
    @classmethod
    def _messages(cls, value: Any) -> tuple[ChatTurn, ...]:
        return chat_turns(value)


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


class BadBody(Exception):
    """A request body the gateway refuses, as its OpenAI error (400 unless ``status``)."""

    def __init__(
        self, message: str, code: str, param: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.status = status

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return openai_error(
            self.status, self.message, "invalid_request_error", self.code, self.param, headers
        )


def _not_a_number(name: str) -> Any:
    raise BadBody(f"the body is not valid JSON: {name} is not a JSON number", "invalid_number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadBody(f"the body holds a number out of range: {text[:40]}", "invalid_number")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS and len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadBody(
            f"the body holds an integer of more than {MAX_INT_DIGITS} digits", "invalid_number"
        )
    return int(text)


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether ``data`` nests arrays / objects more than ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


def decode_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or :class:`BadBody` saying what is wrong with it.

    Strict UTF-8 (``json.loads`` of bytes would let UTF-8-encoded surrogates
    through); no ``NaN`` / ``Infinity``, nor numbers that overflow to them;
    integers of at most :data:`MAX_INT_DIGITS` digits; nesting at most
    :data:`MAX_JSON_DEPTH` deep; no lone UTF-16 surrogates (``"\\ud800"``),
    which nothing downstream can encode.
    """
    if not raw.strip():
        raise BadBody("the request body is empty: send a JSON object", "invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(f"the body is not valid UTF-8 (byte {exc.start})", "invalid_json") from None
    try:
        data = json.loads(
            text, parse_constant=_not_a_number, parse_float=_finite_float, parse_int=_bounded_int
        )
    except json.JSONDecodeError as exc:
        raise BadBody(
            f"the body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})",
            "invalid_json",
        ) from None
    except RecursionError:
        data = None
        too_deep = True
    except ValueError:  # a number Python will not convert
        raise BadBody("the body holds a number out of range", "invalid_number") from None
    else:
        # Only a body with that many brackets can be that deep: most are not walked.
        too_deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(
            data, MAX_JSON_DEPTH
        )
    if too_deep:
        raise BadBody(
            f"the body is nested more than {MAX_JSON_DEPTH} levels deep", "nesting_too_deep"
        )
    if not isinstance(data, dict):
        raise BadBody(f"the body must be a JSON object, not {_json_kind(data)}", "invalid_type")
    # A lone surrogate can only come from a \u escape: strict UTF-8 refused the rest.
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
        bad_key = next(
            (k for k, v in data.items() if _has_lone_surrogate(k) or _has_lone_surrogate(v)),
            None,
        )
        param = bad_key if bad_key is not None and not _has_lone_surrogate(bad_key) else None
        raise BadBody(
            f"{param or 'the body'}: strings must be valid Unicode; "
            "lone UTF-16 surrogates (\\ud800-\\udfff) are not allowed",
            "invalid_unicode",
            param,
        )
    return data


def _content_type_refusal(request: web.BaseRequest) -> BadBody | None:
    """415 unless the body is declared as JSON in UTF-8 (or not declared at all)."""
    declared = request.headers.get("Content-Type")
    if declared is None:
        return None
    mime, _, params = declared.partition(";")
    charset = ""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if _JSON_TYPE.fullmatch(mime.strip().lower()) and charset in ("", "utf-8", "utf8"):
        return None
    return BadBody(
        "Content-Type must be application/json (UTF-8)",
        "unsupported_media_type",
        status=415,
    )


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
#: ``unsupported_parameter``: no worker of the model honours a sampling parameter
#: the request sets (the orchestrator's check, its message names it first).
_UNSUPPORTED = "unsupported_parameter"
_RPC_STATUS = {
    "conflict": 409,
    "idempotency_conflict": 409,
    "bad_request": 400,
    _UNSUPPORTED: 400,
}


def _seal_lapsed(exc: Exception) -> bool:
    """Was the call refused because its seal lapsed before the orchestrator read it?

    The orchestrator refuses such a call before acting on it, so sending it
    again, sealed afresh, is safe: it happens when the orchestrator is behind
    (one that has just taken over, working off what the dead leader left).
    """
    return isinstance(exc, RpcError) and exc.code == "expired"


def _unavailable_error(store: bool) -> tuple[str, str, str]:
    """Message, type and code of a failure behind the gateway: nothing internal in them."""
    if store:
        return (
            "the metadata store is unavailable; retry later",
            "service_unavailable",
            "store_unavailable",
        )
    return (
        "the service is temporarily unavailable; retry later",
        "service_unavailable",
        "unavailable",
    )


def _unavailable_response(store: bool, headers: dict[str, str] | None = None) -> web.Response:
    """503 ``store_unavailable`` / ``unavailable`` with ``Retry-After``."""
    message, kind, code = _unavailable_error(store)
    retry = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
    return openai_error(503, message, kind, code, headers={**(headers or {}), **retry})


def _store_failed(record: RequestRecord) -> bool:
    """Whether a request failed because the store was (its last error ``store_unavailable``)."""
    reason = record.reason or ""
    return record.status != "ok" and reason.rpartition(":")[2] == "store_unavailable"


def _info(request: web.Request) -> telemetry.RequestInfo:
    """The request's :class:`~haif.runtime.telemetry.RequestInfo` (for its log line)."""
    info = request.get(telemetry.REQUEST_INFO)
    if info is None:  # an app without the telemetry middleware
        info = request[telemetry.REQUEST_INFO] = telemetry.RequestInfo()
    return info


def _note_reply(info: telemetry.RequestInfo, reply: SubmitReply) -> None:
    """What the core's final reply tells the request's log line and metrics."""
    rec = reply.record
    reason = reply.reject.reason if reply.reject is not None else rec.reason
    info.model_found = reason != "model_not_found"
    info.outcome = rec.status
    info.worker = rec.worker_id
    info.attempts = rec.attempts
    info.prompt_tokens = rec.prompt_tokens
    info.completion_tokens = rec.output_tokens
    if rec.status != "ok" and reason:
        info.error = reason[:200]


def _log_id(request_id: str) -> str:
    """``request_id`` as it may go into a log line (a client's id is not checked yet)."""
    return request_id if _REQUEST_ID.fullmatch(request_id) else "(invalid x-request-id)"


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

    async def finish(self, record: RequestRecord, finish: str) -> None:
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


def _skip_text(chunk: TokenChunk, skip: int, seen: int) -> tuple[TokenChunk, int]:
    """``chunk`` less its first ``skip`` characters (text a client has already), and the
    characters seen once they are skipped (``seen`` before)."""
    texts = list(chunk.texts)
    start = chunk.start
    while texts and skip >= len(texts[0]):
        skip -= len(texts[0])
        seen += len(texts[0])
        texts.pop(0)
        start += 1
    if texts and skip:
        texts[0] = texts[0][skip:]
        seen += skip
    return TokenChunk(start, tuple(texts)), seen


def _finish_reason(reply: SubmitReply, max_tokens: int) -> str:
    """``stop`` or ``length``, as the engine said; from the token count when it did not
    (an orchestrator or a stored result from before engines reported it)."""
    if reply.finish_reason is not None:
        return reply.finish_reason
    return "length" if reply.record.output_tokens >= max_tokens else "stop"


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
        limits: GatewayLimits | None = None,
        standby_url: str | None = None,
        failover_s: float = 15.0,
        prompts: PromptTokens | None = None,
        tls: ServiceTls | None = None,
    ) -> None:
        """``local``: the orchestrator runs in this process; call it directly, not at
        ``orchestrator_url`` (see :func:`haif.runtime.services.run_service`).
        ``limits``: the edge's deadlines and caps (see "The edge" above).
        ``standby_url``, ``failover_s``: see "A standby orchestrator" above.
        ``prompts``: each model's tokenizer and block size (default: the synthetic
        words for every model; see "Prompt tokens and prefix hashes" above).
        ``tls``: mutual TLS to the orchestrator (:mod:`haif.runtime.cluster_tls`)."""
        if local is not None and standby_url is not None:
            raise ValueError("a gateway in the orchestrator's process has no standby")
        self.orchestrator_urls: tuple[str, ...] = (
            orchestrator_url,
            *((standby_url,) if standby_url else ()),
        )
        self._leader = 0  # index of the orchestrator last found leading
        self.failover_s = failover_s
        self.limits = limits or GatewayLimits()
        self.local = local
        self.signer = signer  # cluster key: seals every RPC to the orchestrator
        self.tls = tls  # cluster certificate: mutual TLS to the orchestrator
        self._tls_watch: asyncio.Task[None] | None = None
        self.region = region
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.auth = auth or GatewayAuth()
        self.draining = False
        #: Handing off to a new gateway (SIGUSR1): each response closes its connection.
        self.closing = False
        self._session: aiohttp.ClientSession | None = None
        self._key_cache: dict[str, tuple[str, float]] = {}  # key hash -> (tenant, expiry)
        self.metrics = telemetry.GatewayMetrics()
        self.prompts = prompts or PromptTokens()
        if tls is not None:
            export_expiry(self.metrics.registry, tls)

    async def start(self) -> None:
        await self.prompts.load()  # the models' tokenizers, verified, before any request
        # No connection cap: every open stream holds one connection.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        if self.tls is not None:  # new certificates, without a restart
            self._tls_watch = asyncio.create_task(self.tls.watch())

    async def stop(self) -> None:
        self.prompts.close()
        if self._tls_watch is not None:
            self._tls_watch.cancel()
        if self._session is not None:
            await self._session.close()

    @property
    def orchestrator_url(self) -> str:
        """The orchestrator calls go to (the leader, as last found)."""
        return self.orchestrator_urls[self._leader]

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
            tls=self.tls,
        )

    # ---------------------------------------------------------- orchestrators

    def _failed_over(self, exc: Exception, failed: str) -> bool:
        """Turn to the other orchestrator after ``exc`` from the one at ``failed``?"""
        if len(self.orchestrator_urls) < 2:
            return False
        if isinstance(exc, RpcError) and exc.code != "not_leader":
            return False
        if self.orchestrator_url == failed:  # no concurrent call turned already
            self._leader = (self._leader + 1) % len(self.orchestrator_urls)
            log.info("orchestrator %s: %s; turning to %s", failed, exc, self.orchestrator_url)
        return True

    async def _call(self, method: str, body: object, *, timeout_s: float) -> object:
        """A unary call to the orchestrator; with a standby, to the other if this one is
        unreachable (either answers reads: both share the store)."""
        for _ in self.orchestrator_urls:
            url = self.orchestrator_url
            try:
                return await self._client().call(method, body, timeout_s=timeout_s)
            except RpcUnavailable as exc:
                if not self._failed_over(exc, url):
                    raise
                error = exc
        raise error

    async def _frames(self, req: Request) -> AsyncGenerator[Frame, None]:
        """The frames of ``req`` from the leader; after a failover, the same request
        again from the new one, the text already passed on left out."""
        loop = asyncio.get_running_loop()
        passed = 0  # characters of response text passed on
        give_up: float | None = None
        backoff = 0.05
        while True:
            url = self.orchestrator_url
            frames = self._client().stream("submit_stream", req, idle_timeout_s=self.idle_timeout_s)
            seen = 0  # characters of this stream's text so far
            try:
                async with contextlib.aclosing(frames):
                    async for frame in frames:
                        if isinstance(frame, TokenChunk) and seen < passed:
                            frame, seen = _skip_text(frame, passed - seen, seen)
                            if not frame.texts:
                                continue
                        if isinstance(frame, TokenChunk):
                            seen += sum(map(len, frame.texts))
                            passed = max(passed, seen)
                        yield frame
                return
            except (RpcUnavailable, RpcError) as exc:
                if not (_seal_lapsed(exc) or self._failed_over(exc, url)):
                    raise
                give_up = give_up if give_up is not None else loop.time() + self.failover_s
                if loop.time() >= give_up:
                    raise
                log.warning("request %s: sending it again after %s", req.request_id, exc)
            # Jittered: the requests a dead leader left do not reach its successor in step.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(0.5, backoff * 2)

    # ------------------------------------------------------------------ auth

    async def _lookup_key(self, key_hash: str) -> str | None:
        now = time.monotonic()
        cached = self._key_cache.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        answer = await self._call("auth_key", key_hash, timeout_s=5.0)
        if answer is not None and not isinstance(answer, str):
            raise RpcError("bad_reply", "auth_key did not return a tenant")
        tenant: str | None = answer
        if tenant is not None and self.auth.key_cache_s > 0:
            if len(self._key_cache) >= _KEY_CACHE_MAX:
                self._key_cache.clear()
            self._key_cache[key_hash] = (tenant, now + self.auth.key_cache_s)
        return tenant

    async def _tenant(self, request: web.Request, rid: str) -> str | web.Response:
        """The caller's tenant, or the refusal to send (fail closed: see "Authentication")."""
        authorization = request.headers.get("Authorization")
        api_key = request.headers.get("x-api-key")
        if not self.auth.required:
            # Placeholders (the SDK's "unused", "EMPTY") are no credential at all.
            authorization, api_key = issued_credentials(authorization, api_key)
            if authorization is None and api_key is None:
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
            headers = {}
            if exc.status == 401:
                headers["WWW-Authenticate"] = (
                    'Bearer realm="haif"'
                    if exc.code == "missing_credentials"
                    else 'Bearer realm="haif", error="invalid_token"'
                )
            return web.json_response(exc.to_error_body(), status=exc.status, headers=headers)
        except (RpcUnavailable, RpcError) as exc:
            log.warning("request %s: checking credentials failed: %s", rid, exc)
            # auth_key only reads the store: when the orchestrator answers with an
            # error (or a broken reply), its store failed.
            store = isinstance(exc, RpcError)
            headers = {"x-request-id": rid} if _REQUEST_ID.fullmatch(rid) else {}
            return _unavailable_response(store, headers)
        return principal.tenant

    # --------------------------------------------------------------- requests

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, within the edge's deadlines and size; else :class:`BadBody`
        (408 / 413 / 400), its answer closing the connection."""
        limits = self.limits
        too_large = BadBody(
            f"the request body is larger than {limits.max_body_bytes} bytes",
            "payload_too_large",
            status=413,
        )
        length = request.content_length
        if length is not None and length > limits.max_body_bytes:
            raise too_large
        content = request.content
        if content.is_eof():  # all of it arrived with the headers: nothing to wait for
            data = await content.read()
            if len(data) > limits.max_body_bytes:
                raise too_large
            return data
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                wait_s = min(deadline - loop.time(), limits.read_idle_timeout_s)
                if wait_s <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait_s):
                    chunk = await content.readany()
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large
                chunks.append(chunk)
        except TimeoutError:
            raise BadBody(
                f"the request body did not arrive in time (all of it within "
                f"{limits.body_timeout_s:g} s, no pause over {limits.read_idle_timeout_s:g} s)",
                "request_timeout",
                status=408,
            ) from None
        except (HttpProcessingError, RequestPayloadError) as exc:
            log.debug("a request body cannot be read: %r", exc)
            # Nothing more of it can be read: no lingering on it after the answer.
            content.feed_eof()
            raise BadBody(
                "the request body cannot be read: bad chunked framing or content encoding",
                "invalid_body",
            ) from None

    async def _parse(self, request: web.Request, model: type[_Body]) -> _Body | web.Response:
        try:
            if (refusal := _content_type_refusal(request)) is not None:
                raise refusal
            data = decode_body(await self._read_body(request))
        except BadBody as exc:
            resp = exc.response()
            if exc.code in ("request_timeout", "payload_too_large", "invalid_body"):
                resp.force_close()  # the rest of the body is not worth waiting for
            return resp
        try:
            parsed = model.model_validate(data)
        except RecursionError:
            return BadBody(
                f"the body is nested more than {MAX_JSON_DEPTH} levels deep", "nesting_too_deep"
            ).response()
        except BadParam as exc:
            return openai_error(400, str(exc), "invalid_request_error", exc.code, exc.param)
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
        given_id = request.headers.get("x-request-id")
        request_id = given_id or f"req-{uuid.uuid4().hex}"
        info = _info(request)
        info.request_id = _log_id(request_id)
        tenant = await self._tenant(request, _log_id(request_id))
        if isinstance(tenant, web.Response):
            return tenant
        info.tenant = tenant
        parsed = await self._parse(request, ChatBody if chat else CompletionBody)
        if isinstance(parsed, web.Response):
            return parsed
        info.model, info.stream = parsed.model, parsed.stream
        messages: tuple[ChatTurn, ...] = ()
        prompt: str | None = None
        if isinstance(parsed, ChatBody):
            messages = parsed.messages
        else:
            assert isinstance(parsed, CompletionBody)
            prompt = parsed.prompt
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
        try:
            measured = await self.prompts.measure_async(parsed.model, prompt, messages)
        except PromptError as exc:
            return openai_error(400, exc.message, "invalid_request_error", exc.code, exc.param)
        req = Request(
            request_id=request_id,
            tenant=tenant,
            model=parsed.model,
            prompt_tokens=measured.tokens,
            prefix_hashes=measured.prefix_hashes,
            prefix_block_tokens=measured.block_tokens,
            max_tokens=parsed.output_limit,
            arrival_s=time.monotonic(),
            origin_region=self.region,
            priority=parsed.priority,
            stream=parsed.stream,
            prompt=prompt,
            messages=messages,
            sampling=parsed.sampling(),
            # With a standby, every request can be resent after a failover (see above).
            idempotency_key=key
            if key is not None or len(self.orchestrator_urls) < 2
            else f"haif-{uuid.uuid4().hex}",
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
        info = _info(request)
        info.request_id, info.tenant, info.model = req.request_id, req.tenant, req.model
        info.stream = body.stream
        last_token = arrived if arrived is not None else time.perf_counter()
        first = True
        sse: _SseStream | None = None
        pieces: list[str] = []
        final: SubmitReply | None = None
        frames = self._frames(req)
        try:
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if isinstance(frame, TokenChunk):
                        now = time.perf_counter()
                        if first:  # tokens came: the model is served, a bounded label
                            first = False
                            info.ttft_s = now - last_token
                            model = metrics.model_label(req.model)
                            metrics.ttft.labels(model, str(body.stream).lower()).observe(
                                info.ttft_s
                            )
                        elif body.stream and frame.texts:
                            metrics.inter_token.labels(metrics.model_label(req.model)).observe(
                                (now - last_token) / len(frame.texts)
                            )
                        last_token = now
                        if not body.stream:
                            pieces.extend(frame.texts)
                            continue
                        if sse is None:
                            sse = await self._open_sse(request, req.request_id, body, chat, headers)
                        await sse.tokens(frame.texts)
                    elif isinstance(frame, SubmitReply):
                        final = frame
                        _note_reply(info, frame)
                    else:
                        raise RpcError("bad_reply", f"unexpected frame {type(frame).__name__}")
        except ConnectionResetError:
            # The client went away; the request still runs to its end and is recorded.
            return sse.resp if sse is not None else web.Response(status=499)
        except (RpcUnavailable, RpcError) as exc:
            status = _RPC_STATUS.get(exc.code) if isinstance(exc, RpcError) else None
            if status is not None and sse is None:
                # The caller's own doing (a reused Idempotency-Key, a bad request).
                assert isinstance(exc, RpcError)
                info.error = exc.code
                # An unsupported parameter's message starts with its name.
                param = exc.message.partition(":")[0] if exc.code == _UNSUPPORTED else None
                return openai_error(
                    status, exc.message, "invalid_request_error", exc.code, param, headers
                )
            store = isinstance(exc, RpcError) and exc.code == "store_unavailable"
            info.error = "store_unavailable" if store else "unavailable"
            log.warning("request %s: submitting failed: %s", req.request_id, exc)
            if sse is not None:
                await self._stream_error(sse, *_unavailable_error(store))
                return sse.resp
            return _unavailable_response(store, headers)
        if final is None:
            log.warning("request %s: the orchestrator sent no final record", req.request_id)
            if sse is not None:
                await self._stream_error(sse, *_unavailable_error(False))
                return sse.resp
            return _unavailable_response(False, headers)
        if body.stream and final.reject is None and final.record.status == "ok":
            if sse is None:
                sse = await self._open_sse(request, req.request_id, body, chat, headers)
            with contextlib.suppress(ConnectionResetError):
                await sse.finish(final.record, _finish_reason(final, req.max_tokens))
            return sse.resp
        if sse is not None:
            rec = final.record
            if _store_failed(rec):
                await self._stream_error(sse, *_unavailable_error(True))
            else:
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
        request[_STREAMING] = True  # from here on an error can only be an SSE event
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
            if _store_failed(rec):
                log.warning("request %s: %s: %s", rec.request_id, rec.status, rec.reason)
                return _unavailable_response(True, headers)
            if rec.status == "failed" and rec.reason == "bad_request":
                # The worker refused the request itself (e.g. a sampling parameter
                # its engine cannot honour): the caller's doing, not retried.
                return openai_error(
                    400,
                    f"the request is invalid for {rec.model} on the worker that took it "
                    "(e.g. a sampling parameter its engine cannot honour, or a chat "
                    "for a model without a chat template)",
                    "invalid_request_error",
                    "bad_request",
                    headers=headers,
                )
            status = 504 if rec.status == "timeout" else 502
            return openai_error(
                status,
                f"request {rec.status}: {rec.reason}",
                "api_error",
                rec.status,
                headers=headers,
            )
        finish = _finish_reason(reply, body.output_limit)
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
        status = await self._call("status", None, timeout_s=2.0)
        if not isinstance(status, OrchestratorStatus):
            raise RpcError("bad_reply", "status did not return an OrchestratorStatus")
        return status

    async def models(self, request: web.Request) -> web.Response:
        if (refusal := self._unavailable()) is not None:
            return refusal
        rid = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        tenant = await self._tenant(request, _log_id(rid))
        if isinstance(tenant, web.Response):
            return tenant
        try:
            status = await self._status()
        except (RpcUnavailable, RpcError) as exc:
            log.warning("GET /v1/models: the orchestrator's status failed: %s", exc)
            return _unavailable_response(False)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "haif"} for m in status.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.draining or self.closing:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        try:
            status = await self._status()
        except (RpcUnavailable, RpcError) as exc:
            log.debug("readyz: the orchestrator's status failed: %s", exc)
            return web.json_response(
                {"ready": False, "reason": "orchestrator unavailable"}, status=503
            )
        if not status.ready:
            return web.json_response(
                {"ready": False, "reason": "no fresh worker", "fresh_workers": 0}, status=503
            )
        return web.json_response({"ready": True, "fresh_workers": len(status.fresh_workers)})


_KEPT_ERROR_HEADERS = frozenset({"allow"})


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, ...) as OpenAI-shaped JSON."""
    path = request.path[:200]
    headers = {k: v for k, v in exc.headers.items() if k.lower() in _KEPT_ERROR_HEADERS}
    if exc.status == 404:
        message, code = f"Invalid URL ({request.method} {path})", "unknown_url"
    elif exc.status == 405:
        message, code = f"{request.method} is not allowed on {path}", "method_not_allowed"
    elif exc.status == 413:
        message, code = exc.text or "the request body is too large", "payload_too_large"
    else:
        message, code = exc.reason, None
    kind = "invalid_request_error" if exc.status < 500 else "api_error"
    return openai_error(exc.status, message, kind, code, headers=headers)


@web.middleware
async def edge_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the gateway answers has OpenAI's shape; exceptions stay in the log."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception:
        rid = _log_id(request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}")
        log.exception("request %s: %s %s failed", rid, request.method, request.path[:200])
        if request.get(_STREAMING):
            raise  # the status line is sent: all aiohttp can do is close the stream
        headers = {"x-request-id": rid} if _REQUEST_ID.fullmatch(rid) else {}
        return openai_error(
            500,
            "internal error; the x-request-id header identifies it in the gateway's log",
            "api_error",
            "internal_error",
            headers=headers,
        )


def _over_capacity_response() -> bytes:
    body = json.dumps(
        _error_body(
            "too many open connections; retry later", "service_unavailable", "too_many_connections"
        )
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {UNAVAILABLE_RETRY_AFTER_S}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


_OVER_CAPACITY = _over_capacity_response()


class _EdgeHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed HTTP with OpenAI-shaped JSON.

    What aiohttp's parser refuses before any handler runs (a bad request
    line, header or chunked framing, an unsupported ``Content-Encoding``)
    gets a JSON 400 ``invalid_http`` and the connection is closed; it is
    logged at DEBUG, not as an error with a traceback (anyone can send it).
    """

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text, kind, code = "internal error", "api_error", "internal_error"
        else:
            self.logger.debug("Malformed request from %s: %r", request.remote, exc)
            lines = (message or "").strip().splitlines()
            detail = lines[0].rstrip(":") if lines else "cannot parse it"
            text, kind, code = (
                f"malformed HTTP request: {detail}"[:300],
                "invalid_request_error",
                "invalid_http",
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response began already: cannot send an error")
        resp = web.json_response(_error_body(text, kind, code), status=status)
        resp.force_close()
        return resp


class _EdgeServer(web.Server):
    """aiohttp's connection manager with a cap on open client connections.

    Each connection is an :class:`_EdgeHandler`. A connection over the cap
    gets a 503 ``too_many_connections`` at once,
    before it sends anything; nothing it sends is read as a request, and it
    is closed after :data:`_REFUSED_LINGER_S` (so the client can read the
    answer before the close).
    """

    max_connections: int
    metrics: telemetry.GatewayMetrics
    open_connections: int
    #: Handing off to a new gateway: idle connections are closed a moment later than
    #: aiohttp would (:meth:`pre_shutdown`), so that one accepted just before the
    #: listener closed gets its request in and answered instead of closed unanswered.
    handing_off: bool

    @classmethod
    def adopt(
        cls, server: web.Server, max_connections: int, metrics: telemetry.GatewayMetrics
    ) -> _EdgeServer:
        # aiohttp builds its Server inside the runner; this only adds behaviour to it.
        server.__class__ = cls
        assert isinstance(server, _EdgeServer)
        server.max_connections = max_connections
        server.metrics = metrics
        server.open_connections = 0
        server.handing_off = False
        return server

    def pre_shutdown(self) -> None:
        if not self.handing_off:
            super().pre_shutdown()

    async def close_idle_after(self, settle_s: float) -> None:
        """The deferred :meth:`pre_shutdown` of a hand-off."""
        await asyncio.sleep(settle_s)
        super().pre_shutdown()

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _EdgeHandler  # the same slots: only handle_error differs
        return handler

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1
        self.metrics.open_connections.inc()
        if 0 < self.max_connections < self.open_connections:
            self.metrics.connections_refused.inc()
            handler.close()  # read nothing more from it as a request
            transport.write(_OVER_CAPACITY)
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(_REFUSED_LINGER_S, transport.close)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1
        self.metrics.open_connections.dec()


def _serve_with_edge(
    app: web.Application,
    limits: GatewayLimits,
    metrics: telemetry.GatewayMetrics,
    servers: list[_EdgeServer],
) -> None:
    """Make every server of ``app`` an :class:`_EdgeServer`, however it is run
    (``web.run_app``, an ``AppRunner``), with the cap of ``limits``; each is added to
    ``servers``."""
    make_handler = app._make_handler
    cap = limits.connection_cap

    def make_edge_handler(**kwargs: Any) -> web.Server:
        server = _EdgeServer.adopt(make_handler(**kwargs), cap, metrics)
        servers.append(server)
        return server

    # Past Application.__setattr__, which warns about new attributes in debug mode.
    object.__setattr__(app, "_make_handler", make_edge_handler)


#: A hand-off's wait between closing the listener and closing idle connections.
_HANDOFF_SETTLE_S = 0.25


def build_app(gateway: Gateway, *, drain_signal: bool = False) -> web.Application:
    """The gateway's app (``drain_signal``: SIGUSR1 starts the hand-off to a new gateway
    on a shared socket: every response from then on closes its connection, so clients
    open their next one, which the new gateway accepts)."""
    limits = gateway.limits
    app = web.Application(
        client_max_size=limits.max_body_bytes,
        middlewares=[telemetry.http_middleware("gateway", gateway.metrics), edge_errors],
        # aiohttp's keep-alive timer runs from a connection's opening and from
        # each response: the head of the next request must be in by then.
        handler_args={
            "keepalive_timeout": limits.header_timeout_s,
            "lingering_time": limits.linger_s,
            # A client that disconnects cancels its handler, which closes its
            # orchestrator stream: the orchestrator then cancels the request.
            "handler_cancellation": True,
        },
    )
    servers: list[_EdgeServer] = []
    _serve_with_edge(app, limits, gateway.metrics, servers)

    async def healthz(_request: web.Request) -> web.Response:
        # The pid tells two gateways on one shared socket apart (haif supervise).
        return web.json_response({"ok": True, "pid": os.getpid()})

    def hand_off() -> None:
        gateway.closing = True
        for server in servers:
            server.handing_off = True

    async def close_after(_request: web.Request, response: web.StreamResponse) -> None:
        if gateway.closing:  # headers are made already: the close must be said too
            response.force_close()
            response.headers["Connection"] = "close"

    async def on_startup(_app: web.Application) -> None:
        await gateway.start()
        if drain_signal:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, hand_off)

    async def on_shutdown(_app: web.Application) -> None:
        # Listening sockets are closed already; refuse what still arrives on
        # open connections while in-flight requests finish.
        gateway.draining = not gateway.closing
        if gateway.closing:  # a hand-off: answer what was accepted, then close the idle
            await asyncio.gather(*(s.close_idle_after(_HANDOFF_SETTLE_S) for s in servers))

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.stop()

    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", gateway.readyz)
    app.router.add_get("/metrics", telemetry.metrics_handler(gateway.metrics.registry))
    app.on_response_prepare.append(close_after)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
