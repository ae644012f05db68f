"""Means over seeds, their 95 % confidence intervals, and when to name a winner.

Shared by ``haif sweep`` (:mod:`haif.analysis.sweep`) and the placement
notebook (``notebooks/compare_placement.ipynb``), so both state and apply
one rule.

:func:`describe` gives n, the mean, the sample standard deviation and the
half-width of a 95 % confidence interval for the mean, ``t(0.975, n-1) *
std / sqrt(n)`` (Student t; :func:`t_quantile_975`). With a single value
there is no spread to estimate: std and half-width are reported as 0.

:func:`clear_winner` applies the rule for naming a winner among several
alternatives (grid points, policies) on one metric:

    The alternative with the best mean wins only if its 95 % confidence
    interval does not overlap the interval of any other alternative (every
    alternative measured over at least two seeds). Otherwise there is no
    clear winner, and the alternatives whose intervals overlap the best
    one's are the contenders.

Intervals that touch count as overlapping; so do equal means with zero-width
intervals (a tie).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Better = Literal["higher", "lower"]

RULE = (
    "the alternative with the best mean wins only if its 95 % confidence interval "
    "(Student t over the seeds) overlaps no other alternative's interval; otherwise "
    "there is no clear winner"
)
"""The winner rule in one sentence, for reports."""

_T975: tuple[float, ...] = (
    12.706204736,
    4.302652730,
    3.182446305,
    2.776445105,
    2.570581836,
    2.446911851,
    2.364624252,
    2.306004135,
    2.262157163,
    2.228138852,
    2.200985160,
    2.178812830,
    2.160368656,
    2.144786688,
    2.131449546,
    2.119905299,
    2.109815578,
    2.100922040,
    2.093024054,
    2.085963447,
    2.079613845,
    2.073873068,
    2.068657610,
    2.063898562,
    2.059538553,
    2.055529439,
    2.051830516,
    2.048407142,
    2.045229642,
    2.042272456,
)
"""t(0.975, df) for df = 1..30 (the two-sided 95 % quantile of Student's t)."""

_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom.

    df 1..30: the tabulated value (9 decimals). Beyond: the Cornish-Fisher
    expansion around the normal quantile (Abramowitz & Stegun 26.7.5, four
    terms), within 1e-6 of the exact value from df 30 on and tending to
    1.95996 as df grows. (scipy is not a dependency.)
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class Stat:
    """One metric over the seeds of one alternative (``None`` when no value is known)."""

    n: int
    mean: float | None
    std: float | None
    ci95: float | None  # half-width of the 95 % confidence interval of the mean


def describe(values: Sequence[float]) -> Stat:
    """n, mean, sample std and 95 % CI half-width (0 and 0 for a single value)."""
    n = len(values)
    if n == 0:
        return Stat(0, None, None, None)
    mean = statistics.fmean(values)
    if n == 1:
        return Stat(1, mean, 0.0, 0.0)
    std = statistics.stdev(values)
    return Stat(n, mean, std, t_quantile_975(n - 1) * std / math.sqrt(n))


Reason = Literal["separated", "overlap", "tie", "one seed", "no data", "no direction"]


@dataclass(frozen=True)
class Verdict:
    """What :func:`clear_winner` concluded for one metric.

    ``winner``: the clear winner, or ``None``. ``best``: the alternative with
    the best mean (the first one in order on a tie; ``None`` without a
    direction or data). ``contenders``: ``best`` and every alternative whose
    interval overlaps its interval, in the given order (just the winner when
    there is one). ``reason``: ``separated`` (a winner), ``overlap``,
    ``tie`` (every known mean equal), ``one seed`` (an alternative has fewer
    than two values: no interval), ``no data`` (fewer than two alternatives
    with a value) or ``no direction`` (the metric is neither better higher
    nor lower).
    """

    winner: str | None
    best: str | None
    contenders: tuple[str, ...]
    reason: Reason


def _known(stat: Stat) -> bool:
    return stat.mean is not None and not math.isnan(stat.mean)


def clear_winner(stats: Mapping[str, Stat], better: Better | None) -> Verdict:
    """Apply the rule of the module docstring to one metric's statistics per alternative."""
    if better is None:
        return Verdict(None, None, (), "no direction")
    known = {label: s for label, s in stats.items() if _known(s)}
    if len(known) < 2:
        return Verdict(None, None, (), "no data")
    sign = 1.0 if better == "higher" else -1.0

    def score(label: str) -> float:
        mean = known[label].mean
        assert mean is not None
        return sign * mean

    best = max(known, key=score)  # the first of equal scores
    if all(score(label) == score(best) for label in known):
        return Verdict(None, best, tuple(known), "tie")

    def interval(stat: Stat) -> tuple[float, float]:
        assert stat.mean is not None
        half = stat.ci95 or 0.0
        return stat.mean - half, stat.mean + half

    lo, hi = interval(known[best])
    overlapping = []
    for label, stat in known.items():
        if label == best:
            continue
        other_lo, other_hi = interval(stat)
        separated = lo > other_hi if better == "higher" else hi < other_lo
        if not separated:
            overlapping.append(label)
    contenders = tuple(label for label in known if label == best or label in overlapping)
    if any(s.n < 2 for s in known.values()):
        return Verdict(None, best, contenders, "one seed")
    if overlapping:
        return Verdict(None, best, contenders, "overlap")
    return Verdict(best, best, (best,), "separated")
