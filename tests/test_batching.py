"""The synthetic engine's profile timings against the simulator's engines.

The same requests reach one simulated worker (SimPy, :mod:`haif.sim.engine`)
and one live synthetic engine running on an asyncio loop with a virtual
clock (``virtual_loop``): first-token and finish times must agree to 1e-6 s.
A real worker app on loopback then streams with ``--timing profile`` in real
time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import simpy
from aiohttp import web
from virtual_loop import VirtualTimeLoop

from haif.contracts import AttemptResult, Event, Request
from haif.fleet.profiles import PerfProfile, load_catalog
from haif.runtime import batching
from haif.runtime import worker as worker_mod
from haif.runtime.batching import IterationTimer, RequestTimer, sleep_until
from haif.runtime.cluster import free_port
from haif.runtime.engines import EngineError, SyntheticEngine
from haif.runtime.engines_cli import engine_from_args
from haif.runtime.messages import InferCall, InferEnd, TokenChunk
from haif.runtime.rpc import RpcClient, RpcError
from haif.sim.engine import BatchingWorker, RequestLevelWorker
from haif.sim.fleet import Network

GPU = "A100-80G"
LLAMA3 = "llama-3-8b"
LLAMA2 = "llama-2-7b"
TOL = 1e-6

# (arrival, request, tokens already delivered)
Arrival = tuple[float, Request, int]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    first_s: float | None
    finish_s: float
    tokens: int  # the response's length so far (resumed tokens included)
    cold_start: bool = False  # it waited for the weights to load


def catalog_profiles(*models: str, kv: int | None = None) -> dict[str, PerfProfile]:
    """The catalog's profiles on ``GPU``, with a smaller KV cache if ``kv`` is given."""
    profiles = {m: load_catalog().get(GPU, m) for m in models}
    if kv is not None:
        profiles = {m: dataclasses.replace(p, kv_capacity_tokens=kv) for m, p in profiles.items()}
    return profiles


def request(
    rid: str, prompt: int, output: int, model: str = LLAMA3, hashes: tuple[int, ...] = ()
) -> Request:
    return Request(rid, "t", model, prompt, output, 0.0, prefix_hashes=hashes)


# ------------------------------------------------------------------ both sides


def simulate(
    timing: str,
    profiles: Mapping[str, PerfProfile],
    arrivals: list[Arrival],
    *,
    max_batch: int | None = None,
    chunked_prefill_tokens: int | None = None,
    prefix_cache: bool = False,
    cold_start: bool = False,
) -> dict[str, Outcome]:
    """One simulated worker on a zero-latency network (restarted at 0 if ``cold_start``)."""
    env = simpy.Environment()
    results: list[AttemptResult] = []

    def send(_src: str, _dst: str, event: Event, _delay_s: float | None = None) -> None:
        assert isinstance(event, AttemptResult)
        results.append(event)

    warm = next(iter(profiles))
    slots = max_batch or profiles[warm].max_batch
    common: dict[str, Any] = {
        "models": tuple(profiles),
        "capacity": slots,
        "vram_gb": 80.0,
        "price_per_hour": 0.0,
        "net": Network(lambda _a, _b: 0.0, connect_timeout_s=1.0),
        "send": send,
        "rng": random.Random(0),
    }
    worker: BatchingWorker | RequestLevelWorker
    if timing == "profile":
        worker = BatchingWorker(
            env,
            "w",
            "r",
            GPU,
            max_batch=max_batch,
            chunked_prefill_tokens=chunked_prefill_tokens,
            prefix_cache=prefix_cache,
            profiles=profiles,
            warm=warm,
            **common,
        )
    else:
        worker = RequestLevelWorker(env, "w", "r", GPU, profiles=profiles, warm=warm, **common)

    def arrive(at: float, req: Request, start: int) -> None:
        env.timeout(at).callbacks.append(
            lambda _ev: worker.dispatch(req, 1, "r", resume_tokens=start)
        )

    for at, req, start in arrivals:
        arrive(at, req, start)
    if cold_start:  # crashed and came back at 0: the weights load first
        worker.go_down()
        worker.come_up()
    env.run()
    return {
        r.request_id: Outcome(r.ok, r.first_token_s, r.finish_s, r.output_tokens, r.cold_start)
        for r in results
    }


def freeze(loop: VirtualTimeLoop, seconds: float, stopped: bool) -> None:
    """The process does not run for ``seconds``: a busy machine, or SIGSTOP then SIGCONT."""
    loop._virtual_now += seconds
    if stopped:
        os.kill(os.getpid(), signal.SIGCONT)  # what the kernel delivers when it continues


def run_live(
    engine: SyntheticEngine,
    arrivals: list[Arrival],
    *,
    freezes: tuple[tuple[float, float, bool], ...] = (),
    cancel_after: Mapping[str, int] | None = None,
    consumer_pause_s: float = 0.0,
) -> tuple[dict[str, Outcome], dict[str, list[tuple[float, TokenChunk]]]]:
    """Stream every request from the engine on a virtual clock; outcomes and chunks."""
    loop = VirtualTimeLoop()
    out: dict[str, Outcome] = {}
    chunks: dict[str, list[tuple[float, TokenChunk]]] = {}
    cancel_after = cancel_after or {}

    async def consume(req: Request, start: int) -> None:
        got = chunks.setdefault(req.request_id, [])
        ok = True
        stream = engine.stream(req, start)
        async with contextlib.aclosing(stream):
            try:
                async for chunk in stream:
                    got.append((loop.time(), chunk))
                    if sum(len(c.texts) for _, c in got) >= cancel_after.get(req.request_id, 1e9):
                        break
                    if consumer_pause_s:
                        await asyncio.sleep(consumer_pause_s)
            except RpcError as exc:
                assert exc.code == "context_too_long"
                ok = False
        tokens = start + sum(len(c.texts) for _, c in got)
        cold = any(c.cold_start for _, c in got)
        out[req.request_id] = Outcome(ok, got[0][0] if got else None, loop.time(), tokens, cold)

    async def main() -> None:
        await engine.load()  # a cold-started engine begins loading its weights now (0)
        for at, seconds, stopped in freezes:
            loop.call_at(at, freeze, loop, seconds, stopped)
        tasks = []
        for at, req, start in sorted(arrivals, key=lambda a: a[0]):
            await sleep_until(at)
            tasks.append(asyncio.create_task(consume(req, start)))
        await asyncio.gather(*tasks)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return out, chunks


def expected_text(req: Request, start: int = 0) -> str:
    """The response text from token ``start`` on (tokens are space-separated)."""
    tokens = SyntheticEngine.tokens(req)[start:]
    return (" " if start else "") + " ".join(tokens)


def starts(got: list[tuple[float, TokenChunk]], start: int = 0) -> list[int]:
    """The chunk starts a gap-free stream from ``start`` has."""
    out = []
    for _, chunk in got:
        out.append(start)
        start += len(chunk.texts)
    return out


def assert_same(sim: dict[str, Outcome], live: dict[str, Outcome]) -> None:
    assert set(sim) == set(live)
    for rid, want in sim.items():
        got = live[rid]
        assert got.ok == want.ok, rid
        if not want.ok:
            continue
        assert got.tokens == want.tokens, rid
        assert got.cold_start == want.cold_start, rid
        assert want.first_s is not None and got.first_s is not None, rid
        assert abs(got.first_s - want.first_s) <= TOL, (rid, got.first_s, want.first_s)
        assert abs(got.finish_s - want.finish_s) <= TOL, (rid, got.finish_s, want.finish_s)


def compare(
    timing: str, profiles: dict[str, PerfProfile], arrivals: list[Arrival], **options: object
) -> tuple[dict[str, Outcome], SyntheticEngine]:
    sim = simulate(timing, profiles, arrivals, **options)  # type: ignore[arg-type]
    if options.get("cold_start"):  # the warm model loads first: nothing before that
        load_s = profiles[next(iter(profiles))].load_time_s
        assert all(o.first_s is None or o.first_s > load_s for o in sim.values())
    engine = SyntheticEngine(timing=timing, profiles=profiles, **options)  # type: ignore[arg-type]
    live, chunks = run_live(engine, arrivals)
    assert_same(sim, live)
    for _at, req, start in arrivals:
        got = chunks[req.request_id]
        if live[req.request_id].ok:  # every token once, in order, with the synthetic text
            assert [c.start for _, c in got] == starts(got, start)
            assert "".join(t for _, c in got for t in c.texts) == expected_text(req, start)
    return live, engine


# ------------------------------------------------------------------ iteration level


def light() -> list[Arrival]:
    return [(0.0, request("a", 512, 64), 0), (3.0, request("b", 100, 20), 0)]


def burst(n: int = 12) -> list[Arrival]:
    rng = random.Random(7)
    return [
        (0.01 * i + 1e-4, request(f"r{i}", rng.randint(50, 2000), rng.randint(1, 120)), 0)
        for i in range(n)
    ]


def resumed() -> list[Arrival]:
    return [
        (0.0, request("a", 300, 80), 0),
        (0.05, request("resumed", 700, 40), 17),
        (0.2, request("c", 50, 30), 0),
    ]


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_light_load_matches_the_simulator(timing: str) -> None:
    live, _ = compare(timing, catalog_profiles(LLAMA3), light())
    profile = catalog_profiles(LLAMA3)[LLAMA3]
    # Alone on the GPU: the API overhead, then one prefill step, as profiles.py says.
    first = live["a"].first_s
    assert first == pytest.approx(profile.api_overhead_s + profile.prefill_time(512))


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_a_restarted_worker_loads_its_weights_first_like_the_simulator(timing: str) -> None:
    arrivals = [*light(), (3.0, request("during", 300, 20), 0), (9.0, request("after", 80, 9), 0)]
    live, engine = compare(timing, catalog_profiles(LLAMA3), arrivals, cold_start=True)
    assert engine.timer is not None and engine.timer.occupancy().warm_models == (LLAMA3,)
    # Those that waited for the weights are marked, in the records of both shells alike.
    assert live["a"].cold_start and live["during"].cold_start
    assert not live["after"].cold_start


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_a_full_batch_queues_like_the_simulator(timing: str) -> None:
    _, engine = compare(timing, catalog_profiles(LLAMA3), burst(), max_batch=4)
    timer = engine.timer
    assert timer is not None and timer.max_batch == 4
    occupancy = timer.occupancy()
    assert (occupancy.queue_depth, occupancy.running) == (0, 0)


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_a_resumed_request_recomputes_like_the_simulator(timing: str) -> None:
    live, _ = compare(timing, catalog_profiles(LLAMA3), resumed())
    assert live["resumed"].tokens == 40


def test_kv_exhaustion_preempts_like_the_simulator() -> None:
    arrivals = [(0.001 * i, request(f"j{i}", 100, 60), 0) for i in range(6)]
    _, engine = compare("profile", catalog_profiles(LLAMA3, kv=700), arrivals)
    timer = engine.timer
    assert isinstance(timer, IterationTimer)
    assert timer.engine.preemptions > 0 and timer.engine.kv_used == 0


def test_a_prompt_larger_than_the_kv_cache_fails_like_the_simulator() -> None:
    arrivals = [(0.0, request("huge", 500, 5), 0), (0.001, request("small", 10, 5), 0)]
    live, _ = compare("profile", catalog_profiles(LLAMA3, kv=100), arrivals)
    assert not live["huge"].ok and live["small"].ok


def test_chunked_prefill_and_prefix_cache_match_the_simulator() -> None:
    arrivals = [
        (0.0, request("decoder", 10, 200), 0),
        (0.3, request("long", 4000, 5, hashes=(1, 2, 3, 4, 5, 6, 7)), 0),
        (2.0, request("shares", 3000, 5, hashes=(1, 2, 3, 9, 9, 9)), 0),
    ]
    for chunked in (None, 256):
        compare(
            "profile",
            catalog_profiles(LLAMA3),
            arrivals,
            chunked_prefill_tokens=chunked,
            prefix_cache=True,
        )


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_another_model_swaps_in_like_the_simulator(timing: str) -> None:
    arrivals = [
        (0.0, request("a", 200, 50), 0),
        (0.1, request("b", 100, 10, model=LLAMA2), 0),
        (0.2, request("c", 100, 10), 0),
    ]
    live, engine = compare(timing, catalog_profiles(LLAMA3, LLAMA2), arrivals)
    load = catalog_profiles(LLAMA2)[LLAMA2].load_time_s
    first_b = live["b"].first_s
    assert first_b is not None and first_b > load  # b waited for the weights
    assert engine.timer is not None and engine.timer.occupancy().warm_models == (LLAMA3,)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_random_workloads_match_the_simulator(timing: str, seed: int) -> None:
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    for i in range(30):
        output = rng.randint(1, 150)
        start = rng.randint(0, output - 1) if rng.random() < 0.2 else 0
        hashes = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 4)))
        model = LLAMA2 if rng.random() < 0.15 else LLAMA3
        req = request(f"q{i}", rng.randint(1, 2500), output, model, hashes)
        arrivals.append((rng.uniform(0.0, 3.0), req, start))
    options: dict[str, object] = {"max_batch": rng.choice([2, 4, 16])}
    kv = rng.choice([5000, 20000, 10**6])
    if timing == "profile":
        options["chunked_prefill_tokens"] = rng.choice([None, 512])
        options["prefix_cache"] = rng.random() < 0.5
    compare(timing, catalog_profiles(LLAMA3, LLAMA2, kv=kv), arrivals, **options)


# ------------------------------------------------------------------ the live clock


def test_late_wakeups_do_not_accumulate() -> None:
    arrivals = [(0.0, request("a", 300, 200), 0)]
    profiles = catalog_profiles(LLAMA3)
    sim = simulate("profile", profiles, arrivals)
    # The loop misses its deadlines by up to 81 ms (a busy machine), over and over,
    # until 1.9 s; the response ends at 2.04 s.
    late = tuple((0.2 * k + 0.003, 0.001 * k * k, False) for k in range(1, 10))
    live, chunks = run_live(
        SyntheticEngine(timing="profile", profiles=profiles), arrivals, freezes=late
    )
    assert max(len(c.texts) for _, c in chunks["a"]) > 1  # the late tokens came out together
    assert abs(live["a"].finish_s - sim["a"].finish_s) <= TOL


def test_a_stopped_process_resumes_its_steps_where_it_stopped() -> None:
    arrivals = [(0.0, request("a", 300, 200), 0)]
    profiles = catalog_profiles(LLAMA3)
    _, steady = run_live(SyntheticEngine(timing="profile", profiles=profiles), arrivals)
    stopped_at, stopped_for = 0.5, 0.4
    before = batching.continued()
    live, _ = run_live(
        SyntheticEngine(timing="profile", profiles=profiles),
        arrivals,
        freezes=((stopped_at, stopped_for, True),),
    )
    assert batching.continued() == before + 1  # the SIGCONT was seen
    # The step in flight ends when the process runs again; every later step shifts by the wait.
    step_end = min(t for t, _ in steady["a"] if t > stopped_at)
    shift = stopped_at + stopped_for - step_end
    assert abs(live["a"].finish_s - (steady["a"][-1][0] + shift)) <= TOL


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_tokens_due_together_come_in_one_chunk(timing: str) -> None:
    arrivals = [(0.0, request("a", 100, 120), 0)]
    engine = SyntheticEngine(timing=timing, profiles=catalog_profiles(LLAMA3))
    live, chunks = run_live(engine, arrivals, consumer_pause_s=0.1)
    got = chunks["a"]
    assert max(len(c.texts) for _, c in got) > 1  # a slow reader gets what piled up
    assert [c.start for _, c in got] == starts(got)
    assert "".join(t for _, c in got for t in c.texts) == SyntheticEngine.text(arrivals[0][1])
    assert live["a"].tokens == 120


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
def test_a_cancelled_stream_frees_its_place(timing: str) -> None:
    profiles = catalog_profiles(LLAMA3)
    arrivals = [(0.0, request("gone", 100, 500), 0), (0.01, request("next", 100, 5), 0)]
    engine = SyntheticEngine(timing=timing, profiles=profiles, max_batch=1)
    live, chunks = run_live(engine, arrivals, cancel_after={"gone": 10})
    cancelled_at = chunks["gone"][-1][0]
    first = live["next"].first_s
    assert first is not None and first > cancelled_at and live["next"].tokens == 5
    timer = engine.timer
    assert timer is not None
    occupancy = timer.occupancy()
    assert (occupancy.queue_depth, occupancy.running) == (0, 0)
    if isinstance(timer, IterationTimer):
        assert occupancy.free_kv_tokens == timer.kv_capacity
    else:
        assert isinstance(timer, RequestTimer)
        # The slot was granted the moment the stream went away.
        ttft = profiles[LLAMA3].api_overhead_s + profiles[LLAMA3].prefill_time(100)
        assert first == pytest.approx(cancelled_at + ttft, abs=TOL)


# ------------------------------------------------------------------ command line


def worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    worker_mod.add_worker_args(parser)
    return parser


BASE_ARGS = ["--port", "1", "--id", "w", "--region", "r", "--orchestrator", "http://x"]


def test_the_command_line_builds_the_profile_timings() -> None:
    parser = worker_parser()
    fixed = engine_from_args(parser.parse_args(BASE_ARGS))
    assert isinstance(fixed, SyntheticEngine) and fixed.timer is None
    args = parser.parse_args(
        [
            *BASE_ARGS,
            *("--timing", "profile", "--gpu-class", "H100-80G", "--models", f"{LLAMA3},{LLAMA2}"),
            *("--max-batch", "32", "--chunked-prefill-tokens", "512", "--prefix-cache"),
        ]
    )
    engine = engine_from_args(args)
    assert isinstance(engine, SyntheticEngine) and engine.queues_internally
    timer = engine.timer
    assert isinstance(timer, IterationTimer)
    assert (timer.engine.max_batch, timer.engine.chunk, timer.engine.prefix is not None) == (
        32,
        512,
        True,
    )
    assert timer.profiles[LLAMA2] == load_catalog().get("H100-80G", LLAMA2)
    assert timer.occupancy().warm_models == (LLAMA3,)  # the first model is loaded at start
    request_level = engine_from_args(
        parser.parse_args([*BASE_ARGS, "--timing", "profile-request", "--gpu-class", GPU])
    )
    assert isinstance(request_level, SyntheticEngine)
    assert isinstance(request_level.timer, RequestTimer)


def test_command_line_errors_name_what_is_wrong(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    parser = worker_parser()
    with pytest.raises(EngineError) as info:
        engine_from_args(
            parser.parse_args([*BASE_ARGS, "--timing", "profile", "--gpu-class", "B300"])
        )
    message = str(info.value)
    assert "'B300'" in message and f"'{LLAMA3}'" in message and "A100-80G" in message
    with pytest.raises(EngineError) as info:
        engine_from_args(
            parser.parse_args(
                [
                    *BASE_ARGS,
                    "--timing",
                    "profile",
                    "--gpu-class",
                    "RTX4090-24G",
                    "--models",
                    "llama-2-70b",
                ]
            )
        )
    message = str(info.value)
    assert "'RTX4090-24G'" in message and "'llama-2-70b'" in message
    assert f"models profiled on RTX4090-24G: {LLAMA2}" in message
    with pytest.raises(EngineError, match="--chunked-prefill-tokens apply to --timing profile"):
        engine_from_args(parser.parse_args([*BASE_ARGS, "--chunked-prefill-tokens", "64"]))
    with pytest.raises(SystemExit):
        parser.parse_args([*BASE_ARGS, "--max-batch", "0"])
    assert "--max-batch: expected a whole number >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([*BASE_ARGS, "--timing", "exact"])
    assert "invalid choice: 'exact'" in capsys.readouterr().err
    # The worker process logs the reason and exits 1, without a traceback.
    args = parser.parse_args([*BASE_ARGS, "--timing", "profile", "--gpu-class", "B300"])
    with caplog.at_level(logging.ERROR, logger="haif.worker"):
        assert worker_mod.run_worker(args) == 1
    assert "worker w not started: --timing profile: no performance profile" in caplog.text


# ------------------------------------------------------------------ real time


@pytest.mark.parametrize("timing", ["profile", "profile-request"])
async def test_a_worker_streams_with_profile_timing(timing: str) -> None:
    port = free_port()
    args = worker_parser().parse_args(
        [
            *("--port", str(port), "--id", "w1", "--region", "r"),
            *("--orchestrator", f"http://127.0.0.1:{free_port()}", "--heartbeat-s", "60"),
            *("--timing", timing, "--gpu-class", GPU, "--models", LLAMA3, "--capacity", "256"),
        ]
    )
    worker = worker_mod.worker_from_args(args)
    runner = web.AppRunner(worker_mod.build_app(worker))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            client = RpcClient(session, f"http://127.0.0.1:{port}", timeout_s=30.0)
            calls = [InferCall(request("a", 256, 24)), InferCall(request("b", 64, 30), 10)]

            async def call(c: InferCall) -> tuple[list[TokenChunk], InferEnd]:
                frames = [f async for f in client.stream("infer_stream", c, idle_timeout_s=10.0)]
                end = frames.pop()
                assert isinstance(end, InferEnd)
                assert all(isinstance(f, TokenChunk) for f in frames)
                return frames, end

            results = await asyncio.gather(*(call(c) for c in calls))
    finally:
        await runner.cleanup()
    profile = load_catalog().get(GPU, LLAMA3)
    for c, (frames, end) in zip(calls, results, strict=True):
        texts = [t for f in frames for t in f.texts]
        assert frames[0].start == c.resume_tokens
        assert len(texts) == c.request.max_tokens - c.resume_tokens
        assert end.output_tokens == c.request.max_tokens
        assert "".join(texts) == expected_text(c.request, c.resume_tokens)
        # Deadlines are never early: at least the API overhead and the prefill.
        prefill = profile.prefill_time(c.request.prompt_tokens + c.resume_tokens)
        assert end.ttft_s >= profile.api_overhead_s + prefill - 1e-3
