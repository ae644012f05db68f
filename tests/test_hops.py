"""Measured hop delays (``network.hops``): the file, its sampling, and the simulator's use."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from haif.cli import main
from haif.configfile import ConfigError
from haif.fleet.hops import HopSampler, hops_document, load_hops, quantile
from haif.fleet.scenario import load_scenario
from haif.sim.driver import run_scenario
from haif.sim.fleet import Network

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    ("values", "u", "expected"),
    [
        ([2.0], 0.0, 2.0),
        ([2.0], 0.7, 2.0),
        ([2.0], 1.0, 2.0),
        ([1.0, 3.0], 0.0, 1.0),
        ([1.0, 3.0], 0.25, 1.5),
        ([1.0, 3.0], 0.5, 2.0),
        ([1.0, 3.0], 1.0, 3.0),
        ([1.0, 2.0, 4.0], 0.5, 2.0),
        ([1.0, 2.0, 4.0], 0.75, 3.0),
        ([1.0, 2.0, 4.0], 0.999, 3.996),
        ([0.0, 0.0, 10.0], 0.4, 0.0),
    ],
)
def test_quantile_interpolates_between_sorted_samples(
    values: list[float], u: float, expected: float
) -> None:
    assert quantile(values, u) == pytest.approx(expected)
    assert quantile(values, u) == pytest.approx(float(np.quantile(values, u)))


@pytest.mark.parametrize(("values", "u"), [([], 0.5), ([1.0], -0.1), ([1.0], 1.5)])
def test_quantile_refuses_what_has_none(values: list[float], u: float) -> None:
    with pytest.raises(ValueError):
        quantile(values, u)


@pytest.mark.parametrize(
    ("samples_ms", "median_ms", "mean_ms"),
    [
        ([2.0], 2.0, 2.0),
        ([3.0, 1.0], 2.0, 2.0),  # any order
        ([1.0, 2.0, 3.0, 4.0, 5.0], 3.0, 3.0),
        ([1.0, 1.0, 1.0, 9.0], 1.0, 1 + 8 / 6),  # uniform on [1, 9] over the last third
    ],
)
def test_sampler_draws_the_measured_distribution(
    samples_ms: list[float], median_ms: float, mean_ms: float
) -> None:
    sampler = HopSampler(samples_ms, random.Random(3))
    draws = np.array([sampler.draw_s() for _ in range(20_000)]) * 1000
    assert sampler.median_s * 1000 == pytest.approx(median_ms)
    assert draws.min() >= min(samples_ms) and draws.max() <= max(samples_ms)
    assert draws.mean() == pytest.approx(mean_ms, rel=0.02)


def test_sampler_is_reproducible_from_its_generator() -> None:
    def draws(seed: int) -> list[float]:
        sampler = HopSampler([1.5, 2.0, 2.5, 4.0], random.Random(seed))
        return [sampler.draw_s() for _ in range(50)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_network_draws_request_hops_and_keeps_the_median_for_the_rest() -> None:
    sampler = HopSampler([1.0, 5.0], random.Random(0))
    net = Network(lambda _a, _b: 4.0, 1.0, sampler.median_s, draw_hop=sampler.draw_s)
    assert net.one_way_s("a", "b") == pytest.approx(0.002 + 0.003)  # half the RTT + median
    hops = {net.request_hop_s("a", "b") for _ in range(100)}
    assert len(hops) > 90 and min(hops) >= 0.003 and max(hops) <= 0.007
    fixed = Network(lambda _a, _b: 4.0, 1.0, 0.003)
    assert fixed.request_hop_s("a", "b") == fixed.one_way_s("a", "b")


# ------------------------------------------------------------------ the file

GOOD = "source: bench/hop_latency.py on a test machine\nhop_ms: [1.5, 2.0, 2.25]\n"

BAD_FILES = [
    ("source: b\nhop_ms: []\n", "hop_ms", "at least 1 item"),
    ("source: b\nhop_ms: [1.0, -2.0]\n", "hop_ms.1", "greater than or equal to 0"),
    ("source: b\nhop_ms: [.nan]\n", "hop_ms.0", "finite number"),
    ("source: b\nhop_ms: [1.0, .inf]\n", "hop_ms.1", "finite number"),
    ("source: b\nhop_ms: fast\n", "hop_ms", "valid tuple"),
    ("hop_ms: [1.0]\n", "source", "Field required"),
    ("source: '  '\nhop_ms: [1.0]\n", "source", "at least 1 character"),
    ("source: b\nhop_ms: [1.0]\nhop_s: [0.001]\n", "hop_s", "Extra inputs are not permitted"),
    ("- 1.0\n- 2.0\n", "", "the top level must be a mapping"),
]


@pytest.mark.parametrize(("text", "field", "message"), BAD_FILES)
def test_a_bad_hops_file_names_the_file_and_field(
    tmp_path: Path, text: str, field: str, message: str
) -> None:
    path = tmp_path / "hops.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_hops(path)
    assert str(path) in str(err.value) and f"{field}" in str(err.value), err.value
    assert message in str(err.value), err.value


def test_the_written_document_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "hops.yaml"
    text = hops_document([2.0, 1.25, 3.5], 'bench: "quoted", 2 CPUs', ["measured", "", "here"])
    path.write_text(text)
    hops = load_hops(path)
    assert hops.source == 'bench: "quoted", 2 CPUs'
    assert hops.hop_ms == (2.0, 1.25, 3.5)
    assert text.startswith("# measured\n#\n# here\n")


# ------------------------------------------------------------------ in a scenario

SCENARIO = (
    "name: hops\nseed: 1\nduration_s: 4\nregions: [a, b]\ncontrol_regions: [a]\n"
    "workers: [{region: a, gpu: A100-80G}, {region: b, gpu: H100-80G}]\n"
    "workload: {kind: poisson, rate: 3, origins: {a: 1.0}, prompt_tokens: {kind: fixed,"
    " value: 100}, output_tokens: {kind: fixed, value: 10}}\n"
    "policy: {rtt_ms: {a: {b: 3}}}\n"
)


def _scenario(tmp_path: Path, network: str = "", hops: str | None = GOOD) -> Path:
    if hops is not None:
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "hops.yaml").write_text(hops)
    path = tmp_path / "hops_scenario.yaml"
    path.write_text(SCENARIO + (f"network: {network}\n" if network else ""))
    return path


@pytest.mark.parametrize(("text", "field", "message"), BAD_FILES)
def test_haif_sim_refuses_a_bad_hops_file_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, field: str, message: str
) -> None:
    path = _scenario(tmp_path, "{hops: data/hops.yaml}", text)
    assert main(["sim", str(path), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}:" in err and "network.hops: " in err, err
    assert str(tmp_path / "data" / "hops.yaml") in err and field in err and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ("{hops: data/none.yaml}", "no such file"),
        ("{hops: data/hops.yaml, hop_ms: 2.0}", "as hop_ms or as a hops file, not both"),
    ],
)
def test_a_scenario_names_a_missing_or_doubled_hop_cost(
    tmp_path: Path, network: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"network\.hops: ") as err:
        load_scenario(_scenario(tmp_path, network))
    assert message in str(err.value)


def test_the_hops_file_is_relative_to_the_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _scenario(tmp_path, "{hops: data/hops.yaml}")
    monkeypatch.chdir(ROOT)
    scenario = load_scenario(path)
    assert scenario.hops_path() == tmp_path / "data" / "hops.yaml"
    samples = scenario.hop_samples()
    assert samples is not None and samples.hop_ms == (1.5, 2.0, 2.25)


def _ttfts(path: Path, overrides: list[str]) -> dict[str, float]:
    records = run_scenario(load_scenario(path, overrides)).records
    return {r.request_id: r.first_token_s - r.arrival_s for r in records if r.first_token_s}


def test_one_measured_value_is_the_constant(tmp_path: Path) -> None:
    """A file holding only hop_ms's value gives the run hop_ms gives, record for record:
    drawing changes nothing but the delays."""
    path = _scenario(tmp_path, hops="source: test\nhop_ms: [2.0]\n")
    constant = run_scenario(load_scenario(path, ["network.hop_ms=2.0"])).records
    drawn = run_scenario(load_scenario(path, ["network.hops=data/hops.yaml"])).records
    assert len(constant) > 5
    assert drawn == constant


def test_each_hop_of_a_request_draws_its_own_delay(tmp_path: Path) -> None:
    """Four hops on a request's way to its first token: each request's TTFT grows by
    between 4 x the smallest and 4 x the largest sample, by different amounts."""
    path = _scenario(tmp_path, hops="source: test\nhop_ms: [1.0, 1.0, 9.0]\n")
    base = _ttfts(path, ["workload.rate=0.5", "network.hop_ms=0"])
    drawn = _ttfts(path, ["workload.rate=0.5", "network.hops=data/hops.yaml"])
    assert len(base) >= 2 and set(base) == set(drawn)
    added = [drawn[rid] - base[rid] for rid in base]
    assert all(0.004 - 1e-9 <= a <= 0.036 + 1e-9 for a in added), added
    assert len({round(a, 9) for a in added}) == len(added)


def test_drawn_hops_are_reproducible_for_a_seed(tmp_path: Path) -> None:
    path = _scenario(tmp_path, "{hops: data/hops.yaml}")
    first = run_scenario(load_scenario(path)).records
    assert len(first) > 5
    assert run_scenario(load_scenario(path)).records == first


@pytest.mark.parametrize("name", ["parity.yaml", "parity_ci.yaml", "parity_heldout.yaml"])
def test_the_parity_scenarios_draw_hops_measured_on_a_run_of_their_own(name: str) -> None:
    """The hop cost a parity run is checked with was measured by bench/hop_latency.py on
    an idle cluster, not fitted on a parity scenario's live run; the file says so."""
    scenario = load_scenario(ROOT / "scenarios" / name)
    assert scenario.network.hops == "hops/local.yaml"
    samples = scenario.hop_samples()
    assert samples is not None and len(samples.hop_ms) >= 100
    assert samples.source.startswith("bench/hop_latency.py --out scenarios/hops/local.yaml")
