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
such a scenario, scaled to what a 2-core machine serves.

Exit status 1 when an error exceeds its bound (default 5 % at p50 and p90,
10 % at p99, for TTFT and end-to-end latency alike; ``--bound ttft.p90=0.2``
sets one), so CI can run it as a check.
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


def cluster_config(scenario: Scenario, *, timing: str = "profile") -> dict[str, Any]:
    """The ``haif up`` cluster YAML that plays ``scenario``'s fleet (refuses what it cannot)."""
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
                "profiles": str(catalog_path.resolve()) if catalog_path else None,
            }
        )
    return {
        "seed": scenario.seed,
        "region": region,
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

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "placement": self.placement,
            "same_worker": self.same_worker,
            "ttft_outliers": self.outliers,
            "passed": self.passed,
        }


def _latencies(records: Sequence[RequestRecord]) -> dict[str, np.ndarray]:
    ok = [r for r in records if r.status == "ok" and r.first_token_s is not None]
    return {
        "ttft": np.array([r.first_token_s - r.arrival_s for r in ok if r.first_token_s]),
        "e2e": np.array([r.finish_s - r.arrival_s for r in ok]),
    }


def _rate(records: Sequence[RequestRecord], pred: Any) -> float:
    return sum(1 for r in records if pred(r)) / len(records) if records else float("nan")


def compare(
    sim: Sequence[RequestRecord],
    live: Sequence[RequestRecord],
    bounds: dict[str, float] | None = None,
) -> Comparison:
    """Side by side: latency quantiles with relative error, rates, placement shares."""
    bounds = bounds or DEFAULT_BOUNDS
    s, lv = _latencies(sim), _latencies(live)
    metrics: list[dict[str, Any]] = []
    passed = True
    for name in METRICS:
        for q in QUANTILES:
            bound = bounds[f"{name}.p{q}"]
            if not len(s[name]) or not len(lv[name]):
                metrics.append({"metric": f"{name} p{q}", "sim": None, "live": None})
                passed = False
                continue
            a, b = float(np.percentile(s[name], q)), float(np.percentile(lv[name], q))
            error = (b - a) / a if a > 0 else float("inf")
            ok = abs(error) <= bound
            passed &= ok
            metrics.append(
                {
                    "metric": f"{name} p{q}",
                    "unit": "s",
                    "sim": a,
                    "live": b,
                    "error": error,
                    "bound": bound,
                    "ok": ok,
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
    same, outliers = _paired(sim, live)
    return Comparison(metrics, placement, passed, same, outliers)


def _ttft(r: RequestRecord) -> float | None:
    return None if r.first_token_s is None else r.first_token_s - r.arrival_s


def _paired(
    sim: Sequence[RequestRecord], live: Sequence[RequestRecord], top: int = 5
) -> tuple[float, list[dict[str, Any]]]:
    """Request by request: how often both ran on one worker; the largest TTFT differences."""
    by_id = {r.request_id: r for r in live if r.status == "ok"}
    pairs = [(s, by_id[s.request_id]) for s in sim if s.status == "ok" and s.request_id in by_id]
    if not pairs:
        return float("nan"), []
    same = sum(s.worker_id == lv.worker_id for s, lv in pairs) / len(pairs)
    diffs = []
    for s, lv in pairs:
        a, b = _ttft(s), _ttft(lv)
        if a is not None and b is not None:
            diffs.append((b - a, s, lv, a, b))
    diffs.sort(key=lambda d: -abs(d[0]))
    outliers = [
        {
            "request_id": s.request_id,
            "arrival_s": s.arrival_s,
            "sim_worker": s.worker_id,
            "live_worker": lv.worker_id,
            "sim_ttft": a,
            "live_ttft": b,
        }
        for _, s, lv, a, b in diffs[:top]
    ]
    return same, outliers


_HAIF = (sys.executable, "-m", "haif")


def _start_cluster(config_path: Path, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
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
    deadline = time.monotonic() + 120
    while not (data_dir / STATE_FILE).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_cluster(proc)
            raise ConfigError(f"the live cluster did not start; see {log}")
        time.sleep(0.1)
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
    scenario: Scenario, out: Path, *, timing: str = "profile", on_event: Any = None
) -> list[RequestRecord]:
    """Play ``scenario`` on a fresh ``haif up`` cluster; client times joined with its records."""
    from haif.fleet.workload import build_requests
    from haif.runtime.replay import join_server_records, replay_with_faults
    from haif.runtime.supervisor import read_state

    live = out / "live"
    live.mkdir(parents=True, exist_ok=True)
    for stale in ("store.duckdb", "store.duckdb.wal", "records.parquet"):
        (live / stale).unlink(missing_ok=True)
    config_path = out / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(cluster_config(scenario, timing=timing), sort_keys=False))
    requests = build_requests(scenario)
    proc = _start_cluster(config_path, live, out / "haif-up.log")
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


def write_report(comparison: Comparison, scenario: Scenario, out: Path) -> None:
    (out / "parity.json").write_text(
        json.dumps({"scenario": scenario.name, **comparison.to_json()}, indent=2) + "\n"
    )
    lines = [
        f"# Parity: {scenario.name} (seed {scenario.seed})",
        "",
        "| metric | sim | live | error | bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in comparison.metrics:
        error = f"{m['error']:+.1%}" if m.get("error") is not None else ""
        bound = f"{m['bound']:.0%}" if m.get("bound") is not None else ""
        unit = m.get("unit")
        lines.append(
            f"| {m['metric']} | {_fmt(m['sim'], unit)} | {_fmt(m['live'], unit)} "
            f"| {error} | {bound} |"
        )
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
        lines.append(
            f"| {o['request_id']} | {o['arrival_s']:.3f} s | {o['sim_worker']} "
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

The scenario needs a single control region and GPU-profiled workers only;
scenarios/parity.yaml is one, scaled to a 2-core machine.
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
        "--bound",
        action="append",
        default=[],
        metavar="METRIC.pQ=ERROR",
        help="bound on |relative error|, e.g. ttft.p90=0.2 (default 0.05 at p50 and p90, "
        "0.10 at p99)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output or table")
    p.set_defaults(func=_cmd_parity)


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
    cluster_config(scenario, timing=args.timing)  # refuse early what cannot run live
    out = Path(args.out or f"reports/parity-{scenario.name}")
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    sim = run_scenario(scenario).records
    write_parquet(sim, out / "sim.parquet")
    with Progress(
        TextColumn("live"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        disable=args.quiet,
    ) as progress:
        task = progress.add_task("live", total=len(sim))
        live = run_live(
            scenario, out, timing=args.timing, on_event=lambda _r: progress.advance(task)
        )
    write_parquet(live, out / "live.parquet")
    comparison = compare(sim, live, bounds)
    write_report(comparison, scenario, out)
    if not args.quiet:
        table = Table(title=f"parity: {scenario.name}")
        for column in ("metric", "sim", "live", "error", "bound"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for m in comparison.metrics:
            unit = m.get("unit")
            table.add_row(
                m["metric"],
                _fmt(m["sim"], unit),
                _fmt(m["live"], unit),
                f"{m['error']:+.1%}" if m.get("error") is not None else "",
                f"{m['bound']:.0%}" if m.get("bound") is not None else "",
                style=None if m.get("ok", True) else "red",
            )
        console.print(table)
        console.print(f"same worker in both runs: {comparison.same_worker:.1%}")
        if not comparison.passed:
            worst = ", ".join(
                f"{o['request_id']} {_fmt(o['sim_ttft'], 's')} -> {_fmt(o['live_ttft'], 's')}"
                for o in comparison.outliers[:3]
            )
            console.print(f"largest TTFT differences: {worst}")
        console.print(f"report: {out / 'parity.md'}  {'PASS' if comparison.passed else 'FAIL'}")
    return 0 if comparison.passed else 1
