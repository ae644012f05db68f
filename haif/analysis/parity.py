"""``haif parity``: the simulator's error against a live cluster running the same scenario.

The scenario runs twice: in the simulator, and on a local cluster that
``haif up`` starts with one synthetic worker per simulated worker — same
ids, regions, GPU classes and models, timed by the same GPU x model
profiles and batching model (``--timing profile``), heartbeating at the
scenario's interval, under the scenario's policy. ``haif replay`` sends the
scenario's requests at their arrival times and runs its faults against the
cluster's processes. The live run's client-side times, joined with the
cluster's own records (where each request ran, how many attempts), are then
compared with the simulation: TTFT and end-to-end latency at p50 / p90 /
p99 with their relative error, success rate, retries, and where requests
were placed (share per region and GPU class).

The live cluster has one gateway and one orchestrator on loopback, so the
scenario must have a single control region (``control_regions: [R]``, its
clients in R) and only GPU-profiled workers; links between regions are
loopback, so give the scenario small RTTs. ``scenarios/parity.yaml`` is
such a scenario, scaled to what a 2-core machine serves. With ``--engines
CLUSTER.yaml`` (:func:`load_engines`) the live workers run real engines
instead (vLLM serving a real model, continuously batched by vLLM's own
scheduler), and the simulated side is timed by the profile ``haif calibrate``
fitted to that engine: ``scenarios/parity_vllm.yaml``.

Exit status 1 when an error exceeds its bound (default 5 % at p50 and p90,
10 % at p99, for TTFT and end-to-end latency alike; ``--bound ttft.p90=0.2``
sets one), so CI can run it as a check. The check reads the point estimate
only; next to it each error has a 95 % bootstrap interval and a verdict on
whether the interval supports the bound (``supported``, ``within, interval
too wide``, ``outside``; :func:`haif.analysis.stats.bound_verdict`), and each
latency a Kolmogorov-Smirnov distance between the two runs' distributions.
The bootstrap is paired by default: the same requests are drawn from both
runs, since both shells serve the same requests (``--bootstrap independent``
resamples each side on its own). ``--repeat N`` plays the scenario N times in
both shells, seeds ``seed``, ``seed + 1``, ... (repeat i has one seed, so one
set of requests, in both; a fresh cluster each time, as faults and warm state
must not carry over), pools the requests for the point estimates and resamples
the runs, then the requests within them, for the intervals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import TypeAdapter

from haif.analysis.stats import (
    DEFAULT_RESAMPLES,
    bound_verdict,
    ks_critical_95,
    ks_distance,
    quantile_errors,
)
from haif.configfile import ConfigError
from haif.contracts import RequestRecord
from haif.control.config import CoreConfig
from haif.fleet.scenario import Scenario
from haif.fleet.targets import scenario_workers
from haif.records import read_parquet, write_parquet

QUANTILES = (50, 90, 99)
METRICS = ("ttft", "e2e")
#: |relative error| allowed per metric and quantile: "ttft.p50" -> 0.05.
DEFAULT_BOUNDS = {
    f"{m}.p{q}": bound for m in METRICS for q, bound in ((50, 0.05), (90, 0.05), (99, 0.10))
}
#: Coverage of the bootstrap interval reported next to each error.
LEVEL = 0.95
BOOTSTRAPS = ("paired", "independent")


#: The fields of a worker in an ``--engines`` cluster file that the live worker takes:
#: its engine and how it loads its model (the rest comes from the scenario).
ENGINE_FIELDS = (
    "engine",
    "capacity",
    "artifact_store",
    "model_ref",
    "keyring",
    "device",
    "upstream_url",
    "upstream_model",
    "vllm_args",
    "start_timeout_s",
)


def load_engines(path: str | Path) -> dict[str, dict[str, Any]]:
    """``--engines``: per GPU class, the engine settings of the cluster file's worker of
    that class (its relative paths made absolute), for a parity run on real engines."""
    from haif.runtime.cluster import beside, load_cluster

    path = Path(path)
    config = load_cluster(path)
    engines: dict[str, dict[str, Any]] = {}
    for w in config.workers:
        settings = w.model_dump(include=set(ENGINE_FIELDS), exclude_none=True)
        for name in ("artifact_store", "keyring"):
            if name in settings:
                settings[name] = str(beside(path.parent, settings[name]).resolve())
        settings["models"] = list(w.models)
        settings["start_timeout_s"] = w.start_timeout()  # its engine's default when unset
        if engines.setdefault(w.gpu_class, settings) != settings:
            raise ConfigError(
                f"{path}: workers of gpu_class {w.gpu_class!r} differ; --engines takes one "
                "engine per GPU class"
            )
    return engines


def cluster_config(
    scenario: Scenario,
    *,
    timing: str = "profile",
    engines: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``haif up`` cluster YAML that plays ``scenario``'s fleet (refuses what it cannot).

    Every worker is synthetic, timed by the scenario's profile of its GPU class, unless
    ``engines`` (:func:`load_engines`) has that GPU class: then it runs that engine
    (vLLM, say), and the scenario's profile of the class should be one ``haif calibrate``
    fitted to it.
    """
    control = scenario.control
    if len(control) != 1:
        raise ConfigError(
            f"{scenario.name}: a live parity run has one gateway and orchestrator; give the "
            f"scenario a single control region (control_regions: [R]), not {list(control)}"
        )
    region = control[0]
    foreign = [o for o in scenario.workload.origins if o != region]
    if foreign:
        raise ConfigError(
            f"workload.origins: the live cluster's clients are all in {region!r}; "
            f"the scenario also has clients in {foreign}"
        )
    catalog = scenario.catalog()
    catalog_path = scenario.profiles_path()
    workers = []
    for wid, wregion, group in scenario_workers(scenario):
        if group.gpu is None:
            raise ConfigError(
                f"workers: {wid} has no gpu; parity needs GPU-profiled workers (the live "
                "synthetic engine is timed by the same profile)"
            )
        if group.gpu_class not in (None, group.gpu):
            raise ConfigError(f"workers: {wid}: gpu_class must be unset or equal to gpu")
        warm = (group.warm_models or group.models)[0]
        profile = catalog.get(group.gpu, warm)
        if engines is not None and group.gpu in engines:
            real = dict(engines[group.gpu])
            missing = [m for m in group.models if m not in real.pop("models")]
            if missing:
                raise ConfigError(
                    f"--engines: the {group.gpu} worker does not serve {missing}, which the "
                    f"scenario's {wid} does"
                )
            workers.append(
                {
                    "id": wid,
                    "region": wregion,
                    "gpu_class": group.gpu,
                    "models": [warm, *(m for m in group.models if m != warm)],
                    "heartbeat_s": scenario.heartbeat.interval_s,
                    **real,
                }
            )
            continue
        if engines is not None:
            raise ConfigError(
                f"--engines: no worker of gpu_class {group.gpu!r} (the scenario's {wid}); "
                f"it has {sorted(engines)}"
            )
        workers.append(
            {
                "id": wid,
                "region": wregion,
                "gpu_class": group.gpu,
                "capacity": group.max_batch or profile.max_batch,
                # the engine loads the first model at start, as the sim's warm model
                "models": [warm, *(m for m in group.models if m != warm)],
                "heartbeat_s": scenario.heartbeat.interval_s,
                "timing": timing,
                "max_batch": group.max_batch,
                "chunked_prefill_tokens": group.chunked_prefill_tokens,
                "prefix_cache": group.prefix_cache,
                "prefix_cache_max_tokens": group.prefix_cache_max_tokens,
                "profiles": str(catalog_path.resolve()) if catalog_path else None,
            }
        )
    return {
        "seed": scenario.seed,
        "region": region,
        # Plain loopback HTTP, as the scenario's hop delays (network.hops) were
        # measured: mutual TLS would add a cost of its own to every hop.
        "internal_tls": False,
        "workers": workers,
        "policy": TypeAdapter(CoreConfig).dump_python(scenario.policy, mode="json"),
    }


@dataclass(frozen=True, slots=True)
class Comparison:
    metrics: list[dict[str, Any]]
    placement: list[dict[str, Any]]
    passed: bool
    #: Share of the requests both runs served that ran on the same worker in both.
    same_worker: float = float("nan")
    #: The requests whose TTFT differs most between the runs (a failed check's first lead).
    outliers: list[dict[str, Any]] = field(default_factory=list)
    #: Per latency metric: the Kolmogorov-Smirnov distance and its 5 % critical value.
    distances: list[dict[str, Any]] = field(default_factory=list)
    #: Runs per side (``--repeat``), pooled for the point estimates.
    repeats: int = 1
    #: How the intervals were drawn: design, resamples, level.
    bootstrap: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "distances": self.distances,
            "repeats": self.repeats,
            "bootstrap": self.bootstrap,
            "placement": self.placement,
            "same_worker": self.same_worker,
            "ttft_outliers": self.outliers,
            "passed": self.passed,
        }

    def too_wide(self) -> list[str]:
        """The metrics within their bound whose interval crosses it."""
        return [
            m["metric"] for m in self.metrics if m.get("verdict") == "within, interval too wide"
        ]


def _latencies(records: Sequence[RequestRecord]) -> dict[str, np.ndarray]:
    ok = [r for r in records if r.status == "ok" and r.first_token_s is not None]
    return {
        "ttft": np.array([r.first_token_s - r.arrival_s for r in ok if r.first_token_s]),
        "e2e": np.array([r.finish_s - r.arrival_s for r in ok]),
    }


def _request_keys(records: Sequence[RequestRecord]) -> list[tuple[str, int]]:
    """Each record's request id with its occurrence number (a repeated id stays apart)."""
    seen: Counter[str] = Counter()
    keys = []
    for r in records:
        keys.append((r.request_id, seen[r.request_id]))
        seen[r.request_id] += 1
    return keys


def _aligned(
    sim: Sequence[RequestRecord], live: Sequence[RequestRecord]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per latency metric, the sim and live values of one run's requests by request id
    (their union, sorted, so the records' order does not matter), nan where a side has
    none: the values :func:`_latencies` takes, paired for the bootstrap."""

    def values(records: Sequence[RequestRecord]) -> dict[tuple[str, int], tuple[float, float]]:
        nan = float("nan")
        out = {}
        for key, r in zip(_request_keys(records), records, strict=True):
            if r.status == "ok" and r.first_token_s is not None:
                ttft = r.first_token_s - r.arrival_s if r.first_token_s else nan
                out[key] = (ttft, r.finish_s - r.arrival_s)
        return out

    s, lv = values(sim), values(live)
    keys = sorted(set(s) | set(lv))
    missing = (float("nan"), float("nan"))
    return {
        name: (
            np.array([s.get(k, missing)[i] for k in keys]),
            np.array([lv.get(k, missing)[i] for k in keys]),
        )
        for i, name in enumerate(METRICS)
    }


def _rate(records: Sequence[RequestRecord], pred: Any) -> float:
    return sum(1 for r in records if pred(r)) / len(records) if records else float("nan")


def compare(
    sim: Sequence[RequestRecord],
    live: Sequence[RequestRecord],
    bounds: dict[str, float] | None = None,
    *,
    rng: np.random.Generator | None = None,
    bootstrap: str = "paired",
    resamples: int = DEFAULT_RESAMPLES,
) -> Comparison:
    """Side by side: latency quantiles with relative error, its interval and verdict,
    KS distances, rates, placement shares (one run per side; :func:`compare_runs`)."""
    return compare_runs([sim], [live], bounds, rng=rng, bootstrap=bootstrap, resamples=resamples)


def compare_runs(
    sim_runs: Sequence[Sequence[RequestRecord]],
    live_runs: Sequence[Sequence[RequestRecord]],
    bounds: dict[str, float] | None = None,
    *,
    rng: np.random.Generator | None = None,
    bootstrap: str = "paired",
    resamples: int = DEFAULT_RESAMPLES,
) -> Comparison:
    """:func:`compare` over repeated runs: run i of ``sim_runs`` and of ``live_runs`` played
    one seed. Point estimates, rates and shares pool the runs' requests; the bootstrap
    (``paired`` by request id, or ``independent`` sides) resamples the runs, then the
    requests within them, from ``rng`` (None: a generator seeded with 0, so a report is
    reproducible). The check passes when every point estimate is within its bound."""
    if len(sim_runs) != len(live_runs) or not sim_runs:
        raise ValueError("compare_runs needs one live run per simulated run")
    if bootstrap not in BOOTSTRAPS:
        raise ValueError(f"bootstrap must be one of {BOOTSTRAPS}, got {bootstrap!r}")
    bounds = bounds or DEFAULT_BOUNDS
    rng = np.random.default_rng(0) if rng is None else rng
    sim = [r for run in sim_runs for r in run]
    live = [r for run in live_runs for r in run]
    if bootstrap == "paired":
        aligned = [_aligned(a, b) for a, b in zip(sim_runs, live_runs, strict=True)]
        samples = {
            name: ([a[name][0] for a in aligned], [a[name][1] for a in aligned]) for name in METRICS
        }
    else:
        per_run = [(_latencies(a), _latencies(b)) for a, b in zip(sim_runs, live_runs, strict=True)]
        # Sorted, so the records' order does not matter.
        samples = {
            name: ([np.sort(a[name]) for a, _ in per_run], [np.sort(b[name]) for _, b in per_run])
            for name in METRICS
        }
    metrics: list[dict[str, Any]] = []
    distances: list[dict[str, Any]] = []
    passed = True
    for name in METRICS:
        s_runs, l_runs = samples[name]
        errors = quantile_errors(
            s_runs,
            l_runs,
            QUANTILES,
            rng,
            paired=bootstrap == "paired",
            resamples=resamples,
            level=LEVEL,
        )
        for q, e in zip(QUANTILES, errors, strict=True):
            bound = bounds[f"{name}.p{q}"]
            if not e.n_sim or not e.n_live:
                metrics.append(
                    {"metric": f"{name} p{q}", "sim": None, "live": None, "verdict": "no data"}
                )
                passed = False
                continue
            ok = abs(e.error) <= bound
            passed &= ok
            metrics.append(
                {
                    "metric": f"{name} p{q}",
                    "unit": "s",
                    "sim": e.sim,
                    "live": e.live,
                    "error": e.error,
                    "bound": bound,
                    "ok": ok,
                    "interval": [e.low, e.high],
                    "verdict": bound_verdict(e.error, e.low, e.high, bound),
                    "n_sim": e.n_sim,
                    "n_live": e.n_live,
                }
            )
        a_all = np.concatenate([*s_runs, np.empty(0)])
        b_all = np.concatenate([*l_runs, np.empty(0)])
        a_all, b_all = a_all[~np.isnan(a_all)], b_all[~np.isnan(b_all)]
        distance, critical = ks_distance(a_all, b_all), ks_critical_95(a_all.size, b_all.size)
        distances.append(
            {
                "metric": name,
                "ks": distance,
                "ks_critical_95": critical,
                "n_sim": int(a_all.size),
                "n_live": int(b_all.size),
                "verdict": _ks_verdict(distance, critical),
            }
        )
    for label, pred in (
        ("success rate", lambda r: r.status == "ok"),
        ("retried", lambda r: r.attempts > 1),
    ):
        metrics.append(
            {"metric": label, "unit": "share", "sim": _rate(sim, pred), "live": _rate(live, pred)}
        )
    placement = []
    shares: dict[str, dict[tuple[str, str], float]] = {}
    for which, records in (("sim", sim), ("live", live)):
        served = [r for r in records if r.status == "ok"]
        counts = Counter((r.served_region or "?", r.gpu_class or "?") for r in served)
        shares[which] = {k: v / len(served) for k, v in counts.items()} if served else {}
    for key in sorted(set(shares["sim"]) | set(shares["live"])):
        a, b = shares["sim"].get(key, 0.0), shares["live"].get(key, 0.0)
        placement.append(
            {"region": key[0], "gpu_class": key[1], "sim": a, "live": b, "difference": b - a}
        )
    same, outliers = _paired_runs(sim_runs, live_runs)
    return Comparison(
        metrics,
        placement,
        passed,
        same,
        outliers,
        distances=distances,
        repeats=len(sim_runs),
        bootstrap={"design": bootstrap, "resamples": resamples, "level": LEVEL},
    )


def _ks_verdict(distance: float, critical: float) -> str:
    if np.isnan(distance):
        return "no data"
    return "differ at 5 %" if distance > critical else "none detected at 5 %"


def _ttft(r: RequestRecord) -> float | None:
    return None if r.first_token_s is None else r.first_token_s - r.arrival_s


def _paired_runs(
    sim_runs: Sequence[Sequence[RequestRecord]],
    live_runs: Sequence[Sequence[RequestRecord]],
    top: int = 5,
) -> tuple[float, list[dict[str, Any]]]:
    """Request by request within each run pair: how often both ran on one worker; the
    largest TTFT differences (with the repeat they came from when there are several)."""
    pairs = []
    for i, (sim, live) in enumerate(zip(sim_runs, live_runs, strict=True)):
        by_id = {r.request_id: r for r in live if r.status == "ok"}
        pairs += [
            (i, s, by_id[s.request_id]) for s in sim if s.status == "ok" and s.request_id in by_id
        ]
    if not pairs:
        return float("nan"), []
    same = sum(s.worker_id == lv.worker_id for _, s, lv in pairs) / len(pairs)
    diffs = []
    for i, s, lv in pairs:
        a, b = _ttft(s), _ttft(lv)
        if a is not None and b is not None:
            diffs.append((b - a, i, s, lv, a, b))
    diffs.sort(key=lambda d: -abs(d[0]))
    outliers = []
    for _, i, s, lv, a, b in diffs[:top]:
        outlier: dict[str, Any] = {
            "request_id": s.request_id,
            "arrival_s": s.arrival_s,
            "sim_worker": s.worker_id,
            "live_worker": lv.worker_id,
            "sim_ttft": a,
            "live_ttft": b,
        }
        if len(sim_runs) > 1:
            outlier["repeat"] = i + 1
        outliers.append(outlier)
    return same, outliers


_HAIF = (sys.executable, "-m", "haif")


def _start_cluster(
    config_path: Path, data_dir: Path, log: Path, start_s: float = 120.0
) -> subprocess.Popen[bytes]:
    from haif.runtime.cluster import free_port
    from haif.runtime.supervisor import STATE_FILE

    (data_dir / STATE_FILE).unlink(missing_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *_HAIF,
                "up",
                str(config_path),
                "--data-dir",
                str(data_dir),
                "--port",
                str(free_port()),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    deadline = time.monotonic() + start_s
    try:
        while not (data_dir / STATE_FILE).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"the live cluster did not start; see {log}")
            time.sleep(0.1)
    except BaseException:  # Ctrl-C or SIGTERM too: never leave the cluster running
        _stop_cluster(proc)
        raise
    return proc


def wait_all_fresh(gateway: str, workers: int, proc: subprocess.Popen[bytes]) -> None:
    """Until the orchestrator has a fresh heartbeat from every worker (as at sim time 0)."""
    deadline = time.monotonic() + 120
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{gateway}/readyz", timeout=2) as resp:
                seen = int(json.loads(resp.read()).get("fresh_workers", 0))
        except (OSError, ValueError):
            pass
        if seen >= workers:
            return
        time.sleep(0.2)
    raise ConfigError(f"only {seen} of {workers} workers became ready on the live cluster")


def _stop_cluster(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_live(
    scenario: Scenario,
    out: Path,
    *,
    timing: str = "profile",
    on_event: Any = None,
    engines: dict[str, dict[str, Any]] | None = None,
) -> list[RequestRecord]:
    """Play ``scenario`` on a fresh ``haif up`` cluster; client times joined with its records
    (``engines``: real engines per GPU class, :func:`cluster_config`)."""
    from haif.fleet.workload import build_requests
    from haif.runtime.replay import join_server_records, replay_with_faults
    from haif.runtime.supervisor import read_state

    live = out / "live"
    live.mkdir(parents=True, exist_ok=True)
    for stale in ("store.duckdb", "store.duckdb.wal", "records.parquet"):
        (live / stale).unlink(missing_ok=True)
    config_path = out / "cluster.yaml"
    config = cluster_config(scenario, timing=timing, engines=engines)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    requests = build_requests(scenario)
    # haif up answers once every worker has (a real engine loads its model first).
    start_s = 120.0 + max(float(w.get("start_timeout_s") or 0) for w in config["workers"])
    proc = _start_cluster(config_path, live, out / "haif-up.log", start_s)
    try:
        state = read_state(live)
        wait_all_fresh(state["gateway_url"], len(scenario_workers(scenario)), proc)
        run = asyncio.run(
            replay_with_faults(
                requests,
                state["gateway_url"],
                scenario=scenario,
                cluster_dir=live,
                timeout_s=scenario.workload.timeout_s,
                on_done=on_event,
            )
        )
    finally:
        _stop_cluster(proc)
    server = live / "records.parquet"
    if not server.exists():
        raise ConfigError(f"the live cluster exported no records; see {out / 'haif-up.log'}")
    return join_server_records(run.records, read_parquet(server))


def _fmt(value: Any, unit: str | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value * 1000:.1f} ms" if unit == "s" else f"{value:.2%}"


#: The columns of the metrics table (terminal and parity.md).
COLUMNS = ("metric", "sim", "live", "error", "95 % interval", "bound", "verdict")


def table_rows(comparison: Comparison) -> list[tuple[tuple[str, ...], str | None]]:
    """The metrics table's rows as text, each with a style for the terminal (red: outside
    its bound; yellow: within, interval too wide): each latency's quantiles, then its
    KS distance (error column: D; bound column: the 5 % critical value), then the rates."""
    rows: list[tuple[tuple[str, ...], str | None]] = []
    ks = {d["metric"]: d for d in comparison.distances}
    style = {"outside": "red", "no data": "red", "within, interval too wide": "yellow"}
    for m in comparison.metrics:
        unit = m.get("unit")
        error = f"{m['error']:+.1%}" if m.get("error") is not None else ""
        interval = m.get("interval")
        span = f"{interval[0]:+.1%} .. {interval[1]:+.1%}" if interval else ""
        bound = f"{m['bound']:.0%}" if m.get("bound") is not None else ""
        verdict = m.get("verdict", "")
        cells = (m["metric"], _fmt(m["sim"], unit), _fmt(m["live"], unit), error, span, bound)
        rows.append(((*cells, verdict), style.get(verdict)))
        name, _, q = m["metric"].partition(" p")
        if name in ks and q == str(QUANTILES[-1]):
            d = ks[name]
            rows.append(
                (
                    (
                        f"{name} KS distance",
                        f"n={d['n_sim']}",
                        f"n={d['n_live']}",
                        "n/a" if np.isnan(d["ks"]) else f"{d['ks']:.3f}",
                        "",
                        "n/a" if np.isnan(d["ks_critical_95"]) else f"{d['ks_critical_95']:.3f}",
                        d["verdict"],
                    ),
                    None,
                )
            )
    return rows


def method_note(comparison: Comparison, seeds: Sequence[int]) -> str:
    """One paragraph: what the error, the interval, the verdict and the KS row mean."""
    b = comparison.bootstrap
    runs = (
        f"{comparison.repeats} runs per side (seeds {', '.join(map(str, seeds))}), "
        "their requests pooled"
        if comparison.repeats > 1
        else "one run per side"
    )
    design = (
        "the same requests drawn from both sides"
        if b.get("design") == "paired"
        else "each side drawn on its own"
    )
    over = "the runs, then the requests within them" if comparison.repeats > 1 else "the requests"
    return (
        f"Error: live / sim - 1, {runs}. Interval: {b.get('level', LEVEL) * 100:.0f} % "
        f"bootstrap percentile interval of the error, {b.get('resamples')} resamples of "
        f"{over} ({design}). Verdict: *supported* (the whole interval within the bound), "
        "*within, interval too wide* (the error within, the interval crossing the bound: "
        "the runs cannot support the claim), *outside* (the error outside). PASS / FAIL "
        "reads the errors only. KS distance: the largest gap between the two empirical "
        "distributions; the bound column holds its 5 % critical value for independent "
        "samples of these sizes."
    )


def write_report(
    comparison: Comparison, scenario: Scenario, out: Path, *, seeds: Sequence[int] = ()
) -> None:
    """``parity.json`` and ``parity.md`` in ``out``; ``seeds``: the runs' seeds (default:
    the scenario's)."""
    seeds = list(seeds) or [scenario.seed]
    (out / "parity.json").write_text(
        json.dumps({"scenario": scenario.name, "seeds": seeds, **comparison.to_json()}, indent=2)
        + "\n"
    )
    title = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    lines = [
        f"# Parity: {scenario.name} ({title})",
        "",
        method_note(comparison, seeds),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 2) + "---|",
    ]
    for cells, _ in table_rows(comparison):
        lines.append("| " + " | ".join(cells) + " |")
    wide = comparison.too_wide()
    if wide:
        lines += [
            "",
            f"Within the bound, but the interval too wide to support it: {', '.join(wide)}.",
        ]
    lines += [
        "",
        "| region | GPU class | sim share | live share | difference |",
        "|---|---|---:|---:|---:|",
    ]
    for p in comparison.placement:
        lines.append(
            f"| {p['region']} | {p['gpu_class']} | {p['sim']:.1%} | {p['live']:.1%} "
            f"| {p['difference'] * 100:+.1f} pp |"
        )
    lines += [
        "",
        f"Requests served by the same worker in both runs: {comparison.same_worker:.1%}.",
        "",
        "| request | arrival | sim worker | live worker | sim TTFT | live TTFT |",
        "|---|---:|---|---|---:|---:|",
    ]
    for o in comparison.outliers:
        request = o["request_id"] + (f" (repeat {o['repeat']})" if "repeat" in o else "")
        lines.append(
            f"| {request} | {o['arrival_s']:.3f} s | {o['sim_worker']} "
            f"| {o['live_worker']} | {_fmt(o['sim_ttft'], 's')} | {_fmt(o['live_ttft'], 's')} |"
        )
    lines += ["", f"**{'PASS' if comparison.passed else 'FAIL'}**", ""]
    (out / "parity.md").write_text("\n".join(lines))


def parse_bounds(items: Sequence[str]) -> dict[str, float]:
    """``["ttft.p90=0.2"]`` over :data:`DEFAULT_BOUNDS`; a clear error for anything else."""
    bounds = dict(DEFAULT_BOUNDS)
    for item in items:
        name, _, value = item.partition("=")
        if name not in bounds:
            raise ConfigError(
                f"--bound {item}: unknown metric {name!r}; known: {', '.join(bounds)}"
            )
        try:
            bound = float(value)
        except ValueError:
            bound = -1.0
        if not bound >= 0:
            raise ConfigError(f"--bound {item}: the error must be a number >= 0, e.g. 0.05")
        bounds[name] = bound
    return bounds


DESCRIPTION = """\
Run a scenario twice, in the simulator and on a fresh local cluster (haif up)
with one synthetic worker per simulated worker (same ids, regions, GPU
classes and models, timed by the same profiles), replaying its requests and
its faults; then compare TTFT and end-to-end latency at p50 / p90 / p99 (with
the relative error), success rate, retries and where requests ran (share per
region and GPU class). Writes parity.md and parity.json next to both runs'
records, and exits 1 when an error exceeds its bound (5 % at p50 and p90,
10 % at p99 unless --bound says otherwise), so CI can run it as a check.

Each error comes with a 95 % bootstrap interval (2000 resamples; paired: the
same requests drawn from both runs, unless --bootstrap independent) and a
verdict: supported (the interval within the bound), "within, interval too
wide" (the error within, the interval not), or outside; the exit status
reads the error alone. A Kolmogorov-Smirnov distance per latency follows its
quantiles. --repeat N plays the scenario N times in both shells (seeds seed,
seed+1, ...; a fresh cluster each time), pools the requests for the errors
and resamples the runs, then their requests, for the intervals.

The scenario needs a single control region and GPU-profiled workers only;
scenarios/parity.yaml is one, scaled to a 2-core machine.

--engines CLUSTER.yaml runs the live workers on real engines instead: each
scenario worker takes the engine of the cluster file's worker of its GPU class
(vLLM, say), and the scenario's profile of that class should be one haif
calibrate fitted to that engine on another workload. scenarios/parity_vllm.yaml
with clusters/tiny-llama-vllm.yaml is one (README, "Sim-to-real against real
vLLM"; run it in the vLLM lane's environment, .ci/vllm-env).
"""
"""``haif parity --help``: what the command does, for its users."""


def add_parity_command(sub: Any) -> None:
    p = sub.add_parser(
        "parity",
        help="run a scenario in the simulator and on a live local cluster; report the error",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", help="scenario YAML, e.g. scenarios/parity.yaml")
    p.add_argument("--out", help="output folder (default reports/parity-<scenario name>)")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a scenario field, e.g. --set duration_s=60 (repeatable)",
    )
    p.add_argument(
        "--timing",
        default="profile",
        choices=("profile", "profile-request"),
        help="live engine timing (profile: iteration level; default)",
    )
    p.add_argument(
        "--engines",
        metavar="CLUSTER.yaml",
        help="run the live workers on real engines: per GPU class, the engine of that class's "
        "worker in this cluster file (vLLM, say; the scenario's profile of the class should be "
        "fitted to it by haif calibrate); default: synthetic workers timed by the profiles",
    )
    p.add_argument(
        "--bound",
        action="append",
        default=[],
        metavar="METRIC.pQ=ERROR",
        help="bound on |relative error|, e.g. ttft.p90=0.2 (default 0.05 at p50 and p90, "
        "0.10 at p99)",
    )
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        metavar="N",
        help="play the scenario N times in both shells, seeds seed..seed+N-1 (default 1)",
    )
    p.add_argument(
        "--bootstrap",
        default="paired",
        choices=BOOTSTRAPS,
        help="resample the same requests from both runs (paired; default) or each on its own",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output or table")
    p.set_defaults(func=_cmd_parity)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _point_errors(sim: Sequence[RequestRecord], live: Sequence[RequestRecord]) -> str:
    """One repeat's errors at p50 / p90 / p99 per latency, for the progress output."""
    s, lv = _latencies(sim), _latencies(live)
    parts = []
    for name in METRICS:
        if not len(s[name]) or not len(lv[name]):
            parts.append(f"{name} n/a")
            continue
        errors = [
            (float(np.percentile(lv[name], q)) / float(np.percentile(s[name], q)) - 1) * 100
            for q in QUANTILES
        ]
        parts.append(f"{name} " + " / ".join(f"{e:+.1f}" for e in errors) + " %")
    return ", ".join(parts)


def _cmd_parity(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from haif.fleet.scenario import load_scenario
    from haif.sim.driver import run_scenario

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    scenario = load_scenario(args.scenario, overrides)
    bounds = parse_bounds(args.bound)
    engines = load_engines(args.engines) if args.engines else None
    cluster_config(scenario, timing=args.timing, engines=engines)  # refuse early
    repeat = int(args.repeat)
    scenarios = [scenario] + [
        load_scenario(args.scenario, [*overrides, f"seed={scenario.seed + i}"])
        for i in range(1, repeat)
    ]
    out = Path(args.out or f"reports/parity-{scenario.name}")
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    sim_runs, live_runs = [], []
    for i, run in enumerate(scenarios):
        # One run keeps today's layout; repeats get a folder each.
        run_out = out if repeat == 1 else out / f"repeat-{i + 1}"
        run_out.mkdir(parents=True, exist_ok=True)
        label = "live" if repeat == 1 else f"repeat {i + 1}/{repeat} (seed {run.seed})"
        if repeat > 1 and not args.quiet:
            console.print(f"{label}: simulating")
        sim = run_scenario(run).records
        write_parquet(sim, run_out / "sim.parquet")
        with Progress(
            TextColumn("live" if repeat == 1 else f"{label}: live"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
            disable=args.quiet,
        ) as progress:
            task = progress.add_task("live", total=len(sim))
            live = run_live(
                run,
                run_out,
                timing=args.timing,
                on_event=lambda _r, t=task: progress.advance(t),
                engines=engines,
            )
        write_parquet(live, run_out / "live.parquet")
        if repeat > 1 and not args.quiet:
            console.print(f"{label}: p50 / p90 / p99 error {_point_errors(sim, live)}")
        sim_runs.append(sim)
        live_runs.append(live)
    comparison = compare_runs(
        sim_runs,
        live_runs,
        bounds,
        rng=np.random.default_rng(scenario.seed),
        bootstrap=args.bootstrap,
    )
    seeds = [run.seed for run in scenarios]
    write_report(comparison, scenario, out, seeds=seeds)
    if not args.quiet:
        runs = f", {repeat} runs" if repeat > 1 else ""
        table = Table(title=f"parity: {scenario.name}{runs}")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
        for cells, style in table_rows(comparison):
            table.add_row(*cells, style=style)
        console.print(table)
        wide = comparison.too_wide()
        if wide:
            console.print(
                "within the bound, but the interval too wide to support it: " + ", ".join(wide)
            )
        console.print(f"same worker in both runs: {comparison.same_worker:.1%}")
        if not comparison.passed:
            worst = ", ".join(
                f"{o['request_id']} {_fmt(o['sim_ttft'], 's')} -> {_fmt(o['live_ttft'], 's')}"
                for o in comparison.outliers[:3]
            )
            console.print(f"largest TTFT differences: {worst}")
        console.print(f"report: {out / 'parity.md'}  {'PASS' if comparison.passed else 'FAIL'}")
    return 0 if comparison.passed else 1
