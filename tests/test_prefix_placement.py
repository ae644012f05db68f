"""``prefix_affinity`` placement: the worker most likely to hold the prompt's leading blocks."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.contracts import Request
from haif.control.config import CoreConfig
from haif.fleet.prefix import block_hashes, prefix_root, word_token_ids
from haif.policy.placement import Candidate, PrefixAffinity, make_placement

BASE = Request("r", "t", "m", 64, 8, 0.0, prefix_block_tokens=16)


def req(hashes: tuple[int, ...]) -> Request:
    return replace(BASE, prefix_hashes=hashes)


def cand(worker_id: str, load: int = 0) -> Candidate:
    return Candidate(worker_id, "r", "H100-80G", True, 0, 0, load, 8, 0.0, True)


def place(s: PrefixAffinity, hashes: tuple[int, ...], loads: dict[str, int], seed: int = 0) -> str:
    chosen = s.choose(req(hashes), [cand(w, n) for w, n in loads.items()], 0.0, random.Random(seed))
    assert chosen is not None
    return chosen.worker_id


@dataclass(frozen=True)
class Case:
    history: tuple[tuple[str, tuple[int, ...]], ...]  # (worker, hashes) placed before
    hashes: tuple[int, ...]
    loads: dict[str, int]
    expected: str
    params: tuple[tuple[str, int], ...] = ()


CASES = {
    "the worker that got the prefix": Case(
        (("b", (1, 2, 3)),), (1, 2, 3, 4), {"a": 0, "b": 0}, "b"
    ),
    "the longest leading run wins": Case(
        (("a", (1, 2)), ("b", (1, 2, 3))), (1, 2, 3, 9), {"a": 0, "b": 0, "c": 0}, "b"
    ),
    "leading only: a later block alone is no match": Case(
        (("b", (7, 2, 3)),), (1, 2, 3), {"a": 0, "b": 1}, "a"
    ),
    "within the imbalance the cache wins": Case((("b", (1, 2)),), (1, 2), {"a": 0, "b": 4}, "b"),
    "beyond the imbalance the load wins": Case((("b", (1, 2)),), (1, 2), {"a": 0, "b": 5}, "a"),
    "a tighter bound": Case(
        (("b", (1, 2)),), (1, 2), {"a": 0, "b": 1}, "a", (("max_imbalance", 0),)
    ),
    "too short a match counts as none": Case(
        (("b", (1, 9)),), (1, 2, 3), {"a": 0, "b": 1}, "a", (("min_match_blocks", 2),)
    ),
    "no hashes: the least loaded": Case((("b", (1, 2)),), (), {"a": 3, "b": 2, "c": 5}, "b"),
    "no match: the least loaded": Case((("b", (1, 2)),), (8, 9), {"a": 3, "b": 4, "c": 1}, "c"),
    "equal matches: the less loaded": Case(
        (("a", (1, 2)), ("b", (1, 2))), (1, 2), {"a": 2, "b": 1, "c": 0}, "b"
    ),
    "the index forgets the least recently sent": Case(
        (("b", (1, 2)), ("b", (5, 6, 7))), (1, 2), {"a": 0, "b": 1}, "a", (("index_blocks", 3),)
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_prefix_affinity_cases(case: Case) -> None:
    s = make_placement("prefix_affinity", dict(case.params))
    assert isinstance(s, PrefixAffinity)
    for worker, hashes in case.history:
        s._remember(worker, hashes)
    assert place(s, case.hashes, case.loads) == case.expected


def test_placing_remembers_where_the_blocks_went() -> None:
    s = PrefixAffinity()
    first = place(s, (1, 2, 3), {"a": 0, "b": 0, "c": 0}, seed=1)
    assert s.matched(first, (1, 2, 3, 4)) == 3
    assert all(s.matched(w, (1,)) == 0 for w in "abc" if w != first)
    # The next turn of the conversation follows it even when others are idle.
    assert place(s, (1, 2, 3, 4), {"a": 1, "b": 1, "c": 1} | {first: 2}) == first
    assert s.matched(first, (1, 2, 3, 4)) == 4


def test_parameters_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="max_imbalance"):
        make_placement("prefix_affinity", {"max_imbalance": -1})
    with pytest.raises(ValueError, match="index_blocks"):
        make_placement("prefix_affinity", {"index_blocks": 0})
    with pytest.raises(ValueError, match="unknown parameter 'block_size'"):
        make_placement("prefix_affinity", {"block_size": 16})
    config = CoreConfig(placement="prefix_affinity", placement_params={"max_imbalance": 2})
    assert config.placement == "prefix_affinity"


def test_a_multi_turn_chat_stays_on_one_worker() -> None:
    """Real prompts: each turn's text starts with the previous turn's."""
    s = PrefixAffinity()
    root = prefix_root("m")
    text = "system prompt " * 20
    workers = {"a": 0, "b": 0, "c": 0, "d": 0}
    served = []
    for turn in range(6):
        text += f" user turn {turn} " + "words " * 30
        hashes = block_hashes(word_token_ids(text), 16, root)
        served.append(place(s, hashes, workers, seed=turn))
        text += " assistant answer " * 5
    assert len(set(served)) == 1


candidate_loads = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 12), min_size=1
)


@settings(max_examples=200, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e"]), st.lists(st.integers(0, 6), max_size=6)
        ),
        max_size=8,
    ),
    hashes=st.lists(st.integers(0, 6), max_size=6),
    loads=candidate_loads,
    imbalance=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_never_beyond_the_load_bound_and_always_the_best_match(
    history: list[tuple[str, list[int]]],
    hashes: list[int],
    loads: dict[str, int],
    imbalance: int,
    seed: int,
) -> None:
    s = PrefixAffinity(max_imbalance=imbalance)
    for worker, placed in history:
        s._remember(worker, tuple(placed))
    matches = {w: s.matched(w, tuple(hashes)) for w in loads}
    chosen = place(s, tuple(hashes), loads, seed)
    least = min(loads.values())
    assert loads[chosen] <= least + imbalance
    eligible = [w for w in loads if loads[w] <= least + imbalance]
    best = max(matches[w] for w in eligible)
    if best >= 1 and hashes:
        assert matches[chosen] == best
    else:
        assert loads[chosen] == least
    # Deterministic: a copy with the same history and seed chooses the same.
    twin = PrefixAffinity(max_imbalance=imbalance)
    for worker, placed in history:
        twin._remember(worker, tuple(placed))
    assert place(twin, tuple(hashes), loads, seed) == chosen
