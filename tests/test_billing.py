"""Billing under a store outage: every answered request billed once, none before it is safe.

A PostgreSQL server of the test's own (:mod:`harness.own_pg`) is stopped
while clients keep sending requests without an ``Idempotency-Key`` (the
requests that need nothing from the store to run): they are served, each
answer ending only once its settlement is fsynced in the orchestrator's
journal; when the server is back, the queued writes (retried, never dropped)
bill each of them exactly once. An orchestrator stopped before the store
returns leaves its settlements in the journal, and the next one writes them
at start; replaying the same journal again bills nothing twice.

Real services on loopback: the orchestrator and gateway in the test's event
loop, synthetic workers as processes.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from harness.api import MODEL
from harness.cluster import serve, shut_down, spawn_worker, wait_fresh
from harness.own_pg import OwnPostgres

from haif.runtime import gateway as gateway_mod
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime.cluster import ClusterConfig, free_port
from haif.runtime.gateway import Gateway
from haif.runtime.journal import Journal
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.store import MetadataStore, open_store

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]


class Stack:
    """Own PostgreSQL, an orchestrator (journal on) on a fixed port, a gateway, two workers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pg = OwnPostgres()
        self.journal_dir = tmp / "journal"
        self.orch_port = free_port()
        self.orch: Orchestrator | None = None
        self.orch_runner: web.AppRunner | None = None
        self.runners: list[web.AppRunner] = []
        self.procs: dict[str, Any] = {}
        self.url = ""

    async def start(self) -> None:
        self.pg.start()
        await self.start_orchestrator()
        orch_url = f"http://127.0.0.1:{self.orch_port}"
        for wid in ("w1", "w2"):
            self.procs[wid] = spawn_worker(self.tmp, wid, orch_url, mean_s=0.05, ttft_s=0.01)
        gw = Gateway(orch_url, "local", idle_timeout_s=5.0)
        runner, self.url = await serve(gateway_mod.build_app(gw), shutdown_timeout=1.0)
        self.runners.append(runner)
        assert self.orch is not None
        await wait_fresh(self.orch, {"w1", "w2"}, self.procs, self.tmp)

    async def start_orchestrator(self) -> None:
        store = await open_store(self.pg.dsn, timeout=2.0, command_timeout=5.0)
        self.orch = Orchestrator(
            ClusterConfig().policy,
            store,
            idle_timeout_s=3.0,
            journal=Journal(self.journal_dir),
            shutdown_grace_s=0.5,
        )
        self.orch_runner, _ = await serve(
            orchestrator_mod.build_app(self.orch), port=self.orch_port, shutdown_timeout=1.0
        )

    async def stop_orchestrator(self) -> None:
        assert self.orch_runner is not None
        await self.orch_runner.cleanup()
        self.orch_runner = self.orch = None

    @property
    def store(self) -> MetadataStore:
        assert self.orch is not None
        return self.orch.store

    async def close(self) -> None:
        if self.orch_runner is not None:
            await self.orch_runner.cleanup()
        await shut_down(self.procs.values(), self.runners)
        self.pg.close()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    try:
        await s.start()
        yield s
    finally:
        await s.close()


async def _send(session: aiohttp.ClientSession, url: str, n: int, tag: str) -> dict[str, int]:
    """``n`` concurrent completions; request id -> completion tokens the client was told."""

    async def one(i: int) -> tuple[str, int]:
        rid = f"{tag}-{i}"
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 5 + i % 7}
        async with session.post(
            f"{url}/v1/completions", json=body, headers={"x-request-id": rid}
        ) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
        return rid, int(answer["usage"]["completion_tokens"])

    return dict(await asyncio.gather(*(one(i) for i in range(n))))


async def _billed(store: MetadataStore) -> dict[str, int]:
    return {u.request_id: u.output_tokens for u in await store.list_usage()}


async def _until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_requests_served_while_the_store_is_down_are_billed_once(stack: Stack) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        before = await _send(session, stack.url, 10, "before")
        stack.pg.stop()
        during = await _send(session, stack.url, 30, "during")
        assert stack.orch is not None and stack.orch.journal is not None
        assert stack.orch.journal.unsettled >= 30  # durable, not yet in the store
        stack.pg.start()
        served = {**before, **during}

        async def all_billed() -> bool:
            try:
                return set(await _billed(stack.store)) >= set(served)
            except Exception:
                return False  # the pool reconnects

        await _until(all_billed, 60, "every served request to be billed")
    billed = await _billed(stack.store)
    assert billed == served  # each once, with the tokens the client was told
    await _until(lambda: _settled(stack), 10, "the journal to settle")


async def _settled(stack: Stack) -> bool:
    assert stack.orch is not None and stack.orch.journal is not None
    return stack.orch.journal.unsettled == 0


async def test_a_stopped_orchestrator_leaves_its_bills_in_the_journal(stack: Stack) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        stack.pg.stop()
        served = await _send(session, stack.url, 12, "orphan")
        await stack.stop_orchestrator()  # its store writes are lost; the journal keeps them
        kept = stack.tmp / "journal-copy"
        shutil.copytree(stack.journal_dir, kept)
        stack.pg.start()
        await stack.start_orchestrator()  # writes the journal at start

        async def billed_all() -> bool:
            return set(await _billed(stack.store)) >= set(served)

        await _until(billed_all, 30, "the journal to be written to the store")
        assert await _billed(stack.store) == served
        # The same journal once more (as if the first replay's settling was lost): no double bill.
        await stack.stop_orchestrator()
        shutil.rmtree(stack.journal_dir)
        shutil.copytree(kept, stack.journal_dir)
        await stack.start_orchestrator()
        await _until(lambda: _settled(stack), 30, "the replayed journal to settle")
        assert await _billed(stack.store) == served
