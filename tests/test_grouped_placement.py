"""weighted_score and locality from the index's groups choose what the full scan chooses.

The index files each model's eligible workers by ``(region, gpu_class, warm,
capacity)`` and, within a group, by ``load``; the two strategies read only a
group's lowest loads (:meth:`OrderedCandidates.groups`). The claim is
exactness, not an approximation: on random fleets (loads, outstanding
counts, capacities, GPU classes, warm models, regions, tried workers) and
random weights, including ones built to tie across groups, the choice and
the random draws are those of the exhaustive scorer over the candidate list.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.contracts import Request, WorkerSnapshot
from haif.control.config import CoreConfig
from haif.control.eligibility import EligibilityIndex
from haif.policy.placement import (
    Candidate,
    Locality,
    OrderedCandidates,
    PlacementStrategy,
    WeightedScore,
    _Union,
    make_placement,
)

REGIONS = ("a", "b", "c", "d")
GPUS = ("H100-80G", "A100-80G", "L40S", "CPU", "Other")
RTT = {"a": {"b": 40.0, "c": 90.0, "d": 40.0}, "b": {"c": 60.0, "d": 0.0}}
MODEL = "m"


def rtt(a: str, b: str) -> float:
    return CoreConfig(rtt_ms=RTT).rtt(a, b)


# Weights from a few values that make different groups' scores meet (1.0 - 0.2 and
# 0.8, 0.6 + 0.2 ...), zero included (w_queue = 0 ties a whole group).
weight = st.sampled_from([0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0, 2.0, 1e-10])
weighted = st.builds(
    WeightedScore,
    w_region=weight,
    w_gpu=weight,
    gpu_preference=st.dictionaries(
        st.sampled_from(GPUS), st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), max_size=5
    ),
    w_warm=weight,
    w_queue=weight,
    w_rtt=weight,
)
locality = st.builds(
    Locality, spill_utilization=st.sampled_from([0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 1e9])
)

worker = st.fixed_dictionaries(
    {
        "region": st.sampled_from(REGIONS),
        "gpu_class": st.sampled_from(GPUS),
        "warm": st.booleans(),
        "capacity": st.sampled_from([1, 2, 3, 4, 8]),
        "reported": st.integers(0, 12),
        "outstanding": st.integers(0, 6),
    }
)


def build(fleet: Sequence[dict[str, object]]) -> EligibilityIndex:
    """An index holding ``fleet`` (worker i is ``w{i:03d}``), every worker eligible or full."""
    index = EligibilityIndex(
        stale_after_s=10.0,
        max_queue_factor=1e9,  # outstanding never makes a worker ineligible here
        worker_breakers={},
        route_breakers={},
        rtt_ms=rtt,
        orders=("groups",),
    )
    for i, w in enumerate(fleet):
        reported = w["reported"]
        assert isinstance(reported, int)
        snapshot = WorkerSnapshot(
            worker_id=f"w{i:03d}",
            region=str(w["region"]),
            gpu_class=str(w["gpu_class"]),
            models_warm=(MODEL,) if w["warm"] else (),
            models_loadable=(MODEL,),
            queue_depth=reported // 2,
            running=reported - reported // 2,
            capacity=int(str(w["capacity"])),
        )
        index.heartbeat(snapshot, 0.0)
        index.add_outstanding(snapshot.worker_id, int(str(w["outstanding"])))
    return index


def agree(
    strategy: PlacementStrategy, view: OrderedCandidates, seed: int
) -> tuple[Candidate | None, Candidate | None]:
    """The strategy's choice from the view's groups and from the full list, same seed;
    asserts both drew the same random numbers."""
    assert view.groups() is not None
    listed = list(view)
    rng_groups, rng_list = random.Random(seed), random.Random(seed)
    got = strategy.choose(REQUEST, view, 0.0, rng_groups)
    want = strategy.choose(REQUEST, listed, 0.0, rng_list)
    assert rng_groups.getstate() == rng_list.getstate()
    return got, want


REQUEST = Request(
    request_id="r",
    tenant="t",
    model=MODEL,
    prompt_tokens=1,
    max_tokens=1,
    arrival_s=0.0,
    origin_region="a",
)


@settings(max_examples=400, deadline=None)
@given(
    strategy=st.one_of(weighted, locality),
    fleet=st.lists(worker, min_size=1, max_size=40),
    origin=st.sampled_from(REGIONS),
    tried=st.lists(st.integers(0, 45), max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_groups_choose_what_the_exhaustive_scan_chooses(
    strategy: PlacementStrategy,
    fleet: list[dict[str, object]],
    origin: str,
    tried: list[int],
    seed: int,
) -> None:
    index = build(fleet)
    view = index.candidates(MODEL, origin, [f"w{i:03d}" for i in tried], 0.0)
    got, want = agree(strategy, view, seed)
    assert got == want


@settings(max_examples=200, deadline=None)
@given(
    spill=st.sampled_from([0.1, 0.25, 0.5]),
    fleet=st.lists(
        worker.map(lambda w: {**w, "reported": 1 + int(str(w["reported"])) % 4}),
        min_size=1,
        max_size=30,
    ),
    origin=st.sampled_from(REGIONS),
    seed=st.integers(0, 2**32 - 1),
)
def test_locality_agrees_when_every_worker_is_saturated(
    spill: float, fleet: list[dict[str, object]], origin: str, seed: int
) -> None:
    """Step 3 (least utilization, then least RTT, both within 1e-9): equal RTTs from
    the origin (b and d from a) and equal utilizations (1/2, 2/4) tie across groups."""
    got, want = agree(Locality(spill_utilization=spill), build(fleet).candidates(
        MODEL, origin, (), 0.0), seed)  # fmt: skip
    assert got == want


@settings(max_examples=100, deadline=None)
@given(
    strategy=st.one_of(weighted, locality),
    size=st.integers(50, 400),
    variety=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_large_uniform_fleets_agree(
    strategy: PlacementStrategy, size: int, variety: int, seed: int
) -> None:
    """Many workers per group and level (the case the groups are for): long tied runs."""
    rnd = random.Random(seed)
    fleet: list[dict[str, object]] = [
        {
            "region": REGIONS[rnd.randrange(variety)],
            "gpu_class": GPUS[rnd.randrange(variety)],
            "warm": rnd.random() < 0.5,
            "capacity": (2, 4)[rnd.randrange(2)] if variety > 2 else 4,
            "reported": rnd.randrange(variety + 1),
            "outstanding": rnd.randrange(3),
        }
        for _ in range(size)
    ]
    index = build(fleet)
    tried = [f"w{rnd.randrange(size):03d}" for _ in range(rnd.randrange(3))]
    view = index.candidates(MODEL, REGIONS[rnd.randrange(4)], tried, 0.0)
    got, want = agree(strategy, view, seed)
    assert got == want


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=120), min_size=1, max_size=6),
)
def test_union_reads_the_merged_order(runs: list[list[int]]) -> None:
    """The union of disjoint sorted runs reads as their merge, without merging."""
    seen: set[int] = set()
    parts = []
    for run in runs:
        ids = sorted(set(run) - seen)
        seen.update(ids)
        if ids:
            parts.append(_Runs([f"w{i:03d}" for i in ids]))
    if not parts:
        return
    union = _Union(parts)
    merged = sorted(f"w{i:03d}" for i in seen)
    assert len(union) == len(merged)
    assert [c.worker_id for c in union] == merged
    assert union[-1].worker_id == merged[-1]
    with pytest.raises(IndexError):
        union[len(merged)]


class _Runs(OrderedCandidates):
    """Sorted ids as bare candidates (the hooks' exhaustive defaults)."""

    def __init__(self, ids: list[str]) -> None:
        self._items = [Candidate(i, "a", "H100-80G", True, 0, 0, 0, 1, 0.0, True) for i in ids]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        return self._items[i]


def test_the_index_keeps_groups_only_when_asked() -> None:
    index = EligibilityIndex(
        stale_after_s=10.0,
        max_queue_factor=2.0,
        worker_breakers={},
        route_breakers={},
        rtt_ms=rtt,
    )
    index.heartbeat(WorkerSnapshot("w1", "a", "H100-80G", models_warm=(MODEL,), capacity=2), 0.0)
    assert index.candidates(MODEL, "a", (), 0.0).groups() is None
    assert make_placement("weighted_score").indexed_orders == ("groups",)  # type: ignore[attr-defined]
    assert make_placement("locality").indexed_orders == ("groups",)  # type: ignore[attr-defined]


def test_groups_follow_load_and_warm_changes() -> None:
    """A heartbeat that only changes the warm models or the GPU class re-files the worker."""
    index = build([{"region": "a", "gpu_class": "L40S", "warm": False, "capacity": 2,
                    "reported": 0, "outstanding": 0}])  # fmt: skip
    snap = WorkerSnapshot(
        "w000", "a", "L40S", models_warm=(MODEL,), models_loadable=(MODEL,), capacity=2
    )
    index.heartbeat(snap, 1.0)
    groups = index.candidates(MODEL, "a", (), 1.0).groups()
    assert groups is not None
    assert [(g.region, g.gpu_class, g.warm, g.capacity) for g in groups] == [("a", "L40S", True, 2)]
    index.heartbeat(
        WorkerSnapshot(
            "w000", "a", "H100-80G", models_loadable=(MODEL,), queue_depth=3, capacity=2
        ),
        2.0,
    )
    groups = index.candidates(MODEL, "b", (), 2.0).groups()
    assert groups is not None and len(groups) == 1
    (g,) = groups
    assert (g.gpu_class, g.rtt_ms, g.same_region) == ("H100-80G", 40.0, False)
    assert [(load, [c.worker_id for c in g.members(load)]) for load in g.loads()] == [(3, ["w000"])]


@pytest.mark.parametrize(
    "sizes", [(3, 1), (4,) * 12, (30, 2, 2, 2), (200, 100), (300, 5, 40), (1000,), (90,) * 4]
)
def test_union_reads_the_merged_order_small_and_large(sizes: tuple[int, ...]) -> None:
    """Both ways of finding member k (merging the ids of few members in many runs,
    bisecting otherwise) agree with the merge."""
    rnd = random.Random(sum(sizes))
    ids = rnd.sample(range(10_000), sum(sizes))
    parts, start = [], 0
    for size in sizes:
        parts.append(_Runs(sorted(f"w{i:05d}" for i in ids[start : start + size])))
        start += size
    union = _Union(parts)
    merged = sorted(f"w{i:05d}" for i in ids)
    for k in {0, 1, len(merged) // 2, len(merged) - 1, *rnd.sample(range(len(merged)), 4)}:
        assert union[k].worker_id == merged[k]
