"""Prefix-aware placement on a live cluster: a multi-turn chat workload through ``haif up``.

Two real clusters (``haif up``: gateway, orchestrator, synthetic workers with
a prefix cache, as processes), the same conversations through each; one
places with ``least_outstanding``, the other with ``prefix_affinity``. The
gateway hashes every prompt's blocks from the model's tokenizer; the workers'
own counters say how many prompt tokens their caches served
(``bench/prefix_placement.py`` is the driver, and prints the figures).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.bench import load_bench

ROOT = Path(__file__).resolve().parent.parent


def test_the_cluster_yaml_names_the_placement_and_a_prefix_cache(tmp_path: Path) -> None:
    from haif.runtime.cluster import load_cluster

    bench = load_bench("prefix_placement")
    path = tmp_path / "c.yaml"
    path.write_text(bench.cluster_yaml("prefix_affinity", [9001, 9002], 9000))
    cluster = load_cluster(path)
    assert cluster.policy.placement == "prefix_affinity"
    assert [w.port for w in cluster.workers] == [9001, 9002]
    assert all(w.prefix_cache and w.timing == "profile" for w in cluster.workers)


def test_a_worker_exports_its_prefix_cache_counters() -> None:
    from prometheus_client import generate_latest

    from haif.contracts import Request
    from haif.fleet.engine import Seq
    from haif.runtime.engines import SyntheticEngine
    from haif.runtime.worker import Worker, WorkerSpec

    spec = WorkerSpec("w", "local", "http://127.0.0.1:1", "http://127.0.0.1:2")
    engine = SyntheticEngine(
        timing="profile", gpu="A100-80G", models=("llama-3-8b",), prefix_cache=True
    )
    worker = Worker(spec, engine)
    text = generate_latest(worker.metrics.registry).decode()
    assert "haif_worker_prefix_cache_queries_total 0.0" in text
    assert "haif_worker_prefix_cache_hits_total 0.0" in text
    # Two requests with the same first two 16-token blocks, one after the other.
    assert engine.timer is not None
    core = engine.timer.engine
    for rid, hashes in (("a", (1, 2, 3)), ("b", (1, 2, 9))):
        request = Request(
            rid, "t", "llama-3-8b", 48, 1, 0.0, prefix_hashes=hashes, prefix_block_tokens=16
        )
        s = Seq(request)  # straight into the timer's engine: no event loop needed
        core.add(s, core.clock)
        while not s.done:
            deadline = core.next_deadline()
            assert deadline is not None
            core.on_timer(deadline)
    text = generate_latest(worker.metrics.registry).decode()
    assert "haif_worker_prefix_cache_queries_total 96.0" in text
    assert "haif_worker_prefix_cache_hits_total 32.0" in text
    assert engine.prefix_cache_stats() == (96, 32)
    # An engine without a prefix cache exports no such series.
    plain = Worker(spec, SyntheticEngine())
    assert "prefix_cache" not in generate_latest(plain.metrics.registry).decode()


@pytest.mark.cluster
@pytest.mark.slow
def test_prefix_affinity_finds_more_cached_prefixes_than_least_outstanding(
    tmp_path: Path,
) -> None:
    bench = load_bench("prefix_placement")
    runs = {
        p: bench.run(p, workers=3, conversations=6, turns=4, think_s=0.2, log_dir=tmp_path)
        for p in ("least_outstanding", "prefix_affinity")
    }
    lo, pa = runs["least_outstanding"], runs["prefix_affinity"]
    for o in (lo, pa):
        assert o.ok == o.requests == 6 * 4, f"{o}; see {tmp_path}"
        # Usage is the model's tokenizer's count: the synthetic model's words.
        assert o.prompt_tokens == o.words
        # Every prompt token was looked up in some worker's cache, once.
        assert o.query_tokens == o.prompt_tokens
        assert 0 <= o.hit_tokens <= o.ideal_tokens
    assert lo.ideal_tokens == pa.ideal_tokens > 0  # the same conversations
    print(f"least_outstanding {lo.hit_tokens}, prefix_affinity {pa.hit_tokens} hit tokens")
    assert pa.hit_tokens > lo.hit_tokens
    # Each conversation stays where its blocks are (the load bound never binds here).
    assert pa.hit_tokens >= 0.9 * pa.ideal_tokens
