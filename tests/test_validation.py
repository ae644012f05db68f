"""The simulator against numbers no one here chose: queueing theory.

(The GPU profiles are checked against LambdaLabs' and Splitwise's
measurements in test_profiles.py, and the Mooncake prefix reuse in
test_traces.py.)

:mod:`haif.analysis.queueing` runs the simulator as M/M/c and M/D/1 queues
and puts each result in a 95 % interval narrower than 2 %; the closed forms
are checked here against textbook values, the interval logic against
samples whose mean is known, and the simulator against the closed forms
(``slow``: about a minute for the quick points, five for the full grid).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from haif.analysis.queueing import (
    GRID,
    POWER,
    QueueingCheck,
    QueueingPoint,
    erlang_c,
    judge,
    md1_mean_wait,
    mg1_mean_wait,
    mmc_mean_wait,
    replication_interval,
)
from haif.analysis.stats import describe


def erlang_c_by_factorials(c: int, a: float) -> float:
    """Erlang C from its textbook sum (an implementation independent of the module's)."""
    rho = a / c
    top = a**c / math.factorial(c) / (1 - rho)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize(
    ("lam", "mu", "c", "wait"),
    [
        # M/M/1: Wq = rho / (mu - lambda).
        (0.5, 1.0, 1, 0.5 / 0.5),
        (0.9, 1.0, 1, 0.9 / 0.1),
        (8.0, 10.0, 1, 0.8 / 2.0),
        # M/M/2, a = 1: P0 = 1/3, C = 1/3, Wq = C / (2 mu - lambda) = 1/3.
        (1.0, 1.0, 2, 1 / 3),
        # M/M/3, a = 2: P0 = 1/9, C = 4/9, Wq = C / (3 - 2) = 4/9.
        (2.0, 1.0, 3, 4 / 9),
        # M/M/2 with lambda = 3, mu = 2 (a = 1.5, rho = 0.75): P0 = 1/7,
        # C = 9/14, Wq = C / (4 - 3) = 9/14.
        (3.0, 2.0, 2, 9 / 14),
    ],
)
def test_mmc_mean_wait_textbook_values(lam: float, mu: float, c: int, wait: float) -> None:
    assert mmc_mean_wait(lam, mu, c) == pytest.approx(wait, rel=1e-12)


@pytest.mark.parametrize(
    ("c", "a"), [(1, 0.5), (2, 1.0), (4, 3.2), (16, 8.0), (16, 15.2), (50, 45)]
)
def test_erlang_c_matches_the_factorial_sum(c: int, a: float) -> None:
    assert erlang_c(c, a) == pytest.approx(erlang_c_by_factorials(c, a), rel=1e-10)


def test_erlang_c_one_server_is_rho() -> None:
    for rho in (0.1, 0.5, 0.95):
        assert erlang_c(1, rho) == pytest.approx(rho, rel=1e-12)


@pytest.mark.parametrize(
    ("lam", "service_s", "wait"),
    [
        # M/D/1: Wq = rho D / (2 (1 - rho)).
        (0.5, 1.0, 0.5 / (2 * 0.5)),
        (0.7, 1.0, 0.7 / 0.6),
        (0.9, 1.0, 4.5),
        (9.0, 0.1, 0.9 * 0.1 / 0.2),
    ],
)
def test_md1_mean_wait_textbook_values(lam: float, service_s: float, wait: float) -> None:
    assert md1_mean_wait(lam, service_s) == pytest.approx(wait, rel=1e-12)


def test_pollaczek_khinchine_spans_deterministic_to_exponential() -> None:
    for rho in (0.3, 0.8, 0.95):
        mm1 = mmc_mean_wait(rho, 1.0, 1)
        assert mg1_mean_wait(rho, 1.0, 1.0) == pytest.approx(mm1, rel=1e-12)
        assert md1_mean_wait(rho, 1.0) == pytest.approx(mm1 / 2, rel=1e-12)


def test_unstable_queues_are_refused() -> None:
    with pytest.raises(ValueError, match="unstable"):
        mmc_mean_wait(2.0, 1.0, 2)
    with pytest.raises(ValueError, match="unstable"):
        md1_mean_wait(1.0, 1.5)
    with pytest.raises(ValueError, match="one server"):
        QueueingPoint(2, 0.5, "fixed", ("wait",), 10, 1000, 1)


def test_grid_seeds_never_repeat() -> None:
    seeds = [p.seed + r for p in GRID for r in range(p.replications)]
    assert len(seeds) == len(set(seeds))
    assert any(p.quick for p in GRID)


# ------------------------------------------------------------------ intervals


def test_plain_interval_is_the_student_t_interval() -> None:
    values = [1.0, 1.2, 0.9, 1.1, 1.05]
    est = replication_interval(values)
    stat = describe(values)
    assert est.mean == pytest.approx(stat.mean)
    assert est.half_width == pytest.approx(stat.ci95)
    assert est.df == 4


def test_interval_rejects_a_wrong_formula() -> None:
    """Samples whose mean is 1.05: a formula of 1.0 lies outside, 1.05 inside."""
    rng = np.random.default_rng(7)
    values = list(rng.normal(1.05, 0.01, size=20))
    wrong = judge("synthetic", "mean", 1.0, values, customers=20)
    assert wrong.powered
    assert not wrong.within
    assert wrong.high < 1.0 or wrong.low > 1.0
    right = judge("synthetic", "mean", 1.05, values, customers=20)
    assert right.powered and right.within


def test_interval_too_wide_is_not_powered() -> None:
    rng = np.random.default_rng(8)
    row = judge("synthetic", "mean", 1.0, list(rng.normal(1.0, 0.2, size=10)), customers=10)
    assert row.rel_half_width > POWER
    assert not row.powered


def test_control_variates_narrow_the_interval_and_expose_bad_inputs() -> None:
    """y depends on a control x of known mean 0: the regression removes that part."""
    rng = np.random.default_rng(9)
    x = rng.normal(0.0, 1.0, size=30)
    y = 2.0 + 0.5 * x + rng.normal(0.0, 0.01, size=30)
    row = judge("synthetic", "mean", 2.0, list(y), [(list(x), 0.0)], customers=30)
    assert row.within and row.powered
    assert row.rel_half_width < row.raw_rel_half_width / 10
    assert abs(row.control_z[0]) < 4
    # The same response with the control's realized mean far from its known
    # one: the estimate is pulled to the known mean, and control_z says so.
    shifted = judge("synthetic", "mean", 2.0, list(y + 0.5), [(list(x + 1.0), 0.0)], customers=30)
    assert shifted.within
    assert shifted.raw_estimate == pytest.approx(row.raw_estimate + 0.5)
    assert abs(shifted.control_z[0]) > 4


def test_too_few_replications_for_the_controls() -> None:
    with pytest.raises(ValueError, match="degree of freedom"):
        replication_interval([1.0, 2.0, 3.0], [([0.1, 0.2, 0.3], 0.0), ([1.0, 0.0, 1.0], 0.5)])


# ------------------------------------------------------------------ the simulator


def assert_rows_hold(rows: list[QueueingCheck]) -> None:
    report = "\n".join(row.line() for row in rows)
    print(report)  # pytest -rP shows it
    for row in rows:
        assert row.within, f"formula outside the 95 % interval:\n{report}"
        assert row.powered or not row.sized, f"interval not under {POWER:.0%}:\n{report}"
        # The controls correct for chance in the inputs only: the inputs' own
        # means must agree with the scenario's (|z| < 4: 1 in 15,000 by chance).
        assert all(abs(z) < 4 for z in row.control_z), f"inputs off:\n{report}"


@pytest.mark.slow
def test_quick_points_match_queueing_theory(quick_queueing: list[QueueingCheck]) -> None:
    """M/M/1 at rho 0.5 (mean wait) and M/M/16 at rho 0.95 (P(wait)), about a minute.

    The full grid (about five minutes) runs in CI as ``haif validate``, which exits 1
    on the same conditions (:attr:`haif.analysis.validation.Check.passed`)."""
    assert {row.name for row in quick_queueing} == {p.name for p in GRID if p.quick}
    assert all(row.sized for row in quick_queueing)
    assert_rows_hold(quick_queueing)


def test_the_validate_gate_fails_on_each_condition() -> None:
    """haif validate's exit code: a formula outside its interval, an interval wider than
    it was sized for, or inputs off their known means each fail the row."""
    from haif.analysis.validation import queueing_rows

    good = judge(
        "M/M/1 rho=0.50",
        "mean wait in queue",
        1.0,
        [1.0, 1.001, 0.999, 1.0005, 0.9995],
        customers=5,
    )
    assert good.within and good.powered
    wrong = dataclasses.replace(good, formula=1.05, within=False)
    wide = dataclasses.replace(good, powered=False)
    unsized = dataclasses.replace(good, powered=False, sized=False)
    strayed = dataclasses.replace(good, control_z=(4.5,))
    rows = queueing_rows([good, wrong, wide, unsized, strayed])
    assert [r.passed for r in rows] == [True, False, False, True, False]
    assert [r.within for r in rows] == [True, False, True, True, True]
