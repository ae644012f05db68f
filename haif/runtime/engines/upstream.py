"""The ``openai`` engine: relays an upstream OpenAI-compatible server (JSON or streaming SSE)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp

from haif.contracts import ErrorKind, Request
from haif.runtime.engines.base import ALL_SAMPLING, EngineError, EngineUnavailable
from haif.runtime.messages import TokenChunk
from haif.runtime.rpc import RpcError

__all__ = ["OpenAIUpstreamEngine"]

log = logging.getLogger(__name__)


async def _lines_then_eof(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's lines, then one empty line (ends an event the server left open)."""
    async for line in content:
        yield line
    yield b""


def _sse_events(lines: Sequence[str]) -> str | None:
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


class OpenAIUpstreamEngine:
    """Relays an upstream OpenAI-compatible server over HTTP (aiohttp).

    A request goes as it came: a chat (``Request.messages``) to the
    upstream's ``/v1/chat/completions`` with its messages (the upstream
    applies its model's chat template), a completion to ``/v1/completions``
    with its prompt. It streams from the upstream only when the client
    streams (``Request.stream``): a JSON request makes one JSON call and the
    whole text comes back as one chunk with the upstream's ``finish_reason``.
    Its sampling parameters go along: ``temperature`` (the client's, else
    this engine's ``temperature``, 0: greedy), and those the client set of
    ``top_p``, ``top_k``, ``seed``, ``stop``, ``presence_penalty``,
    ``frequency_penalty`` and ``ignore_eos`` (``top_k`` and ``ignore_eos``
    are vLLM's extensions: an upstream that does not take them answers 400,
    which comes back as ``bad_request``).

    Usage: what the upstream reports is billed (the record's
    ``prompt_tokens`` and ``output_tokens``, :attr:`TokenChunk.usage`): the
    JSON answer's ``usage``, or, streaming, the final usage chunk asked for
    with ``stream_options: {"include_usage": true}``. An upstream that reports
    none leaves the gateway's counts.

    Streaming, each server-sent delta is one token of the response (as vLLM
    and OpenAI stream them); when a delta carries ``logprobs.tokens`` that
    spell its text, those are the tokens. A resumed request (``start > 0``)
    is sent again and its first ``start`` tokens are skipped, which
    continues the same text when the upstream decodes deterministically. The
    response may end before ``max_tokens`` (the upstream stopped): the worker
    reports the tokens actually produced. Upstream trouble is an
    ``RpcError``: ``unavailable`` (retryable elsewhere) for connection
    errors, timeouts, 401/403/429/5xx, ``bad_request`` for other 4xx.

    ``load()`` checks that the upstream answers ``/v1/models`` and lists
    ``model`` (``check_model=False`` skips the listing check). ``chat`` is
    deprecated and ignored (it sent every request as a chat; each request's
    own kind decides now).
    """

    name = "openai"
    #: Every parameter is forwarded; the upstream honours it or refuses it.
    SUPPORTED_SAMPLING = ALL_SAMPLING

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        chat: bool = False,
        temperature: float = 0.0,
        timeout_s: float = 300.0,
        idle_timeout_s: float = 60.0,
        check_model: bool = True,
        forward_request_id: bool = False,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise EngineError(f"upstream URL {base_url!r} must start with http:// or https://")
        if not model:
            raise EngineError("the openai engine needs the upstream model name")
        if chat:
            log.warning(
                "the openai engine's chat option (--upstream-chat) is deprecated and ignored: "
                "chat requests go to /v1/chat/completions, completions to /v1/completions"
            )
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self._api_key = api_key
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.check_model = check_model
        self.forward_request_id = forward_request_id
        self.extra_body = dict(extra_body or {})
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIUpstreamEngine({self.base_url!r}, {self.model!r})"

    def _headers(self, request: Request | None = None) -> dict[str, str]:
        stream = request is not None and request.stream
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request is not None and self.forward_request_id:
            headers["x-request-id"] = request.request_id
        return headers

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def load(self) -> None:
        url = f"{self.base_url}/models"
        try:
            async with self._client().get(
                url, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=10.0)
            ) as resp:
                if resp.status != 200:
                    raise EngineUnavailable(f"upstream {url} answered HTTP {resp.status}")
                listing = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise EngineUnavailable(f"upstream {url} is unreachable: {exc!r}") from None
        if self.check_model:
            data = listing.get("data") if isinstance(listing, dict) else None
            entries = data if isinstance(data, list) else []
            ids = [m.get("id") for m in entries if isinstance(m, dict)]
            if self.model not in ids:
                raise EngineError(f"upstream {self.base_url} does not serve {self.model!r} ({ids})")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def path(request: Request) -> str:
        """The upstream endpoint ``request`` goes to (under ``/v1``)."""
        return "/chat/completions" if request.messages else "/completions"

    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body sent upstream for ``request``."""
        body: dict[str, Any] = {
            **self.extra_body,
            "model": self.model,
            "max_tokens": request.max_tokens,
            "stream": request.stream,
            "temperature": self.temperature,
        }
        if request.stream:
            body["stream_options"] = {"include_usage": True}
        sampling = request.sampling
        if sampling is not None:
            given = {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "seed": sampling.seed,
                "stop": list(sampling.stop) or None,
                "presence_penalty": sampling.presence_penalty,
                "frequency_penalty": sampling.frequency_penalty,
                "ignore_eos": sampling.ignore_eos or None,
            }
            body.update({k: v for k, v in given.items() if v is not None})
        if request.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt or ""
        return body

    @staticmethod
    def _choice(event: Any) -> dict[str, Any] | None:
        """The first choice of an answer or chunk (raises RpcError for an error object)."""
        if not isinstance(event, dict):
            raise RpcError(ErrorKind.BAD_REPLY, "upstream sent a non-object answer")
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream error: {message}")
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        return choices[0]

    def _tokens(self, event: Any, chat: bool) -> list[str]:
        """The tokens of one SSE chunk (raises RpcError for an error event)."""
        choice = self._choice(event)
        if choice is None:
            return []
        if chat:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        if not isinstance(text, str) or not text:
            return []
        logprobs = choice.get("logprobs")
        tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
        if (
            isinstance(tokens, list)
            and tokens
            and all(isinstance(t, str) for t in tokens)
            and "".join(tokens) == text
        ):
            return list(tokens)
        return [text]

    @staticmethod
    def _usage(event: Any) -> tuple[int, int] | None:
        """The ``(prompt_tokens, completion_tokens)`` an answer or chunk reports, if any."""
        usage = event.get("usage") if isinstance(event, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
            return prompt, completion
        return None

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        if start >= request.max_tokens:
            return
        url = self.base_url + self.path(request)
        if request.stream:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_read=self.idle_timeout_s)
        else:  # nothing comes back until the whole answer is ready
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._client().post(
                url, json=self.body(request), headers=self._headers(request), timeout=timeout
            ) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    retryable = resp.status in (401, 403, 408, 429) or resp.status >= 500
                    code = ErrorKind.UNAVAILABLE if retryable else ErrorKind.BAD_REQUEST
                    raise RpcError(code, f"upstream answered HTTP {resp.status}: {detail}")
                if request.stream:
                    async for chunk in self._relay(request, start, resp):
                        yield chunk
                else:
                    yield await self._answer(request, start, resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream {self.base_url}: {exc!r}") from None

    async def _answer(
        self, request: Request, start: int, resp: aiohttp.ClientResponse
    ) -> TokenChunk:
        """A JSON answer as one chunk: its whole text, finish reason and usage."""
        try:
            answer = await resp.json(content_type=None)
        except ValueError:
            raise RpcError(ErrorKind.BAD_REPLY, "upstream answer is not JSON") from None
        choice = self._choice(answer)
        if choice is None:
            raise RpcError(ErrorKind.BAD_REPLY, "upstream answer has no choices")
        if request.messages:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        text = text if isinstance(text, str) else ""
        reason = self._finished(answer) or "stop"
        # One piece: the answer's token boundaries are unknown (a resumed JSON
        # request had nothing delivered but this piece).
        pieces = (text,) if start == 0 else ()
        return TokenChunk(start, pieces, reason, self._usage(answer))

    async def _relay(
        self, request: Request, start: int, resp: aiohttp.ClientResponse
    ) -> AsyncGenerator[TokenChunk, None]:
        """The SSE stream as chunks; the upstream's usage rides on a last, empty chunk."""
        n = request.max_tokens
        chat = bool(request.messages)
        index = 0
        finished = False
        usage: tuple[int, int] | None = None
        lines: list[str] = []
        async for raw in _lines_then_eof(resp.content):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line:
                lines.append(line)
                continue
            data = _sse_events(lines)
            lines = []
            if data is None:
                continue
            if data.strip() == "[DONE]":
                finished = True
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise RpcError(ErrorKind.BAD_REPLY, "upstream event is not JSON") from None
            usage = self._usage(event) or usage
            if index >= n:  # past max_tokens: only the usage chunk matters now
                continue
            reason = self._finished(event)
            tokens = self._tokens(event, chat)[: n - index]
            first = max(index, start)
            texts = tokens[first - index :]
            index += len(tokens)
            if index >= n:
                reason = reason or "length"
            finished = finished or reason is not None
            if texts or reason is not None:
                # The upstream's finish_reason rides on its chunk (maybe empty).
                yield TokenChunk(first, tuple(texts), reason)
        if not finished:  # cut off: neither [DONE] nor a finish_reason
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream {self.base_url} broke off the stream")
        if usage is not None:
            yield TokenChunk(max(index, start), (), None, usage)

    @staticmethod
    def _finished(event: Any) -> str | None:
        """The event's ``finish_reason`` (None while the response goes on)."""
        choices = event.get("choices") if isinstance(event, dict) else None
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            reason = choices[0].get("finish_reason")
            if isinstance(reason, str) and reason:
                return reason
        return None
