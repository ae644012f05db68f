"""The ``openai`` engine: relays an upstream OpenAI-compatible server (streaming SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp

from haif.contracts import ErrorKind, Request
from haif.runtime.engines.base import ALL_SAMPLING, EngineError, EngineUnavailable
from haif.runtime.messages import TokenChunk
from haif.runtime.rpc import RpcError

__all__ = ["OpenAIUpstreamEngine"]


async def _lines_then_eof(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's lines, then one empty line (ends an event the server left open)."""
    async for line in content:
        yield line
    yield b""


def _sse_events(lines: Sequence[str]) -> str | None:
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


class OpenAIUpstreamEngine:
    """Relays an upstream OpenAI-compatible server over streaming HTTP (aiohttp).

    Each request is sent as ``/v1/completions`` (or ``/v1/chat/completions``
    with ``chat=True``) with ``stream: true`` and its sampling parameters:
    ``temperature`` (the client's, else this engine's ``temperature``, 0:
    greedy), and those the client set of ``top_p``, ``top_k``, ``seed``,
    ``stop``, ``presence_penalty``, ``frequency_penalty`` and ``ignore_eos``
    (``top_k`` and ``ignore_eos`` are vLLM's extensions: an upstream that
    does not take them answers 400, which comes back as ``bad_request``).
    The ``finish_reason`` is the upstream's.
    Each server-sent delta is one token of the response (as vLLM and OpenAI
    stream them); when a delta carries ``logprobs.tokens`` that spell its text,
    those are the tokens. A resumed request (``start > 0``) is sent again and
    its first ``start`` tokens are skipped, which continues the same text when
    the upstream decodes deterministically. The response may end before
    ``max_tokens`` (the upstream stopped): the worker reports the tokens
    actually produced. Upstream trouble is an ``RpcError``: ``unavailable``
    (retryable elsewhere) for connection errors, timeouts, 401/403/429/5xx,
    ``bad_request`` for other 4xx.

    ``load()`` checks that the upstream answers ``/v1/models`` and lists
    ``model`` (``check_model=False`` skips the listing check).
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
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self._api_key = api_key
        self.chat = chat
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
        headers = {"Accept": "text/event-stream"}
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

    def _body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extra_body,
            "model": self.model,
            "max_tokens": request.max_tokens,
            "stream": True,
            "temperature": self.temperature,
        }
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
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt or ""}]
        else:
            body["prompt"] = request.prompt or ""
        return body

    def _tokens(self, event: Any) -> list[str]:
        """The tokens of one SSE chunk (raises RpcError for an error event)."""
        if not isinstance(event, dict):
            raise RpcError(ErrorKind.BAD_REPLY, "upstream sent a non-object event")
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream error: {message}")
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        if self.chat:
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

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        n = request.max_tokens
        if start >= n:
            return
        path = "/chat/completions" if self.chat else "/completions"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_read=self.idle_timeout_s)
        index = 0
        finished = False
        try:
            async with self._client().post(
                self.base_url + path,
                json=self._body(request),
                headers=self._headers(request),
                timeout=timeout,
            ) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    retryable = resp.status in (401, 403, 408, 429) or resp.status >= 500
                    code = ErrorKind.UNAVAILABLE if retryable else ErrorKind.BAD_REQUEST
                    raise RpcError(code, f"upstream answered HTTP {resp.status}: {detail}")
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
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise RpcError(ErrorKind.BAD_REPLY, "upstream event is not JSON") from None
                    reason = self._finished(event)
                    finished = finished or reason is not None
                    tokens = self._tokens(event)[: n - index]
                    first = max(index, start)
                    texts = tokens[first - index :]
                    index += len(tokens)
                    if index >= n:
                        reason = reason or "length"
                    if texts or reason is not None:
                        # The upstream's finish_reason rides on the last chunk (maybe empty).
                        yield TokenChunk(first, tuple(texts), reason)
                    if index >= n:
                        return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream {self.base_url}: {exc!r}") from None
        if not finished:  # cut off: neither [DONE] nor a finish_reason
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream {self.base_url} broke off the stream")

    @staticmethod
    def _finished(event: Any) -> str | None:
        """The event's ``finish_reason`` (None while the response goes on)."""
        choices = event.get("choices") if isinstance(event, dict) else None
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            reason = choices[0].get("finish_reason")
            if isinstance(reason, str) and reason:
                return reason
        return None
