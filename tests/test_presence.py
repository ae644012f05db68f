"""Tests for :mod:`haif.control.presence` with a hand-advanced clock.

Every ``now`` is passed explicitly. The table cases drive one
:class:`Presence` through heartbeats, timer calls and views; the Hypothesis
test checks the heap-and-lazy-refresh implementation against a per-worker
reference written straight from the rule (no heap, no shared state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.contracts import WorkerGone
from haif.control.presence import (
    DEFAULT_HEARTBEAT_S,
    MIN_HEARTBEAT_S,
    Evicted,
    Presence,
    PresenceConfig,
    Rejoined,
)


def after(t: float) -> float:
    """The first instant after ``t``: when a limit at ``t`` is passed."""
    return math.nextafter(t, math.inf)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Beat:
    worker: str
    at: float
    rejoined_after: float | None = None  # expect a Rejoined notice, away this long


@dataclass(frozen=True)
class Timer:
    at: float
    evicted: tuple[str, ...] = ()  # in eviction order


@dataclass(frozen=True)
class View:
    at: float
    stale: tuple[str, ...] | None = None
    fresh: tuple[str, ...] | None = None
    evicted: tuple[str, ...] | None = None
    evictions: int | None = None
    # worker -> (interval judged by, limit); None: not present
    judged: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    next_deadline: float | str | None = "any"  # "any": not checked


Step = Beat | Timer | View

CASES: dict[str, tuple[dict[str, Any], list[Step]]] = {
    "default interval until the second heartbeat": (
        {},
        [
            Beat("w", 0.0),
            View(0.0, judged={"w": (DEFAULT_HEARTBEAT_S, 1.5)}, next_deadline=after(1.5)),
            View(0.75, stale=(), fresh=("w",)),
            View(after(0.75), stale=("w",), fresh=()),
            Timer(1.5),  # exactly at the limit: not silent for *more* than 3 intervals
            Timer(after(1.5), evicted=("w",)),
            View(2.0, stale=(), fresh=(), evicted=("w",), evictions=1, judged={"w": None}),
            View(2.0, next_deadline=None),
        ],
    ),
    "the second gap is the estimate": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 0.25),
            View(0.25, judged={"w": (0.25, 1.0)}),
            Timer(1.0),
            Timer(after(1.0), evicted=("w",)),
        ],
    ),
    "later gaps move the estimate by 0.7 / 0.3": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 1.0),
            Beat("w", 2.5),  # 0.7 * 1 + 0.3 * 1.5 = 1.15
            View(2.5, judged={"w": (1.15, 2.5 + 3 * 1.15)}),
            Beat("w", 3.5),  # 0.7 * 1.15 + 0.3 * 1 = 1.105
            View(3.5, judged={"w": (0.7 * 1.15 + 0.3 * 1.0, 3.5 + 3 * (0.7 * 1.15 + 0.3))}),
        ],
    ),
    "a stall short of eviction counts two intervals": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 1.0),
            Timer(3.5),
            Beat("w", 3.875),  # silent 2.875 s of the 3 allowed; counts as 2: 0.7 + 0.6
            View(3.875, evictions=0, judged={"w": (1.3, 3.875 + 3 * 1.3)}),
        ],
    ),
    "a gap over twice the estimate is capped": (
        {"evict_after_missed": 20},
        [
            Beat("w", 0.0),
            Beat("w", 1.0),
            Beat("w", 11.0),  # gap 10 counts as 2: 0.7 + 0.6
            View(11.0, judged={"w": (1.3, 11.0 + 20 * 1.3)}),
        ],
    ),
    "no worker is judged by less than the minimum": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 0.01),
            View(0.01, judged={"w": (MIN_HEARTBEAT_S, 0.01 + 3 * MIN_HEARTBEAT_S)}),
        ],
    ),
    "a repeated heartbeat at the same instant changes no estimate": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 0.0),
            View(0.0, judged={"w": (DEFAULT_HEARTBEAT_S, 1.5)}),
            Beat("w", 0.5),
            View(0.5, judged={"w": (0.5, 2.0)}),
        ],
    ),
    "a heartbeat exactly at the limit keeps the worker": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 1.5),  # silent exactly 3 x 0.5 s
            Timer(after(1.5)),
            View(1.5, evicted=(), evictions=0, judged={"w": (1.5, 1.5 + 4.5)}),
        ],
    ),
    "an evicted worker rejoins with a fresh estimate": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 0.5),
            Timer(2.5, evicted=("w",)),
            View(2.5, evicted=("w",), judged={"w": None}),
            Beat("w", 4.0, rejoined_after=1.5),
            View(4.0, evicted=(), fresh=("w",), evictions=1, judged={"w": (0.5, 5.5)}),
            Beat("w", 5.0),  # not a rejoin: it is present
            View(5.0, judged={"w": (1.0, 8.0)}),
        ],
    ),
    "evict after one missed interval": (
        {"evict_after_missed": 1},
        [
            Beat("w", 0.0),
            Beat("w", 0.5),
            View(0.5, judged={"w": (0.5, 1.0)}, next_deadline=after(0.5)),
            Timer(after(0.5)),  # the first heartbeat's limit: it beat since
            View(0.5, next_deadline=after(1.0)),
            Timer(after(1.0), evicted=("w",)),
        ],
    ),
    "a shrinking estimate moves the deadline earlier": (
        {},
        [
            Beat("w", 0.0),  # limit 1.5
            Beat("w", 0.125),  # estimate 0.125: limit 0.5
            View(0.125, next_deadline=after(0.5)),
            Timer(after(0.5), evicted=("w",)),
        ],
    ),
    "a later limit is watched lazily": (
        {},
        [
            Beat("w", 0.0),
            Beat("w", 1.0),  # limit 4: later than its entry (1.5), nothing pushed
            Beat("w", 2.0),  # limit 5
            View(2.0, next_deadline=after(1.5)),
            Timer(after(1.5)),  # nothing to do; the next deadline is the live limit
            View(2.0, next_deadline=after(5.0), evictions=0),
            Timer(after(5.0), evicted=("w",)),
        ],
    ),
    "several workers, each on its own interval": (
        {},
        [
            Beat("a", 0.0),
            Beat("b", 0.0),
            Beat("c", 0.0),
            Beat("a", 0.25),  # a: 0.25 (limit 1.0)
            Beat("b", 1.0),  # b: 1.0 (limit 4.0)
            Beat("c", 1.0),
            Beat("c", 1.5),  # c: 0.7 + 0.15 = 0.85 (limit 1.5 + 2.55 = 4.05)
            View(1.5, stale=("a",), fresh=("b", "c"), next_deadline=after(1.0)),
            Timer(after(1.0), evicted=("a",)),
            View(3.0, stale=("b", "c"), fresh=(), next_deadline=after(4.0)),
            Timer(5.0, evicted=("b", "c")),  # a late call evicts both, earliest first
            View(5.0, evicted=("a", "b", "c"), evictions=3, next_deadline=None),
        ],
    ),
}


def run_case(config: dict[str, Any], steps: list[Step]) -> None:
    presence = Presence(PresenceConfig(**config))
    for i, step in enumerate(steps):
        where = f"step {i}: {step}"
        if isinstance(step, Beat):
            notice = presence.heartbeat(step.worker, step.at)
            if step.rejoined_after is None:
                assert notice is None, where
            else:
                assert notice == Rejoined(step.worker, step.at, step.rejoined_after), where
        elif isinstance(step, Timer):
            evicted = presence.on_timer(step.at)
            assert tuple(e.worker_id for e in evicted) == step.evicted, where
            assert all(e.at_s == step.at for e in evicted), where
        else:
            if step.stale is not None:
                assert tuple(presence.stale(step.at)) == step.stale, where
            if step.fresh is not None:
                assert tuple(presence.fresh(step.at)) == step.fresh, where
            if step.evicted is not None:
                assert tuple(presence.evicted()) == step.evicted, where
            if step.evictions is not None:
                assert presence.evictions == step.evictions, where
            for wid, judged in step.judged.items():
                if judged is None:
                    assert wid not in presence and presence.interval(wid) is None, where
                    assert presence.last_seen(wid) is None and presence.limit(wid) is None
                else:
                    assert wid in presence, where
                    assert presence.interval(wid) == pytest.approx(judged[0]), where
                    assert presence.limit(wid) == pytest.approx(judged[1]), where
            if step.next_deadline != "any":
                assert presence.next_deadline() == step.next_deadline, where


@pytest.mark.parametrize("name", list(CASES))
def test_presence_table(name: str) -> None:
    config, steps = CASES[name]
    run_case(config, steps)


def test_eviction_notice_carries_the_judgement() -> None:
    presence = Presence()
    presence.heartbeat("w", 10.0)
    presence.heartbeat("w", 10.5)
    (notice,) = presence.on_timer(13.0)
    assert notice == Evicted("w", 13.0, 2.5, 0.5)
    assert notice.gone == WorkerGone("w")
    assert presence.present() == [] and len(presence) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"evict_after_missed": 0}, "evict_after_missed must be >= 1, got 0"),
        ({"stale_after_missed": 0.0}, "stale_after_missed must be > 0"),
        ({"default_interval_s": -1.0}, "default_interval_s must be > 0"),
        ({"min_interval_s": 0.0}, "min_interval_s must be > 0"),
    ],
)
def test_config_is_validated_once(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PresenceConfig(**kwargs)


def test_defaults_are_the_runtime_orchestrators() -> None:
    config = PresenceConfig()
    assert (config.evict_after_missed, config.stale_after_missed) == (3, 1.5)
    assert (config.default_interval_s, config.min_interval_s) == (0.5, 0.05)


def test_heartbeats_do_not_grow_the_heap() -> None:
    """Steady heartbeats push nothing: the hot path is O(1); entries refresh lazily."""
    presence = Presence()
    workers = [f"w{i}" for i in range(50)]
    t = 0.0
    for step in range(200):
        for j, wid in enumerate(workers):
            now = step * 1.0 + j / 100
            presence.heartbeat(wid, now)
            t = now
        deadline = presence.next_deadline()
        assert deadline is not None
        if deadline <= t:
            assert presence.on_timer(deadline) == []
    assert len(presence._heap) <= 2 * len(workers)
    assert presence.evictions == 0


# ---------------------------------------------------------------- Hypothesis


def reference_evictions(
    beats: list[tuple[float, str]], end: float, config: PresenceConfig
) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """(time, worker) evictions and rejoins, worker by worker, from the rule alone."""
    k = config.evict_after_missed
    evictions: list[tuple[float, str]] = []
    rejoins: list[tuple[float, str]] = []
    for wid in sorted({w for _, w in beats}):
        times = [t for t, w in beats if w == wid]
        seen: float | None = None
        est: float | None = None
        evicted = False
        for t in times:
            if seen is not None:
                judged = max(
                    config.min_interval_s, config.default_interval_s if est is None else est
                )
                limit = seen + k * judged
                if t > after(limit):  # the timer at after(limit) came first
                    evictions.append((after(limit), wid))
                    seen, est, evicted = None, None, True
            if seen is None:
                if evicted:
                    rejoins.append((t, wid))
                seen, est, evicted = t, None, False
                continue
            gap = t - seen
            if gap > 0:
                est = gap if est is None else 0.7 * est + 0.3 * min(gap, 2 * est)
            seen = t
        if seen is not None:
            judged = max(config.min_interval_s, config.default_interval_s if est is None else est)
            if after(seen + k * judged) <= end:
                evictions.append((after(seen + k * judged), wid))
    return sorted(evictions), sorted(rejoins)


gaps = st.one_of(
    st.just(0.0),
    st.floats(0.001, 0.2),
    st.floats(0.2, 3.0),
    st.sampled_from([0.25, 0.5, 1.0, 1.5]),
)


@settings(max_examples=300, deadline=None)
@given(
    schedule=st.lists(st.tuples(gaps, st.sampled_from("abcd")), min_size=1, max_size=60),
    tail=st.floats(0.0, 10.0),
    missed=st.integers(1, 4),
)
def test_timer_driven_presence_matches_the_rule(
    schedule: list[tuple[float, str]], tail: float, missed: int
) -> None:
    config = PresenceConfig(evict_after_missed=missed)
    presence = Presence(config)
    beats: list[tuple[float, str]] = []
    t = 0.0
    for gap, wid in schedule:
        t += gap
        beats.append((t, wid))
    end = t + tail

    evictions: list[tuple[float, str]] = []
    rejoins: list[tuple[float, str]] = []

    def run_timers(until: float, *, inclusive: bool) -> None:
        while True:
            deadline = presence.next_deadline()
            if deadline is None or deadline > until or (deadline == until and not inclusive):
                return
            for notice in presence.on_timer(deadline):
                assert notice.at_s == deadline
                evictions.append((deadline, notice.worker_id))

    for now, wid in beats:
        run_timers(now, inclusive=False)  # a heartbeat at a deadline goes first
        # The timer is never late: no present worker is past its limit (one
        # whose eviction is due at this very instant waits for the heartbeat).
        for w in presence.present():
            limit = presence.limit(w)
            assert limit is not None and after(limit) >= now
        notice = presence.heartbeat(wid, now)
        if notice is not None:
            rejoins.append((now, wid))
    run_timers(end, inclusive=True)

    want_evictions, want_rejoins = reference_evictions(beats, end, config)
    assert sorted(evictions) == want_evictions
    assert sorted(rejoins) == want_rejoins
    assert presence.evictions == len(evictions)
    assert set(presence.evicted()) | set(presence.present()) == {w for _, w in beats}
    assert not set(presence.evicted()) & set(presence.present())
    assert sorted(presence.fresh(end) + presence.stale(end)) == presence.present()
