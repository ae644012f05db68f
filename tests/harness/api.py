"""The OpenAI-compatible API as the tests see it: the model, texts, SSE, plain POSTs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from haif.contracts import Request
from haif.runtime.worker import SyntheticEngine

#: The model every synthetic worker serves.
MODEL = "llama-3-8b"


def expected_text(request_id: str, max_tokens: int) -> str:
    """What the synthetic engine answers, on any worker."""
    return SyntheticEngine.text(Request(request_id, "t", MODEL, 1, max_tokens, 0.0))


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            yield line[len("data: ") :]


def completion_text(chunk: dict[str, Any]) -> str:
    """The text of one streamed completion or chat completion chunk."""
    if not chunk["choices"]:
        return ""
    choice = chunk["choices"][0]
    if "delta" in choice:
        return str(choice["delta"].get("content") or "")
    return str(choice["text"])


def post_json(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """A blocking JSON POST: ``(status, headers, decoded body)``, errors included."""
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())
