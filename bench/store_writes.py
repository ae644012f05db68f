"""CPU the metadata store spends per request on the orchestrator's writes.

Drives a store the way the orchestrator does at a fixed request rate: per
request a keyless reserve, a ``running`` status change and a finalize (usage
row, job settled, record), each awaited in turn, requests arriving on a
fixed schedule (open loop). Prints the process CPU time per request (the
store's own threads included) and how the writes were grouped into
transactions. With DuckDB, ``--linger-ms`` sets how long the writes nobody
waits for gather before they commit (0: as soon as the store is free).

    .venv/bin/python bench/store_writes.py [--rate 150] [--seconds 8] [--linger-ms 50]
    .venv/bin/python bench/store_writes.py --store postgresql://postgres@127.0.0.1:5432/haif_bench

A script, not a test. The PostgreSQL server's own CPU is not counted (it is
another process); compare DuckDB settings with DuckDB.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from haif.contracts import RequestRecord
from haif.runtime.store import DuckDBStore, JobRow, MetadataStore, SqlStore, open_store
from haif.runtime.store.duckdb_store import DEFAULT_LINGER_S


async def _one(store: MetadataStore) -> None:
    rid = uuid.uuid4().hex
    now = time.time()
    await store.reserve(JobRow(rid, "bench", None, "h", expires_s=now + 30), now)
    await store.set_job_status(rid, "running", now, "w1", expires_s=now + 30)
    record = RequestRecord(
        rid, "bench", "m", "r", "r", "w1", "H100", now, now, now, now, 1, 1, 1, "ok", None,
        False, 0.0,
    )  # fmt: skip
    await store.finalize(rid, record, b"x" * 100, now)


async def _run(args: argparse.Namespace, tmp: str) -> None:
    if args.store:
        store = await open_store(args.store)
        label = args.store
    else:
        linger = DEFAULT_LINGER_S if args.linger_ms is None else args.linger_ms / 1000
        store = DuckDBStore(Path(tmp) / "bench.duckdb", linger_s=linger)
        label = f"DuckDB, linger {linger * 1000:.0f} ms"
    try:
        await asyncio.gather(*(_one(store) for _ in range(20)))  # warm up
        loop = asyncio.get_running_loop()
        n = int(args.rate * args.seconds)
        cpu0, start = time.process_time(), loop.time()
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / args.rate - loop.time()))
            tasks.append(asyncio.ensure_future(_one(store)))
        await asyncio.gather(*tasks)
        cpu = time.process_time() - cpu0
        print(f"store: {label}; {args.rate:.0f} requests/s for {args.seconds:.0f} s")
        print(f"  CPU per request (this process): {cpu * 1000 / n:.2f} ms")
        if isinstance(store, SqlStore):
            stats = store.batch_stats
            print(
                f"  {stats.operations} writes in {stats.batches} transactions "
                f"(largest {stats.largest})"
            )
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=150.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--linger-ms", type=float, help="DuckDB only (default: the store's)")
    parser.add_argument("--store", help="a postgresql:// URL (default: a fresh DuckDB file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(args, tmp))


if __name__ == "__main__":
    main()
