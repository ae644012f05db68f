"""Prefix-cache hits in a simulation's outputs: the records' ``prefix_hit_tokens``
column, ``summary.json``'s ``prefix_cache`` (overall, per worker, per tenant) and the
line in ``report.md``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from haif.analysis.compare import load_run
from haif.analysis.query import run_query
from haif.fleet.engine import BLOCK_TOKENS
from haif.fleet.scenario import load_scenario
from haif.records import FILE_SCHEMA, PREFIX_HIT_TOKENS, SCHEMA, read_parquet
from haif.sim.driver import SimCluster
from haif.sim.engine import PrefixHitEngine
from haif.sim.report import write_report

ROOT = Path(__file__).resolve().parent.parent
PREFIX = ROOT / "scenarios" / "prefix_cache.yaml"
FAILOVER = ROOT / "scenarios" / "failover.yaml"
SHORT = ["duration_s=120", "drain_s=120", "workload.tenants={a: 1, b: 1}"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimCluster, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("prefix")
    cluster = SimCluster(load_scenario(PREFIX, SHORT))
    result = cluster.run()
    summary = write_report(result, out, plots=False)
    return cluster, out, summary


def _stats(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    prompt = sum(p for p, _ in pairs)
    hit = sum(h for _, h in pairs)
    return {
        "requests": len(pairs),
        "prompt_tokens": prompt,
        "hit_tokens": hit,
        "hit_ratio": hit / prompt if prompt else None,
    }


def test_records_summary_and_report_agree(
    cached: tuple[SimCluster, Path, dict[str, Any]],
) -> None:
    cluster, out, summary = cached
    table = pq.read_table(out / "records.parquet")
    assert table.schema == FILE_SCHEMA
    rows = table.to_pylist()
    served = [r for r in rows if r["worker_id"] is not None]
    assert served and all(r[PREFIX_HIT_TOKENS] is not None for r in served if r["status"] == "ok")
    assert all(r[PREFIX_HIT_TOKENS] is None for r in rows if r["worker_id"] is None)
    assert all(
        0 <= r[PREFIX_HIT_TOKENS] < r["prompt_tokens"] for r in served if r["status"] == "ok"
    )

    known = [r for r in rows if r[PREFIX_HIT_TOKENS] is not None]
    by_worker: dict[str, list[tuple[int, int]]] = defaultdict(list)
    by_tenant: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in known:
        by_worker[r["worker_id"]].append((r["prompt_tokens"], r[PREFIX_HIT_TOKENS]))
        by_tenant[r["tenant"]].append((r["prompt_tokens"], r[PREFIX_HIT_TOKENS]))
    prefix = summary["prefix_cache"]
    assert prefix == json.loads((out / "summary.json").read_text())["prefix_cache"]
    pairs = [(r["prompt_tokens"], r[PREFIX_HIT_TOKENS]) for r in known]
    assert {k: prefix[k] for k in ("requests", "prompt_tokens", "hit_tokens", "hit_ratio")} == (
        _stats(pairs)
    )
    assert prefix["hit_tokens"] > 0 and 0 < prefix["hit_ratio"] < 1
    assert set(prefix["by_worker"]) == set(cluster.workers)  # every worker has a cache
    for wid, stats in prefix["by_worker"].items():
        assert stats == _stats(by_worker.get(wid, [])), wid
    assert set(prefix["by_tenant"]) == {"a", "b"}
    for tenant, stats in prefix["by_tenant"].items():
        assert stats == _stats(by_tenant[tenant]), tenant

    # The engines' own counters: every recorded hit is a hit of whole cached blocks.
    for wid, worker in cluster.workers.items():
        engine = worker.engine  # type: ignore[attr-defined]
        assert isinstance(engine, PrefixHitEngine)
        recorded = sum(engine.prefix_hits.values())
        assert engine.prefix is not None
        assert recorded <= engine.prefix.hits * BLOCK_TOKENS, wid
    assert sum(s["hit_tokens"] for s in prefix["by_worker"].values()) == prefix["hit_tokens"]
    # ... and the summary's figures are the engines' counts: on a worker that preempted
    # nothing each admission is one attempt, so its cache's own tally of hit tokens (the
    # KV pool's cache, not a replay) is the summary's, and every lookup is a request's.
    checked = 0
    for wid, worker in cluster.workers.items():
        engine = worker.engine  # type: ignore[attr-defined]
        if engine.preemptions:
            continue
        checked += 1
        assert engine.prefix.hit_tokens == prefix["by_worker"][wid]["hit_tokens"], wid
        assert len(engine.prefix_hits) == prefix["by_worker"][wid]["requests"], wid
    assert checked > 0

    report = (out / "report.md").read_text()
    line = next(ln for ln in report.splitlines() if ln.startswith("| prefix-cache hits |"))
    assert f"{prefix['hit_ratio']:.2%} of prompt tokens" in line
    assert f"({prefix['hit_tokens']:,} of {prefix['prompt_tokens']:,})" in line
    assert "## Prefix cache" in report and "| tenant a |" in report


def test_the_column_is_queryable_and_old_files_still_read(
    cached: tuple[SimCluster, Path, dict[str, Any]], tmp_path: Path
) -> None:
    _cluster, out, summary = cached
    result = run_query(
        "SELECT sum(prefix_hit_tokens), count(prefix_hit_tokens) FROM records", [out]
    )
    assert result.rows == [
        (summary["prefix_cache"]["hit_tokens"], summary["prefix_cache"]["requests"])
    ]
    assert len(read_parquet(out / "records.parquet")) == summary["requests"]
    # A records file written before the column existed is read as before.
    old = tmp_path / "old" / "records.parquet"
    old.parent.mkdir()
    pq.write_table(pq.read_table(out / "records.parquet").select(SCHEMA.names), old)
    assert read_parquet(old) == read_parquet(out / "records.parquet")
    assert load_run(old.parent).records.num_rows == summary["requests"]
    both = run_query(
        "SELECT run, count(prefix_hit_tokens) FROM records GROUP BY run", [out, old.parent]
    )
    assert dict(both.rows) == {out.name: summary["prefix_cache"]["requests"], "old": 0}


def test_without_a_prefix_cache_the_outputs_say_so(tmp_path: Path) -> None:
    scenario = load_scenario(FAILOVER, ["duration_s=20", "drain_s=30", "faults=[]"])
    summary = write_report(SimCluster(scenario).run(), tmp_path, plots=False)
    assert summary["prefix_cache"] is None
    column = pq.read_table(tmp_path / "records.parquet").column(PREFIX_HIT_TOKENS)
    assert column.null_count == len(column) > 0
    assert "| prefix-cache hits | no prefix cache |" in (tmp_path / "report.md").read_text()
    assert "## Prefix cache" not in (tmp_path / "report.md").read_text()
