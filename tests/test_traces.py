"""Workload sources: data checks against the figures published in shared/traces/README.md,
plus unit tests of the arrival processes and transforms."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from haif.fleet.scenario import Scenario
from haif.fleet.traces import (
    BLOCK_TOKENS,
    SERVEGEN_WINDOW_S,
    TRACES_DIR,
    ClientWindow,
    LengthSampler,
    TraceRequest,
    diurnal_arrivals,
    gamma_arrivals,
    load_azure,
    load_lengths,
    load_mooncake,
    load_servegen,
    poisson_arrivals,
    prefix_reuse,
    prefix_reuse_tokens,
    scale_rate,
    servegen_arrivals,
    shift,
    time_window,
    trace_stats,
)
from haif.fleet.workload import build_requests

AZURE_CONV = TRACES_DIR / "azure_llm_2023_conv.csv"
AZURE_CODE = TRACES_DIR / "azure_llm_2023_code.csv"
MOONCAKE = TRACES_DIR / "mooncake_fast25_conversation.jsonl"
SHAREGPT = TRACES_DIR / "lengths_sharegpt8k_llama2tok.csv"
ARXIV = TRACES_DIR / "lengths_arxiv_summarization_llama2tok.csv"
SERVEGEN = TRACES_DIR / "servegen_m-large_day1.csv"

# Published in shared/traces/README.md (full files) and traces/README.md (the slice).
SHA256 = {
    "azure_llm_2023_code.csv": "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
    "azure_llm_2023_conv.csv": "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
    "mooncake_fast25_conversation.jsonl": (
        "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df"
    ),
    "lengths_sharegpt8k_llama2tok.csv": (
        "6d6c296302a853e2669a674a96f269283e60c57e60363bd450588a1066919f9f"
    ),
    "lengths_arxiv_summarization_llama2tok.csv": (
        "9d3580538d915ca75e4aaaa54590b42dbb17abc6d74c8913310cf07c232adcdc"
    ),
    "servegen_m-large_day1.csv": "f07d69eb11c9fade1f7eabe398a3a542d32dcf8f85ba2cec1575c8b8edb9544d",
}


def _cv(times: list[float]) -> float:
    iat = np.diff(np.asarray(times))
    return float(iat.std() / iat.mean())


@cache
def _mooncake(seed: int = 7) -> tuple[TraceRequest, ...]:
    return tuple(load_mooncake(MOONCAKE, random.Random(seed)))


@cache
def _servegen() -> tuple[ClientWindow, ...]:
    return tuple(load_servegen(SERVEGEN, model="m-large"))


# ------------------------------------------------------------------ checksums


@pytest.mark.parametrize("name", sorted(SHA256))
def test_shipped_files_are_byte_exact(name: str) -> None:
    digest = hashlib.sha256((TRACES_DIR / name).read_bytes()).hexdigest()
    assert digest == SHA256[name]


def test_readme_lists_every_shipped_file() -> None:
    readme = (TRACES_DIR / "README.md").read_text(encoding="utf-8")
    for name, digest in SHA256.items():
        assert name in readme
        assert digest in readme


# ---------------------------------------------------------------------- Azure


def test_azure_conv_matches_published_stats() -> None:
    reqs = load_azure(AZURE_CONV)
    assert len(reqs) == 19_366
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(4.3145790)  # 18:15:50.9951690 - 18:15:46.6805900
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    s = trace_stats(reqs)
    assert s["rate"] == pytest.approx(5.53, abs=0.05)
    assert s["iat_cv"] == pytest.approx(1.09, abs=0.02)
    assert s["input_mean"] == pytest.approx(1_155, abs=1)
    assert s["output_mean"] == pytest.approx(211, abs=1)
    assert (s["input_p50"], s["input_p99"]) == (1_020, 4_142)
    assert (s["output_p50"], s["output_p99"]) == (129, 601)
    assert s["span_s"] == pytest.approx(3_501.721937)


def test_azure_code_matches_published_stats() -> None:
    reqs = load_azure(AZURE_CODE)
    assert len(reqs) == 8_819
    s = trace_stats(reqs)
    assert s["rate"] == pytest.approx(2.57, abs=0.01)
    assert s["iat_cv"] == pytest.approx(13.15, abs=0.1)
    assert s["input_mean"] == pytest.approx(2_048, abs=1)
    assert s["output_mean"] == pytest.approx(27.9, abs=0.1)


def test_azure_parses_timestamps_exactly(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_bytes(
        b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        b"2023-11-16 23:59:59.9999999,1,2\r\n"
        b"2023-11-17 00:00:00.0000001,3,4\r\n"
        b"2023-11-16 23:59:58,5,6"
    )
    reqs = load_azure(p)
    assert [r.prompt_tokens for r in reqs] == [5, 1, 3]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(1.9999999, abs=1e-12)
    assert reqs[2].arrival_s == pytest.approx(2.0000001, abs=1e-12)


# ------------------------------------------------------------------- Mooncake


def test_mooncake_rows_and_lengths() -> None:
    reqs = load_mooncake(MOONCAKE, random.Random(0), quantum_s=0.0)
    assert len(reqs) == 12_031
    s = trace_stats(reqs)
    assert s["span_s"] == pytest.approx(3_537, abs=1)
    assert s["rate"] == pytest.approx(3.40, abs=0.01)
    assert s["iat_cv"] == pytest.approx(3.03, abs=0.02)  # the quantization artefact
    assert s["input_mean"] == pytest.approx(12_035, abs=1)
    assert s["output_mean"] == pytest.approx(343, abs=1)
    assert all(len(r.hash_ids) == math.ceil(r.prompt_tokens / BLOCK_TOKENS) for r in reqs)


def test_mooncake_prefix_reuse_unlimited_is_published_36_6_percent() -> None:
    reqs = _mooncake()
    assert prefix_reuse(reqs) == pytest.approx(0.366, abs=0.01)
    assert prefix_reuse(reqs) == pytest.approx(0.3664, abs=1e-4)
    assert prefix_reuse_tokens(reqs) == pytest.approx(0.374, abs=0.01)


def test_mooncake_prefix_reuse_lru_3m_tokens() -> None:
    reqs = _mooncake()
    assert prefix_reuse(reqs, cache_blocks=int(3e6 / BLOCK_TOKENS)) == pytest.approx(
        0.136, abs=0.01
    )


def test_mooncake_spread_is_sorted_bounded_and_deterministic() -> None:
    raw = load_mooncake(MOONCAKE, random.Random(0), quantum_s=0.0)
    spread = _mooncake()
    assert spread == tuple(load_mooncake(MOONCAKE, random.Random(7)))
    assert spread != tuple(load_mooncake(MOONCAKE, random.Random(8)))
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(spread))
    # Stable within a bucket: the i-th request of the file is the i-th request out.
    for r, s in zip(raw, spread, strict=True):
        assert (r.prompt_tokens, r.output_tokens, r.hash_ids) == (
            s.prompt_tokens,
            s.output_tokens,
            s.hash_ids,
        )
        assert r.arrival_s <= s.arrival_s < r.arrival_s + 3.0
    # Spreading removes the quantization artefact: IATs look roughly Poisson-like.
    assert trace_stats(list(spread))["iat_cv"] < 1.5


def test_mooncake_spread_gap_is_limited_by_next_stamp(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    lines = [
        '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0]}',
        '{"timestamp": 0, "input_length": 2, "output_length": 1, "hash_ids": [0]}',
        '{"timestamp": 1000, "input_length": 3, "output_length": 1, "hash_ids": [1]}',
        '{"timestamp": 1000, "input_length": 4, "output_length": 1, "hash_ids": [1]}',
    ]
    p.write_text("\n".join(lines) + "\n")
    for seed in range(50):
        reqs = load_mooncake(p, seed, quantum_s=3.0)
        assert [r.prompt_tokens for r in reqs] == [1, 2, 3, 4]
        assert all(0.0 <= r.arrival_s < 1.0 for r in reqs[:2])
        assert all(1.0 <= r.arrival_s < 4.0 for r in reqs[2:])


# -------------------------------------------------------------- prefix reuse


@pytest.mark.parametrize(
    ("blocks", "cache_blocks", "expected"),
    [
        # Prefix semantics: the lookup stops at the first miss.
        ([(1, 2, 3), (1, 9, 3)], None, 1 / 6),
        ([(1, 2, 3), (1, 2, 3)], None, 3 / 6),
        ([(1, 2), (3, 4), (1, 2)], None, 2 / 6),
        ([(1, 2), (3, 4), (1, 2)], 2, 0.0),  # LRU evicted 1, 2
        ([(1, 2), (3, 4), (1, 2)], 4, 2 / 6),
        ([(1, 2), (1, 3), (1, 2)], 2, 2 / 6),  # LRU keeps 1 (touched), FIFO would not
        ([(1, 2), (1, 2)], 0, 0.0),
        ([], None, 0.0),
    ],
)
def test_prefix_reuse_table(
    blocks: list[tuple[int, ...]], cache_blocks: int | None, expected: float
) -> None:
    reqs = [TraceRequest(float(i), BLOCK_TOKENS * len(b), 1, b) for i, b in enumerate(blocks)]
    assert prefix_reuse(reqs, cache_blocks) == pytest.approx(expected)


def test_prefix_reuse_uses_arrival_order_and_tokens() -> None:
    late = TraceRequest(2.0, 1000, 1, (1, 2))
    early = TraceRequest(1.0, 600, 1, (1, 2))
    assert prefix_reuse([late, early]) == pytest.approx(0.5)
    # 'late' hits both blocks but only has 1000 tokens: 1000 / 1600 reused.
    assert prefix_reuse_tokens([late, early]) == pytest.approx(1000 / 1600)


# -------------------------------------------------------------------- lengths


def test_length_files_and_sampler() -> None:
    share = load_lengths(SHAREGPT)
    arxiv = load_lengths(ARXIV)
    assert len(share) == 30_731
    assert len(arxiv) == 28_257
    assert np.mean([p for p, _ in share]) == pytest.approx(2_340, abs=1)
    assert np.mean([d for _, d in share]) == pytest.approx(439, abs=1)
    assert np.mean([p for p, _ in arxiv]) == pytest.approx(2_588, abs=1)
    assert np.mean([d for _, d in arxiv]) == pytest.approx(291, abs=1)
    a = LengthSampler(share, random.Random(11))
    b = LengthSampler(share, 11)
    draws = [a.sample() for _ in range(2_000)]
    assert draws == [b.sample() for _ in range(2_000)]
    pool = set(share)
    assert all(d in pool for d in draws)
    assert len(set(draws)) > 1_000  # with replacement, but spread over the file
    # Draws with replacement: the mean of 2,000 has the file's mean (2,340) and
    # sd (2,089 tokens) / sqrt(2,000) = 46.7; within 4 sd (+-8 %). Seeded: exact.
    prompts = np.array([p for p, _ in share], dtype=float)
    drawn = [p for p, _ in draws]
    assert prompts.std() == pytest.approx(2_089, abs=1)
    assert abs(np.mean(drawn) - prompts.mean()) <= 4 * prompts.std() / math.sqrt(len(drawn))
    assert sum(drawn) == 4_649_984
    with pytest.raises(ValueError):
        LengthSampler([], 0)


# ------------------------------------------------------------------- ServeGen


def test_servegen_slice_loads() -> None:
    wins = _servegen()
    assert len(wins) == 6_819
    assert {w.model for w in wins} == {"m-large"}
    assert len({w.client_id for w in wins}) == 101
    assert all(w.rate > 0 and w.arg1 > 0 and w.arg2 > 0 for w in wins)
    assert all(0 <= w.start_s < 86_400 and w.start_s % SERVEGEN_WINDOW_S == 0 for w in wins)
    assert {w.pattern for w in wins} == {"Gamma", "Weibull"}
    assert load_servegen(SERVEGEN, model="m-mid") == []
    two = load_servegen(SERVEGEN, clients=["0", "1"])
    assert {w.client_id for w in two} == {"0", "1"}
    # Gamma fits are moment fits in seconds: shape = 1/cv^2, mean IAT ~ 1/rate.
    gam = [w for w in wins if w.pattern == "Gamma"]
    assert all(w.fitted_cv() == pytest.approx(w.cv, rel=1e-6) for w in gam)
    assert np.median([w.fitted_mean_iat() * w.rate for w in gam]) == pytest.approx(1, abs=0.01)


def test_servegen_arrivals_mean_rate_over_the_day() -> None:
    wins = _servegen()
    scale = 0.01
    arr = servegen_arrivals(wins, random.Random(5), rate_scale=scale)
    expected = sum(w.rate for w in wins) * SERVEGEN_WINDOW_S * scale
    assert len(arr) == pytest.approx(expected, rel=0.05)
    times = [t for t, _ in arr]
    assert times == sorted(times)
    assert times[0] >= 0 and times[-1] < 86_400
    assert {c for _, c in arr} <= {w.client_id for w in wins}
    assert arr == servegen_arrivals(wins, random.Random(5), rate_scale=scale)


def test_servegen_arrivals_per_window_rate_and_cv() -> None:
    wins = _servegen()
    busy = [w for w in wins if w.pattern == "Gamma" and 1.0 <= w.cv <= 2.0 and w.rate >= 2.0]
    assert len(busy) >= 10
    rng = random.Random(9)
    ratios = []
    for w in busy[:40]:
        arr = [t for t, _ in servegen_arrivals([w], rng)]
        assert all(w.start_s <= t < w.end_s for t in arr)
        ratios.append(len(arr) / (w.rate * SERVEGEN_WINDOW_S))
        assert _cv(arr) == pytest.approx(w.cv, rel=0.25)
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.1)


def test_servegen_weibull_keeps_shape_and_sets_mean_from_rate() -> None:
    # 100 consecutive windows of one Weibull law whose published scale is off by 3x.
    c = 0.6
    unit_mean = math.gamma(1 + 1 / c)
    wins = [
        ClientWindow("language", "m", "7", i * SERVEGEN_WINDOW_S, 2.0, 9.9, "Weibull", c, 3.0)
        for i in range(100)
    ]
    assert wins[0].fitted_mean_iat() == pytest.approx(3.0 * unit_mean)
    arr = [t for t, _ in servegen_arrivals(wins, 3)]
    # The count of a stationary renewal process: mean rate x T, variance about
    # cv^2 x rate x T, here cv = 1.758 (Weibull c = 0.6): 120,000 +- 609, so
    # within 4 sd (+-2 %; the published scale, a mean gap of 4.5 s, would give
    # a ninth of that).
    cv = wins[0].fitted_cv()
    assert cv == pytest.approx(math.sqrt(math.gamma(1 + 2 / c) / unit_mean**2 - 1))
    mean = 2.0 * 100 * SERVEGEN_WINDOW_S
    assert abs(len(arr) - mean) <= 4 * cv * math.sqrt(mean), (len(arr), mean)
    assert _cv(arr) == pytest.approx(wins[0].fitted_cv(), rel=0.1)
    # start_s / duration_s select and re-base; rate_scale multiplies the rate.
    part = servegen_arrivals(wins, 3, start_s=900.0, duration_s=1_200.0, rate_scale=0.5)
    assert all(0 <= t < 1_200 for t, _ in part)
    # Rate 2 x 0.5 over 1,200 s: 1,200 +- 4 x 1.758 x sqrt(1,200) = +-244 (20 %);
    # unscaled (2,400) falls outside.
    assert abs(len(part) - 1_200) <= 4 * cv * math.sqrt(1_200), len(part)
    assert (len(arr), len(part)) == (121_198, 1_213)  # seeded: exact


# ------------------------------------------------------------------ synthetic


def test_poisson_rate_and_cv() -> None:
    t = poisson_arrivals(5.0, 4_000.0, random.Random(1))
    assert t == sorted(t) and t[0] >= 0 and t[-1] < 4_000
    assert len(t) / 4_000 == pytest.approx(5.0, rel=0.03)
    assert _cv(t) == pytest.approx(1.0, abs=0.03)
    assert t == poisson_arrivals(5.0, 4_000.0, 1)
    assert poisson_arrivals(0.0, 10.0, 1) == []


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_rate_and_cv(cv: float) -> None:
    t = gamma_arrivals(10.0, cv, 20_000.0, random.Random(2))
    assert t == sorted(t) and t[0] >= 0 and t[-1] < 20_000
    # A stationary renewal process's count over T has mean rate x T and, for
    # long T, variance cv^2 x rate x T (renewal CLT): 200,000 +- 224 / 447 / 1342
    # for cv 0.5 / 1 / 3; within 4 sd, that is +-0.45 % / 0.9 % / 2.7 %.
    mean = 10.0 * 20_000
    assert abs(len(t) - mean) <= 4 * cv * math.sqrt(mean), (len(t), mean)
    assert len(t) == {0.5: 200_061, 1.0: 200_406, 3.0: 201_815}[cv]  # seeded: exact
    assert _cv(t) == pytest.approx(cv, abs=0.1 * cv)


def test_gamma_cv_zero_is_periodic() -> None:
    t = gamma_arrivals(2.0, 0.0, 10.0, 4)
    assert len(t) == 20
    assert np.allclose(np.diff(t), 0.5)


def test_gamma_stationary_start_is_unbiased_for_bursty_processes() -> None:
    # Short windows with CV 5: an ordinary renewal start would add ~12 per window.
    rng = random.Random(6)
    counts = [len(gamma_arrivals(1.0, 5.0, 10.0, rng)) for _ in range(4_000)]
    assert np.mean(counts) == pytest.approx(10.0, rel=0.1)


def test_diurnal_peak_trough_and_mean() -> None:
    period = 1_000.0
    t = np.asarray(diurnal_arrivals(20.0, 0.8, period, 5 * period, random.Random(3)))
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 5 * period
    assert len(t) / (5 * period) == pytest.approx(20.0, rel=0.05)
    phase = (t % period) / period
    q_peak = np.sum((phase >= 0.125) & (phase < 0.375))  # sin peaks at 1/4
    q_rise = np.sum((phase < 0.125) | (phase >= 0.875))
    q_fall = np.sum((phase >= 0.375) & (phase < 0.625))
    q_trough = np.sum((phase >= 0.625) & (phase < 0.875))  # sin troughs at 3/4
    assert q_peak > q_rise > q_trough
    assert q_peak > q_fall > q_trough
    # The rate averaged over the peak quarter is 20 x (1 + 0.8 x 0.9003) and over
    # the trough quarter 20 x (1 - 0.8 x 0.9003), where 0.9003 = 2 sqrt(2) / pi is
    # the mean of sin over [pi/4, 3pi/4]: Poisson counts of mean 43,006 and 6,994
    # over the 5 periods, a ratio 6.149. The quarters' counts are independent
    # Poisson, so the ratio's sd is ratio x sqrt(1/43006 + 1/6994) = 0.080 (1.3 %);
    # within 4 sd (an amplitude of 0.77 instead of 0.8, ratio 5.5, falls outside).
    lift = 0.8 * 2 * math.sqrt(2) / math.pi
    peak, trough = (20.0 * 5 * period / 4 * (1 + sign * lift) for sign in (1, -1))
    ratio = peak / trough
    assert ratio == pytest.approx(6.1493, abs=1e-4)
    sd = ratio * math.sqrt(1 / peak + 1 / trough)
    assert abs(q_peak / q_trough - ratio) <= 4 * sd, (q_peak, q_trough)
    assert (len(t), int(q_peak), int(q_trough)) == (99_955, 43_020, 6_971)  # seeded: exact
    # phase_s shifts the peak: with phase period/2 the first half is the trough.
    s = np.asarray(diurnal_arrivals(20.0, 1.0, period, period, 3, phase_s=period / 2))
    assert np.sum(s < period / 2) < np.sum(s >= period / 2)
    with pytest.raises(ValueError):
        diurnal_arrivals(1.0, 1.5, period, period, 0)


# ----------------------------------------------------------------- transforms


def _reqs(*times: float) -> list[TraceRequest]:
    return [TraceRequest(t, i + 1, 1) for i, t in enumerate(times)]


def _times(reqs: list[TraceRequest]) -> list[float]:
    return [r.arrival_s for r in reqs]


@pytest.mark.parametrize(
    ("times", "factor", "expected"),
    [
        ((0.0, 2.0, 4.0), 2.0, [0.0, 1.0, 2.0]),
        ((1.0, 3.0), 0.5, [2.0, 6.0]),
        ((), 3.0, []),
    ],
)
def test_scale_rate(times: tuple[float, ...], factor: float, expected: list[float]) -> None:
    out = scale_rate(_reqs(*times), factor)
    assert _times(out) == pytest.approx(expected)
    assert [r.prompt_tokens for r in out] == [r.prompt_tokens for r in _reqs(*times)]


def test_scale_rate_rejects_non_positive() -> None:
    with pytest.raises(ValueError):
        scale_rate(_reqs(1.0), 0.0)


@pytest.mark.parametrize(
    ("start", "duration", "expected_times", "expected_ids"),
    [
        (1.0, 2.0, [0.0, 1.5], [2, 3]),  # [1, 3): 3.0 excluded
        (0.0, 10.0, [0.0, 1.0, 2.5, 3.0], [1, 2, 3, 4]),
        (5.0, 1.0, [], []),
        (2.5, 0.5, [0.0], [3]),
    ],
)
def test_time_window(
    start: float, duration: float, expected_times: list[float], expected_ids: list[int]
) -> None:
    out = time_window(_reqs(0.0, 1.0, 2.5, 3.0), start, duration)
    assert _times(out) == pytest.approx(expected_times)
    assert [r.prompt_tokens for r in out] == expected_ids


@pytest.mark.parametrize(
    ("offset", "period", "expected_times", "expected_ids"),
    [
        (10.0, None, [10.0, 11.0, 18.0], [1, 2, 3]),
        (-1.0, None, [-1.0, 0.0, 7.0], [1, 2, 3]),
        (3.0, 10.0, [1.0, 3.0, 4.0], [3, 1, 2]),  # 8 + 3 wraps to 1 -> sorted first
        (-1.0, 10.0, [0.0, 7.0, 9.0], [2, 3, 1]),
        (20.0, 10.0, [0.0, 1.0, 8.0], [1, 2, 3]),
    ],
)
def test_shift(
    offset: float, period: float | None, expected_times: list[float], expected_ids: list[int]
) -> None:
    out = shift(_reqs(0.0, 1.0, 8.0), offset, period)
    assert _times(out) == pytest.approx(expected_times)
    assert [r.prompt_tokens for r in out] == expected_ids


def test_trace_request_is_frozen_and_slotted() -> None:
    r = TraceRequest(1.0, 2, 3)
    assert r.hash_ids == () and r.client == ""
    assert not hasattr(r, "__dict__")
    with pytest.raises(AttributeError):
        r.arrival_s = 2.0  # type: ignore[misc]


def test_trace_stats_empty_and_small() -> None:
    assert trace_stats([]) == {"n": 0.0}
    s = trace_stats(_reqs(0.0, 1.0, 3.0))
    assert s["rate"] == pytest.approx(2 / 3)  # 1 / mean IAT
    assert s["iat_cv"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------ phases


def _phases_scenario(**workload: object) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "phases",
            "duration_s": 250,
            "regions": ["r"],
            "workers": [{"region": "r", "models": ["m"]}],
            "workload": {"models": {"m": 1.0}, **workload},
        }
    )


def test_phases_have_their_own_rates_and_lengths_and_repeat_to_the_end() -> None:
    phases = [
        {"duration_s": 50, "rate": 4.0, "prompt_tokens": {"kind": "fixed", "value": 10}},
        {"duration_s": 25, "rate": 0.0},
        {"duration_s": 25, "rate": 8.0, "output_tokens": {"kind": "uniform", "low": 3, "high": 5}},
    ]
    scenario = _phases_scenario(
        kind="phases",
        phases=phases,
        rate_scale=0.5,
        prompt_tokens={"kind": "fixed", "value": 900},
        output_tokens={"kind": "fixed", "value": 7},
    )
    requests = build_requests(scenario)
    # 250 s: the 100 s cycle twice, then the first phase's 50 s once more.
    spans = {0: (0, 50), 1: (50, 75), 2: (75, 100)}
    counts = {0: 0, 1: 0, 2: 0}
    for r in requests:
        phase = next(i for i, (lo, hi) in spans.items() if lo <= r.arrival_s % 100 < hi)
        counts[phase] += 1
        if phase == 0:
            assert (r.prompt_tokens, r.max_tokens) == (10, 7)
        else:
            assert r.prompt_tokens == 900 and 3 <= r.max_tokens <= 5
    assert counts[1] == 0  # rate 0: a pause
    # Rates halved by rate_scale: 2/s over 150 s and 4/s over 50 s; Poisson, within 4 sd.
    assert abs(counts[0] - 300) <= 4 * math.sqrt(300), counts
    assert abs(counts[2] - 200) <= 4 * math.sqrt(200), counts
    assert max(r.arrival_s for r in requests) < 250
    assert max(r.arrival_s for r in requests if r.prompt_tokens == 10) >= 200  # the third cycle


@pytest.mark.parametrize(
    ("workload", "message"),
    [
        ({"kind": "phases"}, "kind phases needs a list of phases"),
        ({"phases": [{"duration_s": 1, "rate": 1}]}, "only kind phases has phases"),
        (
            {"kind": "phases", "phases": [{"duration_s": 1, "rate": 1}], "lengths": "x.csv"},
            "phases draw token counts from their distributions",
        ),
        ({"kind": "phases", "phases": [{"rate": 1}]}, "duration_s"),
    ],
)
def test_phases_refuse_what_does_not_fit(workload: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _phases_scenario(**workload)
