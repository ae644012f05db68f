"""Sampling and stopping: validated at the gateway, honoured (or refused) by every engine.

The gateway validates the OpenAI sampling parameters (and vLLM's ``top_k``
and ``ignore_eos``) and passes them on in ``Request.sampling``; the synthetic
engine honours ``temperature``, ``seed``, ``stop`` and ``ignore_eos``
deterministically and refuses the rest; ``finish_reason`` is the engine's.
The end-to-end tests drive a real ``haif up`` cluster (synthetic workers)
with the ``openai`` SDK. The transformers engine's sampling is tested on the
tiny model in ``test_engines.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from harness.api import MODEL, post_json
from harness.cluster import Up, in_process_stack, running

from haif import wire
from haif.contracts import SAMPLING_PARAMETERS, Request, SamplingParams, WorkerSnapshot
from haif.runtime.cluster import ClusterConfig
from haif.runtime.engines import (
    ALL_SAMPLING,
    SyntheticEngine,
    supported_sampling,
    unsupported_parameter,
)
from haif.runtime.engines.synthetic import EOS_MIN, EOS_SPAN, plan
from haif.runtime.engines.text import StopStrings
from haif.runtime.engines.vllm_engine import sampling_kwargs
from haif.runtime.messages import Announce, InferCall, InferEnd, TokenChunk
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.reservations import request_body_hash
from haif.runtime.rpc import RpcError
from haif.runtime.store import DuckDBStore
from haif.runtime.worker import Worker, WorkerSpec


def req(
    rid: str, max_tokens: int, sampling: SamplingParams | None = None, prompt: str = "hi"
) -> Request:
    return Request(rid, "t", MODEL, 1, max_tokens, 0.0, prompt=prompt, sampling=sampling)


# ------------------------------------------------------------------ contracts


def test_sampling_params_travel_and_say_what_they_ask_for() -> None:
    sampling = SamplingParams(temperature=0.5, seed=7, stop=("a", "b"), ignore_eos=True)
    request = req("r", 4, sampling)
    assert wire.decode(wire.encode(request)) == request
    assert sampling.requested() == ("temperature", "seed", "stop", "ignore_eos")
    assert SamplingParams().requested() == ()
    assert SamplingParams(temperature=0.0, seed=0, top_k=0).requested() == (
        "temperature",
        "top_k",
        "seed",
    )
    assert set(SAMPLING_PARAMETERS) == ALL_SAMPLING
    # A request without sampling keeps the digest it always had; sampling changes it.
    assert request_body_hash(req("r", 4)) != request_body_hash(request)
    assert request_body_hash(req("r", 4, SamplingParams(seed=1))) != request_body_hash(
        req("r", 4, SamplingParams(seed=2))
    )


def test_an_engine_that_does_not_declare_honours_only_ignore_eos() -> None:
    assert supported_sampling(object()) == {"ignore_eos"}
    assert supported_sampling(SyntheticEngine()) == {"temperature", "seed", "stop", "ignore_eos"}
    synthetic = supported_sampling(SyntheticEngine())
    assert unsupported_parameter(req("r", 4), frozenset()) is None
    asks = SamplingParams(temperature=1.0, top_p=0.5, frequency_penalty=1.0)
    assert unsupported_parameter(req("r", 4, asks), synthetic) == "top_p"
    assert unsupported_parameter(req("r", 4, asks), ALL_SAMPLING) is None


def test_vllm_sampling_params_map_by_name() -> None:
    # Greedy, exactly max_tokens, for a request without sampling (the simulator's).
    legacy = sampling_kwargs(req("r", 9))
    assert (legacy["temperature"], legacy["ignore_eos"], legacy["max_tokens"]) == (0.0, True, 9)
    given = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        seed=5,
        stop=("\n",),
        presence_penalty=0.5,
        frequency_penalty=-0.5,
    )
    assert sampling_kwargs(req("r", 9, given)) == {
        "max_tokens": 9,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 5,
        "stop": ["\n"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "ignore_eos": False,
    }
    # Omitted: OpenAI's temperature 1, and a seed from the request id (resumable).
    default = sampling_kwargs(req("r", 9, SamplingParams()))
    assert default["temperature"] == 1.0 and "top_p" not in default and "stop" not in default
    assert default["seed"] == sampling_kwargs(req("r", 3, SamplingParams()))["seed"]
    assert default["seed"] != sampling_kwargs(req("other", 9, SamplingParams()))["seed"]


def test_stop_strings_cut_and_hold_back() -> None:
    stops = StopStrings(("END", "\n\n"))
    assert stops.feed("hello E") == ("hello ", False)  # "E" may start "END"
    assert stops.feed("x") == ("Ex", False)
    assert stops.feed("and\n") == ("and", False)
    assert stops.feed("\nmore") == ("", True)  # "\n\n" completes: cut before it
    late = StopStrings(("ab",))
    assert late.feed("xa") == ("x", False)
    assert late.flush() == "a"
    assert StopStrings(()).feed("abc") == ("abc", False)


# ------------------------------------------------------------------ synthetic


def test_synthetic_text_is_unchanged_without_sampling() -> None:
    legacy = req("same", 12)
    assert SyntheticEngine.text(req("same", 12, SamplingParams())) == SyntheticEngine.text(legacy)
    assert len(SyntheticEngine.tokens(legacy)) == 12
    # No sampling parameters (a trace): always max_tokens, whatever the EOS position.
    assert plan(req("long", 4000)).count == 4000 and plan(req("long", 4000)).finish == "length"


def test_synthetic_seed_and_temperature() -> None:
    seeded = [req(rid, 10, SamplingParams(seed=42)) for rid in ("a", "b")]
    texts = [SyntheticEngine.text(r) for r in seeded]
    assert texts[0] == texts[1] != SyntheticEngine.text(req("a", 10))
    assert SyntheticEngine.text(req("a", 10, SamplingParams(seed=43))) != texts[0]
    # Another prompt, another text for the same seed.
    assert SyntheticEngine.text(req("a", 10, SamplingParams(seed=42), prompt="yo")) != texts[0]
    # Greedy: the seed changes nothing.
    greedy = SamplingParams(temperature=0.0, seed=42)
    assert SyntheticEngine.text(req("a", 10, greedy)) == SyntheticEngine.text(req("a", 10))


def test_synthetic_end_of_sequence() -> None:
    ends = [plan(req(f"eos-{i}", 5000, SamplingParams())) for i in range(20)]
    assert all(p.finish == "stop" for p in ends)
    assert all(EOS_MIN <= p.count < EOS_MIN + EOS_SPAN for p in ends)
    assert len({p.count for p in ends}) > 10  # the position depends on the request
    first = ends[0].count
    exact = plan(req("eos-0", first + 1, SamplingParams()))
    assert (exact.count, exact.finish) == (first, "stop")
    assert plan(req("eos-0", first, SamplingParams())).finish == "length"
    ignored = plan(req("eos-0", 5000, SamplingParams(ignore_eos=True)))
    assert (ignored.count, ignored.finish) == (5000, "length")


async def test_synthetic_stop_strings_stream_and_resume() -> None:
    full = SyntheticEngine.text(req("s", 8))
    stop = full[9:13]  # spans the end of a token and the start of the next
    request = req("s", 8, SamplingParams(stop=("zzz-never", stop)))
    engine = SyntheticEngine(mean_s=0.01, ttft_s=0.0)
    chunks = [c async for c in engine.stream(request)]
    text = "".join(t for c in chunks for t in c.texts)
    assert text == full[:9] == SyntheticEngine.text(request)
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])
    tokens = sum(len(c.texts) for c in chunks)
    assert stop not in text and tokens < 8
    # A resumed stream continues the same pieces (every worker cuts the same way).
    resumed = [c async for c in engine.stream(request, 1)]
    assert "".join(t for c in resumed for t in c.texts) == text[len(chunks[0].texts[0]) :]
    # A stop string that never occurs: max_tokens, "length".
    never = [c async for c in engine.stream(req("s", 8, SamplingParams(stop=("@",))))]
    assert "".join(t for c in never for t in c.texts) == full
    assert never[-1].finish_reason == "length"


async def test_the_worker_refuses_what_its_engine_cannot_honour_and_reports_the_finish() -> None:
    spec = WorkerSpec("w", "r", "http://w", "http://o", models=(MODEL,), mean_s=0.01, ttft_s=0.0)
    worker = Worker(spec, SyntheticEngine(0.01, 0.0))
    assert worker.sampling == {"temperature", "seed", "stop", "ignore_eos"}
    with pytest.raises(RpcError) as info:
        worker._call(InferCall(req("r", 4, SamplingParams(top_k=5))))
    assert info.value.code == "bad_request" and info.value.message.startswith("top_k:")
    frames = [f async for f in worker.rpc_infer_stream(InferCall(req("r", 600, SamplingParams())))]
    end = frames[-1]
    assert isinstance(end, InferEnd) and all(isinstance(f, TokenChunk) for f in frames[:-1])
    expected = plan(req("r", 600, SamplingParams()))
    assert (end.output_tokens, end.finish_reason) == (expected.count, expected.finish)
    frames = [f async for f in worker.rpc_infer_stream(InferCall(req("r", 5)))]
    assert isinstance(frames[-1], InferEnd) and frames[-1].finish_reason == "length"


# ------------------------------------------------------------------ a live cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``haif up`` with its default cluster (synthetic workers)."""
    c = Up(tmp_path_factory.mktemp("sampling"))
    c.wait_ready()
    try:
        yield c
    finally:
        c.stop()


# (parameter, bad value): each is a 400 naming the parameter.
BAD_VALUES: list[tuple[str, Any]] = [
    ("temperature", -0.1),
    ("temperature", 2.5),
    ("temperature", "0.5"),
    ("temperature", True),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", 1.5),
    ("seed", 1.5),
    ("seed", "7"),
    ("seed", 2**64),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", {"a": 1}),
    ("presence_penalty", 2.5),
    ("presence_penalty", -3),
    ("frequency_penalty", 2.01),
    ("n", 2),
    ("ignore_eos", "yes"),
    ("max_tokens", 0),
    ("max_completion_tokens", 0),
]


@pytest.mark.cluster
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize(("param", "value"), BAD_VALUES, ids=[f"{p}={v!r}" for p, v in BAD_VALUES])
def test_a_bad_sampling_value_is_a_400_naming_it(
    cluster: Up, chat: bool, param: str, value: Any
) -> None:
    body: dict[str, Any] = {"model": MODEL, param: value}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, _, answer = post_json(cluster.url + path, json.dumps(body).encode())
    assert status == 400, answer
    error = answer["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert error["message"].startswith(param), error


@pytest.mark.cluster
def test_values_that_ask_for_nothing_pass_on_any_engine(cluster: Up) -> None:
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 3,
        "top_p": 1,
        "top_k": -1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "n": 1,
        "temperature": 2,
        "seed": -(2**63),
        "stop": ["a", "b", "c", "d"],
        "logit_bias": {},  # an unknown field: allowed
    }
    status, _, answer = post_json(cluster.url + "/v1/completions", json.dumps(body).encode())
    assert status == 200, answer
    # Explicit nulls are "not given" (some clients send them).
    nulls = {p: None for p in SAMPLING_PARAMETERS if p != "ignore_eos"}
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": None, **nulls}
    status, _, answer = post_json(cluster.url + "/v1/completions", json.dumps(body).encode())
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 2


def client(cluster: Up) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="EMPTY", max_retries=0)


@pytest.mark.cluster
def test_the_openai_sdk_sees_finish_reasons(cluster: Up) -> None:
    sdk = client(cluster)
    rid = {"x-request-id": "fin-1"}
    # Enough room: the synthetic model's end of sequence ends it ("stop").
    done = sdk.completions.create(model=MODEL, prompt="hi", max_tokens=4096, extra_headers=rid)
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    assert EOS_MIN <= done.usage.completion_tokens < EOS_MIN + EOS_SPAN
    assert done.usage.completion_tokens == len(done.choices[0].text.split())
    # The same with ignore_eos (the extension trace replay sets): exactly max_tokens.
    eos = sdk.completions.create(
        model=MODEL,
        prompt="hi",
        max_tokens=4096,
        extra_headers=rid,
        extra_body={"ignore_eos": True},
    )
    assert eos.choices[0].finish_reason == "length"
    assert eos.usage is not None and eos.usage.completion_tokens == 4096
    # A stop string: cut before it, "stop", in both shapes and both modes.
    short = sdk.completions.create(model=MODEL, prompt="hi", max_tokens=6, extra_headers=rid)
    assert short.choices[0].finish_reason == "length"
    text = short.choices[0].text
    stop = text.split()[2]
    cut = text[: text.index(stop)]
    stopped = sdk.completions.create(
        model=MODEL, prompt="hi", max_tokens=6, stop=stop, extra_headers=rid
    )
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, "stop")
    # The token that completes the stop string counts; its text is not returned.
    assert stopped.usage is not None and stopped.usage.completion_tokens == len(cut.split()) + 1
    stream = sdk.completions.create(
        model=MODEL, prompt="hi", max_tokens=6, stop=[stop], stream=True, extra_headers=rid
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    chat = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stop=stop,
        extra_headers=rid,
    )
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (cut, "stop")
    streamed = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
        extra_headers=rid,
    )
    parts = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in parts) == text
    assert parts[-1].choices[0].finish_reason == "length"


@pytest.mark.cluster
def test_the_openai_sdk_seed_and_temperature(cluster: Up) -> None:
    sdk = client(cluster)

    def text(rid: str, **kw: Any) -> str:
        out = sdk.completions.create(
            model=MODEL, prompt="hi", max_tokens=5, extra_headers={"x-request-id": rid}, **kw
        )
        return str(out.choices[0].text)

    assert text("sd-1", seed=9) == text("sd-2", seed=9) != text("sd-1", seed=10)
    assert text("sd-1", seed=9, temperature=0) == text("sd-1")


@pytest.mark.cluster
def test_a_parameter_the_fleet_cannot_honour_is_a_400_naming_it(cluster: Up) -> None:
    sdk = client(cluster)
    calls: dict[str, Callable[[], object]] = {
        "top_p": lambda: sdk.completions.create(model=MODEL, prompt="hi", top_p=0.5),
        "frequency_penalty": lambda: sdk.completions.create(
            model=MODEL, prompt="hi", frequency_penalty=1.0
        ),
        "top_k": lambda: sdk.completions.create(model=MODEL, prompt="hi", extra_body={"top_k": 3}),
    }
    for name, call in calls.items():
        with pytest.raises(openai.BadRequestError) as info:
            call()
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == name, body
        assert body["code"] == "unsupported_parameter" and name in body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        list(
            sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                presence_penalty=0.5,
                stream=True,
            )
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "presence_penalty"


class _OverPromising(Worker):
    """A worker that announces every parameter (as a worker of a mixed fleet, or one
    whose announcement is out of date, may) while its engine honours fewer."""

    @property
    def sampling(self) -> frozenset[str]:
        return ALL_SAMPLING


@pytest.mark.cluster
async def test_a_worker_that_cannot_honour_a_parameter_refuses_it_with_a_400(
    tmp_path: Path,
) -> None:
    async with in_process_stack(
        tmp_path, lambda spec: _OverPromising(spec, SyntheticEngine(0.01, 0.0))
    ) as (orch, url):
        body = json.dumps({"model": MODEL, "prompt": "hi", "top_p": 0.5}).encode()
        status, _, answer = await asyncio.to_thread(post_json, url + "/v1/completions", body)
        # Let in by the orchestrator (the fleet says it can), refused by the worker,
        # not retried elsewhere: a 400, never a silently ignored top_p.
        assert status == 400, answer
        assert answer["error"]["code"] == "bad_request", answer
        records = await orch.store.records()
        assert [(r.status, r.reason, r.attempts) for r in records] == [("failed", "bad_request", 1)]


async def test_the_orchestrator_refuses_what_no_worker_of_the_model_honours(
    tmp_path: Path,
) -> None:
    async with running(
        Orchestrator(ClusterConfig().policy, DuckDBStore(tmp_path / "s.db"))
    ) as orch:

        async def announce(wid: str, sampling: tuple[str, ...] | None, model: str = MODEL) -> None:
            snap = WorkerSnapshot(wid, "r", "g", models_warm=(model,), models_loadable=(model,))
            assert await orch.rpc_heartbeat(Announce(snap, "http://x", None, sampling))

        await announce("a", ("seed", "temperature"))
        await announce("b", ("top_p",))
        await announce("c", None, "other")  # says nothing: assumed to honour everything

        def check(sampling: SamplingParams, model: str = MODEL) -> str | None:
            request = Request("r", "t", model, 1, 4, 0.0, sampling=sampling)
            try:
                orch._check_sampling(request)
            except RpcError as exc:
                assert (exc.code, exc.status) == ("unsupported_parameter", 400)
                return exc.message.partition(":")[0]
            return None

        assert check(SamplingParams(seed=1, temperature=0.5)) is None  # a honours both
        assert check(SamplingParams(top_p=0.5)) is None  # b does
        assert check(SamplingParams(top_k=5)) == "top_k"  # nobody does
        # Each is honoured somewhere but no worker honours both: one the first lacks.
        assert check(SamplingParams(seed=1, top_p=0.5)) == "top_p"
        assert check(SamplingParams(top_k=5), "other") is None
        assert check(SamplingParams(top_k=5), "nobody-serves-it") is None  # the core decides


def test_the_synthetic_end_of_sequence_range_in_the_docs_is_the_engines() -> None:
    from pathlib import Path

    from haif.runtime.engines.synthetic import EOS_MIN, EOS_SPAN

    page = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    dash = "\N{EN DASH}"  # as the page writes ranges
    assert f"after {EOS_MIN}{dash}{EOS_MIN + EOS_SPAN - 1:,} tokens" in page
