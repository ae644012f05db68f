"""Seeded scenario tests of the SimPy shell and the `haif sim` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from haif.cli import main
from haif.configfile import ConfigError
from haif.fleet.scenario import load_scenario
from haif.sim.driver import run_scenario
from haif.sim.report import served_by_region, write_report

ROOT = Path(__file__).resolve().parent.parent
FAILOVER = ROOT / "scenarios" / "failover.yaml"
SHORT = [
    "duration_s=300",
    "drain_s=120",
    "workload.rate_scale=2",
    "faults.0.start_s=100",
    "faults.0.end_s=200",
]


@pytest.mark.slow
def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_report(run_scenario(load_scenario(FAILOVER, SHORT)), tmp_path / "a")
    b = write_report(run_scenario(load_scenario(FAILOVER, SHORT)), tmp_path / "b")
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {
        "records.parquet",
        "timeseries.parquet",
        "utilization.parquet",
        "summary.json",
        "report.md",
        "timeseries.png",
        "latency_cdf.png",
    } <= set(names)
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_seed_changes_the_run() -> None:
    one = run_scenario(load_scenario(FAILOVER, [*SHORT, "seed=1"]))
    two = run_scenario(load_scenario(FAILOVER, [*SHORT, "seed=2"]))
    assert [r.arrival_s for r in one.records] != [r.arrival_s for r in two.records]


def test_policy_change_keeps_the_workload() -> None:
    """Per-component RNGs: changing placement must not change the requests."""
    a = run_scenario(load_scenario(FAILOVER, SHORT))
    b = run_scenario(load_scenario(FAILOVER, [*SHORT, "policy.placement=random"]))
    key = sorted((r.request_id, r.arrival_s, r.prompt_tokens) for r in a.records)
    assert key == sorted((r.request_id, r.arrival_s, r.prompt_tokens) for r in b.records)
    assert [r.worker_id for r in a.records] != [r.worker_id for r in b.records]


def test_failover_moves_traffic_and_comes_back() -> None:
    result = run_scenario(load_scenario(FAILOVER, SHORT))
    assert result.unfinished == 0
    table = served_by_region(result)
    assert all(table["before"][r] > 0 for r in ("us-east", "us-west", "eu-west"))
    # Requests that arrive during the outage are served elsewhere (a request
    # already running in us-east at the start failed and was retried).
    assert table["during"]["us-east"] == 0
    assert table["during"]["us-west"] > table["before"]["us-west"] * 0.5
    assert table["after"]["us-east"] > 0
    ok = sum(r.status == "ok" for r in result.records)
    assert ok / len(result.records) > 0.95
    # The outage was felt: attempts failed and were retried elsewhere.
    assert any(r.attempts > 1 and r.status == "ok" for r in result.records)
    # Every arrival got exactly one record.
    ids = [r.request_id for r in result.records]
    assert len(ids) == len(set(ids))


def test_no_outage_no_retries() -> None:
    result = run_scenario(load_scenario(FAILOVER, [*SHORT, "faults=[]"]))
    assert all(r.status == "ok" for r in result.records)
    assert all(r.attempts == 1 for r in result.records)


def test_heartbeat_staleness_is_what_the_core_sees() -> None:
    """With heartbeats far apart, the outage costs more failed attempts."""
    fast = run_scenario(load_scenario(FAILOVER, SHORT))
    slow = run_scenario(
        load_scenario(FAILOVER, [*SHORT, "heartbeat.interval_s=10", "policy.stale_after_s=30"])
    )

    def failed_attempts(res: object) -> int:
        return sum(r.attempts - (r.status == "ok") for r in res.records)  # type: ignore[attr-defined]

    assert failed_attempts(slow) > failed_attempts(fast)


def test_presence_evicts_the_silent_region_on_time() -> None:
    """Each orchestrator evicts the workers of a region that went down, as the runtime would."""
    result = run_scenario(load_scenario(FAILOVER, SHORT))  # us-east down from 100 s to 200 s
    down = sorted(w for w in result.served_by_worker if w.startswith("us-east/"))
    for region, evictions in result.evictions.items():
        during = {w: t for t, w in evictions if 100 <= t < 200}
        assert sorted(during) == down, region
        # Silent for 3 of their ~1 s intervals after their last heartbeat
        # (before 100 s; 1 % of heartbeats are lost, so it may be one earlier).
        assert all(101 < t < 105 for t in during.values()), (region, during)
    patient = run_scenario(load_scenario(FAILOVER, [*SHORT, "heartbeat.evict_after_missed=6"]))
    for region, evictions in patient.evictions.items():
        times = [t for t, _ in evictions if 100 <= t < 200]
        assert len(times) == len(down) and all(104 < t < 108 for t in times), region


# ------------------------------------------------------------------ CLI


def test_cli_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "sim",
            str(FAILOVER),
            "--out",
            str(tmp_path),
            "--seed",
            "3",
            "-q",
            *[arg for s in SHORT for arg in ("--set", s)],
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["requests"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "success rate" in report and "| during |" in report
    assert (tmp_path / "records.parquet").stat().st_size > 0


BAD = [
    ("workers:\n  - {region: nowhere}\n", "workers.0.region", "unknown region 'nowhere'"),
    ("policy: {placement: fastest}\n", "policy.placement", "allowed: jsq"),
    ("workload: {kind: poison}\n", "workload.kind", "'poisson'"),
    ("workload: {rate: -1}\n", "workload.rate", "greater than 0"),
    ("heartbeat: {interval: 1}\n", "heartbeat.interval", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("extra", "field", "message"), BAD)
def test_bad_scenarios_name_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, field: str, message: str
) -> None:
    base = (
        "name: bad\nregions: [a]\n"
        + ("" if extra.startswith("workers") else "workers: [{region: a}]\n")
        + extra
    )
    path = tmp_path / "bad.yaml"
    path.write_text(base)
    assert main(["sim", str(path), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and field in err and message in err, err
    line = base.splitlines().index(extra.splitlines()[-1]) + 1
    assert f"{path}:{line}" in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_scenario(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(bad)


@pytest.mark.parametrize("override", ["noequals", "workers.x.region=a", "=3"])
def test_bad_overrides(override: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_scenario(FAILOVER, [override])


@pytest.mark.parametrize(
    ("workers", "workload", "field", "message"),
    [
        ("[{region: a, gpu: V100}]", "{}", "workers.0.gpu", "unknown GPU 'V100'"),
        (
            "[{region: a, gpu: RTX4090-24G, models: [llama-2-70b]}]",
            "{}",
            "workers.0.models",
            "only served on",
        ),
        (
            "[{region: a, gpu: H100-80G}]",
            "{models: {gpt-5: 1.0}}",
            "workload.models.gpt-5",
            "no worker serves 'gpt-5'",
        ),
    ],
)
def test_fleet_errors_name_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    workers: str,
    workload: str,
    field: str,
    message: str,
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"name: f\nregions: [a]\nworkers: {workers}\nworkload: {workload}\n")
    assert main(["sim", str(path), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{field}: " in err and message in err, err


def test_service_hops_add_their_latency_on_the_way_there_and_back(tmp_path: Path) -> None:
    """network.hop_ms: client -> gateway, orchestrator -> worker, worker -> orchestrator and
    gateway -> client each take it; a lone request's TTFT and latency grow by 4 hops."""
    path = tmp_path / "one.yaml"
    path.write_text(
        "name: one\nseed: 1\nduration_s: 1\nregions: [a]\n"
        "workers: [{region: a, gpu: A100-80G}]\n"
        "workload: {kind: poisson, rate: 2, prompt_tokens: {kind: fixed, value: 100},"
        " output_tokens: {kind: fixed, value: 10}}\n"
    )

    def run(hop_ms: float) -> dict[str, tuple[float, float]]:
        records = run_scenario(load_scenario(path, [f"network.hop_ms={hop_ms}"])).records
        return {
            r.request_id: (r.first_token_s - r.arrival_s, r.finish_s - r.arrival_s)
            for r in records
            if r.first_token_s is not None
        }

    base, hopped = run(0.0), run(5.0)
    assert base and set(base) == set(hopped)
    for rid, (ttft, e2e) in base.items():
        assert hopped[rid][0] == pytest.approx(ttft + 0.020)
        assert hopped[rid][1] == pytest.approx(e2e + 0.020)
