"""Chat: the gateway validates messages and passes them on; engines render them.

The gateway accepts a message's content as a string or an array of text
parts, refuses other parts and unknown roles with a 400 naming the
parameter, and puts the messages in ``Request.messages`` (never a joined
prompt). The transformers engine renders them with the model's chat template
(tested on the tiny model in ``test_engines.py`` and end to end in
``test_runtime_real_model.py``); the ``openai`` engine forwards them as chat
(``test_engines.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from harness.api import MODEL, post_json
from harness.cluster import in_process_stack

from haif import wire
from haif.contracts import ChatTurn, Request
from haif.runtime.engines import SyntheticEngine
from haif.runtime.engines.text import NoChatTemplate, encode_chat
from haif.runtime.gateway import BadParam, chat_turns
from haif.runtime.messages import TokenChunk
from haif.runtime.reservations import request_body_hash
from haif.runtime.worker import Worker


def test_chat_turns_accept_strings_and_text_parts() -> None:
    turns = chat_turns(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
                "name": "ann",
            },
            {"role": "assistant", "content": "Hi."},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "user", "content": []},
        ]
    )
    assert turns == (
        ChatTurn("system", "Be brief."),
        ChatTurn("developer", "No lists."),
        ChatTurn("user", "Hello \nthere"),
        ChatTurn("assistant", "Hi."),
        ChatTurn("tool", "42"),
        ChatTurn("user", ""),
    )


# (messages, the parameter the 400 names)
BAD_MESSAGES: list[tuple[Any, str]] = [
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], "messages[0]"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "messages[1].role"),
    ([{"role": "function", "content": "x", "name": "f"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": 7}], "messages[0].content"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]"),
    (
        [
            {"role": "system", "content": "x"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                ],
            },
        ],
        "messages[1].content[1].type",
    ),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
]


@pytest.mark.parametrize(("messages", "param"), BAD_MESSAGES, ids=[p for _, p in BAD_MESSAGES])
def test_bad_messages_name_the_parameter(messages: Any, param: str) -> None:
    with pytest.raises(BadParam) as info:
        chat_turns(messages)
    assert info.value.param == param
    assert str(info.value).startswith(param)


def test_a_chat_request_travels_with_its_messages() -> None:
    turns = (ChatTurn("system", "Be brief."), ChatTurn("user", "Hi"))
    request = Request("r", "t", MODEL, 3, 4, 0.0, messages=turns)
    back = wire.decode(wire.encode(request))
    assert back == request and isinstance(back.messages, tuple)
    assert request.text == "Be brief.\nHi" and request.prompt is None
    assert Request("r", "t", MODEL, 1, 4, 0.0, prompt="x").text == "x"
    # The body digest tells a chat from a completion of its joined text.
    assert request_body_hash(request) != request_body_hash(
        Request("r", "t", MODEL, 3, 4, 0.0, prompt=request.text)
    )
    assert request_body_hash(request) != request_body_hash(
        Request("r", "t", MODEL, 3, 4, 0.0, messages=(ChatTurn("user", "Be brief.\nHi"),))
    )


class _Tokenizer:
    """Records what ``apply_chat_template`` is given; encodes a character per token."""

    def __init__(self, template: str | None) -> None:
        self.chat_template = template
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def apply_chat_template(self, messages: Any, **kw: Any) -> str:
        self.calls.append((messages, kw))
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False  # the template wrote its own
        return {"input_ids": [ord(c) for c in text]}


def test_encode_chat_uses_the_tokenizers_template_or_refuses() -> None:
    tok = _Tokenizer("{{ whatever }}")
    ids = encode_chat(tok, (ChatTurn("user", "hi"),), "m")
    assert ids == [ord(c) for c in "<user>hi<assistant>"]
    assert tok.calls == [
        ([{"role": "user", "content": "hi"}], {"add_generation_prompt": True, "tokenize": False})
    ]
    with pytest.raises(NoChatTemplate) as info:
        encode_chat(_Tokenizer(None), (ChatTurn("user", "hi"),), "tiny-model")
    assert info.value.code == "bad_request" and "tiny-model" in info.value.message
    assert "chat template" in info.value.message


class _Recording(SyntheticEngine):
    """The synthetic engine, keeping the requests it was given."""

    def __init__(self) -> None:
        super().__init__(0.01, 0.0)
        self.seen: list[Request] = []

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        self.seen.append(request)
        async for chunk in super().stream(request, start):
            yield chunk


@pytest.mark.cluster
async def test_the_gateway_passes_messages_and_refuses_bad_ones(tmp_path: Path) -> None:
    engine = _Recording()
    async with in_process_stack(tmp_path, lambda spec: Worker(spec, engine)) as (_orch, url):

        async def post(body: dict[str, Any]) -> tuple[int, Any]:
            raw = json.dumps({"model": MODEL, "max_tokens": 3, **body}).encode()
            status, _, answer = await asyncio.to_thread(
                post_json, url + "/v1/chat/completions", raw
            )
            return status, answer

        messages = [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}],
            },
        ]
        status, answer = await post({"messages": messages})
        assert status == 200, answer
        assert answer["choices"][0]["message"]["role"] == "assistant"
        # prompt_tokens: the words of the joined contents (the synthetic engine's count).
        assert answer["usage"]["prompt_tokens"] == 4
        [seen] = engine.seen
        assert seen.messages == (ChatTurn("system", "Be brief."), ChatTurn("user", "Say \nhi"))
        assert seen.prompt is None
        for bad, param in [
            (
                [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                "messages[0].content[0].type",
            ),
            ([{"role": "bot", "content": "x"}], "messages[0].role"),
            ([], "messages"),
        ]:
            status, answer = await post({"messages": bad})
            assert status == 400, answer
            error = answer["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param), error
            assert error["message"].startswith(param)
        assert len(engine.seen) == 1  # refused at the edge


class _FakeVllm:
    """Stands in for the ``vllm`` module: records what the engine hands to ``generate``."""

    def __init__(self) -> None:
        self.inputs: list[Any] = []

    @staticmethod
    def SamplingParams(**kw: Any) -> dict[str, Any]:  # vLLM's name
        return kw

    def engine(self) -> Any:
        fake = self

        class _Out:
            def __init__(self, ids: list[int], finished: bool) -> None:
                self.outputs = [type("O", (), {"token_ids": ids, "finish_reason": "length"})()]
                self.finished = finished

        class _Engine:
            async def generate(
                self, inputs: Any, params: Any, rid: str
            ) -> AsyncGenerator[_Out, None]:
                fake.inputs.append(inputs)
                yield _Out([ord("o")], False)
                yield _Out([ord("o"), ord("k")], True)

        return _Engine()


class _DecodingTokenizer(_Tokenizer):
    bos_token_id = 1
    eos_token_id = 2

    def decode(self, ids: list[int], **kw: Any) -> str:
        return "".join(chr(i) for i in ids)


async def test_the_vllm_engine_hands_vllm_the_templates_token_ids(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    from haif.runtime.engines.vllm_engine import VllmEngine
    from haif.runtime.security import Keyring

    fake = _FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine = VllmEngine(tmp_path / "store", "m:1", Keyring())
    engine._engine = fake.engine()
    engine._tokenizer = tok = _DecodingTokenizer("{{ whatever }}")
    chat = Request("v", "t", "m", 1, 2, 0.0, messages=(ChatTurn("user", "hi"),))
    chunks = [c async for c in engine.stream(chat)]
    assert fake.inputs == [{"prompt_token_ids": [ord(c) for c in "<user>hi<assistant>"]}]
    assert tok.calls[0][1] == {"add_generation_prompt": True, "tokenize": False}
    assert "".join(t for c in chunks for t in c.texts) == "ok"
    # A completion's prompt is encoded as it is; no template, no chat.
    [c async for c in engine.stream(Request("w", "t", "m", 1, 2, 0.0, prompt="yo"))]
    assert fake.inputs[-1] == {"prompt_token_ids": [ord("y"), ord("o")]}
    engine._tokenizer = _DecodingTokenizer(None)
    with pytest.raises(NoChatTemplate):
        [c async for c in engine.stream(chat)]
