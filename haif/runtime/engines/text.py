"""Token ids to text and prompts to token ids, shared by the local-model engines.

:class:`IncrementalDetokenizer` cuts a generation into text pieces so that the
piece of token ``i`` is a pure function of the prompt and the ids ``0..i``:
every worker (transformers or vLLM) cuts a resumed response the same way.
:class:`StopStrings` cuts a response's text at its first stop string.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from haif.contracts import ChatTurn, ErrorKind, Request
from haif.runtime.rpc import RpcError

__all__ = [
    "IncrementalDetokenizer",
    "NoChatTemplate",
    "StopStrings",
    "chat_messages",
    "encode_chat",
    "encode_prompt",
    "encode_request",
    "tokenizer_decoder",
]


class IncrementalDetokenizer:
    """Token ids in, text pieces out: piece ``i`` depends only on the context and ids ``0..i``.

    ``decode`` turns ids into text. The concatenated pieces equal the decoded
    text of all the ids. A piece is held back (``""``) while the text ends in
    an incomplete character (``U+FFFD``, e.g. half of a UTF-8 sequence in a
    byte-level BPE) and released with the next token that completes it; the
    ``final`` token releases everything. The last few prompt ids are decoded
    along (as vLLM does) so tokenizers that drop a leading space when a text
    starts with a token still give the first generated token its space.
    """

    CONTEXT = 5

    def __init__(self, decode: Callable[[list[int]], str], context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self.ids: list[int] = list(context_ids[-self.CONTEXT :]) if self.CONTEXT else []
        self._prefix = 0
        self._read = len(self.ids)

    def add(self, token_id: int, final: bool = False) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if final or (len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


class StopStrings:
    """Cuts a response's text at its first stop string; holds back a possible start of one.

    ``feed(piece)`` returns the text that may go out now and whether a stop
    string was found (the text then ends before it); ``flush()`` what is held.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text, False
        found = [(text.find(s) + len(s), text.find(s)) for s in self.stops if s in text]
        if found:
            _end, start = min(found)
            self.held = ""
            return text[:start], True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def tokenizer_decoder(
    tokenizer: Any, lock: threading.Lock | None = None
) -> Callable[[list[int]], str]:
    def decode(ids: list[int]) -> str:
        with lock or contextlib.nullcontext():
            text: str = tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        return text

    return decode


def encode_prompt(tokenizer: Any, prompt: str | None, bos_id: int) -> list[int]:
    """The prompt's token ids (no special tokens); ``[bos_id]`` for an empty prompt."""
    if not prompt:
        return [bos_id]
    ids: list[int] = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids or [bos_id]


class NoChatTemplate(RpcError):
    """A chat request for a model whose tokenizer has no chat template (a 400, as vLLM)."""

    def __init__(self, model: str) -> None:
        super().__init__(
            ErrorKind.BAD_REQUEST,
            f"{model} has no chat template: chat completions need one "
            "(use /v1/completions, or publish the model with a chat_template)",
        )


def chat_messages(messages: Sequence[ChatTurn]) -> list[dict[str, str]]:
    """The messages as ``apply_chat_template`` takes them (role and content strings)."""
    return [{"role": m.role, "content": m.content} for m in messages]


def encode_chat(tokenizer: Any, messages: Sequence[ChatTurn], model: str) -> list[int]:
    """The token ids of ``messages`` rendered with the tokenizer's own chat template.

    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``
    renders the text (the template writes its own special tokens, e.g. BOS),
    which is then encoded without adding special tokens again — what vLLM's
    OpenAI server does. A tokenizer without a ``chat_template`` refuses the
    request (:class:`NoChatTemplate`, a 400): vLLM refuses chat for such a
    model since transformers dropped its default templates; no fallback.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(model)
    text = tokenizer.apply_chat_template(
        chat_messages(messages), add_generation_prompt=True, tokenize=False
    )
    ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def encode_request(tokenizer: Any, request: Request, bos_id: int) -> list[int]:
    """A request's prompt ids: its chat rendered by the chat template, else its prompt."""
    if request.messages:
        return encode_chat(tokenizer, request.messages, request.model) or [bos_id]
    return encode_prompt(tokenizer, request.prompt, bos_id)
