"""Per-second time series (exact values on hand-built records) and report PNGs."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from haif.contracts import RequestRecord
from haif.sim.plots import (
    DPI,
    FILE_NAMES,
    plot_all,
    plot_latency_cdfs,
    plot_region_load,
    plot_slo,
    plot_utilization,
)
from haif.sim.timeseries import (
    BASE_COLUMNS,
    UTILIZATION_COLUMNS,
    per_second,
    utilization_frame,
    write_timeseries,
)

NAN = math.nan
REGIONS = ("us-east", "eu-west")
FAULTS = [(2.0, 4.0, "us-east outage")]


def rec(
    rid: str,
    arrival: float,
    finish: float,
    status: str = "ok",
    region: str | None = "us-east",
    first: float | None = None,
    tokens: int = 0,
    gpu: str | None = "A100-80G",
    cost: float = 0.01,
) -> RequestRecord:
    return RequestRecord(
        request_id=rid,
        tenant="t",
        model="m",
        origin_region="us-east",
        served_region=region if status == "ok" else None,
        worker_id="w" if status == "ok" else None,
        gpu_class=gpu if status == "ok" else None,
        arrival_s=arrival,
        admitted_s=arrival,
        first_token_s=first,
        finish_s=finish,
        prompt_tokens=10,
        output_tokens=tokens,
        attempts=1,
        status=status,
        reason=None if status == "ok" else status,
        cold_start=False,
        cost=cost,
    )


# Ten requests over six seconds; comments give (ttft, e2e) of the ok ones.
RECORDS = [
    rec("a", 0.2, 1.5, first=0.4, tokens=10),  # (0.2, 1.3) bin 1
    rec("b", 0.5, 1.9, region="eu-west", first=1.0, tokens=20),  # (0.5, 1.4) bin 1
    rec("c", 0.9, 1.1, status="failed"),  # bin 1
    rec("d", 1.0, 3.0, first=1.1, tokens=30),  # (0.1, 2.0) bin 3: a boundary is the next second
    rec("e", 1.2, 3.7, status="timeout"),  # bin 3
    rec("f", 2.0, 3.5, region="eu-west", first=2.6, tokens=5),  # (0.6, 1.5) bin 3
    rec("g", 2.5, 3.2, first=None, tokens=7),  # (none, 0.7) bin 3
    rec("h", 4.0, 9.0, tokens=99),  # finishes after the frame: in flight to the end
    rec("i", 5.5, 5.6, status="rejected"),  # bin 5
    rec("j", 3.0, 4.0, region="ap-south", first=3.2, tokens=1),  # (0.2, 1.0) bin 4
]
END_S = 5.5  # -> six rows, t = 0..5

EXPECTED: list[tuple[str, list[float]]] = [
    ("t", [0, 1, 2, 3, 4, 5]),
    ("arrivals", [3, 2, 2, 1, 1, 1]),
    ("completed_ok", [0, 2, 0, 3, 1, 0]),
    ("errors", [0, 1, 0, 1, 0, 1]),
    ("error_rate", [0.0, 1 / 3, 0.0, 0.25, 0.0, 1.0]),
    ("output_tokens_per_s", [0, 30, 0, 42, 1, 0]),
    ("in_flight", [3, 2, 4, 1, 1, 1]),
    ("e2e_p50_s", [NAN, 1.35, NAN, 1.5, 1.0, NAN]),
    ("e2e_p99_s", [NAN, 1.3 + 0.1 * 0.99, NAN, 1.5 + 0.5 * 0.98, 1.0, NAN]),
    ("ttft_p50_s", [NAN, 0.35, NAN, 0.35, 0.2, NAN]),
    ("served_us-east", [0, 1, 0, 2, 0, 0]),
    ("served_eu-west", [0, 1, 0, 1, 0, 0]),
]

# (slo_ttft_s, slo_e2e_s) -> slo_attainment per second.
SLO_CASES: list[tuple[float | None, float | None, list[float]]] = [
    (None, None, [NAN, 2 / 3, NAN, 3 / 4, 1.0, 0.0]),  # just "ok"
    (None, 1.5, [NAN, 2 / 3, NAN, 2 / 4, 1.0, 0.0]),  # f's 1.5 s meets it exactly
    (0.4, None, [NAN, 1 / 3, NAN, 1 / 4, 1.0, 0.0]),  # g has no first token: a miss
    (0.4, 1.5, [NAN, 1 / 3, NAN, 0.0, 1.0, 0.0]),
]


def assert_column(df: pd.DataFrame, column: str, expected: list[float]) -> None:
    got = df[column].to_numpy(dtype=np.float64)
    want = np.asarray(expected, dtype=np.float64)
    assert np.isnan(got).tolist() == np.isnan(want).tolist(), column
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-9)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return per_second(RECORDS, END_S, REGIONS)


@pytest.mark.parametrize(("column", "expected"), EXPECTED, ids=[c for c, _ in EXPECTED])
def test_per_second_values(frame: pd.DataFrame, column: str, expected: list[float]) -> None:
    assert_column(frame, column, expected)


@pytest.mark.parametrize(("ttft", "e2e", "expected"), SLO_CASES)
def test_slo_attainment(ttft: float | None, e2e: float | None, expected: list[float]) -> None:
    df = per_second(RECORDS, END_S, REGIONS, slo_ttft_s=ttft, slo_e2e_s=e2e)
    assert_column(df, "slo_attainment", expected)


def test_columns_order_and_types(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == [*BASE_COLUMNS, "served_us-east", "served_eu-west"]
    floats = {"error_rate", "e2e_p50_s", "e2e_p99_s", "ttft_p50_s", "slo_attainment"}
    for column in frame.columns:
        assert frame[column].dtype == (np.float64 if column in floats else np.int64), column
    # Repeated regions give one column; region order is the caller's.
    again = per_second(RECORDS, END_S, ["eu-west", "us-east", "eu-west"])
    assert list(again.columns)[-2:] == ["served_eu-west", "served_us-east"]
    assert list(per_second(RECORDS, END_S).columns) == list(BASE_COLUMNS)


def test_counts_add_up(frame: pd.DataFrame) -> None:
    # Everything arriving in the frame either finished in it or is still in flight.
    finished = int(frame["completed_ok"].sum() + frame["errors"].sum())
    assert int(frame["arrivals"].sum()) == finished + int(frame["in_flight"].iloc[-1])


def test_frame_length_follows_end_s() -> None:
    assert len(per_second(RECORDS, 5.0)) == 5  # [0, 5): i (5.5 -> 5.6) falls outside
    assert int(per_second(RECORDS, 5.0)["errors"].sum()) == 2
    assert len(per_second(RECORDS, 5.01)) == 6
    assert len(per_second(RECORDS, 0.0)) == 0


@pytest.mark.parametrize("end_s", [0.0, 3.0])
def test_empty_records(end_s: float) -> None:
    df = per_second([], end_s, REGIONS, slo_ttft_s=1.0)
    assert list(df.columns) == [*BASE_COLUMNS, "served_us-east", "served_eu-west"]
    assert len(df) == int(end_s)
    for column in ("arrivals", "completed_ok", "errors", "in_flight", "served_us-east"):
        assert (df[column] == 0).all() and df[column].dtype == np.int64
    assert (df["error_rate"] == 0.0).all()
    for column in ("e2e_p50_s", "e2e_p99_s", "ttft_p50_s", "slo_attainment"):
        assert df[column].isna().all() and df[column].dtype == np.float64


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(7)
    arrival = rng.uniform(0, 20, 400)
    e2e = rng.exponential(2.0, 400)
    records = [
        rec(f"r{i}", float(a), float(a + d), first=float(a + d / 3))
        for i, (a, d) in enumerate(zip(arrival, e2e, strict=True))
    ]
    df = per_second(records, 30.0)
    finish_bin = np.floor(arrival + e2e)
    lat = (arrival + e2e) - arrival
    for t in range(30):
        sel = lat[finish_bin == t]
        for column, q in (("e2e_p50_s", 50), ("e2e_p99_s", 99)):
            got = float(df[column].to_numpy(dtype=np.float64)[t])
            if sel.size == 0:
                assert math.isnan(got)
            else:
                assert got == np.percentile(sel, q)  # bit-identical interpolation


def test_utilization_frame() -> None:
    samples = [
        (1.0, "w2", "eu-west", "H100", 0.5),
        (0.0, "w2", "eu-west", "H100", 0.25),
        (1.0, "w1", "us-east", "A100-80G", 1.0),
        (0.0, "w1", "us-east", "A100-80G", 0.0),
    ]
    df = utilization_frame(samples)
    assert list(df.columns) == list(UTILIZATION_COLUMNS)
    assert df["t"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert df["worker_id"].tolist() == ["w1", "w2", "w1", "w2"]
    assert df["busy_fraction"].tolist() == [0.0, 0.25, 1.0, 0.5]
    empty = utilization_frame([])
    assert list(empty.columns) == list(UTILIZATION_COLUMNS) and empty.empty


def test_write_timeseries_is_deterministic(tmp_path: Path, frame: pd.DataFrame) -> None:
    a = write_timeseries(frame, tmp_path / "a" / "timeseries.parquet")
    b = write_timeseries(per_second(RECORDS, END_S, REGIONS), tmp_path / "b.parquet")
    assert a.read_bytes() == b.read_bytes()
    back = pq.read_table(a).to_pandas()
    pd.testing.assert_frame_equal(back, frame)


# -------------------------------------------------------------------- plots


def util() -> pd.DataFrame:
    return utilization_frame(
        [
            (float(t), w, region, gpu, 0.0 if (w == "w1" and 2 <= t < 4) else 0.25 * (t % 4))
            for t in range(6)
            for w, region, gpu in (("w1", "us-east", "A100-80G"), ("w2", "eu-west", "H100"))
        ]
    )


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5_000, path
    width, _height = struct.unpack(">II", data[16:24])
    assert width == round(11.0 * DPI), path


@pytest.mark.slow
def test_plot_all_writes_every_figure_reproducibly(tmp_path: Path, frame: pd.DataFrame) -> None:
    first = plot_all(RECORDS, frame, util(), REGIONS, FAULTS, tmp_path / "one", slo_desc="ok")
    second = plot_all(RECORDS, frame, util(), REGIONS, FAULTS, tmp_path / "two", slo_desc="ok")
    assert set(first) == set(FILE_NAMES)
    for key, path in first.items():
        assert path == tmp_path / "one" / FILE_NAMES[key]
        assert_png(path)
        assert path.read_bytes() == second[key].read_bytes(), key


def test_single_plot_returns_its_path(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = tmp_path / "nested" / "folder" / "slo.png"
    assert plot_slo(frame, [], path) == path
    assert_png(path)


@pytest.mark.parametrize(
    "records",
    [[], [rec("x", 0.5, 1.5, status="failed", cost=0.0), rec("y", 1.0, 2.0, status="rejected")]],
    ids=["no-records", "no-ok-requests"],
)
def test_empty_inputs_give_no_data_figures(tmp_path: Path, records: list[RequestRecord]) -> None:
    df = per_second(records, 3.0 if records else 0.0, REGIONS)
    paths = plot_all(records, df, utilization_frame([]), REGIONS, FAULTS, tmp_path)
    assert set(paths) == set(FILE_NAMES)
    for path in paths.values():
        assert_png(path)


def test_missing_utilization_and_regions(tmp_path: Path) -> None:
    assert_png(plot_utilization(None, FAULTS, tmp_path / "u.png"))
    # No regions to show, and a frame without the served_ columns.
    assert_png(plot_region_load(per_second(RECORDS, END_S), [], [], tmp_path / "r.png"))
    assert_png(plot_region_load(per_second(RECORDS, END_S), REGIONS, [], tmp_path / "s.png"))
    # Ok requests without first tokens: the TTFT panel says "no data".
    no_ttft = [rec("z", 0.0, 1.0), rec("w", 0.5, 2.0)]
    assert_png(plot_latency_cdfs(no_ttft, tmp_path / "c.png"))
