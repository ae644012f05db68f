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

The module's second part serves ``haif parity`` (:mod:`haif.analysis.parity`): the
relative error of a latency quantile with a bootstrap interval over requests and seeds
(:func:`quantile_errors`), whether that interval supports a bound (:func:`bound_verdict`),
and the Kolmogorov-Smirnov distance between two samples (:func:`ks_distance`); the
section comment above them says how.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

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


# ----------------------------------------------------- quantile errors with bootstrap intervals
#
# ``haif parity`` (:mod:`haif.analysis.parity`) compares latency quantiles of a simulated
# and a live run. One run's p99 rests on a handful of requests, so a relative error alone
# cannot say whether the simulator is within a bound; these functions give the error an
# interval and the two distributions a distance.
#
# :func:`quantile_errors`: for each percentile q, the relative error ``live / sim - 1`` of
# the q-th percentile of the live values against the simulated ones (numpy's linear
# percentile of the values pooled over the runs), and a bootstrap percentile interval of
# that error. A resample first draws as many runs as there are, with replacement (the
# spread between seeds), then, within each drawn run, as many values as that run has, with
# replacement (the spread between requests); with one run it is the ordinary bootstrap
# over requests. Two designs:
#
# - independent (the default): each side is resampled on its own, as two unrelated
#   samples. The interval then includes how far each side's quantile itself would move
#   with another sample of requests.
# - paired: ``sim[i][k]`` and ``live[i][k]`` are one request (run i of both sides is one
#   seed); runs and requests are drawn once and taken from both sides, so the interval
#   is the error's spread over samples of requests that both shells serve. A value a side
#   lacks (a request that failed there) is nan: the request is drawn, and counts on the
#   other side only. Where the two shells agree request by request, the interval is
#   narrow however heavy the tail; where different requests make the tails, it widens.
#
# The interval runs from the ``(1 - level) / 2`` to the ``(1 + level) / 2`` order
# statistic of the resampled errors (no interpolation; a resample that leaves a side with
# no value is left out). The randomness is the ``numpy.random.Generator`` passed in: the
# same generator state and samples give the same interval.
#
# :func:`bound_verdict` reads an error, its interval and a bound: ``supported`` when the
# whole interval lies within +-bound, ``within, interval too wide`` when the point is
# within but the interval crosses the bound, ``outside`` when the point is outside.
#
# :func:`ks_distance`: the two-sample Kolmogorov-Smirnov statistic, the largest gap
# between the two empirical distribution functions (exact, by merging the sorted
# samples); :func:`ks_critical_95` the asymptotic value it exceeds with probability 5 %
# when both samples are independent draws from one distribution.

DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples per interval: each end of a 95 % interval rests on 50 of them."""

SupportVerdict = Literal["supported", "within, interval too wide", "outside", "no data"]

#: Values drawn per block of resamples (bounds the memory of a vectorized block: 8 bytes
#: each, a few arrays of this size at once).
_BLOCK_CELLS = 2_000_000

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class QuantileError:
    """One percentile, simulated and live, with the relative error and its interval."""

    q: float  # percentile, 0..100
    sim: float
    live: float
    error: float  # live / sim - 1 (inf when sim is 0; nan when a side has no value)
    low: float  # the interval's ends
    high: float
    level: float  # the interval's coverage, e.g. 0.95
    n_sim: int  # values pooled over the runs
    n_live: int


def relative_error(sim: float, live: float) -> float:
    """``live / sim - 1``: positive when the live value is the larger (inf when sim is 0)."""
    return (live - sim) / sim if sim > 0 else math.inf


def row_percentiles(rows: FloatArray, counts: IntArray, qs: FloatArray) -> FloatArray:
    """Percentiles ``qs`` of the first ``counts[i]`` values of each sorted row ``i``, shape
    (rows, len(qs)): numpy's default (linear) percentile of those values; nan for a row
    with no value."""
    h = (counts[:, None] - 1) * (qs[None, :] / 100.0)
    lo = np.maximum(np.floor(h).astype(np.int64), 0)
    hi = np.maximum(np.minimum(lo + 1, counts[:, None] - 1), 0)
    x_lo = np.take_along_axis(rows, lo, axis=1)
    x_hi = np.take_along_axis(rows, hi, axis=1)
    # x_lo + t * (x_hi - x_lo), exact where x_lo == x_hi (a constant stays constant).
    value = np.where(x_hi == x_lo, x_lo, x_lo + (h - lo) * (x_hi - x_lo))
    return np.where(counts[:, None] > 0, value, np.nan)


def resampled_percentiles(
    sides: Sequence[Sequence[FloatArray]],
    qs: Sequence[float],
    rng: np.random.Generator,
    resamples: int = DEFAULT_RESAMPLES,
) -> list[FloatArray]:
    """Percentiles ``qs`` of ``resamples`` bootstrap resamples, one (len(qs), resamples)
    array per side. Every side holds one array per run, run i equally long on all sides;
    each resample draws runs with replacement, then positions within each drawn run with
    replacement, and takes those positions from every side (one side: the plain bootstrap;
    two: the paired one). nan values are drawn but not counted."""
    lengths = np.array([r.size for r in sides[0]], dtype=np.int64)
    if not lengths.size or not lengths.min() > 0:
        raise ValueError("every run needs a value to resample")
    for side in sides[1:]:
        if [r.size for r in side] != lengths.tolist():
            raise ValueError("paired sides need runs of equal lengths")
    q = np.asarray(qs, dtype=np.float64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    values = [np.concatenate(side) for side in sides]
    n_runs, width = lengths.size, int(lengths.max())
    slot = np.arange(width)
    out = [np.empty((q.size, resamples)) for _ in sides]
    block = max(1, _BLOCK_CELLS // (n_runs * width))
    for begin in range(0, resamples, block):
        b = min(block, resamples - begin)
        pick = rng.integers(0, n_runs, size=(b, n_runs))  # which runs: the spread over seeds
        n = lengths[pick][..., None]  # (b, runs, 1): each drawn run's size
        # Within each drawn run, n of its positions with replacement; slots past n unused.
        offset = np.minimum((rng.random((b, n_runs, width)) * n).astype(np.int64), n - 1)
        index = starts[pick][..., None] + offset
        used = slot < n
        for pooled, result in zip(values, out, strict=True):
            drawn = np.where(used, pooled[index], np.nan).reshape(b, n_runs * width)
            counts = np.count_nonzero(~np.isnan(drawn), axis=1).astype(np.int64)
            drawn.sort(axis=1)  # nan (unused or missing) last
            result[:, begin : begin + b] = row_percentiles(drawn, counts, q).T
    return out


def _order_interval(values: FloatArray, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` order statistics of the non-nan
    ``values`` (nan, nan when there are none)."""
    ordered = np.sort(values[~np.isnan(values)])
    if not ordered.size:
        return math.nan, math.nan
    last = ordered.size - 1
    low = math.floor((1 - level) / 2 * last)
    high = math.ceil((1 + level) / 2 * last)
    return float(ordered[low]), float(ordered[high])


def _as_runs(samples: Sequence[npt.ArrayLike]) -> list[FloatArray]:
    return [np.asarray(s, dtype=np.float64).ravel() for s in samples]


def quantile_errors(
    sim: Sequence[npt.ArrayLike],
    live: Sequence[npt.ArrayLike],
    qs: Sequence[float],
    rng: np.random.Generator,
    *,
    paired: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
) -> list[QuantileError]:
    """Each percentile in ``qs``: the pooled sim and live values, ``live / sim - 1`` and
    its bootstrap percentile interval (section comment above). ``sim`` and ``live`` hold
    one array of values per run (a list of one array for one run); nan values are left
    out. Independent: the sides' runs may differ in number and length, and the sim side is
    resampled first. ``paired``: the sides have the same runs, equally long, position k
    of run i one request on both."""
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s_runs, l_runs = _as_runs(sim), _as_runs(live)
    if paired and [r.size for r in s_runs] != [r.size for r in l_runs]:
        raise ValueError("paired samples need the same runs, equally long")
    s_all = np.concatenate([*s_runs, np.empty(0)])
    l_all = np.concatenate([*l_runs, np.empty(0)])
    s_all, l_all = s_all[~np.isnan(s_all)], l_all[~np.isnan(l_all)]
    if not s_all.size or not l_all.size:
        nan = math.nan
        return [
            QuantileError(float(q), nan, nan, nan, nan, nan, level, s_all.size, l_all.size)
            for q in qs
        ]
    if paired:
        # Drop runs and positions that neither side has a value for.
        keep = [~(np.isnan(a) & np.isnan(b)) for a, b in zip(s_runs, l_runs, strict=True)]
        pairs = [(a[k], b[k]) for a, b, k in zip(s_runs, l_runs, keep, strict=True) if k.any()]
        s_boot, l_boot = resampled_percentiles(
            [[a for a, _ in pairs], [b for _, b in pairs]], qs, rng, resamples
        )
    else:
        (s_boot,) = resampled_percentiles([[r for r in s_runs if r.size]], qs, rng, resamples)
        (l_boot,) = resampled_percentiles([[r for r in l_runs if r.size]], qs, rng, resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.where(s_boot > 0, (l_boot - s_boot) / s_boot, np.inf)
    boot[np.isnan(s_boot) | np.isnan(l_boot)] = np.nan
    result = []
    for i, q in enumerate(qs):
        a, b = float(np.percentile(s_all, q)), float(np.percentile(l_all, q))
        low, high = _order_interval(boot[i], level)
        result.append(
            QuantileError(
                float(q), a, b, relative_error(a, b), low, high, level, s_all.size, l_all.size
            )
        )
    return result


def quantile_error(
    sim: npt.ArrayLike,
    live: npt.ArrayLike,
    q: float,
    rng: np.random.Generator,
    *,
    paired: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
) -> QuantileError:
    """:func:`quantile_errors` for one percentile of one run per side."""
    return quantile_errors(
        [sim], [live], [q], rng, paired=paired, resamples=resamples, level=level
    )[0]


def bound_verdict(error: float, low: float, high: float, bound: float) -> SupportVerdict:
    """Does the interval support ``|error| <= bound``? (The section comment above.)"""
    if math.isnan(error):
        return "no data"
    if not abs(error) <= bound:
        return "outside"
    if -bound <= low and high <= bound:
        return "supported"
    return "within, interval too wide"


def ks_distance(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """The two-sample Kolmogorov-Smirnov statistic ``max_x |F_a(x) - F_b(x)|`` (nan when
    a sample is empty): 0 for equal samples, 1 for samples that do not overlap."""
    x = np.sort(np.asarray(a, dtype=np.float64).ravel())
    y = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if not x.size or not y.size:
        return math.nan
    # Both empirical CDFs step only at sample values; compare them at every one.
    grid = np.concatenate([x, y])
    f_x = np.searchsorted(x, grid, side="right") / x.size
    f_y = np.searchsorted(y, grid, side="right") / y.size
    return float(np.max(np.abs(f_x - f_y)))


def ks_critical_95(n: int, m: int) -> float:
    """The asymptotic 5 % critical value of the two-sample KS statistic for samples of n
    and m values, ``sqrt(-ln(0.025) / 2) * sqrt((n + m) / (n * m))`` (1.358 x the root);
    nan when a sample is empty."""
    if n < 1 or m < 1:
        return math.nan
    return math.sqrt(-math.log(0.025) / 2) * math.sqrt((n + m) / (n * m))
