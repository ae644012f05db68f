"""Each fault kind of a scenario, seeded, on a small two-region fleet."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from haif.contracts import Dispatch, Submit
from haif.fleet.scenario import Scenario, load_scenario
from haif.fleet.targets import scenario_workers
from haif.seeding import derive_rng
from haif.sim.driver import SimResult, run_scenario
from haif.sim.report import served_by_region

ROOT = Path(__file__).resolve().parent.parent


def scenario(faults: list[dict[str, Any]], **extra: Any) -> Scenario:
    base: dict[str, Any] = {
        "name": "faults",
        "seed": 4,
        "duration_s": 300,
        "drain_s": 120,
        "regions": ["a", "b"],
        "workers": [
            {
                "region": "a",
                "count": 3,
                "capacity": 4,
                "service": {"kind": "exponential", "mean_s": 0.5, "ttft_s": 0.05},
            },
            {
                "region": "b",
                "count": 3,
                "capacity": 4,
                "service": {"kind": "exponential", "mean_s": 0.5, "ttft_s": 0.05},
            },
        ],
        "workload": {
            "kind": "poisson",
            "rate": 8,
            "origins": {"a": 0.5, "b": 0.5},
            "timeout_s": 60,
        },
        "faults": faults,
        "policy": {"placement": "p2c", "rtt_ms": {"a": {"b": 60}}, "attempt_timeout_s": 10},
    }
    base.update(extra)
    return Scenario.model_validate(base)


def in_window(result: SimResult, lo: float, hi: float) -> list[Any]:
    return [r for r in result.records if lo <= r.arrival_s < hi]


def test_worker_crash_by_count_restarts_after_delay() -> None:
    fault = {"kind": "worker_crash", "at_s": 100, "restart_s": 60, "region": "a", "count": 2}
    result = run_scenario(scenario([fault]))
    victims = {w for (t0, t1, what) in result.fault_windows for w in [what]}
    assert victims == {"2 worker(s) crash"}
    util = [u for u in result.utilization if 105 <= u[0] < 155]
    idle = {wid for _t, wid, *_ in util} - {wid for _t, wid, _r, _g, busy in util if busy > 0}
    assert len(idle) == 2 and all(w.startswith("a/") for w in idle)
    after = [u for u in result.utilization if u[0] >= 180 and u[1] in idle and u[4] > 0]
    assert after, "crashed workers serve again after the restart"
    ok = sum(r.status == "ok" for r in result.records)
    assert ok / len(result.records) > 0.99  # the retry budget may refuse a few retries
    assert any(r.attempts > 1 and r.status == "ok" for r in result.records)


def test_worker_crash_by_ids_and_bad_ids() -> None:
    ok = scenario([{"kind": "worker_crash", "at_s": 50, "restart_s": 30, "ids": ["b/generic/1.0"]}])
    assert run_scenario(ok).unfinished == 0
    bad = scenario([{"kind": "worker_crash", "at_s": 50, "ids": ["nope"]}])
    from haif.configfile import ConfigError

    with pytest.raises(ConfigError, match=r"faults\.0\.ids: unknown worker"):
        run_scenario(bad)


def test_partition_keeps_each_side_to_itself() -> None:
    fault = {"kind": "partition", "a": "a", "b": "b", "start_s": 100, "end_s": 200}
    result = run_scenario(scenario([fault]), keep_log=True)
    assert result.decisions is not None
    # Once heartbeats across the cut go stale (3 s), a's orchestrator places nothing in b.
    cross = [
        d for t, d in result.decisions["a"] if 105 <= t < 200 and getattr(d, "region", None) == "b"
    ]
    assert cross == []
    before = [d for t, d in result.decisions["a"] if t < 100 and getattr(d, "region", None) == "b"]
    assert before, "without the cut, a's orchestrator does use b's workers"
    assert sum(r.status == "ok" for r in result.records) / len(result.records) > 0.99


def test_gray_failure_slows_only_the_victims() -> None:
    fault = {
        "kind": "gray_failure",
        "region": "a",
        "count": 1,
        "factor": 6,
        "start_s": 50,
        "end_s": 250,
    }
    result = run_scenario(scenario([fault], workload={"kind": "poisson", "rate": 4}))
    during = [r for r in in_window(result, 60, 240) if r.status == "ok"]
    by_worker: dict[str, list[float]] = {}
    for r in during:
        assert r.worker_id is not None
        by_worker.setdefault(r.worker_id, []).append(r.finish_s - r.arrival_s)
    means = sorted((sum(v) / len(v), w) for w, v in by_worker.items())
    slowest, victim = means[-1]
    assert victim.startswith("a/")
    assert slowest > 3 * means[-2][0]


def test_store_outage_fails_reservations_then_recovers() -> None:
    fault = {"kind": "store_outage", "start_s": 100, "end_s": 130}
    result = run_scenario(scenario([fault]))
    during = in_window(result, 102, 125)
    assert during and all(r.status != "ok" for r in during)
    assert {r.reason for r in during} <= {
        "attempts_exhausted:store_unavailable",
        "budget_exhausted:store_unavailable",
    }
    after = in_window(result, 140, 300)
    assert after and all(r.status == "ok" for r in after)


def test_gateway_down_clients_fail_over() -> None:
    fault = {"kind": "gateway_down", "region": "a", "start_s": 100, "end_s": 200}
    result = run_scenario(scenario([fault]), keep_log=True)
    assert result.events is not None
    submits_b = [
        (t, e.request.origin_region) for t, e in result.events["b"] if isinstance(e, Submit)
    ]
    assert all(origin == "b" for t, origin in submits_b if t < 100)
    moved = [t for t, origin in submits_b if origin == "a"]
    assert moved and min(moved) >= 100 and max(moved) < 201
    assert all(r.status == "ok" for r in result.records)
    # Until clients notice (failover_delay_s = 5 s), they wait at least the connect timeout.
    noticed = [r for r in in_window(result, 100, 104) if r.origin_region == "a"]
    assert noticed and all(r.finish_s - r.arrival_s >= 1.0 for r in noticed)


def failures_by_the_rule(
    sc: Scenario, per_gpu_hour: float, restart_s: float, end_s: float
) -> list[tuple[float, str]]:
    """Random failures written out from the rule, not from the simulator:
    each (single-GPU) worker fails after an exponential wait at its rate,
    drawn from its own stream ``random_failures:<worker id>``, stays down
    ``restart_s``, then waits again."""
    out = []
    for wid, _, _ in scenario_workers(sc):
        rng = derive_rng(sc.seed, f"random_failures:{wid}")
        t = 0.0
        while (t := t + rng.expovariate(per_gpu_hour / 3600.0)) < end_s:
            out.append((t, wid))
            t += restart_s
    return sorted(out)


def simulated_failures(result: SimResult) -> list[tuple[float, str]]:
    return sorted(
        (t0, what.removesuffix(" failed"))
        for t0, _, what in result.fault_windows
        if what.endswith(" failed")
    )


def test_random_failures_from_a_per_gpu_hour_rate() -> None:
    sc = scenario([], random_failures={"per_gpu_hour": 30.0, "restart_s": 20})
    result = run_scenario(sc)
    got = simulated_failures(result)
    expected = failures_by_the_rule(sc, 30.0, 20.0, result.end_s)
    # Exactly these failures, at these times (seeded): 12 in the 301.5 s the
    # run lasts, where the renewal mean (next test) is 6 x (301.5 / 140 - 0.13) = 12.1.
    assert result.end_s == 301.5
    assert [w for _, w in got] == [w for _, w in expected]
    assert [t for t, _ in got] == pytest.approx([t for t, _ in expected], abs=1e-9)
    assert len(got) == 12
    assert sum(r.status == "ok" for r in result.records) / len(result.records) > 0.95


def test_random_failure_count_is_within_its_statistical_interval() -> None:
    """An hour on 6 workers: the count against the rate, whatever the seed.

    Failures of one worker are a renewal process whose gaps are ``restart_s``
    plus an exponential wait of mean 1/rate: mean gap m = 20 + 120 = 140 s,
    sd s = 120 s. Over t seconds the count has mean t/m + (s^2 - m^2)/(2 m^2)
    and variance s^2 t / m^3 (renewal theorem); for 6 workers and t ~ 3600 s
    that is 153.5 +- 10.6, and +-4 sd is [111, 196] (a rate off by 2x gives
    ~83 or ~270 failures).
    """
    sc = scenario(
        [],
        duration_s=3600,
        workload={"kind": "poisson", "rate": 0.2, "origins": {"a": 0.5, "b": 0.5}},
        random_failures={"per_gpu_hour": 30.0, "restart_s": 20},
    )
    result = run_scenario(sc)
    m, s, t = 140.0, 120.0, result.end_s
    mean = 6 * (t / m + (s * s - m * m) / (2 * m * m))
    sd = math.sqrt(6 * s * s * t / m**3)
    assert 3600 <= t < 3700 and 9.5 < sd < 11
    count = len(simulated_failures(result))
    assert abs(count - mean) <= 4 * sd, (count, mean, sd)


@pytest.mark.parametrize("resume", [False, True])
def test_crash_mid_response_resumes_when_the_policy_says_so(resume: bool) -> None:
    sc = load_scenario(
        ROOT / "scenarios" / "failover.yaml",
        [
            "duration_s=400",
            "drain_s=200",
            "faults.0.start_s=150",
            "faults.0.end_s=250",
            f"policy.resume_partial={str(resume).lower()}",
        ],
    )
    result = run_scenario(sc, keep_log=True)
    assert result.decisions is not None
    resumed = {
        d.request_id: t
        for log in result.decisions.values()
        for t, d in log
        if isinstance(d, Dispatch) and d.resume_tokens > 0
    }
    assert bool(resumed) is resume
    records = {r.request_id: r for r in result.records}
    finished = 0
    for rid, dispatched_at in resumed.items():
        rec = records[rid]
        assert rec.attempts > 1
        if rec.status == "ok":  # a resumed request can fail again and exhaust its tries
            finished += 1
            # The client's first token came from the crashed worker, before the retry.
            assert rec.first_token_s is not None and rec.first_token_s < dispatched_at
    assert finished >= len(resumed) / 2, (finished, len(resumed))
    assert served_by_region(result)["during"]["us-east"] == 0
