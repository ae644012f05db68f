"""Tests for haif.policy.placement: table-driven choices, tie-breaks, registry."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.contracts import Request
from haif.policy.placement import (
    DEFAULT_GPU_PREFERENCE,
    PLACEMENTS,
    Candidate,
    LocalityConfig,
    PlacementStrategy,
    RoundRobin,
    WeightedScore,
    WeightedScoreConfig,
    make_placement,
    placement_names,
    register_placement,
)

REQ = Request(
    request_id="r1",
    tenant="t1",
    model="llama-8b",
    prompt_tokens=100,
    max_tokens=50,
    arrival_s=0.0,
    origin_region="eu-west",
)

BUILTIN = (
    "jsq",
    "least_outstanding",
    "locality",
    "p2c",
    "random",
    "round_robin",
    "weighted_score",
)


def cand(
    worker_id: str,
    *,
    region: str = "eu-west",
    gpu_class: str = "H100-80G",
    warm: bool = True,
    queue_depth: int = 0,
    running: int = 0,
    outstanding: int = 0,
    capacity: int = 10,
    rtt_ms: float | None = None,
    same_region: bool | None = None,
) -> Candidate:
    local = region == REQ.origin_region
    return Candidate(
        worker_id=worker_id,
        region=region,
        gpu_class=gpu_class,
        warm=warm,
        queue_depth=queue_depth,
        running=running,
        outstanding=outstanding,
        capacity=capacity,
        rtt_ms=(0.0 if local else 50.0) if rtt_ms is None else rtt_ms,
        same_region=local if same_region is None else same_region,
    )


def choose(
    strategy: PlacementStrategy, candidates: Sequence[Candidate], seed: int = 0
) -> Candidate | None:
    return strategy.choose(REQ, candidates, 0.0, random.Random(seed))


# ------------------------------------------------------------ candidate


def test_candidate_load_and_utilization() -> None:
    c = cand("w", queue_depth=3, running=2, outstanding=1, capacity=10)
    assert c.load == 5
    assert c.utilization == pytest.approx(0.5)
    stale = cand("w", queue_depth=0, running=0, outstanding=7, capacity=2)
    assert stale.load == 7
    assert stale.utilization == pytest.approx(3.5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("capacity", 0), ("queue_depth", -1), ("running", -1), ("outstanding", -1), ("rtt_ms", -1.0)],
)
def test_candidate_validation_names_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        cand("w", **{field: value})


# ------------------------------------------------------- table of choices

SCENARIOS: list[tuple[str, dict[str, object], list[Candidate], str]] = [
    # jsq picks the minimum load (max(outstanding, queue_depth + running)).
    (
        "jsq",
        {},
        [cand("a", queue_depth=5), cand("b", running=2), cand("c", outstanding=4)],
        "b",
    ),
    # jsq trusts the local outstanding count when the heartbeat is stale-low.
    (
        "jsq",
        {},
        [cand("a", queue_depth=3), cand("b", outstanding=6, queue_depth=0)],
        "a",
    ),
    # least_outstanding ignores the (stale) heartbeat queue depth.
    (
        "least_outstanding",
        {},
        [cand("a", queue_depth=50, outstanding=1), cand("b", queue_depth=0, outstanding=2)],
        "a",
    ),
    # weighted score: warm H100 in the same region beats every weaker option.
    (
        "weighted_score",
        {},
        [
            cand("cold-h100", warm=False),
            cand("remote-h100", region="us-east"),
            cand("local-a100", gpu_class="A100-80G"),
            cand("local-h100"),
        ],
        "local-h100",
    ),
    # default weights: warm L40S (1+0.6+1) beats cold H100 (1+1+0) ...
    (
        "weighted_score",
        {},
        [cand("cold-h100", warm=False), cand("warm-l40s", gpu_class="L40S")],
        "warm-l40s",
    ),
    # ... but not when the warm cache is worth nothing.
    (
        "weighted_score",
        {"w_warm": 0.0},
        [cand("cold-h100", warm=False), cand("warm-l40s", gpu_class="L40S")],
        "cold-h100",
    ),
    # queue weight: a busy worker loses to an idle one once w_queue dominates.
    (
        "weighted_score",
        {"w_queue": 10.0},
        [cand("busy-h100", running=8), cand("idle-a100", gpu_class="A100-80G")],
        "idle-a100",
    ),
    (
        "weighted_score",
        {"w_queue": 0.0},
        [cand("busy-h100", running=8), cand("idle-a100", gpu_class="A100-80G")],
        "busy-h100",
    ),
    # region weight off + RTT penalty: the nearer remote region wins.
    (
        "weighted_score",
        {"w_region": 0.0, "w_rtt": 1.0},
        [
            cand("far", region="ap-south", rtt_ms=200.0),
            cand("near", region="us-east", rtt_ms=80.0),
        ],
        "near",
    ),
    # custom GPU preference given as a dict.
    (
        "weighted_score",
        {"gpu_preference": {"L40S": 2.0}},
        [cand("h100"), cand("l40s", gpu_class="L40S")],
        "l40s",
    ),
    # locality stays local when the origin region has headroom, even if remote is idle.
    (
        "locality",
        {},
        [
            cand("local-busy", running=7),
            cand("local", running=5),
            cand("remote-idle", region="us-east"),
        ],
        "local",
    ),
    # locality spills to the nearest region when the local region is saturated.
    (
        "locality",
        {},
        [
            cand("local-full", running=9),
            cand("far", region="ap-south", rtt_ms=200.0),
            cand("near-full", region="us-east", rtt_ms=40.0, running=8),
            cand("near", region="us-east", rtt_ms=40.0, running=3),
            cand("mid", region="eu-north", rtt_ms=90.0),
        ],
        "near",
    ),
    # within the spill region, the least loaded under the threshold.
    (
        "locality",
        {},
        [
            cand("local-full", running=10),
            cand("r1", region="us-east", rtt_ms=40.0, running=6),
            cand("r2", region="us-east", rtt_ms=40.0, running=2),
        ],
        "r2",
    ),
    # everything saturated: least utilized overall.
    (
        "locality",
        {},
        [
            cand("local-full", running=10),
            cand("remote-less", region="us-east", rtt_ms=40.0, running=9),
        ],
        "remote-less",
    ),
    # everything saturated, equal utilization: lower RTT wins.
    (
        "locality",
        {},
        [
            cand("far", region="ap-south", rtt_ms=200.0, running=9),
            cand("near", region="us-east", rtt_ms=40.0, running=9),
        ],
        "near",
    ),
    # spill threshold is configurable.
    (
        "locality",
        {"spill_utilization": 0.5},
        [cand("local", running=6), cand("remote", region="us-east")],
        "remote",
    ),
]


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize(
    ("name", "params", "candidates", "expected"),
    SCENARIOS,
    ids=[f"{s[0]}-{i}" for i, s in enumerate(SCENARIOS)],
)
def test_choice_table(
    name: str, params: dict[str, object], candidates: list[Candidate], expected: str, seed: int
) -> None:
    strategy = make_placement(name, params)
    for order in (candidates, list(reversed(candidates))):
        chosen = choose(strategy, order, seed)
        assert chosen is not None
        assert chosen.worker_id == expected


def test_weighted_score_values() -> None:
    strategy = WeightedScore(WeightedScoreConfig(w_rtt=1.0))
    c = cand("x", region="us-east", gpu_class="A100-80G", warm=True, running=5, rtt_ms=150.0)
    # 0*region + 0.8 gpu + 1 warm - 0.5 util - 1.5 rtt
    assert strategy.score(c) == pytest.approx(0.8 + 1.0 - 0.5 - 1.5)
    assert strategy.score(cand("y", gpu_class="TPU")) == pytest.approx(1.0 + 0.0 + 1.0)


# ------------------------------------------------------------------- p2c


def test_p2c_never_picks_the_max_load() -> None:
    candidates = [cand("low", running=1), cand("mid", running=4), cand("high", running=9)]
    strategy = make_placement("p2c")
    rng = random.Random(3)
    counts: Counter[str] = Counter()
    for _ in range(3000):
        chosen = strategy.choose(REQ, candidates, 0.0, rng)
        assert chosen is not None
        counts[chosen.worker_id] += 1
    assert counts["high"] == 0
    # Each pair is sampled 1/3 of the time: low wins 2/3, mid wins 1/3 (the middle can win).
    assert 1800 < counts["low"] < 2200
    assert 800 < counts["mid"] < 1200


def test_p2c_single_and_tie_first_sampled() -> None:
    only = cand("only", running=9)
    assert choose(make_placement("p2c"), [only]) is only
    a, b = cand("a", running=2), cand("b", running=2)
    for seed in range(20):
        first, _ = random.Random(seed).sample([a, b], 2)
        assert choose(make_placement("p2c"), [b, a], seed) is first


# ----------------------------------------------------------- round robin


def test_round_robin_cycles_in_id_order() -> None:
    rr = make_placement("round_robin")
    candidates = [cand("c"), cand("a"), cand("b")]
    picks = [choose(rr, candidates) for _ in range(7)]
    assert [p.worker_id for p in picks if p is not None] == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_survives_candidate_changes() -> None:
    rr = RoundRobin()
    full = [cand("a"), cand("b"), cand("c"), cand("d")]
    assert [getattr(choose(rr, full), "worker_id", None) for _ in range(2)] == ["a", "b"]
    # "c" disappears (breaker opened): the cycle continues with "d", not restarting.
    without_c = [x for x in full if x.worker_id != "c"]
    assert getattr(choose(rr, without_c), "worker_id", None) == "d"
    # last chosen ("d") disappears too, and a new "bb" appears: next id > "d" wraps to "a".
    changed = [cand("a"), cand("b"), cand("bb")]
    assert [getattr(choose(rr, changed), "worker_id", None) for _ in range(4)] == [
        "a",
        "b",
        "bb",
        "a",
    ]
    # the last chosen id is gone and a larger one exists: continue after it.
    rr.last_worker_id = "b0"
    assert getattr(choose(rr, changed), "worker_id", None) == "bb"


# --------------------------------------------------------------- tie-breaks

TIED = [cand(f"w{i}", running=2, outstanding=1) for i in range(4)]
TIE_STRATEGIES = ("random", "jsq", "least_outstanding", "weighted_score", "locality", "p2c")


def _sequence(name: str, seed: int, n: int = 40) -> list[str]:
    strategy = make_placement(name)
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        chosen = strategy.choose(REQ, TIED, 0.0, rng)
        assert chosen is not None
        out.append(chosen.worker_id)
    return out


@pytest.mark.parametrize("name", TIE_STRATEGIES)
def test_tie_break_deterministic_per_seed_and_varies_across_seeds(name: str) -> None:
    assert _sequence(name, 42) == _sequence(name, 42)
    sequences = {tuple(_sequence(name, seed)) for seed in range(10)}
    assert len(sequences) > 1
    # Input order does not matter: the strategies order by worker_id first.
    strategy = make_placement(name)
    forward = strategy.choose(REQ, TIED, 0.0, random.Random(5))
    backward = make_placement(name).choose(REQ, TIED[::-1], 0.0, random.Random(5))
    assert forward is not None and backward is not None
    assert forward.worker_id == backward.worker_id


@pytest.mark.parametrize("name", TIE_STRATEGIES)
def test_tie_break_roughly_uniform(name: str) -> None:
    counts = Counter(_sequence(name, 2024, n=4000))
    assert set(counts) == {c.worker_id for c in TIED}
    for worker_id in counts:
        assert 850 < counts[worker_id] < 1150, counts


def test_no_rng_draw_without_a_tie() -> None:
    rng = random.Random(9)
    state = rng.getstate()
    chosen = make_placement("jsq").choose(REQ, [cand("a"), cand("b", running=1)], 0.0, rng)
    assert chosen is not None and chosen.worker_id == "a"
    assert rng.getstate() == state


# ------------------------------------------------------------- properties

candidate_st = st.builds(
    Candidate,
    worker_id=st.text(alphabet="abcdefgh", min_size=1, max_size=3),
    region=st.sampled_from(["eu-west", "us-east", "ap-south"]),
    gpu_class=st.sampled_from([g for g, _ in DEFAULT_GPU_PREFERENCE] + ["TPU"]),
    warm=st.booleans(),
    queue_depth=st.integers(0, 50),
    running=st.integers(0, 50),
    outstanding=st.integers(0, 50),
    capacity=st.integers(1, 32),
    rtt_ms=st.floats(0.0, 500.0, allow_nan=False),
    same_region=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    candidates=st.lists(candidate_st, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    rounds=st.integers(1, 4),
)
def test_every_strategy_returns_a_member_or_none(
    candidates: list[Candidate], seed: int, rounds: int
) -> None:
    for name in placement_names():
        strategy = make_placement(name)
        rng = random.Random(seed)
        for _ in range(rounds):
            chosen = strategy.choose(REQ, candidates, 0.0, rng)
            if not candidates:
                assert chosen is None
            else:
                assert chosen is not None
                assert any(chosen is c for c in candidates)
        # same seed, fresh strategy: same first answer
        again = make_placement(name).choose(REQ, candidates, 0.0, random.Random(seed))
        first = make_placement(name).choose(REQ, candidates, 0.0, random.Random(seed))
        assert again is first


@settings(max_examples=100, deadline=None)
@given(candidates=st.lists(candidate_st, min_size=1, max_size=8), seed=st.integers(0, 10**6))
def test_jsq_and_least_outstanding_pick_minimum(candidates: list[Candidate], seed: int) -> None:
    jsq = choose(make_placement("jsq"), candidates, seed)
    lo = choose(make_placement("least_outstanding"), candidates, seed)
    assert jsq is not None and lo is not None
    assert jsq.load == min(c.load for c in candidates)
    assert lo.outstanding == min(c.outstanding for c in candidates)


@pytest.mark.parametrize("name", BUILTIN)
def test_empty_returns_none(name: str) -> None:
    assert choose(make_placement(name), []) is None


# ---------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert placement_names() == BUILTIN
    assert set(PLACEMENTS) == set(BUILTIN)
    for name in BUILTIN:
        assert make_placement(name).name == name
        assert isinstance(make_placement(name), PlacementStrategy)


def test_unknown_strategy_lists_allowed() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        make_placement("nope")
    for name in BUILTIN:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("jsq", {"alpha": 1}, "alpha"),
        ("weighted_score", {"w_gpuu": 1.0}, "w_gpuu"),
        ("locality", {"spill": 0.5}, "spill"),
    ],
)
def test_unknown_parameter_is_named(name: str, params: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_placement(name, params)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("weighted_score", {"w_queue": -1.0}, "w_queue"),
        ("weighted_score", {"w_rtt": float("nan")}, "w_rtt"),
        ("weighted_score", {"w_gpu": "high"}, "w_gpu"),
        ("weighted_score", {"gpu_preference": {"H100-80G": "x"}}, "gpu_preference"),
        ("weighted_score", {"gpu_preference": [("H100", 1.0), ("H100", 0.5)]}, "gpu_preference"),
        ("weighted_score", {"gpu_preference": 3}, "gpu_preference"),
        ("locality", {"spill_utilization": 0.0}, "spill_utilization"),
        ("locality", {"spill_utilization": True}, "spill_utilization"),
    ],
)
def test_invalid_values_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_placement(name, params)


def test_gpu_preference_normalized_to_sorted_pairs() -> None:
    cfg = WeightedScoreConfig(gpu_preference={"b": 1, "a": 0.5})
    assert cfg.gpu_preference == (("a", 0.5), ("b", 1.0))
    assert cfg.preference("b") == 1.0
    assert cfg.preference("zzz") == 0.0
    assert WeightedScoreConfig().gpu_preference == DEFAULT_GPU_PREFERENCE
    assert dict(DEFAULT_GPU_PREFERENCE)["H100-80G"] == 1.0
    assert WeightedScoreConfig.__pydantic_config__ == {"extra": "forbid"}
    assert LocalityConfig.__pydantic_config__ == {"extra": "forbid"}


def test_configs_are_frozen() -> None:
    cfg = LocalityConfig()
    with pytest.raises(AttributeError):
        cfg.spill_utilization = 0.5  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class _FirstConfig:
    reverse: bool = False


class _First:
    name: str = "first_by_id"

    def __init__(self, config: _FirstConfig) -> None:
        self.config = config

    def choose(
        self,
        request: Request,
        candidates: Sequence[Candidate],
        now: float,
        rng: random.Random,
    ) -> Candidate | None:
        ordered = sorted(candidates, key=lambda c: c.worker_id, reverse=self.config.reverse)
        return ordered[0] if ordered else None


def test_register_custom_strategy() -> None:
    register_placement("first_by_id", _FirstConfig, _First)
    try:
        assert "first_by_id" in placement_names()
        strategy = make_placement("first_by_id", {"reverse": True})
        chosen = choose(strategy, [cand("a"), cand("z")])
        assert chosen is not None and chosen.worker_id == "z"
        with pytest.raises(ValueError, match="already registered"):
            register_placement("first_by_id", _FirstConfig, _First)
        register_placement("first_by_id", _FirstConfig, _First, replace=True)
        with pytest.raises(ValueError, match="bogus"):
            make_placement("first_by_id", {"bogus": 1})
    finally:
        from haif.policy import placement

        placement._REGISTRY.pop("first_by_id", None)
    assert "first_by_id" not in placement_names()


def test_register_rejects_non_dataclass_config() -> None:
    with pytest.raises(ValueError, match="dataclass"):
        register_placement("bad", dict, _First)  # type: ignore[arg-type]
