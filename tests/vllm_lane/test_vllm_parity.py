"""Sim-to-real against real vLLM: calibrate a profile on one workload, check it on a trace.

The README's procedure ("Sim-to-real against real vLLM"), end to end, on this machine:
``haif up clusters/tiny-llama-vllm.yaml`` (vLLM's CPU build serving the tiny Llama),
``haif replay scenarios/calibrate_vllm.yaml`` (synthetic phases of load and lengths),
``haif calibrate --shared-steps`` on the cluster's records, then ``haif parity
scenarios/parity_vllm.yaml --engines clusters/tiny-llama-vllm.yaml`` with the fitted
profile: the simulator against a fresh vLLM cluster on a window of the Azure
conversation trace, which the profile was not fitted to.

What it checks is that the procedure works: every request served, on the same worker
in both runs, and each live quantile within a factor of the simulated one (3 at p50
and p90, 4 at p99, which rests on a request or two). That guard is wide because one
run on two cores is noisy: on this machine runs of the procedure gave TTFT p90 errors
from -1 % to +140 % (the latter between two runs at +15 % and +3 %), and CI on a 2-core
Intel machine once measured +68 % at TTFT p50 (docs/validation.md lists the runs). It
is not the issue's target (10 %). What the guard is for, it shows on the same live
run: the fitted profile with every step cost five times too large, or a fifth as
large, fails it. A failure prints the parity report and the fit. The
vLLM lane runs it (``make test-vllm``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.require import require
from harness.up_cli import UpCli
from harness.vllm import haif_env

from haif.analysis.calibrate import COEFFICIENTS
from haif.analysis.parity import compare
from haif.fleet.scenario import load_scenario
from haif.records import read_parquet
from haif.sim.driver import run_scenario

pytestmark = [pytest.mark.vllm, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
#: The guard: live / simulated quantile within [1 / factor, factor].
FACTOR = {"p50": 3.0, "p90": 3.0, "p99": 4.0}
#: Step costs this far off, either way, must fail the guard (the negative control).
BROKEN = 5.0


def haif(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "haif", *args],
        cwd=cwd,
        env=haif_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_calibrate_then_parity_against_real_vllm_end_to_end(tmp_path: Path) -> None:
    require("vllm", extra="vllm")
    cluster = tmp_path / "tiny-llama-vllm.yaml"
    # Calibrated on the cluster haif parity runs: plain loopback HTTP between the
    # services (mutual TLS, haif up's default, costs the worker's CPU too).
    cluster.write_text(
        (ROOT / "clusters" / "tiny-llama-vllm.yaml").read_text() + "internal_tls: false\n"
    )
    made = haif(
        *("artifacts", "make-tiny", "--arch", "llama", "--store", "tiny-llama/art"),
        *("--key", "tiny-llama/keys/cluster.key"),
        cwd=tmp_path,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr

    # 1. The calibration workload through a live vLLM cluster; its records at Ctrl-C.
    up = UpCli(
        tmp_path / "calibrate", cluster, workers=1, cwd=tmp_path, env=haif_env(), timeout_s=400
    )
    try:
        replay = haif(
            *("replay", str(ROOT / "scenarios" / "calibrate_vllm.yaml")),
            *("--cluster", str(tmp_path / "calibrate"), "--out", str(tmp_path / "replay")),
            cwd=tmp_path,
            timeout=400,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
    finally:
        out = up.stop()
    assert up.proc.returncode == 0, out

    # 2. The profile of (CPU-vllm, tiny-llama) fitted to those records.
    profiles = tmp_path / "cpu-vllm.yaml"
    fitted = haif(
        *("calibrate", str(tmp_path / "calibrate" / "records.parquet")),
        *("--as-gpu", "CPU-vllm", "--base", "CPU", "--shared-steps", "--out", str(profiles)),
        cwd=tmp_path,
        timeout=120,
    )
    assert fitted.returncode == 0, fitted.stdout + fitted.stderr
    errors = json.loads((tmp_path / "calibrate.json").read_text())
    assert errors, fitted.stdout

    # 3. The simulator with that profile against a fresh vLLM cluster on the trace window.
    # The CLI's own bounds are the guard's upper side; the test reads both sides.
    bounds = [f"--bound={m}.{q}={f - 1}" for m in ("ttft", "e2e") for q, f in FACTOR.items()]
    parity = haif(
        *("parity", str(ROOT / "scenarios" / "parity_vllm.yaml"), "--engines", str(cluster)),
        *("--set", f"profiles={profiles}", "--out", str(tmp_path / "parity"), "-q", *bounds),
        cwd=tmp_path,
        timeout=900,
    )
    assert parity.returncode in (0, 1), parity.stdout + parity.stderr  # 1: a bound exceeded
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    table = {m["metric"]: m for m in report["metrics"]}
    shown = {k: round(v["error"] * 100, 1) for k, v in table.items() if "error" in v}
    print(f"parity against real vLLM, error %: {shown}")
    assert table["success rate"]["live"] == 1.0, table["success rate"]
    assert report["same_worker"] == 1.0
    diagnosis = (
        f"{shown}\n{(tmp_path / 'parity' / 'parity.md').read_text()}\n"
        f"haif calibrate:\n{fitted.stdout}"
    )
    assert outside_guard(report["metrics"]) == [], diagnosis

    # 4. The negative control: the same live run against profiles with broken step costs.
    live = read_parquet(tmp_path / "parity" / "live.parquet")
    for factor in (BROKEN, 1 / BROKEN):
        scaled = scaled_profile(profiles, factor, tmp_path / f"broken-{factor:.2f}.yaml")
        scenario = load_scenario(ROOT / "scenarios" / "parity_vllm.yaml", [f"profiles={scaled}"])
        broken = compare(run_scenario(scenario).records, live, resamples=10)
        missed = outside_guard(broken.metrics)
        print(f"step costs x{factor:.2f}: outside the guard {missed}")
        assert "e2e p50" in missed, (factor, broken.metrics)


def outside_guard(metrics: list[dict[str, Any]]) -> list[str]:
    """The latency quantiles whose live / simulated ratio is outside the guard."""
    out = []
    for m in metrics:
        quantile = m["metric"].split()[-1]
        if quantile in FACTOR and "error" in m:
            ratio, factor = m["error"] + 1.0, FACTOR[quantile]
            if not 1 / factor <= ratio <= factor:
                out.append(m["metric"])
    return out


def scaled_profile(path: Path, factor: float, out: Path) -> Path:
    """``path``'s catalog with the step costs haif calibrate fitted multiplied by ``factor``."""
    catalog = yaml.safe_load(path.read_text())
    pairs = [p for p in catalog["coefficients"] if p["gpu"] == "CPU-vllm"]
    assert pairs, f"no CPU-vllm pair in {path}"
    for pair in pairs:
        pair.update({k: pair[k] * factor for k in COEFFICIENTS})
    out.write_text(yaml.safe_dump(catalog))
    return out
