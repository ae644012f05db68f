"""The sans-I/O batching engine, driven by hand: deadlines, invariants, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.contracts import Request
from haif.fleet.engine import BatchingEngine, Seq
from haif.fleet.profiles import GpuSpec, ModelSpec, PerfProfile, StepCoefficients


def profile(kv: int = 10**7, api_s: float = 0.0, load_s: float = 5.0) -> PerfProfile:
    gpu = GpuSpec("G", 80.0, 3600.0, 1.0, 1.0, source="test")
    spec = ModelSpec("m", 1.0, 1.0, 1, 1, 1, source="test")
    # A step takes max(10 ms, 1 ms per prefill token) (+ nothing per context token).
    coeffs = StepCoefficients(0.01, 0.0, 0.001, 0.0, 0.0, source="test")
    return PerfProfile(gpu, spec, coeffs, 64, kv, load_s, api_s)


def seq(rid: str, prompt: int, output: int) -> Seq:
    return Seq(Request(rid, "t", "m", prompt, output, 0.0))


def run(engine: BatchingEngine, until: float = 1e9) -> list[tuple[float, Seq]]:
    """Call on_timer at every deadline up to ``until``; (time, sequence) of those that left."""
    out: list[tuple[float, Seq]] = []
    deadline = engine.next_deadline()
    while deadline is not None and deadline <= until:
        out += [(deadline, s) for s in engine.on_timer(deadline)]
        deadline = engine.next_deadline()
    return out


def test_one_request_by_hand() -> None:
    engine = BatchingEngine({"m": profile()}, "m")
    a = seq("a", 100, 5)
    assert engine.next_deadline() is None
    engine.add(a, 1.0)
    assert engine.next_deadline() == 1.0  # nothing starts until the timer
    assert engine.on_timer(1.0) == [] and engine.busy
    assert engine.next_deadline() == pytest.approx(1.1)  # the 100-token prefill
    [(t, left)] = run(engine)  # then 4 decode steps as one segment
    assert left is a and t == pytest.approx(1.14)
    assert a.first_token_s == pytest.approx(1.1) and a.done and a.generated == 5
    assert engine.kv_used == 0 and not engine.busy and engine.steps == 5


def test_an_admissible_arrival_cuts_the_segment_at_the_next_step() -> None:
    engine = BatchingEngine({"m": profile()}, "m")
    a, b = seq("a", 10, 100), seq("b", 10, 1)
    engine.add(a, 0.0)
    engine.on_timer(0.0)
    engine.on_timer(engine.next_deadline() or 0.0)  # prefill done at 0.01: a segment of 99
    assert engine.next_deadline() == pytest.approx(1.0)
    engine.add(b, 0.0555)  # mid-step 5 of the segment (0.05-0.06)
    assert engine.next_deadline() == pytest.approx(0.06)  # cut at the step boundary
    left = run(engine)
    assert [s.request.request_id for _, s in left] == ["b", "a"]
    assert b.first_token_s == pytest.approx(0.07)


def test_api_overhead_and_a_restart_load() -> None:
    engine = BatchingEngine({"m": profile(api_s=0.05)}, "m")
    engine.restart(0.0)
    assert engine.warm_models(1.0) == () and engine.warm_models(5.0) == ("m",)
    a = seq("a", 10, 1)
    engine.add(a, 2.0)
    [(t, left)] = run(engine)
    assert left is a and t == pytest.approx(5.01)
    assert a.cold_start  # it waited for the weights


def test_a_prompt_that_can_never_fit_fails() -> None:
    engine = BatchingEngine({"m": profile(kv=100)}, "m")
    big = seq("big", 100, 1)
    engine.add(big, 0.0)
    assert run(engine) == [(0.0, big)] and big.error == "context_too_long"


@settings(max_examples=60, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(
            st.floats(0.0, 2.0),  # arrival
            st.integers(1, 900),  # prompt
            st.integers(1, 200),  # output
            st.one_of(st.none(), st.floats(0.0, 2.0)),  # cancel after
        ),
        min_size=1,
        max_size=25,
    ),
    chunk=st.sampled_from([None, 64, 256]),
    kv=st.sampled_from([1000, 3000, 10**6]),
)
def test_kv_stays_within_the_cache_and_every_request_ends(
    jobs: list[tuple[float, int, int, float | None]], chunk: int | None, kv: int
) -> None:
    engine = BatchingEngine({"m": profile(kv=kv)}, "m", chunked_prefill_tokens=chunk)
    inputs: list[tuple[float, int, str, Seq]] = []
    seqs = []
    for i, (at, prompt, output, cancel_after) in enumerate(jobs):
        s = seq(f"j{i}", prompt, output)
        seqs.append(s)
        inputs.append((at, 0, "add", s))
        if cancel_after is not None:
            inputs.append((at + cancel_after, 1, "cancel", s))
    inputs.sort(key=lambda x: (x[0], x[1]))
    left: list[Seq] = []

    def check() -> None:
        held = sum(s.context + s.prompt_left for s in engine.batch)
        assert engine.kv_used == held
        assert engine.kv_used + len(engine.batch) <= engine.kv_capacity

    for at, _, what, s in inputs:
        deadline = engine.next_deadline()
        while deadline is not None and deadline <= at:
            left += engine.on_timer(deadline)
            check()
            deadline = engine.next_deadline()
        engine.add(s, at) if what == "add" else engine.cancel(s, at)
    left += [s for _, s in run(engine)]
    check()
    assert engine.kv_used == 0 and not engine.batch and not engine.waiting
    for s in seqs:
        if s.cancelled:
            continue
        assert s in left
        if s.error is None:
            assert s.done and s.generated == s.request.max_tokens
        else:
            assert s.request.prompt_tokens + s.request.max_tokens >= kv  # it outgrew the cache
