"""The simulator against queueing theory, with intervals narrow enough to fail.

Closed forms: :func:`erlang_c` (the probability that an M/M/c customer
waits), :func:`mmc_mean_wait` (its mean wait in queue), :func:`mg1_mean_wait`
(Pollaczek-Khinchine) and :func:`md1_mean_wait`. :func:`queueing_checks`
runs the simulator (:func:`haif.sim.driver.run_scenario`) as a plain FIFO
M/M/c or M/D/1 queue — one worker with ``capacity: c`` slots, the abstract
service model with ``ttft_s: 0`` (the first token marks the start of
service, so the wait in queue is ``first_token_s - arrival_s``), Poisson
arrivals, every policy that could refuse or reorder work disabled — and
compares each point of :data:`GRID` with its formula (:class:`QueueingCheck`).

Statistics, per point:

* Independent replications: replication ``r`` runs with Scenario seed
  ``point.seed + r`` (every component's generator is derived from the seed,
  :mod:`haif.seeding`). The seeds were fixed before any result was seen.
* Warm-up deletion: each run starts empty, so its first
  ``max(1000, 5 rho / (1 - sqrt(rho))^2)`` customers (in arrival order) are
  dropped: five relaxation times ``1 / (c mu (1 - sqrt(rho))^2)`` (Morse's
  M/M/1 relaxation time; with c servers busy the queue drains at ``c mu``),
  times the arrival rate. From an empty start the mean's bias then is below
  ``e^-5`` of the initial deficit and decays further in the kept window.
* Each replication's metric is the mean over its kept customers; the
  estimate and its 95 % interval come from the replication means, Student t.
* Control variates (Lavenberg & Welch 1981; Law & Kelton, "Simulation
  Modeling and Analysis", chapter 11): each replication's realized mean
  inter-arrival time and, for exponential service, mean service time over
  the kept customers, whose true means (``1 / lambda``, ``1 / mu``) are known
  exactly. The estimate is the intercept of the least-squares regression of
  the replication means on the centred controls; its standard error is the
  regression's, with ``n - 1 - q`` degrees of freedom for ``q`` controls
  (exact under joint normality). They halve the variance of the mean wait
  and cut that of P(wait) about tenfold. A control corrects only for the
  inputs' chance deviation, so an input the simulator got wrong would be
  corrected away: each row therefore also reports the plain replication
  mean and interval (``raw_*``) and each control's deviation from its known
  mean in standard errors (``control_z``), which must stay small.

Every replication is also checked customer by customer (:func:`replicate`):
all served, never more than c in service, a customer waits exactly when all
c servers are busy at its arrival (FIFO and work-conserving), and a fixed
service time is the mean; a breach raises instead of giving a row.

A row is ``powered`` when the interval's half-width is under 2 % of the
estimate (:data:`POWER`), and ``within`` when the formula lies inside the
interval. Each row is a 95 % interval, so with k rows about k / 20 fall
outside by chance on fresh seeds; the seeds are fixed, so the outcome is
reproducible.

Why this grid (:data:`GRID`): the variance of a mean wait grows steeply with
load. Over n kept customers the interval's relative half-width is about
``2 sqrt(K / n)``, so 2 % takes about ``10,000 K`` customers, where K (the
relative variance per customer, with the controls) was measured here as
about 16 for M/M/1 at rho 0.5, 30 for M/D/1 at 0.7, 85 for M/M/4 at 0.8,
140 for M/D/1 at 0.9, 230 for M/M/1 at 0.9, 450-700 for M/M/16 at 0.8-0.9
and 1,300 for M/M/16 at 0.95, while the simulator serves about 15,000
customers a second on one core. So a mean wait at 2 % fits the five-minute
budget up to rho 0.9 for one server (M/D/1; M/M/1 at 0.9 alone would take
2.5 minutes) and 0.8 for four; at 16 servers it
would take 5 to 13 million customers, 6 to 15 minutes on its own (3 million
customers at rho 0.9 gave +-2.7 %, the formula inside). There the grid
checks Erlang C's P(wait) instead, whose K is about 5 at rho 0.95 with the
controls, and reports the mean wait from the same runs as an unsized row
(``sized=False``: not powered, shown for what it says; its replication
means are right-skewed, so its interval is rougher than the others').
M/M/16 at rho 0.5 is left out: one customer in a hundred waits, and no
metric of its queue can be powered here. ``quick`` runs the points marked
quick (about a minute); the full grid, about five. The replications were
sized from pilot runs and once more from the first full run's K.

Time is scaled so that customers arrive at :data:`ARRIVAL_RATE` per second
at every point (service mean ``c rho / ARRIVAL_RATE``): the simulator's
per-second bookkeeping then costs the same at every point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from haif.analysis.stats import t_quantile_975
from haif.fleet.scenario import Scenario
from haif.sim.driver import run_scenario

POWER = 0.02
"""A row is powered when its 95 % interval's half-width is under this share of its estimate."""

ARRIVAL_RATE = 10.0
"""Customers per second at every point of the grid."""

WAIT_EPS_S = 1e-9
"""A customer waited when its wait in queue exceeds this (a customer served at once has 0.0)."""

Metric = Literal["wait", "p_wait"]
METRIC_NAMES: dict[str, str] = {"wait": "mean wait in queue", "p_wait": "P(wait)"}

Progress = Callable[[str, int, int], None]
"""(point name, replications done, replications in all)."""


# ------------------------------------------------------------------ closed forms


def _stable(arrival_rate: float, service_rate: float, servers: int) -> float:
    if arrival_rate <= 0 or service_rate <= 0 or servers < 1:
        raise ValueError("arrival and service rates must be > 0 and servers >= 1")
    rho = arrival_rate / (servers * service_rate)
    if rho >= 1:
        raise ValueError(f"unstable queue: rho = {rho:g} >= 1")
    return rho


def erlang_c(servers: int, offered_load: float) -> float:
    """P(wait) in an M/M/c queue with ``servers`` servers and offered load ``a = lambda / mu``.

    Erlang C, through the Erlang B recursion ``B_0 = 1``,
    ``B_k = a B_{k-1} / (k + a B_{k-1})`` and ``C = c B_c / (c - a (1 - B_c))``
    (no factorials, stable for any c).
    """
    _stable(offered_load, 1.0, servers)
    b = 1.0
    for k in range(1, servers + 1):
        b = offered_load * b / (k + offered_load * b)
    return servers * b / (servers - offered_load * (1 - b))


def mmc_mean_wait(arrival_rate: float, service_rate: float, servers: int) -> float:
    """Mean wait in queue of an M/M/c queue: ``C(c, a) / (c mu - lambda)``."""
    _stable(arrival_rate, service_rate, servers)
    p_wait = erlang_c(servers, arrival_rate / service_rate)
    return p_wait / (servers * service_rate - arrival_rate)


def mg1_mean_wait(arrival_rate: float, mean_service_s: float, service_scv: float) -> float:
    """Mean wait in queue of an M/G/1 queue (Pollaczek-Khinchine).

    ``lambda E[S^2] / (2 (1 - rho))`` with ``E[S^2] = (1 + scv) E[S]^2``;
    ``service_scv`` is the squared coefficient of variation of the service
    time (1 exponential, 0 deterministic).
    """
    if service_scv < 0:
        raise ValueError("service_scv must be >= 0")
    rho = _stable(arrival_rate, 1.0 / mean_service_s, 1)
    return arrival_rate * (1 + service_scv) * mean_service_s**2 / (2 * (1 - rho))


def md1_mean_wait(arrival_rate: float, service_s: float) -> float:
    """Mean wait in queue of an M/D/1 queue: ``rho D / (2 (1 - rho))``."""
    return mg1_mean_wait(arrival_rate, service_s, 0.0)


# ------------------------------------------------------------------ intervals


@dataclass(frozen=True)
class Estimate:
    """A mean over independent replications with its 95 % interval."""

    mean: float
    half_width: float
    df: int


def replication_interval(
    values: Sequence[float], controls: Sequence[tuple[Sequence[float], float]] = ()
) -> Estimate:
    """The mean of ``values`` (one per independent replication) and its 95 % interval.

    Without controls: the sample mean, ``t(0.975, n - 1) s / sqrt(n)``. With
    controls, each a pair (one value per replication, its known expectation):
    the regression-adjusted control-variate estimator, the intercept of the
    least-squares fit of ``values`` on ``1`` and the centred controls, with
    the intercept's standard error and ``n - 1 - q`` degrees of freedom.
    """
    y = np.asarray(values, dtype=float)
    n = len(y)
    q = len(controls)
    df = n - 1 - q
    if df < 1:
        raise ValueError(f"{n} replications leave no degree of freedom for {q} controls")
    columns = [np.ones(n)]
    for xs, known in controls:
        x = np.asarray(xs, dtype=float)
        if len(x) != n:
            raise ValueError("each control needs one value per replication")
        columns.append(x - known)
    z = np.column_stack(columns)
    coef, *_ = np.linalg.lstsq(z, y, rcond=None)
    residuals = y - z @ coef
    s2 = float(residuals @ residuals) / df
    variance = s2 * float(np.linalg.inv(z.T @ z)[0, 0])
    return Estimate(float(coef[0]), t_quantile_975(df) * math.sqrt(variance), df)


@dataclass(frozen=True)
class QueueingCheck:
    """One metric at one point of the grid against its closed form.

    ``estimate``, ``low``, ``high``: the control-variate estimate and its 95 %
    interval; ``rel_half_width``: the half-width over the estimate.
    ``within``: ``low <= formula <= high``. ``powered``: ``rel_half_width <
    POWER``. ``sized``: the grid sized this row's replications for the 2 %
    target (False: a row reported from runs sized for another metric).
    ``raw_*``: the plain mean over replications, without controls.
    ``control_z``: each control's replication mean minus its known mean, in
    standard errors (a large one means the simulator's inputs are off, which
    the controls would otherwise correct away). ``customers``: kept
    customers over all replications (after warm-up); ``seconds``: the point's
    wall time (all its rows share the runs).
    """

    name: str
    metric: str
    formula: float
    estimate: float
    low: float
    high: float
    rel_half_width: float
    customers: int
    replications: int
    within: bool
    powered: bool
    sized: bool = True
    raw_estimate: float = math.nan
    raw_rel_half_width: float = math.nan
    control_z: tuple[float, ...] = ()
    seconds: float = 0.0

    @property
    def rel_error(self) -> float:
        """``estimate / formula - 1``."""
        return self.estimate / self.formula - 1

    def line(self) -> str:
        """The row as one line of text."""
        flags = ("within" if self.within else "OUTSIDE") + (
            "" if self.powered else (" not powered" if self.sized else " not powered (unsized)")
        )
        zs = ",".join(f"{z:+.1f}" for z in self.control_z)
        return (
            f"{self.name:<16} {self.metric:<19} formula {self.formula:.5g}  "
            f"estimate {self.estimate:.5g} [{self.low:.5g}, {self.high:.5g}]  "
            f"+-{self.rel_half_width:.2%}  err {self.rel_error:+.2%}  "
            f"raw {self.raw_estimate:.5g} +-{self.raw_rel_half_width:.2%}  z({zs})  "
            f"{self.customers:,} customers x{self.replications}  {self.seconds:.0f} s  {flags}"
        )


def judge(
    name: str,
    metric: str,
    formula: float,
    values: Sequence[float],
    controls: Sequence[tuple[Sequence[float], float]] = (),
    *,
    customers: int,
    sized: bool = True,
    seconds: float = 0.0,
) -> QueueingCheck:
    """Replication values of one metric against ``formula``: the row for it."""
    est = replication_interval(values, controls)
    raw = replication_interval(values)
    zs = []
    for xs, known in controls:
        x = np.asarray(xs, dtype=float)
        se = float(np.std(x, ddof=1)) / math.sqrt(len(x))
        zs.append((float(np.mean(x)) - known) / se if se > 0 else 0.0)
    low, high = est.mean - est.half_width, est.mean + est.half_width
    rel = est.half_width / abs(est.mean) if est.mean != 0 else math.inf
    return QueueingCheck(
        name=name,
        metric=metric,
        formula=formula,
        estimate=est.mean,
        low=low,
        high=high,
        rel_half_width=rel,
        customers=customers,
        replications=len(values),
        within=low <= formula <= high,
        powered=rel < POWER,
        sized=sized,
        raw_estimate=raw.mean,
        raw_rel_half_width=raw.half_width / abs(raw.mean) if raw.mean != 0 else math.inf,
        control_z=tuple(zs),
        seconds=seconds,
    )


# ------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class QueueingPoint:
    """One queue of the grid: ``servers`` slots at load ``rho``.

    ``metrics`` are sized (``replications`` x ``customers`` kept customers)
    for the 2 % target; ``extra_metrics`` come from the same runs, unsized,
    in the full grid only. Replication r runs with seed ``seed + r``.
    """

    servers: int
    rho: float
    service: Literal["exponential", "fixed"]
    metrics: tuple[Metric, ...]
    replications: int
    customers: int
    seed: int
    quick: bool = False
    extra_metrics: tuple[Metric, ...] = ()

    def __post_init__(self) -> None:
        if self.service == "fixed" and self.servers != 1:
            raise ValueError("deterministic service is checked for one server (M/D/1) only")

    @property
    def name(self) -> str:
        kind = "M" if self.service == "exponential" else "D"
        return f"M/{kind}/{self.servers} rho={self.rho:.2f}"

    @property
    def mean_service_s(self) -> float:
        return self.servers * self.rho / ARRIVAL_RATE

    @property
    def warmup(self) -> int:
        """Customers dropped at the start of each run (module docstring)."""
        return max(1000, math.ceil(5 * self.rho / (1 - math.sqrt(self.rho)) ** 2))

    def formula(self, metric: Metric) -> float:
        lam, s = ARRIVAL_RATE, self.mean_service_s
        if self.service == "fixed":
            return md1_mean_wait(lam, s) if metric == "wait" else self.rho
        if metric == "wait":
            return mmc_mean_wait(lam, 1.0 / s, self.servers)
        return erlang_c(self.servers, lam * s)

    def scenario(self, seed: int) -> Scenario:
        """The simulator's scenario for one replication: a plain FIFO queue."""
        return Scenario.model_validate(
            {
                "name": f"queueing-{self.servers}-{self.rho}-{self.service}",
                "seed": seed,
                "duration_s": (self.warmup + self.customers) / ARRIVAL_RATE,
                "drain_s": 600,
                "regions": ["r"],
                "heartbeat": {"interval_s": 60},
                "workers": [
                    {
                        "region": "r",
                        "capacity": self.servers,
                        "service": {
                            "kind": self.service,
                            "mean_s": self.mean_service_s,
                            "ttft_s": 0.0,
                        },
                    }
                ],
                "workload": {"kind": "poisson", "rate": ARRIVAL_RATE},
                "store": {"write_latency_ms": 0.0},
                "policy": {
                    # Nothing may refuse or reorder work: a plain FIFO queue.
                    "max_queue_factor": 10_000,
                    "stale_after_s": 1e6,
                    "shedding": {"thresholds": [1e9]},
                    "throttle": {"enabled": False},
                    "attempt_timeout_s": None,
                },
            }
        )


GRID: tuple[QueueingPoint, ...] = (
    QueueingPoint(1, 0.5, "exponential", ("wait",), 40, 10_000, 1_000_000, quick=True),
    QueueingPoint(16, 0.95, "exponential", ("p_wait",), 20, 12_000, 2_000_000, True, ("wait",)),
    QueueingPoint(4, 0.8, "exponential", ("wait", "p_wait"), 30, 52_000, 3_000_000),
    QueueingPoint(1, 0.9, "fixed", ("wait",), 30, 72_000, 4_000_000),
)
"""The points checked (module docstring says why these)."""


@dataclass(frozen=True)
class Replication:
    """One run's kept customers: means of the metrics and of the controls."""

    customers: int
    wait: float
    p_wait: float
    service: float
    gap: float


def replicate(point: QueueingPoint, seed: int) -> Replication:
    """Run one replication of ``point`` and reduce it to its kept customers' means.

    Raises RuntimeError when the run breaks the queue's contract: a request
    not served, more than c in service, a customer waiting while a server is
    free or served at once while all are busy, or a deterministic service
    time that is not the mean.
    """
    result = run_scenario(point.scenario(seed))
    records = sorted(result.records, key=lambda r: r.arrival_s)
    bad = [r for r in records if r.status != "ok" or r.first_token_s is None or r.finish_s is None]
    if bad:
        raise RuntimeError(f"{point.name} seed {seed}: {len(bad)} requests not served: {bad[0]}")
    arrival = np.array([r.arrival_s for r in records])
    start = np.array([r.first_token_s for r in records], dtype=float)
    finish = np.array([r.finish_s for r in records], dtype=float)
    w = point.warmup
    if len(records) < w + 2:
        raise RuntimeError(f"{point.name} seed {seed}: only {len(records)} customers")
    wait = start - arrival
    service = finish - start
    waited = wait > WAIT_EPS_S
    # In service when a customer arrives: started before, not finished by then.
    busy = np.searchsorted(np.sort(start), arrival, side="left") - np.searchsorted(
        np.sort(finish), arrival, side="right"
    )
    broken = int(np.sum(busy > point.servers) + np.sum(waited != (busy >= point.servers)))
    if broken:
        raise RuntimeError(f"{point.name} seed {seed}: {broken} customers broke FIFO M/x/c")
    if point.service == "fixed":
        off = float(np.max(np.abs(service - point.mean_service_s)))
        if off > 1e-9 * point.mean_service_s:
            raise RuntimeError(f"{point.name} seed {seed}: a fixed service time is off by {off}")
    kept = len(records) - w
    return Replication(
        customers=kept,
        wait=float(np.mean(wait[w:])),
        p_wait=float(np.mean(waited[w:])),
        service=float(np.mean(service[w:])),
        gap=float(arrival[-1] - arrival[w - 1]) / kept,
    )


def check_point(
    point: QueueingPoint, *, extra: bool = True, progress: Progress | None = None
) -> list[QueueingCheck]:
    """Run ``point``'s replications; one row per metric (and per extra metric if ``extra``)."""
    began = time.perf_counter()
    reps = []
    for r in range(point.replications):
        reps.append(replicate(point, point.seed + r))
        if progress is not None:
            progress(point.name, r + 1, point.replications)
    seconds = time.perf_counter() - began
    controls: list[tuple[Sequence[float], float]] = [
        ([rep.gap for rep in reps], 1.0 / ARRIVAL_RATE)
    ]
    if point.service == "exponential":
        controls.append(([rep.service for rep in reps], point.mean_service_s))
    customers = sum(rep.customers for rep in reps)
    metrics = [(m, True) for m in point.metrics]
    if extra:
        metrics += [(m, False) for m in point.extra_metrics]
    return [
        judge(
            point.name,
            METRIC_NAMES[metric],
            point.formula(metric),
            [getattr(rep, metric) for rep in reps],
            controls,
            customers=customers,
            sized=sized,
            seconds=seconds,
        )
        for metric, sized in metrics
    ]


def queueing_checks(
    *, quick: bool = False, progress: Progress | None = None
) -> list[QueueingCheck]:
    """Every row of :data:`GRID` (``quick``: the quick points' sized rows only)."""
    rows: list[QueueingCheck] = []
    for point in GRID:
        if quick and not point.quick:
            continue
        rows += check_point(point, extra=not quick, progress=progress)
    return rows
