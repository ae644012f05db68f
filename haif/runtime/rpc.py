"""msgpack RPC over aiohttp between gateway, orchestrator and workers.

Unary calls
-----------
A call is ``POST /rpc/<method>`` whose body is a msgpack envelope::

    {"v": 1, "type": method, "id": message id, "trace": traceparent | None,
     "body": <contract encoded by haif.wire>, "auth": <seal> (when signed)}

and whose reply is ``{"ok": true, "body": ...}`` or
``{"ok": false, "error": {"code": ..., "message": ...}}``. Every call has a
timeout, so a dead peer turns into :class:`RpcUnavailable` instead of a hang.

Authentication
--------------
A client built with a :class:`~haif.runtime.security.Signer` adds ``auth``,
an Ed25519 seal (:func:`~haif.runtime.security.seal`) of the msgpack array
``["haif-rpc-v1", method, id, trace, body]`` (``method`` as in the URL, the
one the server runs), sealed for the recipient's name (``audience``:
:data:`ORCHESTRATOR_AUDIENCE`, or a worker's id). So a sealed heartbeat
cannot be replayed as another call, to another recipient, with another body
or trace, or twice. A server given an :class:`EnvelopeAuth` rebuilds those bytes from
what it decoded and opens the seal with its keyring, its own name, its clock
and a replay cache before anything else; a call that fails gets HTTP 401
(503 when the replay cache is full) with the
:class:`~haif.runtime.security.AuthError` code (``unsigned``,
``invalid_seal``, ``unknown_key``, ``bad_signature``, ``wrong_audience``,
``expired``, ``replayed``) and its handler never runs. A handler learns the
verified caller's key id from :func:`caller_key_id`. Without a signer /
``EnvelopeAuth`` (the default) nothing is signed or checked.

Mutual TLS
----------
A client built with a :class:`~haif.runtime.cluster_tls.ServiceTls` calls
``https://`` URLs with the cluster's client context and checks, during the
handshake, that the server's certificate names ``audience``
(:func:`~haif.runtime.cluster_tls.tls_hostname`). A server given a
:class:`PeerAuth` (and served with the matching server context) reads the
caller's identity from its verified certificate and answers 403 when that
identity's role may not call the method (401 when the connection carries no
certificate: a server not served over TLS); a handler learns the name with
:func:`caller_name`. Both checks may be combined (seal *and* certificate).

Streaming calls
---------------
A streaming method (``infer_stream`` on workers, ``submit_stream`` on the
orchestrator) takes the same envelope and answers ``200`` with content type
``application/x-msgpack-stream``: a chunked HTTP body of msgpack maps written
back to back (msgpack is self-delimiting; the client reads them with
``msgpack.Unpacker.feed``). Frames:

- ``{"ok": true, "body": <contract>}`` — one item of the stream;
- ``{"ok": true, "keepalive": true}`` — nothing new yet; sent whenever the
  handler has produced nothing for ``keepalive_s`` (1 s), so a silent peer is
  distinguishable from a busy one;
- ``{"ok": false, "error": {"code", "message"}}`` — the call failed; last frame;
- ``{"ok": true, "end": true}`` — the stream is complete; last frame.

The client (:meth:`RpcClient.stream`) applies an *idle* timeout between reads
(``sock_read``): a peer that dies or hangs mid-stream surfaces as
:class:`RpcUnavailable` (``kind`` ``"disconnected"`` when the connection broke
or the body ended without an end frame, ``"timeout"`` when nothing arrived in
time, ``"connect"`` when the peer could not be reached), never as a hang. An
unknown method or a malformed envelope is answered with a plain unary error
reply, which the client raises as :class:`RpcError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Mapping,
)
from typing import Any

import aiohttp
import msgpack
from aiohttp import web
from opentelemetry.trace import SpanKind, StatusCode

from haif import wire
from haif.contracts import ErrorKind
from haif.runtime import telemetry
from haif.runtime.cluster_tls import Identity, ServiceTls, peer_identity
from haif.runtime.roles import Role, allowed, role_of
from haif.runtime.security import (
    DEFAULT_MAX_TTL_S,
    DEFAULT_SKEW_S,
    AuthError,
    Keyring,
    ReplayCache,
    Signer,
    open_sealed,
    seal,
)

CONTENT_TYPE = "application/msgpack"
STREAM_CONTENT_TYPE = "application/x-msgpack-stream"
Handler = Callable[[Any], Awaitable[Any]]
StreamHandler = Callable[[Any], AsyncIterator[Any]]
#: Largest single frame a stream client accepts.
MAX_FRAME_BYTES = 16 << 20
DEFAULT_KEEPALIVE_S = 1.0
#: Methods served without a span (periodic noise).
UNTRACED_METHODS = frozenset({"heartbeat"})
#: The name calls to the orchestrator are sealed for; a worker's is its worker id.
ORCHESTRATOR_AUDIENCE = "orchestrator"
#: How long a seal is valid: short, so the replay cache stays small.
DEFAULT_SEAL_TTL_S = 10.0
#: A refused caller is logged at most once per this many seconds (per peer, method, code).
REFUSAL_LOG_EVERY_S = 30.0
_RPC_DOMAIN = "haif-rpc-v1"

log = logging.getLogger("haif.rpc")
_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "haif_rpc_caller", default=None
)


_peer: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "haif_rpc_peer", default=None
)


def caller_key_id() -> str | None:
    """The key id whose seal the call being handled carried; ``None`` if unchecked."""
    return _caller.get()


def caller_identity() -> Identity | None:
    """The verified certificate identity of the call being handled; ``None`` if unchecked."""
    return _peer.get()


class RpcError(Exception):
    """The peer answered with an error; ``status`` is the HTTP status it is served with.

    ``code`` is an :class:`~haif.contracts.ErrorKind` where the error is an
    attempt's failure (the orchestrator reports it to the core as the
    attempt's error); it is kept as a plain ``str``.
    """

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message
        self.status = status


class RpcUnavailable(Exception):
    """The peer could not be reached, broke the connection or did not answer in time.

    ``kind``: ``"connect"`` (never reached), ``"timeout"`` (no answer / idle
    between stream frames too long) or ``"disconnected"`` (the connection or
    stream broke after the call was sent). :attr:`error_kind` is what a call
    to a worker that ends so reports as its attempt's error.
    """

    def __init__(self, message: str, kind: str = "connect") -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def error_kind(self) -> str:
        """The attempt's :class:`~haif.contracts.ErrorKind` (``connection_error`` if unsure)."""
        return _UNAVAILABLE_ERRORS.get(self.kind, ErrorKind.CONNECTION_ERROR.value)


_UNAVAILABLE_ERRORS: dict[str, str] = {
    "connect": ErrorKind.CONNECTION_ERROR.value,
    "timeout": ErrorKind.TIMEOUT.value,
    "disconnected": ErrorKind.WORKER_CRASHED.value,
}


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _kind_of(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "connect"
    if isinstance(exc, TimeoutError):  # ServerTimeoutError, asyncio timeouts
        return "timeout"
    return "disconnected"


def _raise_error(reply: Mapping[str, Any], status: int) -> None:
    error = reply.get("error") or {}
    if not isinstance(error, Mapping):
        error = {}
    raise RpcError(str(error.get("code", "error")), str(error.get("message", "")), status)


def sealed_bytes(method: str, message_id: Any, trace: Any, plain_body: Any) -> bytes:
    """What an envelope's seal signs: the method, the envelope's id and trace, and its body."""
    return _pack([_RPC_DOMAIN, method, message_id, trace, plain_body])


class RpcClient:
    """Calls one peer; with ``signer``, every envelope is sealed for ``audience``.

    ``audience`` is the recipient's name (:data:`ORCHESTRATOR_AUDIENCE` or a
    worker's id); ``clock`` (UNIX seconds) dates the seals.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeout_s: float,
        *,
        signer: Signer | None = None,
        audience: str = "",
        clock: Callable[[], float] = time.time,
        seal_ttl_s: float = DEFAULT_SEAL_TTL_S,
        tls: ServiceTls | None = None,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.signer = signer
        self.audience = audience
        self.clock = clock
        self.seal_ttl_s = seal_ttl_s
        #: aiohttp arguments of every request: the cluster's client context and
        #: the name the server's certificate must carry (built once, not per call).
        self._tls: dict[str, Any] = {}
        if tls is not None:
            if not self.base_url.startswith("https://"):
                raise ValueError(f"{self.base_url}: mutual TLS needs an https:// URL")
            self._tls = tls.client_kwargs(audience or ORCHESTRATOR_AUDIENCE)

    def envelope(self, method: str, body: Any, trace: str | None = None) -> bytes:
        """The packed envelope of a call (sealed when the client has a signer)."""
        if trace is None:  # the caller's current span, if any (W3C traceparent)
            trace = telemetry.inject()
        message_id = uuid.uuid4().hex
        plain = wire.to_plain(body)
        envelope: dict[str, Any] = {
            "v": 1,
            "type": method,
            "id": message_id,
            "trace": trace,
            "body": plain,
        }
        if self.signer is not None:
            envelope["auth"] = seal(
                sealed_bytes(method, message_id, trace, plain),
                self.signer,
                self.clock(),
                self.seal_ttl_s,
                audience=self.audience,
            )
        return _pack(envelope)

    async def call(
        self,
        method: str,
        body: Any,
        *,
        timeout_s: float | None = None,
        trace: str | None = None,
    ) -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self.session.post(
                f"{self.base_url}/rpc/{method}",
                data=self.envelope(method, body, trace),
                headers={"Content-Type": CONTENT_TYPE},
                timeout=timeout,
                **self._tls,
            ) as resp:
                payload = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RpcUnavailable(
                f"{self.base_url}: {type(exc).__name__}: {exc}", _kind_of(exc)
            ) from None
        try:
            reply = msgpack.unpackb(payload, raw=False)
        except (msgpack.UnpackException, ValueError):
            raise RpcError("bad_reply", f"HTTP {resp.status}, not msgpack") from None
        if not isinstance(reply, dict):
            raise RpcError("bad_reply", "reply is not a map")
        if not reply.get("ok"):
            _raise_error(reply, resp.status)
        return wire.from_plain(reply.get("body"))

    async def stream(
        self,
        method: str,
        body: Any,
        *,
        idle_timeout_s: float,
        connect_timeout_s: float = 5.0,
        timeout_s: float | None = None,
        trace: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Call a streaming method; yield each decoded item until the end frame.

        Raises :class:`RpcError` on an error frame and :class:`RpcUnavailable`
        when the peer cannot be reached, stays silent for ``idle_timeout_s``
        (keepalives count as activity), breaks the connection, ends the body
        without an end frame, or the whole call exceeds ``timeout_s`` (default:
        the client's ``timeout_s``). Use it under ``contextlib.aclosing`` so
        leaving the loop early releases the connection at once.
        """
        timeout = aiohttp.ClientTimeout(
            total=timeout_s or self.timeout_s,
            sock_connect=connect_timeout_s,
            sock_read=idle_timeout_s,
        )
        url = f"{self.base_url}/rpc/{method}"
        try:
            async with self.session.post(
                url,
                data=self.envelope(method, body, trace),
                headers={"Content-Type": CONTENT_TYPE},
                timeout=timeout,
                **self._tls,
            ) as resp:
                if resp.content_type != STREAM_CONTENT_TYPE:
                    payload = await resp.read()
                    try:
                        reply = msgpack.unpackb(payload, raw=False)
                    except (msgpack.UnpackException, ValueError):
                        raise RpcError("bad_reply", f"HTTP {resp.status}, not msgpack") from None
                    if isinstance(reply, dict) and not reply.get("ok"):
                        _raise_error(reply, resp.status)
                    raise RpcError("bad_reply", f"{method} did not answer with a stream")
                unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME_BYTES)
                async for data in resp.content.iter_any():
                    try:
                        unpacker.feed(data)
                        frames = list(unpacker)
                    except (msgpack.UnpackException, ValueError) as exc:
                        raise RpcError("bad_reply", f"bad stream frame: {exc}") from None
                    for frame in frames:
                        if not isinstance(frame, dict):
                            raise RpcError("bad_reply", "stream frame is not a map")
                        if not frame.get("ok"):
                            _raise_error(frame, resp.status)
                        if frame.get("end"):
                            return
                        if frame.get("keepalive"):
                            continue
                        yield wire.from_plain(frame.get("body"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RpcUnavailable(
                f"{self.base_url}: {type(exc).__name__}: {exc}", _kind_of(exc)
            ) from None
        raise RpcUnavailable(f"{url}: stream ended without an end frame", "disconnected")


class LocalClient:
    """Calls a service running in this process through its RPC methods, not over HTTP.

    A stand-in for :class:`RpcClient` (same ``call`` / ``stream``) where the
    caller and the service share a process, as a gateway colocated with its
    orchestrator does: no envelope, seal, socket or codec on the way (the
    contracts are immutable, so nothing needs copying). A method's
    :class:`RpcError` reaches the caller as it is, any other failure as
    ``RpcError("internal")``; an unknown method is ``RpcError("unknown_method")``;
    a unary call that takes longer than its timeout raises
    :class:`RpcUnavailable` (``"timeout"``). The caller's span stays the
    current one, so the service's spans are its children.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        streams: Mapping[str, StreamHandler],
        timeout_s: float,
        *,
        service: str = "rpc",
    ) -> None:
        self.handlers = dict(handlers)
        self.streams = dict(streams)
        self.timeout_s = timeout_s
        self.service = service

    def _unknown(self, method: str) -> RpcError:
        return RpcError("unknown_method", f"no RPC method {method!r}", 404)

    def _internal(self, method: str, exc: Exception) -> RpcError:
        log.error("%s %s failed", self.service, method, exc_info=exc)
        return RpcError("internal", type(exc).__name__, 500)

    async def call(
        self,
        method: str,
        body: Any,
        *,
        timeout_s: float | None = None,
        trace: str | None = None,
    ) -> Any:
        handler = self.handlers.get(method)
        if handler is None:
            raise self._unknown(method)
        try:
            return await asyncio.wait_for(handler(body), timeout_s or self.timeout_s)
        except TimeoutError:
            raise RpcUnavailable(f"{self.service} {method}: no answer in time", "timeout") from None
        except RpcError:
            raise
        except Exception as exc:
            raise self._internal(method, exc) from None

    async def stream(
        self,
        method: str,
        body: Any,
        *,
        idle_timeout_s: float,
        connect_timeout_s: float = 5.0,
        timeout_s: float | None = None,
        trace: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Yield the items of streaming ``method``; leaving early closes it (use ``aclosing``)."""
        handler = self.streams.get(method)
        if handler is None:
            raise self._unknown(method)
        try:
            async with contextlib.aclosing(handler(body)) as items:  # type: ignore[type-var]
                async for item in items:
                    yield item
        except (RpcError, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._internal(method, exc) from None


def _reply(status: int, obj: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=_pack(obj), content_type=CONTENT_TYPE)


def error_reply(status: int, code: str, message: str) -> web.Response:
    return _reply(status, {"ok": False, "error": {"code": code, "message": message}})


async def ready_batches(
    items: AsyncIterator[Any], every_s: float
) -> AsyncGenerator[tuple[list[Any], bool], None]:
    """``items`` in batches of those ready together, each with whether it is the last.

    A batch is an item and whatever followed it without waiting (the rest of
    a burst, or the end of ``items``), so a stream sends it in one write, not
    one per frame: each send costs a system call here and a wake-up at the
    peer. An empty, not last, batch means no item came for ``every_s``
    seconds (a keepalive is due). The pending ``__anext__`` is never
    cancelled by a keepalive, only when the consumer stops early (then
    ``items`` is closed too).
    """
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(items.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield [], False
                continue
            batch: list[Any] = []
            while pending is not None and pending.done():
                task, pending = pending, None
                try:
                    item = task.result()
                except StopAsyncIteration:
                    yield batch, True
                    return
                except Exception:
                    if batch:  # what came before the failure still goes out
                        yield batch, False
                    raise
                batch.append(item)
                pending = asyncio.ensure_future(items.__anext__())
                await asyncio.sleep(0)  # one step: an item already there joins the batch
            yield batch, False
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class EnvelopeAuth:
    """What a server demands of every call: a seal from ``keyring`` for ``audience``.

    ``audience`` is this server's name (:data:`ORCHESTRATOR_AUDIENCE`, or the
    worker's id); ``clock`` gives UNIX seconds (a test passes a hand-driven
    one); ``replay`` remembers the seals already accepted (one per server).
    """

    def __init__(
        self,
        keyring: Keyring,
        audience: str = "",
        *,
        clock: Callable[[], float] = time.time,
        replay: ReplayCache | None = None,
        skew_s: float = DEFAULT_SKEW_S,
        max_ttl_s: float = DEFAULT_MAX_TTL_S,
        methods: Mapping[str, frozenset[Role]] | None = None,
    ) -> None:
        self.keyring = keyring
        self.audience = audience
        self.clock = clock
        self.replay = replay if replay is not None else ReplayCache()
        self.skew_s = skew_s
        self.max_ttl_s = max_ttl_s
        #: Which roles may call each method (:mod:`haif.runtime.roles`); None: any trusted key.
        self.methods = methods

    def verify(self, method: str, envelope: Mapping[str, Any]) -> str:
        """The key id that sealed this call of ``method``, if its role may call it.

        Raises :class:`AuthError`: 401 for a missing or bad seal, 403 when the
        key's role may not call ``method``.
        """
        auth = envelope.get("auth")
        signed = sealed_bytes(
            method, envelope.get("id"), envelope.get("trace"), envelope.get("body")
        )
        kid = open_sealed(
            signed,
            auth if isinstance(auth, Mapping) else None,
            self.keyring,
            self.clock(),
            self.replay,
            audience=self.audience,
            skew_s=self.skew_s,
            max_ttl_s=self.max_ttl_s,
        )
        if self.methods is not None:
            name = self.keyring.name_of(kid) or ""
            if not allowed(self.methods, method, name):
                raise AuthError(
                    403, "forbidden", f"{role_of(name)} key {name!r} may not call {method!r}"
                )
        return kid


class PeerAuth:
    """What a server served with mutual TLS demands: a caller whose role may call the method.

    The TLS handshake has already refused a caller without a certificate from
    the cluster CA (or with an expired one); this reads the identity of the
    one that passed (:func:`~haif.runtime.cluster_tls.peer_identity`) and
    checks its role against ``methods`` (:mod:`haif.runtime.roles`).
    """

    def __init__(self, methods: Mapping[str, frozenset[Role]]) -> None:
        self.methods = methods

    def verify(self, method: str, transport: asyncio.BaseTransport | None) -> Identity:
        """The caller's identity; :class:`AuthError` 401 without one, 403 if not allowed."""
        identity = peer_identity(transport)
        if identity is None:
            raise AuthError(
                401, "no_certificate", "internal RPC needs a client certificate from the cluster CA"
            )
        roles = self.methods.get(method)
        if roles is None or identity.role not in roles:
            raise AuthError(
                403,
                "forbidden",
                f"{identity.role} certificate {identity.name!r} may not call {method!r}",
            )
        return identity


class LogThrottle:
    """Says when a repeated warning is due: once per key every ``every_s`` seconds.

    A misconfigured peer retries every heartbeat; its refusal is logged once
    per window, not every time. Memory is bounded (forgets all at ``max_keys``).
    """

    def __init__(self, every_s: float = REFUSAL_LOG_EVERY_S, max_keys: int = 1024) -> None:
        self.every_s = every_s
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = now
        return True


def add_rpc_routes(
    app: web.Application,
    handlers: Mapping[str, Handler],
    streams: Mapping[str, StreamHandler] | None = None,
    *,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
    service: str = "rpc",
    auth: EnvelopeAuth | None = None,
    peer_auth: PeerAuth | None = None,
) -> None:
    """Serve ``handlers`` (unary) and ``streams`` (streaming) by method name.

    A unary handler is a coroutine taking the decoded body; a streaming
    handler is an async generator taking it, whose items become frames.
    Each call (but ``heartbeat``) runs in a span ``rpc.<method>``, child of
    the envelope's ``trace`` (:mod:`haif.runtime.telemetry`). With ``auth``
    every call must carry a valid seal, checked before anything else runs
    (refusals are logged as warnings); handlers read the caller's key id
    with :func:`caller_key_id`. With ``peer_auth`` (a server behind mutual
    TLS) the caller's certificate must name a role allowed to call the
    method; handlers read it with :func:`caller_identity`.
    """
    stream_handlers = dict(streams or {})
    refusals = LogThrottle()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        try:
            envelope = msgpack.unpackb(await request.read(), raw=False)
            if not isinstance(envelope, dict) or envelope.get("v") != 1:
                raise wire.WireError("not a v1 envelope")
        except (msgpack.UnpackException, ValueError) as exc:
            return error_reply(400, "bad_request", str(exc))
        caller: str | None = None
        peer: Identity | None = None
        if auth is not None or peer_auth is not None:
            try:
                if peer_auth is not None:
                    peer = peer_auth.verify(method, request.transport)
                if auth is not None:
                    caller = auth.verify(method, envelope)
            except AuthError as exc:
                remote = request.remote or "?"
                if refusals.due((remote, method, exc.code)):
                    log.warning(
                        "%s refused %s from %s: %s (%s)",
                        service,
                        method,
                        remote,
                        exc.code,
                        exc.message,
                    )
                return error_reply(exc.status, exc.code, exc.message)
        if method not in handlers and method not in stream_handlers:
            return error_reply(404, "unknown_method", f"no RPC method {method!r}")
        try:
            body = wire.from_plain(envelope.get("body"))
        except ValueError as exc:
            return error_reply(400, "bad_request", str(exc))
        token = _caller.set(caller)
        peer_token = _peer.set(peer)
        try:
            if method in UNTRACED_METHODS:
                return await serve(request, method, body)
            with telemetry.tracer().start_as_current_span(
                f"rpc.{method}",
                context=telemetry.extract(envelope.get("trace")),
                kind=SpanKind.SERVER,
                attributes={"haif.service": service, "rpc.method": method},
            ) as span:
                resp = await serve(request, method, body)
                if resp.status >= 400:
                    span.set_status(StatusCode.ERROR, f"HTTP {resp.status}")
                return resp
        finally:
            _caller.reset(token)
            _peer.reset(peer_token)

    async def serve(request: web.Request, method: str, body: Any) -> web.StreamResponse:
        handler = handlers.get(method)
        stream_handler = stream_handlers.get(method)
        if stream_handler is not None:
            return await _serve_stream(request, stream_handler(body), keepalive_s)
        assert handler is not None
        try:
            result = await handler(body)
        except RpcError as exc:
            return error_reply(exc.status, exc.code, exc.message)
        return _reply(200, {"ok": True, "body": wire.to_plain(result)})

    app.router.add_post("/rpc/{method}", dispatch)


async def _serve_stream(
    request: web.Request, items: AsyncIterator[Any], keepalive_s: float
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Content-Type": STREAM_CONTENT_TYPE})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    batches = ready_batches(items, keepalive_s)
    try:
        sent = b""  # the last batch goes out with the end frame, in one write
        try:
            async for batch, last in batches:
                frames = [{"ok": True, "body": wire.to_plain(item)} for item in batch]
                packed = b"".join(map(_pack, frames or [{"ok": True, "keepalive": True}]))
                if last:
                    sent = packed if batch else b""
                    break
                await resp.write(packed)
            final: dict[str, Any] = {"ok": True, "end": True}
        except RpcError as exc:
            final = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("stream handler %s failed", request.path)
            final = {"ok": False, "error": {"code": "internal", "message": type(exc).__name__}}
        await resp.write_eof(sent + _pack(final))
    except ConnectionResetError:
        pass  # the caller went away; the generator is closed below
    finally:
        await batches.aclose()
    return resp
