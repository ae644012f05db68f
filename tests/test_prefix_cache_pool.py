"""The prefix cache lives in the KV pool (vLLM's automatic prefix caching, 512-token blocks).

Driven by hand on :class:`~haif.fleet.engine.BatchingEngine`: cached blocks are free
memory, eviction is least recently used and only under pressure, a pinned block is never
evicted, the cap, a crash or a swap empties the cache; and on the Mooncake conversation
trace the engine's hit ratio is the offline exact LRU replay's
(:func:`haif.fleet.traces.prefix_reuse`) within half a point.
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from haif.configfile import ConfigError
from haif.contracts import Request
from haif.fleet.engine import BLOCK_TOKENS, BatchingEngine, PrefixCache, Seq
from haif.fleet.profiles import GpuSpec, ModelSpec, PerfProfile, StepCoefficients
from haif.fleet.scenario import load_scenario
from haif.fleet.traces import TraceRequest, load_mooncake, prefix_reuse, prefix_reuse_tokens
from haif.runtime.batching import BatchingOptions, IterationTimer
from haif.runtime.cluster import WorkerConfig
from haif.runtime.engines import EngineError, make_engine
from haif.runtime.engines.synthetic import SyntheticEngine
from haif.runtime.engines_cli import engine_from_args
from haif.runtime.worker import add_worker_args
from haif.sim.driver import SimCluster
from haif.sim.engine import BatchingWorker

ROOT = Path(__file__).resolve().parent.parent
MOONCAKE = ROOT / "traces" / "mooncake_fast25_conversation.jsonl"
PREFIX = ROOT / "scenarios" / "prefix_cache.yaml"
B = BLOCK_TOKENS


def profile(kv: int, model: str = "m") -> PerfProfile:
    gpu = GpuSpec("G", 80.0, 3600.0, 1.0, 1.0, source="test")
    spec = ModelSpec(model, 1.0, 1.0, 1, 1, 1, source="test")
    # A step takes max(10 ms, 1 ms per prefill token); decoding does not grow with context.
    coeffs = StepCoefficients(0.01, 0.0, 0.001, 0.0, 0.0, source="test")
    return PerfProfile(gpu, spec, coeffs, 64, kv, 5.0, 0.0)


def engine(
    kv: int,
    cap: int | None = None,
    profiles: dict[str, PerfProfile] | None = None,
    max_segment_steps: int | None = None,
) -> BatchingEngine:
    return BatchingEngine(
        profiles or {"m": profile(kv)},
        "m",
        prefix_cache=True,
        prefix_cache_max_tokens=cap,
        max_segment_steps=max_segment_steps,
    )


def seq(rid: str, prompt: int, output: int, hashes: Sequence[int], model: str = "m") -> Seq:
    return Seq(Request(rid, "t", model, prompt, output, 0.0, prefix_hashes=tuple(hashes)))


def cache_of(e: BatchingEngine) -> PrefixCache:
    assert e.prefix is not None
    return e.prefix


_CHECKS = [0]
#: The free pool's total is recounted (O(pool)) every this many checks, and
#: at the end of every serve() but a replay's: with a pool that holds all of
#: Mooncake, recounting it after each of its 12,031 requests took three minutes.
_RECOUNT_EVERY = 64


def check(e: BatchingEngine, *, recount: bool = False) -> None:
    """The pool's invariants: the cache never adds memory, running blocks are pinned."""
    p = cache_of(e)
    assert e.kv_used == sum(s.context + s.prompt_left for s in e.batch)
    assert e.kv_used + len(e.batch) <= e.kv_capacity
    _CHECKS[0] += 1
    if recount or _CHECKS[0] % _RECOUNT_EVERY == 0:
        assert p.free_tokens == sum(p.free.values())
    assert e.kv_used + p.free_tokens <= e.kv_capacity
    if p.max_tokens is not None:
        assert p.free_tokens <= p.max_tokens
    assert all(h not in p.free for h in p.refs)
    held: dict[int, int] = {}
    for s in e.batch:
        for h in s.blocks:
            held[h] = held.get(h, 0) + 1
    assert held == p.refs  # exactly the running sequences' blocks are pinned


def advance(e: BatchingEngine, until: float = float("inf")) -> float:
    """Call on_timer at every deadline up to ``until``, checking the invariants; the clock."""
    deadline = e.next_deadline()
    while deadline is not None and deadline <= until:
        e.on_timer(deadline)
        check(e)
        deadline = e.next_deadline()
    return e.clock


def serve(e: BatchingEngine, now: float, *seqs: Seq, recount: bool = True) -> float:
    """Add ``seqs`` at ``now`` and run until they all left; the clock then. ``recount``:
    recount the free pool at the end (O(pool); a replay of thousands recounts once)."""
    advance(e, now)
    for s in seqs:
        e.add(s, now)
    while not all(s.done for s in seqs):
        deadline = e.next_deadline()
        assert deadline is not None
        e.on_timer(deadline)
        check(e)
    check(e, recount=recount)
    return e.clock


# ------------------------------------------------------------- one request after another


@dataclass(frozen=True)
class Case:
    kv: int
    cap: int | None
    requests: tuple[tuple[int, int, tuple[int, ...]], ...]  # (prompt, output, hashes)
    hits: tuple[int, ...]  # blocks each request found
    free: tuple[int, ...]  # evictable blocks at the end, least recently used first
    evictions: int


CASES = {
    # A finished request's blocks stay, evictable, the tail first (vLLM frees in reverse);
    # with room for all, nothing is evicted. A hit takes blocks out of the evictable list.
    "no pressure, nothing evicted": Case(
        10**6,
        None,
        ((2 * B, 1, (1, 2)), (2 * B, 1, (3, 4)), (3 * B, 1, (1, 2, 5))),
        (0, 0, 2),
        (4, 3, 5, 2, 1),
        0,
    ),
    # A 4-block pool: the running request's prompt and first token leave room for 1
    # cached block, so the least recently used (2: the tail of the first) goes.
    "a full pool evicts the least recently used": Case(
        4 * B,
        None,
        ((2 * B, 1, (1, 2)), (2 * B, 1, (3, 4)), (2 * B, 1, (1, 2))),
        (0, 0, 1),
        (3, 2, 1),
        2,
    ),
    # A 600-token prompt's second block holds 88 tokens but takes a whole block:
    # 1,000 tokens of pool keep one of the two.
    "a partial block takes a whole one": Case(
        1000, None, ((600, 1, (1, 2)), (600, 1, (1, 2))), (0, 1), (1,), 2
    ),
    # Hashes beyond the prompt hold none of its tokens: not cached, not looked up.
    "hashes beyond the prompt are ignored": Case(
        10**6, None, ((B, 1, (1, 2, 3)), (B, 1, (1, 9))), (0, 1), (1,), 0
    ),
    # The lookup stops at the first miss; the blocks after it are cached again when the
    # prompt is prefilled (pinned, then freed with it).
    "the lookup stops at the first miss": Case(
        10**6,
        None,
        ((3 * B, 1, (1, 2, 3)), (3 * B, 1, (9, 2, 3))),
        (0, 0),
        (1, 3, 2, 9),
        0,
    ),
    # The cap (rounded down to whole blocks: 2) bounds the evictable blocks in a large
    # pool: the second request's blocks push the first's out.
    "the cap bounds the evictable blocks": Case(
        10**6,
        3 * B - 1,
        ((2 * B, 1, (1, 2)), (2 * B, 1, (3, 4)), (2 * B, 1, (3, 4)), (2 * B, 1, (1, 2))),
        (0, 0, 2, 0),
        (2, 1),
        4,
    ),
    "a cap of 0 keeps nothing once a request is done": Case(
        10**6, 0, ((2 * B, 1, (1, 2)), (2 * B, 1, (1, 2))), (0, 0), (), 4
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_one_request_after_another(case: Case) -> None:
    e = engine(case.kv, case.cap)
    now, hits = 0.0, []
    for i, (prompt, output, hashes) in enumerate(case.requests):
        before = cache_of(e).hits
        s = seq(f"r{i}", prompt, output, hashes)
        now = serve(e, now + 1.0, s)
        hits.append(cache_of(e).hits - before)
        assert e.kv_used == 0 and e.free_kv_tokens() == case.kv  # cached blocks are free
    p = cache_of(e)
    assert tuple(hits) == case.hits
    assert tuple(p.free) == case.free and not p.refs
    assert p.evictions == case.evictions


def test_a_hit_is_not_prefilled_and_counts_its_tokens() -> None:
    e = engine(10**6)
    serve(e, 0.0, seq("a", 4 * B, 1, (1, 2, 3, 4)))
    b = seq("b", 4 * B, 1, (1, 2, 7, 8))
    e.add(b, 10.0)
    e.on_timer(10.0)
    assert (b.context, b.prompt_left) == (2 * B, 2 * B)  # two blocks hit
    assert e.next_deadline() == pytest.approx(10.0 + 2 * B * 0.001)  # half the prefill
    c = seq("c", 4 * B, 1, (1, 2, 3, 4))
    serve(e, 20.0, c)
    p = cache_of(e)
    # All cached but the prompt's last token, which is always computed.
    assert p.hit_tokens == 2 * B + (4 * B - 1)
    assert (p.hits, p.lookups) == (2 + 4, 4 + 4 + 4)


def live(rid: str, prompt: int, hashes: Sequence[int], block: int = 16) -> Seq:
    """A request whose hashes are of ``block``-token blocks (a live prompt's, not a trace's)."""
    return Seq(
        Request(
            rid, "t", "m", prompt, 1, 0.0, prefix_hashes=tuple(hashes), prefix_block_tokens=block
        )
    )


def test_a_request_says_how_many_tokens_its_blocks_hold() -> None:
    e = engine(10**6)
    p = cache_of(e)
    serve(e, 0.0, live("a", 64, (1, 2, 3, 4)))
    assert tuple(p.free) == (4, 3, 2, 1) and p.free_tokens == 64
    b = live("b", 80, (1, 2, 3, 9, 10))
    e.add(b, 10.0)
    e.on_timer(10.0)
    assert (b.context, b.prompt_left) == (3 * 16, 80 - 3 * 16)  # three 16-token blocks hit
    assert p.hit_tokens == 48 and p.query_tokens == 64 + 80
    # Blocks of both sizes share the pool; each counts its own tokens.
    serve(e, 20.0, seq("c", 2 * B, 1, (70, 71)))
    assert p.free_tokens == 16 * 6 + 2 * B


def test_the_cap_counts_tokens_whatever_the_block_size() -> None:
    e = engine(10**6, cap=40)
    serve(e, 0.0, live("a", 64, (1, 2, 3, 4)))
    p = cache_of(e)
    # 40 tokens hold two 16-token blocks: the tail goes first.
    assert tuple(p.free) == (2, 1) and p.free_tokens == 32 and p.evictions == 2


def test_hashes_without_a_block_size_are_ignored() -> None:
    e = engine(10**6)
    serve(e, 0.0, live("a", 64, (1, 2, 3, 4), block=0))
    assert not cache_of(e).free and cache_of(e).lookups == 0


# ------------------------------------------------------------- pressure from running requests


def test_decode_growth_evicts_and_a_pinned_block_never_goes() -> None:
    e = engine(8 * B, max_segment_steps=50)  # deadlines every 50 decode steps, to look
    p = cache_of(e)
    serve(e, 0.0, seq("old", 2 * B, 1, (7, 8)))
    assert tuple(p.free) == (8, 7)
    # A long answer (its context ends at 4,024 of the 4,096 tokens); its blocks are pinned.
    a = seq("a", 2 * B, 3000, (1, 2))
    e.add(a, 10.0)
    advance(e, 10.0 + 2 * B * 0.001)  # its prompt is prefilled: cached, pinned by it
    assert a.blocks == (1, 2) and p.refs == {1: 1, 2: 1} and tuple(p.free) == (8, 7)
    # Another request hits a's blocks while a runs (no sharing: both count them in
    # kv_used); its prompt needs the room of one cached block, the least recently used.
    b = seq("b", 4 * B, 1, (1, 2, 5, 6))
    advance(e, 12.0)
    e.add(b, 12.0)
    advance(e, 12.01)
    assert b in e.batch and b.blocks == (1, 2) and b.context == 2 * B
    assert p.refs == {1: 2, 2: 2} and tuple(p.free) == (7,) and p.evictions == 1
    advance(e, 13.1)  # b is done: its own blocks are evictable, a's stay pinned
    assert b.done and p.refs == {1: 1, 2: 1} and tuple(p.free) == (7, 6, 5)
    # a's answer fills the pool: the evictable blocks go as it grows, the pinned ones stay.
    sizes = []
    while not a.done:
        deadline = e.next_deadline()
        assert deadline is not None
        e.on_timer(deadline)
        check(e)
        if not a.done:
            assert p.refs == {1: 1, 2: 1}
            sizes.append(len(p.free))
    assert sizes[0] == 3 and sizes[-1] == 0 and sorted(sizes, reverse=True) == sizes
    assert tuple(p.free) == (2, 1) and p.evictions == 4 and e.preemptions == 0
    serve(e, e.clock + 1.0, seq("d", 2 * B, 1, (1, 2)))
    assert p.hits == 2 + 2


def test_cached_blocks_do_not_keep_a_request_out() -> None:
    # The pool is full of cached blocks; a request that needs all of it is admitted at
    # once and evicts them, rather than waiting or being preempted.
    e = engine(6 * B)
    serve(e, 0.0, seq("a", 3 * B, 1, (1, 2, 3)), seq("b", 3 * B - 2, 1, (4, 5, 6)))
    assert len(cache_of(e).free) == 6 and e.free_kv_tokens() == 6 * B
    big = seq("big", 6 * B - 2, 1, (9,) * 12)
    e.add(big, 10.0)
    e.on_timer(10.0)
    assert big in e.batch and not cache_of(e).free and cache_of(e).evictions == 6


def test_preemption_frees_blocks_and_the_recompute_hits_them() -> None:
    e = engine(2600)
    a, b = seq("a", 2 * B, 500, (1, 2)), seq("b", 2 * B, 500, (3, 4))
    for s in (a, b):
        e.add(s, 0.0)
    # Both prefill together (2.048 s), then decode until the pool is full (275 steps):
    # b, the newest, is preempted; its blocks stay cached, evictable.
    advance(e, 5.0)
    assert e.preemptions == 1 and b in e.waiting and b.generated == 276
    assert b.blocks == () and tuple(cache_of(e).free) == (4, 3)
    advance(e, 7.1)  # a is done at 7.038; b comes back and finds its prompt
    assert a.done and b in e.batch and (b.context, b.prompt_left) == (2 * B, 276)
    assert cache_of(e).hits == 2
    advance(e)
    # Only the 276 tokens it had generated are recomputed (0.276 s), then 223 steps.
    assert b.done and b.finish_s == pytest.approx(7.038 + 0.276 + 223 * 0.01)


def test_a_cancel_frees_the_blocks_it_pinned() -> None:
    e = engine(10**6)
    serve(e, 0.0, seq("a", 2 * B, 1, (1, 2)))
    b = seq("b", 3 * B, 100, (1, 2, 3))
    e.add(b, 5.0)
    advance(e, 5.0)
    assert cache_of(e).refs == {1: 1, 2: 1} and not cache_of(e).free
    e.cancel(b, 5.1)  # mid-prefill: only the blocks it hit were pinned
    assert b.blocks == () and not cache_of(e).refs and tuple(cache_of(e).free) == (2, 1)
    check(e)


def test_a_crash_or_a_swap_empties_the_cache() -> None:
    e = engine(10**6)
    serve(e, 0.0, seq("a", 2 * B, 1, (1, 2)))
    running = seq("b", 3 * B, 1000, (1, 2, 3))
    e.add(running, 5.0)
    advance(e, 6.0)
    assert len(cache_of(e)) == 3
    e.crash(6.0)
    assert len(cache_of(e)) == 0 and running.blocks == ()
    e.restart(7.0)
    serve(e, 7.0, seq("c", 2 * B, 1, (1, 2)))
    assert cache_of(e).hits == 2  # b's hit before the crash; c found nothing
    # A swap to another model loads other weights: the cache goes with them.
    two = engine(10**6, None, {"m": profile(10**6), "other": profile(10**6, "other")})
    serve(two, 0.0, seq("a", 2 * B, 1, (1, 2)))
    serve(two, 1.0, seq("x", 2 * B, 1, (1, 2), model="other"))
    assert cache_of(two).hits == 0 and tuple(cache_of(two).free) == (2, 1)


# ------------------------------------------------------------- the Mooncake conversation trace


@cache
def _mooncake() -> tuple[TraceRequest, ...]:
    return tuple(load_mooncake(MOONCAKE, random.Random(7)))


def _replay(e: BatchingEngine, reqs: Sequence[TraceRequest]) -> tuple[float, float]:
    """One request at a time (each done before the next arrives), in arrival order: the
    engine's hit blocks over looked-up blocks, and hit tokens over prompt tokens."""
    now = 0.0
    for i, r in enumerate(reqs):
        s = seq(f"r{i}", r.prompt_tokens, r.output_tokens, r.hash_ids)
        now = serve(e, now, s, recount=False)
    check(e, recount=True)
    p = cache_of(e)
    return p.hits / p.lookups, p.hit_tokens / sum(r.prompt_tokens for r in reqs)


def _tail_first_lru(reqs: Sequence[TraceRequest], blocks: int) -> float:
    """Exact LRU over blocks that refreshes a request's blocks tail first (vLLM's free
    order): :func:`prefix_reuse` with its in-request tie-break reversed."""
    lru: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    for r in reqs:
        for h in r.hash_ids:
            if h not in lru:
                break
            hit += 1
        total += len(r.hash_ids)
        for h in reversed(r.hash_ids):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > blocks:
            lru.popitem(last=False)
    return hit / total


@pytest.mark.parametrize(
    ("kv_tokens", "cap", "blocks"),
    [
        (10**8, None, None),  # 195,312 blocks: the trace's 182,790 all stay
        (5_859 * B, None, 5_859),  # a 3M-token pool (the published LRU size) evicts
        (10**8, 5_859 * B, 5_859),  # the same cache as a cap in a large pool
    ],
    ids=["pool holds all", "pool evicts", "cap evicts"],
)
def test_mooncake_hit_ratio_is_the_offline_lru_replay(
    kv_tokens: int, cap: int | None, blocks: int | None
) -> None:
    reqs = _mooncake()  # all 12,031 requests
    e = engine(kv_tokens, cap)
    by_blocks, by_tokens = _replay(e, reqs)
    offline = prefix_reuse(reqs, blocks)
    assert by_blocks == pytest.approx(offline, abs=0.005)
    assert by_tokens == pytest.approx(prefix_reuse_tokens(reqs, blocks), abs=0.005)
    if blocks is None:
        assert by_blocks == offline == pytest.approx(0.3664, abs=1e-4)  # exactly
        assert cache_of(e).evictions == 0
    else:
        assert cache_of(e).evictions > 0 and len(cache_of(e).free) <= blocks
    if cap is not None:
        # Nothing else in the pool: exactly an LRU of that many blocks.
        assert by_blocks == _tail_first_lru(reqs, 5_859)


# ------------------------------------------------------------- the cap, where it is configured


@pytest.mark.parametrize("bad", [-1, 1.5, True, "512"])
def test_a_bad_cap_names_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="prefix_cache_max_tokens"):
        BatchingEngine({"m": profile(10**6)}, "m", prefix_cache=True, prefix_cache_max_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix_cache_max_tokens"):
        BatchingOptions(prefix_cache=True, prefix_cache_max_tokens=bad)  # type: ignore[arg-type]


def test_a_cap_without_a_prefix_cache_is_an_error() -> None:
    needs = "prefix_cache_max_tokens: needs prefix_cache: true"
    with pytest.raises(ValueError, match=needs):
        BatchingEngine({"m": profile(10**6)}, "m", prefix_cache_max_tokens=1024)
    with pytest.raises(ValueError, match=needs):
        BatchingOptions(prefix_cache_max_tokens=1024)
    with pytest.raises(ValueError, match=needs):
        WorkerConfig(id="w", region="r", timing="profile", prefix_cache_max_tokens=1024)
    with pytest.raises(ConfigError, match=r"workers\.0\.prefix_cache_max_tokens.*needs"):
        load_scenario(
            PREFIX, ["workers.0.prefix_cache=false", "workers.0.prefix_cache_max_tokens=1024"]
        )


def test_the_scenario_cap_reaches_the_simulated_engine() -> None:
    with pytest.raises(ConfigError, match=r"workers\.0\.prefix_cache_max_tokens"):
        load_scenario(PREFIX, ["workers.0.prefix_cache_max_tokens=-5"])
    assert load_scenario(PREFIX).workers[0].prefix_cache_max_tokens is None
    for cap, tokens in [("null", None), ("1000000", 10**6), ("0", 0)]:
        sets = ["duration_s=1", f"workers.0.prefix_cache_max_tokens={cap}"]
        cluster = SimCluster(load_scenario(PREFIX, sets))
        for worker in cluster.workers.values():
            assert isinstance(worker, BatchingWorker)
            assert cache_of(worker.engine).max_tokens == tokens


def test_the_live_worker_takes_the_cap() -> None:
    config = WorkerConfig(
        id="w", region="r", timing="profile", prefix_cache=True, prefix_cache_max_tokens=4096
    )
    args = config.engine_args(None)
    assert args[args.index("--prefix-cache-max-tokens") + 1] == "4096"
    assert "--prefix-cache-max-tokens" not in WorkerConfig(id="w", region="r").engine_args(None)
    synthetic = make_engine(
        "synthetic",
        timing="profile",
        gpu="H100-80G",
        models=("llama-3-8b",),
        prefix_cache=True,
        prefix_cache_max_tokens=4096,
    )
    assert isinstance(synthetic, SyntheticEngine)
    timer = synthetic.timer
    assert isinstance(timer, IterationTimer)
    assert cache_of(timer.engine).max_tokens == 4096
    with pytest.raises(EngineError, match="prefix_cache_max_tokens"):
        make_engine("synthetic", timing="fixed", prefix_cache_max_tokens=4096)
    with pytest.raises(EngineError, match="prefix_cache_max_tokens: needs prefix_cache"):
        make_engine(
            "synthetic",
            timing="profile",
            gpu="H100-80G",
            models=("llama-3-8b",),
            prefix_cache_max_tokens=4096,
        )


def test_the_worker_command_line_takes_the_cap() -> None:
    parser = argparse.ArgumentParser()
    add_worker_args(parser)
    base = ["--port", "1", "--id", "w", "--region", "r", "--orchestrator", "http://x"]
    base += ["--timing", "profile", "--gpu-class", "H100-80G", "--models", "llama-3-8b"]
    for flags, tokens in [(["--prefix-cache-max-tokens", "1024"], 1024), ([], None)]:
        synthetic = engine_from_args(parser.parse_args([*base, "--prefix-cache", *flags]))
        assert isinstance(synthetic, SyntheticEngine)
        assert isinstance(synthetic.timer, IterationTimer)
        assert cache_of(synthetic.timer.engine).max_tokens == tokens
    with pytest.raises(EngineError, match="--prefix-cache-max-tokens needs --prefix-cache"):
        engine_from_args(parser.parse_args([*base, "--prefix-cache-max-tokens", "1024"]))
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--prefix-cache", "--prefix-cache-max-tokens", "-1"])
