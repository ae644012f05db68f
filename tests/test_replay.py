"""`haif replay` and the live fault schedule against a real `haif up` cluster, and `haif parity`'s
pieces (cluster derivation, comparison)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.cluster import Up, run_haif
from harness.records import timed_record
from virtual_loop import run_virtual

from haif.analysis.parity import (
    DEFAULT_BOUNDS,
    cluster_config,
    compare,
    load_engines,
    parse_bounds,
)
from haif.configfile import ConfigError
from haif.contracts import Request, RequestRecord
from haif.fleet.scenario import Scenario, load_scenario
from haif.fleet.targets import scenario_workers
from haif.records import read_parquet
from haif.runtime import replay as replay_mod
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.faults import live_plan
from haif.runtime.replay import load_workload, prompt_text, replay_with_faults
from haif.seeding import derive_rng
from haif.sim.driver import SimCluster

ROOT = Path(__file__).resolve().parents[1]
HAIF = (sys.executable, "-m", "haif")


def _scenario(tmp: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


SMALL = """
name: small
seed: 3
duration_s: 4
regions: [local]
workers: [{region: local, count: 2}]
workload:
  kind: poisson
  rate: 10
  prompt_tokens: {kind: uniform, low: 5, high: 50}
  output_tokens: {kind: uniform, low: 5, high: 40}
"""


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    cluster = Up(tmp_path / "data")
    try:
        yield cluster
    finally:
        cluster.stop()


def _services(up: Up) -> dict[str, dict[str, Any]]:
    status, body = up.control("GET", "/services")
    assert status == 200
    return {s["name"]: s for s in body["services"]}


@pytest.mark.cluster
@pytest.mark.slow
def test_control_endpoint_faults_processes_and_cluster_survives(up: Up) -> None:
    assert (up.data / "cluster.json").stat().st_mode & 0o777 == 0o600
    assert up.control("GET", "/services", token="wrong")[0] == 401
    before = _services(up)
    assert set(before) == {"orchestrator", "w1", "w2", "gateway"}
    assert before["w1"]["state"] == "running" and before["w1"]["pid"]

    assert up.control("POST", "/services/w1/kill")[0] == 200
    assert _services(up)["w1"] == {**before["w1"], "pid": None, "state": "down"}
    time.sleep(0.5)
    assert up.proc.poll() is None  # a worker going down does not stop the cluster

    status, row = up.control("POST", "/services/w1/start")
    assert status == 200 and row["state"] == "running"
    assert row["pid"] not in (None, before["w1"]["pid"])

    assert up.control("POST", "/services/w2/stop")[1]["state"] == "stopped"
    assert up.control("POST", "/services/w2/cont")[1]["state"] == "running"
    status, body = up.control("POST", "/services/nope/kill")
    assert status == 404 and "w1" in body["error"]
    status, body = up.control("POST", "/services/w2/explode")
    assert status == 409 and "kill" in body["error"]
    out = up.stop()
    assert "records" in out
    assert not (up.data / "cluster.json").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_replay_records_every_request_with_client_times(up: Up, tmp_path: Path) -> None:
    requests, _ = load_workload(_scenario(tmp_path, SMALL))
    assert len(requests) > 20
    run = asyncio.run(replay_with_faults(requests, up.url))
    by_id = {r.request_id: r for r in run.records}
    assert set(by_id) == {r.request_id for r in requests}
    for req in requests:
        rec = by_id[req.request_id]
        assert rec.status == "ok", rec
        assert rec.output_tokens == req.max_tokens
        assert rec.prompt_tokens == req.prompt_tokens
        assert rec.first_token_s is not None
        # Never sent early; how late depends on the machine's load, so the
        # schedule itself is checked exactly on a virtual clock (next test).
        assert rec.arrival_s >= req.arrival_s - 1e-6
        assert rec.arrival_s < rec.first_token_s <= rec.finish_s
    up.stop()
    server = {r.request_id: r for r in read_parquet(up.data / "records.parquet")}
    assert set(server) == set(by_id)  # the x-request-id joins both views


@pytest.mark.cluster
@pytest.mark.slow
def test_replay_cli_with_faults_kills_and_restarts_a_worker(up: Up, tmp_path: Path) -> None:
    source = _scenario(
        tmp_path,
        SMALL.replace("duration_s: 4", "duration_s: 6")
        + "faults: [{kind: worker_crash, ids: [w1], at_s: 1.0, restart_s: 2.0}]\n",
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [*HAIF, "replay", str(source), "--faults", "--cluster", str(up.data), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fault 0 begins" in proc.stderr and "fault 0 ends" in proc.stderr
    records = read_parquet(out / "records.parquet")
    requests, _ = load_workload(source)
    assert len(records) == len(requests)  # none lost
    assert {r.status for r in records} <= {"ok", "failed", "rejected"}
    assert sum(r.status == "ok" for r in records) >= len(records) * 0.8
    services = _services(up)
    assert services["w1"]["state"] == "running"  # restarted after restart_s
    log = (up.data / "logs" / "w1.log").read_text()
    assert log.count("worker w1 (") == 2, log  # the restarted worker appended to the same log


@pytest.mark.slow
def test_replay_cli_errors_are_clear(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_haif("replay", *args)

    missing = run(str(tmp_path / "nope.yaml"), "--gateway", "http://127.0.0.1:9")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    source = _scenario(tmp_path, SMALL)
    no_cluster = run(str(source), "--faults", "--cluster", str(tmp_path / "none"))
    assert no_cluster.returncode == 2 and "haif up" in no_cluster.stderr
    # an unreachable gateway is a recorded failure per request, not a crash
    gateway = f"http://127.0.0.1:{free_port()}"
    down = run(str(source), "--gateway", gateway, "--limit", "3", "--out", str(tmp_path / "o"))
    assert down.returncode == 0, down.stderr
    assert {r.status for r in read_parquet(tmp_path / "o/records.parquet")} == {"failed"}


@pytest.mark.parametrize("speed", [1.0, 2.5])
def test_open_loop_sends_every_request_at_its_arrival_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, speed: float
) -> None:
    """On a virtual clock, with a gateway that takes 3 s to answer anything:
    each request still goes out at exactly its (sped-up) arrival time, open
    loop, and each record carries the client's send and finish times."""
    requests, _ = load_workload(_scenario(tmp_path, SMALL))
    sent: dict[str, float] = {}

    async def slow_gateway(
        _session: Any, gateway: str, request: Request, *, clock: Any, **_: Any
    ) -> RequestRecord:
        assert gateway == "http://gw"
        at = sent[request.request_id] = clock()
        await asyncio.sleep(3.0)  # seconds of the loop's clock, not trace seconds
        return RequestRecord.never_served(replace(request, arrival_s=at), clock(), "failed", "x")

    monkeypatch.setattr(replay_mod, "send_one", slow_gateway)
    run = run_virtual(lambda: replay_mod.run_open_loop(requests, "http://gw/", speed=speed))
    assert list(sent) == [r.request_id for r in requests]  # in order, none skipped
    for r in requests:
        assert sent[r.request_id] == pytest.approx(r.arrival_s, abs=1e-9), r.request_id
    finish = {r.request_id: r.finish_s for r in run.records}
    assert all(finish[i] == pytest.approx(sent[i] + 3.0 * speed, abs=1e-9) for i in sent)
    assert run.wall_s == pytest.approx(requests[-1].arrival_s + 3.0 * speed, abs=1e-9)


def test_prompt_counts_as_its_tokens() -> None:
    assert len(prompt_text(17).split()) == 17
    assert len(prompt_text(17, (4, 5), 8).split()) == 17
    assert len(prompt_text(17, salt="r 1").split()) == 17
    assert prompt_text(0, salt="r1") == prompt_text(0, (1,), 8) == ""


def test_replayed_prompts_share_prefix_hashes_as_the_trace_shares_blocks() -> None:
    """Mooncake's 512-token blocks become words the gateway hashes in 16-token blocks."""
    from haif.fleet.prefix import shared_blocks
    from haif.runtime.prompt_tokens import PromptTokens

    measure = PromptTokens().measure
    a = measure("llama-3-8b", prompt_text(1500, (1, 2, 3), 512, salt="ra"))
    b = measure("llama-3-8b", prompt_text(1400, (1, 2, 7), 512, salt="rb"))
    c = measure("llama-3-8b", prompt_text(1500, (9, 2, 3), 512, salt="rc"))
    assert (a.tokens, b.tokens) == (1500, 1400)
    assert shared_blocks(a.prefix_hashes, b.prefix_hashes) == 2 * 512 // 16
    assert shared_blocks(a.prefix_hashes, c.prefix_hashes) == 0
    # Without blocks (an Azure trace) a request shares nothing, as in the simulator.
    d = measure("llama-3-8b", prompt_text(64, salt="rd"))
    e = measure("llama-3-8b", prompt_text(64, salt="re"))
    assert shared_blocks(d.prefix_hashes, e.prefix_hashes) == 0 and len(d.prefix_hashes) == 4


# ----------------------------------------------------------------- fault plans


def _fleet(scenario: Scenario) -> list[dict[str, Any]]:
    rows = [
        {"name": wid, "kind": "worker", "region": region}
        for wid, region, _ in scenario_workers(scenario)
    ]
    return [*rows, {"name": "gateway", "kind": "gateway", "region": scenario.regions[0]}]


def test_live_faults_pick_the_simulators_victims() -> None:
    raw = yaml.safe_load((ROOT / "scenarios/failover.yaml").read_text())
    raw["base_dir"] = str(ROOT / "scenarios")
    raw["faults"] += [
        {"kind": "worker_crash", "at_s": 10, "count": 3},
        {
            "kind": "gray_failure",
            "start_s": 5,
            "end_s": 9,
            "region": "us-west",
            "count": 1,
            "factor": 4,
        },
        {"kind": "gateway_down", "region": "us-east", "start_s": 1, "end_s": 2},
    ]
    scenario = Scenario.model_validate(raw)
    plan = live_plan(scenario, _fleet(scenario))
    sim = SimCluster(scenario)
    assert [w.kind for w in plan] == ["down", "down", "slow", "gateway_down"]
    outage, crash, gray, gateway = plan
    assert set(outage.targets) == {w for w in sim.workers if w.startswith("us-east/")}
    assert (outage.start_s, outage.end_s) == (1200, 2100)
    assert (crash.start_s, crash.end_s) == (10, 130)
    assert gray.factor == 4
    assert gateway.targets == ("gateway",)
    # The victims by the documented rule, written here rather than through
    # pick_workers (which both the live plan and the simulator call): fault i's
    # own generator derive_rng(seed, "fault:<i>") samples `count` ids from the
    # fleet (or the fault's region) in scenario order. Seeded, so also pinned.
    assert scenario.seed == 42  # failover.yaml's
    fleet = [(wid, region) for wid, region, _ in scenario_workers(scenario)]
    crash_rule = derive_rng(42, "fault:1").sample([w for w, _ in fleet], 3)
    gray_rule = derive_rng(42, "fault:2").sample([w for w, r in fleet if r == "us-west"], 1)
    pinned = ("us-west/RTX4090-24G/4.0", "us-east/RTX4090-24G/2.0", "us-east/H100-80G/0.1")
    assert crash.targets == tuple(crash_rule) == pinned
    assert gray.targets == tuple(gray_rule) == ("us-west/A100-80G/3.0",)

    # What the simulator does, watched as it runs (not its plan recomputed):
    # the workers it slows down and takes down are the live plan's victims.
    def observed(t: float) -> tuple[set[str], set[str]]:
        sim.env.run(until=t)
        down = {w for w, worker in sim.workers.items() if not worker.up}
        slow = {w for w, worker in sim.workers.items() if worker.slow != 1.0}
        return down, slow

    assert observed(0.5) == (set(), set())
    assert observed(6.0) == (set(), set(gray.targets))  # gray failure 5-9 s
    assert observed(11.0) == (set(crash.targets), set())  # crash of 3 at 10 s, back at 130 s
    assert observed(200.0) == (set(), set())
    assert observed(1201.0) == (set(outage.targets), set())  # us-east out 1200-2100 s


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"kind": "partition", "a": "a", "b": "b", "start_s": 1, "end_s": 2}, "'partition' fault"),
        ({"kind": "store_outage", "start_s": 1, "end_s": 2}, "'store_outage' fault"),
        ({"kind": "worker_crash", "at_s": 1, "ids": ["zz"]}, "unknown worker"),
        (
            {"kind": "gateway_down", "region": "b", "start_s": 1, "end_s": 2},
            "no gateway process in 'b' \\(with colocate_gateway",
        ),
    ],
)
def test_faults_a_local_cluster_cannot_run_are_refused(fault: dict[str, Any], message: str) -> None:
    scenario = Scenario.model_validate(
        {
            "name": "x",
            "regions": ["a", "b"],
            "workers": [{"region": "a"}, {"region": "b"}],
            "faults": [fault],
        }
    )
    with pytest.raises(ConfigError, match=message):
        live_plan(scenario, _fleet(scenario))


# ----------------------------------------------------------------- parity


def test_parity_cluster_mirrors_the_scenario_fleet() -> None:
    scenario = load_scenario(ROOT / "scenarios/parity.yaml")
    config = ClusterConfig.model_validate(yaml.safe_load(yaml.safe_dump(cluster_config(scenario))))
    assert [w.id for w in config.workers] == [w for w, _, _ in scenario_workers(scenario)]
    assert {(w.region, w.gpu_class, w.timing) for w in config.workers} == {
        ("us-east", "H100-80G", "profile"),
        ("us-east", "A100-80G", "profile"),
        ("us-west", "A100-80G", "profile"),
        ("us-west", "RTX4090-24G", "profile"),
        ("eu-west", "H100-80G", "profile"),
    }
    assert all(w.heartbeat_s == scenario.heartbeat.interval_s for w in config.workers)
    assert config.policy == scenario.policy
    assert config.region == "us-east"


def test_parity_engines_put_real_engines_in_the_scenarios_fleet() -> None:
    """--engines clusters/tiny-llama-vllm.yaml: the scenario's CPU-vllm worker runs that
    file's vLLM engine (paths made absolute, its load time waited for), with the
    scenario's id, region, models and heartbeat; a GPU class the file lacks, or a model
    its worker does not serve, is refused."""
    engines = load_engines(ROOT / "clusters/tiny-llama-vllm.yaml")
    assert list(engines) == ["CPU-vllm"]
    scenario = load_scenario(ROOT / "scenarios/parity_vllm.yaml")
    raw = cluster_config(scenario, engines=engines)
    config = ClusterConfig.model_validate(yaml.safe_load(yaml.safe_dump(raw)))
    (worker,) = config.workers
    assert (worker.id, worker.region, worker.gpu_class) == (
        "local/CPU-vllm/0.0",
        "local",
        "CPU-vllm",
    )
    assert worker.engine == "vllm" and worker.models == ("tiny-llama",)
    assert worker.capacity == worker.vllm_args["max_num_seqs"] == scenario.workers[0].max_batch
    assert Path(worker.artifact_store or "") == ROOT / "clusters/tiny-llama/art"
    assert worker.start_timeout_s == 300
    assert worker.heartbeat_s == scenario.heartbeat.interval_s
    with pytest.raises(ConfigError, match="no worker of gpu_class 'H100-80G'"):
        cluster_config(load_scenario(ROOT / "scenarios/parity.yaml"), engines=engines)
    other = {"CPU-vllm": {**engines["CPU-vllm"], "models": ["tiny-gpt2"]}}
    with pytest.raises(ConfigError, match="does not serve"):
        cluster_config(scenario, engines=other)


def test_scaled_and_cut_lengths() -> None:
    """prompt_scale scales a trace's prompts before max_prompt_tokens cuts them;
    max_output_tokens cuts outputs; arrivals and the rest stay as they were."""
    from haif.fleet.workload import build_requests

    path = ROOT / "scenarios/parity_vllm.yaml"
    raw = build_requests(
        load_scenario(
            path,
            [
                "workload.prompt_scale=1",
                "workload.max_prompt_tokens=1000000",
                "workload.max_output_tokens=null",
            ],
        )
    )
    cut = build_requests(load_scenario(path))
    assert [(r.request_id, r.arrival_s) for r in raw] == [(r.request_id, r.arrival_s) for r in cut]
    for a, b in zip(raw, cut, strict=True):
        assert b.prompt_tokens == max(1, min(round(a.prompt_tokens * 0.25), 1024))
        assert b.max_tokens == min(a.max_tokens, 1000)
    assert sum(r.prompt_tokens for r in cut) < 0.3 * sum(r.prompt_tokens for r in raw)
    with pytest.raises(ConfigError, match="prompt_scale"):
        load_scenario(ROOT / "scenarios/prefix_cache.yaml", ["workload.prompt_scale=0.5"])


def test_the_ci_parity_gate_is_held_out_and_at_the_readme_bounds() -> None:
    """CI's parity scenario shares parity.yaml's fleet and settings on a window of
    the trace that neither parity.yaml nor parity_ci.yaml covers, and CI, the
    command's defaults and the README state the same bounds."""
    held = load_scenario(ROOT / "scenarios/parity_heldout.yaml")
    assert not held.faults
    for name in ("parity.yaml", "parity_ci.yaml"):
        other = load_scenario(ROOT / "scenarios" / name)
        # Trace seconds covered: from start_s, duration_s at rate_scale.
        end = other.workload.start_s + other.duration_s * other.workload.rate_scale
        assert held.workload.start_s >= end, name
        assert held.workload.rate_scale == other.workload.rate_scale
        assert (held.workers, held.network, held.store, held.policy) == (
            other.workers,
            other.network,
            other.store,
            other.policy,
        )
        assert held.heartbeat.interval_s == other.heartbeat.interval_s
    assert len(load_workload(ROOT / "scenarios/parity_heldout.yaml")[0]) == 253
    ci = (ROOT / ".ci" / "run").read_text()
    gate = [line for line in ci.splitlines() if "haif parity" in line and not line.startswith("#")]
    assert gate == [
        ".venv/bin/haif parity scenarios/parity_heldout.yaml --repeat 3 "
        "--out reports/parity-heldout"
    ]  # no --bound: the defaults
    assert {
        f"{m}.p{q}": b for m in ("ttft", "e2e") for q, b in ((50, 0.05), (90, 0.05), (99, 0.10))
    } == DEFAULT_BOUNDS
    page = " ".join((ROOT / "docs" / "validation.md").read_text().split())
    assert "CI gates `parity_heldout` at 5 % at p50 and p90 and 10 % at p99" in page


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"control_regions": None}, "single control region"),
        ({"workers": [{"region": "us-east"}]}, "no gpu"),
        ({"workload": {"origins": {"us-west": 1.0}}}, "clients are all in 'us-east'"),
    ],
)
def test_parity_refuses_what_a_live_cluster_cannot_play(
    change: dict[str, Any], message: str
) -> None:
    raw = yaml.safe_load((ROOT / "scenarios/parity.yaml").read_text())
    raw.update(change)
    raw["base_dir"] = str(ROOT / "scenarios")
    with pytest.raises(ConfigError, match=message):
        cluster_config(Scenario.model_validate(raw))


def test_compare_reports_relative_errors_and_fails_past_the_bounds() -> None:
    sim = [timed_record(i, 0.1, 1.0 + i / 100) for i in range(100)]
    same = compare(sim, sim)
    assert same.passed and all(m.get("error", 0) == 0 for m in same.metrics)
    slower = [timed_record(i, 0.1, (1.0 + i / 100) * 1.08) for i in range(100)]
    result = compare(sim, slower)
    e2e = {m["metric"]: m for m in result.metrics if m["metric"].startswith("e2e")}
    assert e2e["e2e p50"]["error"] == pytest.approx(0.08)
    assert not e2e["e2e p50"]["ok"] and e2e["e2e p99"]["ok"]  # 8 % > 5 %, < 10 %
    assert not result.passed
    moved = [
        timed_record(i, 0.1, 1.0 + i / 100, served_region="b" if i < 25 else "a")
        for i in range(100)
    ]
    shares = {p["region"]: p["difference"] for p in compare(sim, moved).placement}
    assert shares == {"a": pytest.approx(-0.25), "b": pytest.approx(0.25)}


def test_compare_pairs_requests_by_id_for_same_worker_share_and_outliers() -> None:
    sim = [timed_record(i, 0.1, 1.0) for i in range(10)]
    live = [timed_record(i, 0.1, 1.0, worker_id="w" if i < 6 else "x") for i in range(10)]
    live[3] = timed_record(3, 0.5, 1.0)  # 400 ms late on its first token
    live[7] = timed_record(7, 0.05, 1.0, worker_id="x")
    live[9] = timed_record(9, 0.1, 1.0, status="error", first_token_s=None)  # not paired
    result = compare(sim, live)
    assert result.same_worker == pytest.approx(6 / 9)
    worst = result.outliers[0]
    assert (worst["request_id"], worst["sim_ttft"], worst["live_ttft"]) == (
        "r3",
        pytest.approx(0.1),
        pytest.approx(0.5),
    )
    assert result.outliers[1]["request_id"] == "r7" and result.outliers[1]["live_worker"] == "x"
    assert result.to_json()["same_worker"] == result.same_worker


@pytest.mark.cluster
@pytest.mark.slow
def test_haif_up_seals_rpc_and_the_admin_key_opens_the_dlq(tmp_path: Path) -> None:
    """With ``internal_tls: false`` (the opt-out) every RPC is sealed with the cluster
    keys ``haif up`` made, and the admin key opens the DLQ."""
    config = tmp_path / "plain.yaml"
    config.write_text("internal_tls: false\n")
    up = Up(tmp_path / "data", config)
    try:
        _seals_and_admin_key(up, tmp_path)
    finally:
        up.stop()


def _seals_and_admin_key(up: Up, tmp_path: Path) -> None:
    orch = _services(up)["orchestrator"]["url"]
    assert orch.startswith("http://")
    keys = up.data / "keys"

    def dlq(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HAIF, "dlq", "list", "--orchestrator", orch, "--json", *flags],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,  # no .haif/keys/admin.key here
        )

    refused = dlq()
    assert refused.returncode == 2 and "unsigned" in refused.stderr, refused.stderr
    admin = [str(keys / "admin.key"), "--cluster-keyring", str(keys / "keyring")]
    allowed = dlq("--cluster-key", *admin)
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout) == []


def test_bounds_can_be_set_per_metric_and_bad_ones_are_named() -> None:
    bounds = parse_bounds(["ttft.p90=0.2", "e2e.p99=0"])
    assert bounds["ttft.p90"] == 0.2 and bounds["e2e.p99"] == 0.0
    assert bounds["ttft.p50"] == 0.05  # the others keep the targets
    sim = [timed_record(i, 0.1 * (1 + i / 100), 1.0) for i in range(100)]
    live = [timed_record(i, 0.1 * (1 + i / 100) * 1.08, 1.0) for i in range(100)]
    assert not compare(sim, live).passed
    loose = {**DEFAULT_BOUNDS, "ttft.p50": 0.1, "ttft.p90": 0.1}
    assert compare(sim, live, loose).passed
    for bad, message in (("ttft.p95=0.1", "unknown metric"), ("e2e.p50=x", "number >= 0")):
        with pytest.raises(ConfigError, match=message):
            parse_bounds([bad])
