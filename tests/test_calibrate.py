"""``haif calibrate``: recover a known profile from the records of simulated runs.

The simulator, timed by a catalog whose (CPU, tiny-gpt2) coefficients are
chosen here (KNOWN), writes request records; calibrating from them must give
coefficients whose prefill and decode step times match KNOWN's over the
range the records cover. The fitted catalog then drives a scenario through
``profiles:``. Bad inputs give clear errors (exit 2, no traceback).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from haif.analysis.calibrate import (
    CalibrationError,
    PairFit,
    calibrate,
    collect,
    fit_pair,
)
from haif.cli import main
from haif.configfile import ConfigError
from haif.contracts import RequestRecord
from haif.fleet.profiles import StepCoefficients, load_catalog
from haif.fleet.scenario import load_scenario
from haif.records import write_parquet
from haif.sim.driver import run_scenario

KNOWN = StepCoefficients(
    floor_s=0.005,
    a_s=0.002,
    b_s=5.0e-5,
    c_s=1.0e-6,
    d_s=0.001,
    e_s=1.0e-8,
    source="chosen for the test",
)
OVERHEAD_S = 0.0156  # the packaged catalog's api_overhead_s, which the simulator adds
# Fitted step times within 1 % of KNOWN's over the observed range (the worst here:
# 0.87 % for a decode step, 0.12 % for a prefill; deterministic, seeded runs).
TOLERANCE = 0.01
TODAY = dt.date(2025, 1, 2)


def _known_catalog(path: Path) -> Path:
    doc = yaml.safe_load(
        resources.files("haif.fleet.data").joinpath("profiles.yaml").read_text(encoding="utf-8")
    )
    names = ("floor_s", "a_s", "b_s", "c_s", "d_s", "e_s")
    entry: dict[str, Any] = {"gpu": "CPU", "model": "tiny-gpt2"}
    entry.update({n: getattr(KNOWN, n) for n in names})
    entry["sources"] = {n: KNOWN.source for n in names}
    doc["coefficients"].append(entry)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _scenario(folder: Path, name: str, **extra: Any) -> Path:
    worker: dict[str, Any] = {"region": "local", "gpu": "CPU", "models": ["tiny-gpt2"]}
    worker.update(extra.pop("worker", {}))
    doc: dict[str, Any] = {
        "name": name,
        "seed": 3,
        "duration_s": 120,
        "drain_s": 60,
        "regions": ["local"],
        "profiles": "known.yaml",
        "store": {"write_latency_ms": 0},  # nothing but the API overhead before the prefill
        "workers": [worker],
        "workload": {
            "kind": "poisson",
            "rate": 6.0,
            "models": {"tiny-gpt2": 1.0},
            "prompt_tokens": {"kind": "uniform", "low": 20, "high": 400},
            "output_tokens": {"kind": "uniform", "low": 4, "high": 64},
        },
    }
    doc.update(extra)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Records of two simulated runs timed by KNOWN (a few seconds in all)."""
    folder = tmp_path_factory.mktemp("calibrate")
    _known_catalog(folder / "known.yaml")
    scenarios = {
        # Continuous batching: B from 1 to 8, prefills pausing the decodes.
        "iteration": _scenario(folder, "iteration", fidelity="iteration"),
        # Prompts join the running decodes' steps (vLLM v1): shared steps.
        "shared": _scenario(
            folder, "shared", fidelity="iteration", worker={"chunked_prefill_tokens": 4096}
        ),
        # One slot: every decode runs alone (B = 1), so d cannot be told from the floor.
        "single": _scenario(
            folder,
            "single",
            fidelity="request",
            duration_s=150,
            worker={"max_batch": 1},
            workload={**yaml.safe_load((folder / "iteration.yaml").read_text())["workload"]}
            | {"rate": 2.0},
        ),
    }
    out = {}
    for name, path in scenarios.items():
        result = run_scenario(load_scenario(path))
        out[name] = write_parquet(result.records, folder / name / "records.parquet")
    return out


def _prefill_error(fit: PairFit) -> float:
    lo, hi = fit.obs.prompt.min(), fit.obs.prompt.max()
    worst = 0.0
    for n in np.linspace(lo, hi, 40).round():
        known = KNOWN.step_time(int(n), 0, 1, n * n)
        got = fit.coeffs.step_time(int(n), 0, 1, n * n)
        worst = max(worst, abs(got - known) / known)
    return worst


def _decode_error(fit: PairFit) -> float:
    """Worst relative error of a decode step over the observed B and context per sequence."""
    m = fit.obs.decode_ok
    b = fit.obs.batch[m]
    per_seq = fit.obs.context[m] / b
    worst = 0.0
    for batch in np.linspace(np.percentile(b, 5), np.percentile(b, 95), 8):
        for ctx in np.linspace(np.percentile(per_seq, 5), np.percentile(per_seq, 95), 8):
            known = KNOWN.step_time(0, 0, 0) + KNOWN.c_s * batch * ctx + KNOWN.d_s * batch
            got = fit.coeffs.floor_s + fit.coeffs.c_s * batch * ctx + fit.coeffs.d_s * batch
            worst = max(worst, abs(got - known) / known)
    return worst


def test_iteration_level_records_give_back_the_known_profile(runs: dict[str, Path]) -> None:
    result = calibrate(runs["iteration"], today=TODAY)
    (fit,) = result.fits
    assert (fit.gpu, fit.model) == ("CPU", "tiny-gpt2")
    assert fit.overhead_s == OVERHEAD_S
    assert set(fit.fitted) == {"floor_s", "a_s", "b_s", "c_s", "d_s", "e_s"}
    assert fit.obs.batch.max() > 4  # the records do exercise batching
    assert _prefill_error(fit) < TOLERANCE
    assert _decode_error(fit) < TOLERANCE
    summary = fit.summary()
    assert summary["ttft_idle_abs_rel_error"]["median"] < TOLERANCE
    assert summary["tpot_abs_rel_error"]["median"] < TOLERANCE
    assert summary["idle_prefill_observations"] >= 10
    # Without taking the interleaved prefills out, decode steps come out too slow.
    naive = fit_pair(fit.obs, overhead_s=OVERHEAD_S, origin="x", prefill_stalls=False)
    assert naive.coeffs.step_time(0, 600, 3) > fit.coeffs.step_time(0, 600, 3)
    assert not [n for n in result.notes if "--overhead" in n]


def test_prefills_that_share_the_decodes_steps_are_taken_out_as_such(
    runs: dict[str, Path],
) -> None:
    """With chunked_prefill_tokens a prompt joins a step that still decodes the others:
    --shared-steps takes out only what its prefill adds beyond the floor and gives back
    the known profile; taken out as a step of its own, the floor is taken out once too
    often and decode steps come out too fast."""
    (fit,) = calibrate(runs["shared"], today=TODAY, shared_steps=True).fits
    assert fit.obs.batch.max() > 4
    assert _decode_error(fit) < TOLERANCE
    assert _prefill_error(fit) < TOLERANCE
    assert "prefills share steps with decodes" in fit.sources["d_s"]
    (separate,) = calibrate(runs["shared"], today=TODAY).fits
    assert _decode_error(separate) > 2 * TOLERANCE
    assert separate.coeffs.step_time(0, 600, 3) < fit.coeffs.step_time(0, 600, 3)


def test_an_overhead_the_simulator_does_not_add_is_pointed_out(runs: dict[str, Path]) -> None:
    """--overhead 0 fits TTFT without the per-request overhead the simulator adds (the
    catalog's api_overhead_s): simulated TTFTs then sit that far above the fit; say so."""
    result = calibrate(runs["iteration"], today=TODAY, overhead_s=0.0)
    (note,) = [n for n in result.notes if "--overhead" in n]
    assert f"{OVERHEAD_S * 1000:+.1f} ms off the fit" in note


def test_one_slot_leaves_the_per_sequence_term_unidentified(runs: dict[str, Path]) -> None:
    (fit,) = calibrate(runs["single"], today=TODAY, prefill_stalls=False).fits
    assert np.allclose(fit.obs.batch, 1.0)
    assert "d_s" not in fit.fitted and fit.coeffs.d_s == 0.0
    assert any(
        n.startswith("d_s cannot be identified: every decode ran at about the same")
        for n in fit.notes
    )
    assert "not identifiable" in fit.sources["d_s"]
    # The floor takes up d: a decode step at B = 1 is still right.
    assert _prefill_error(fit) < TOLERANCE
    assert _decode_error(fit) < TOLERANCE

    catalog = load_catalog()
    (based,) = calibrate(runs["single"], today=TODAY, prefill_stalls=False, base_gpu="CPU").fits
    assert based.coeffs.d_s == catalog.get("CPU", "tiny-gpt2").coeffs.d_s
    assert "kept at CPU (catalog)'s value" in based.sources["d_s"]
    assert _decode_error(based) < TOLERANCE


def test_written_catalog_drives_a_scenario(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cat" / "my-profiles.yaml"
    result = calibrate(runs["iteration"], today=TODAY, out=out, as_gpu="CPU-local")
    assert result.names == {("CPU", "tiny-gpt2"): ("CPU-local", "tiny-gpt2")}
    catalog = load_catalog(out)
    fitted = catalog.get("CPU-local", "tiny-gpt2").coeffs
    assert fitted == dataclasses.replace(result.fits[0].coeffs, source=fitted.source)
    assert "fitted by haif calibrate" in fitted.source and "2025-01-02" in fitted.source
    assert "assumption: copied from catalog GPU CPU" in catalog.gpus["CPU-local"].source
    assert catalog.get("H100-80G", "llama-3-8b") == load_catalog().get("H100-80G", "llama-3-8b")
    report = json.loads((out.parent / "calibrate.json").read_text())
    assert report["pairs"][0]["written_as"] == ["CPU-local", "tiny-gpt2"]
    assert report["pairs"][0]["tpot_abs_rel_error"]["median"] < TOLERANCE

    scenario_path = _scenario(
        out.parent,
        "fitted",
        profiles="my-profiles.yaml",
        duration_s=20,
        worker={"gpu": "CPU-local"},
    )
    scenario = load_scenario(scenario_path)
    records = run_scenario(scenario).records
    ok = [r for r in records if r.status == "ok"]
    assert ok and all(r.gpu_class == "CPU-local" for r in ok)
    # The first request finds the worker idle: its TTFT is the overhead + the fitted prefill.
    first = min(ok, key=lambda r: r.arrival_s)
    assert first.first_token_s is not None and first.admitted_s is not None
    n = first.prompt_tokens
    assert first.first_token_s - first.admitted_s == pytest.approx(
        OVERHEAD_S + fitted.step_time(n, 0, 1, float(n * n)), rel=1e-9
    )


def test_scenario_profiles_errors(tmp_path: Path) -> None:
    path = _scenario(tmp_path, "missing", profiles="nope.yaml")
    with pytest.raises(ConfigError, match=r"missing.yaml:\d+: profiles: no such file .*nope.yaml"):
        load_scenario(path)
    path = _scenario(tmp_path, "no_profiles", profiles=None, worker={"gpu": "CPU-local"})
    with pytest.raises(ConfigError, match=r"workers.0.gpu: unknown GPU 'CPU-local'"):
        load_scenario(path)
    (tmp_path / "bad.yaml").write_text("gpus: 3\n", encoding="utf-8")
    path = _scenario(tmp_path, "bad", profiles="bad.yaml")
    with pytest.raises(ConfigError, match=r"profiles: .*bad.yaml: not a profile catalog"):
        load_scenario(path)


def test_cli_prints_the_fit_and_writes_the_catalog(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.yaml"
    code = main(["calibrate", str(runs["iteration"].parent), "--out", str(out), "--gpu", "CPU"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "CPU, tiny-gpt2" in printed and "TPOT |rel. error|" in printed
    assert out.is_file() and (tmp_path / "calibrate.json").is_file()
    assert load_catalog(out).get("CPU", "tiny-gpt2").coeffs.source.startswith("floor_s: fitted")


def _record(i: int, **kw: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": f"r{i}",
        "tenant": "t",
        "model": "tiny-gpt2",
        "origin_region": "local",
        "served_region": "local",
        "worker_id": "w1",
        "gpu_class": "CPU",
        "arrival_s": 10.0 * i,
        "admitted_s": 10.0 * i,
        "first_token_s": 10.0 * i + 0.05,
        "finish_s": 10.0 * i + 0.05 + 0.01 * 9,
        "prompt_tokens": 128,
        "output_tokens": 10,
        "attempts": 1,
        "status": "ok",
        "reason": None,
        "cold_start": False,
        "cost": 0.0,
    }
    fields.update(kw)
    return RequestRecord(**fields)


def test_degenerate_records_name_what_cannot_be_identified() -> None:
    # Every prompt 128 tokens, every decode alone at about the same context: a and floor.
    records = [
        _record(i, output_tokens=10 + i, finish_s=10.0 * i + 0.05 + 0.01 * (9 + i))
        for i in range(5)
    ]
    (obs,) = collect(records).values()
    fit = fit_pair(obs, overhead_s=0.0, origin="t")
    notes = "\n".join(fit.notes)
    assert "b_s cannot be identified: every prompt had 128 tokens; kept at 0" in notes
    assert "e_s cannot be identified: every prompt had 128 tokens" in notes
    assert "d_s cannot be identified: every decode ran at about the same batch size" in notes
    assert "c_s cannot be identified: the decode context does not vary" in notes
    assert fit.coeffs.b_s == fit.coeffs.e_s == fit.coeffs.d_s == fit.coeffs.c_s == 0.0
    assert fit.coeffs.step_time(128, 0, 1, 128.0**2) == pytest.approx(0.05, rel=1e-3)
    assert fit.coeffs.floor_s == pytest.approx(0.01, rel=1e-3)

    # A single request: nothing to tell apart, still no crash.
    (obs,) = collect([_record(0)]).values()
    fit = fit_pair(obs, overhead_s=0.0, origin="t")
    assert fit.coeffs.floor_s > 0 and "too few observations (1)" in "\n".join(fit.notes)


def _write(path: Path, records: list[RequestRecord]) -> Path:
    return write_parquet(records, path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope.parquet", "nope.parquet: no such file"),
        (lambda d: d / "empty_dir", "records.parquet: no such file"),
        (
            lambda d: d.joinpath("text.parquet").write_text("hello") and d / "text.parquet",
            "cannot read request records as Parquet",
        ),
        (
            lambda d: (
                pq.write_table(pa.table({"x": [1]}), d / "cols.parquet") or d / "cols.parquet"
            ),
            "missing column(s) request_id",
        ),
        (
            lambda d: _write(d / "failed.parquet", [_record(0, status="failed", reason="x")]),
            "no ok requests to calibrate from (1 records, statuses: failed)",
        ),
        (
            lambda d: _write(d / "short.parquet", [_record(0, output_tokens=1)]),
            "no usable requests",
        ),
    ],
)
def test_bad_records_exit_2_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    (tmp_path / "empty_dir").mkdir()
    path = make(tmp_path)
    assert main(["calibrate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_bad_options_are_clear(tmp_path: Path) -> None:
    records = [_record(0), _record(1, gpu_class="A100-80G", worker_id="w2")]
    path = _write(tmp_path / "two.parquet", records)
    with pytest.raises(CalibrationError, match=r"--gpu H100-80G: no such .* \(found A100-80G/"):
        calibrate(path, today=TODAY, gpu="H100-80G")
    with pytest.raises(CalibrationError, match="--as-gpu X: the records hold several GPU classes"):
        calibrate(path, today=TODAY, as_gpu="X")
    with pytest.raises(CalibrationError, match="--base TPU: not a GPU of the catalog"):
        calibrate(path, today=TODAY, base_gpu="TPU")
    with pytest.raises(CalibrationError, match="model 'gpt-9' is not in the catalog"):
        calibrate(path, today=TODAY, gpu="CPU", as_model="gpt-9", out=tmp_path / "c.yaml")
    assert not (tmp_path / "c.yaml").exists()
