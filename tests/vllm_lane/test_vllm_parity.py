"""Sim-to-real against real vLLM: calibrate a profile on one workload, check it on a trace.

The README's procedure ("Sim-to-real against real vLLM"), end to end, on this machine:
``haif up clusters/tiny-llama-vllm.yaml`` (vLLM's CPU build serving the tiny Llama),
``haif replay scenarios/calibrate_vllm.yaml`` (synthetic phases of load and lengths),
``haif calibrate --shared-steps`` on the cluster's records, then ``haif parity
scenarios/parity_vllm.yaml --engines clusters/tiny-llama-vllm.yaml`` with the fitted
profile: the simulator against a fresh vLLM cluster on a window of the Azure
conversation trace, which the profile was not fitted to.

What it checks is that the procedure works: every request served, on the same worker
in both runs, and each error within a guard (50 % at p50 and p90, 100 % at p99) that a
broken step fails (a unit, a lost overhead, a profile of the wrong engine: errors of
2x and more). It does not check the issue's target (10 % at p50 and p90): on this
machine, quiet, three runs of the procedure gave errors from -20 % to +39 % at p50
and p90, and the live side's own end-to-end p90 moved by up to 27 % between runs
(README, "Sim-to-real against real vLLM"; docs/validation.md lists the runs). The
vLLM lane runs it (``make test-vllm``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.require import require
from harness.up_cli import UpCli
from harness.vllm import haif_env

pytestmark = [pytest.mark.vllm, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
#: The guard on |relative error| at p50 and p90, and at p99 (which rests on a request or two).
BOUND = 0.50
P99_BOUND = 1.00


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
    bounds = [f"--bound={m}.p{q}={BOUND}" for m in ("ttft", "e2e") for q in (50, 90)]
    bounds += [f"--bound={m}.p99={P99_BOUND}" for m in ("ttft", "e2e")]
    parity = haif(
        *("parity", str(ROOT / "scenarios" / "parity_vllm.yaml"), "--engines", str(cluster)),
        *("--set", f"profiles={profiles}", "--out", str(tmp_path / "parity"), "-q", *bounds),
        cwd=tmp_path,
        timeout=900,
    )
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())
    table = {m["metric"]: m for m in report["metrics"]}
    shown = {
        k: round(v.get("error", float("nan")) * 100, 1) for k, v in table.items() if "error" in v
    }
    print(f"parity against real vLLM, error %: {shown}")
    assert table["success rate"]["live"] == 1.0, table["success rate"]
    assert report["same_worker"] == 1.0
    assert parity.returncode == 0, f"{shown}\n{parity.stdout}{parity.stderr}"
