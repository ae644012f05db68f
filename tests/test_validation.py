"""The simulator against numbers no one here chose: queueing theory.

(The GPU profiles are checked against LambdaLabs' and Splitwise's
measurements in test_profiles.py, and the Mooncake prefix reuse in
test_traces.py.)
"""

from __future__ import annotations

import math

import pytest

from haif.sim.driver import run_scenario
from haif.sim.scenario import Scenario


def erlang_c_wait(lam: float, mu: float, c: int) -> float:
    """Mean time in queue of an M/M/c queue (Erlang C)."""
    a = lam / mu
    rho = a / c
    top = a**c / math.factorial(c) / (1 - rho)
    p_wait = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    return p_wait / (c * mu - lam)


@pytest.mark.parametrize(("lam", "c"), [(8.0, 10), (3.4, 4)])
def test_mmc_mean_wait_matches_erlang_c(lam: float, c: int) -> None:
    mu = 1.0
    scenario = Scenario.model_validate(
        {
            "name": "mmc",
            "seed": 11,
            "duration_s": 12_000,
            "drain_s": 600,
            "regions": ["r"],
            "workers": [
                {
                    "region": "r",
                    "capacity": c,
                    "service": {"kind": "exponential", "mean_s": 1 / mu, "ttft_s": 0.0},
                }
            ],
            "workload": {"kind": "poisson", "rate": lam},
            "store": {"write_latency_ms": 0.0},
            "policy": {
                # Nothing may refuse or reorder work: a plain FIFO M/M/c server.
                "max_queue_factor": 10_000,
                "shedding": {"thresholds": [1e9]},
                "throttle": {"enabled": False},
                "attempt_timeout_s": None,
            },
        }
    )
    result = run_scenario(scenario)
    ok = [r for r in result.records if r.status == "ok"]
    assert len(ok) == len(result.records) > lam * 11_000
    # With ttft_s = 0 the first token marks the start of service.
    waits = [r.first_token_s - r.arrival_s for r in ok if r.first_token_s is not None]
    mean_wait = sum(waits) / len(waits)
    expected = erlang_c_wait(lam, mu, c)
    assert mean_wait == pytest.approx(expected, rel=0.05), (mean_wait, expected)
