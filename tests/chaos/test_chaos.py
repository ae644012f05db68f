"""Chaos: real faults under steady load; every request answered, each billed exactly once.

Each test starts a whole cluster as processes (``haif up``: a gateway, an
orchestrator with its journal, three synthetic workers) on a PostgreSQL
server of its own (:mod:`harness.own_pg`), sends 100 requests per second
for 30 s (open loop; a third of them streaming), and puts one fault in the
middle: a worker killed with SIGKILL, the orchestrator killed with SIGKILL
(both started again 2 s later through the cluster's control endpoint), the
PostgreSQL server stopped for 10 s (immediate mode, as a crash), or every
usage write slowed by 50 ms for 10 s (a trigger that sleeps). One more
cluster runs a standby pair (``orchestrators: 2``) at 150 requests per
second and has its leader killed with SIGKILL (started again 2 s later, as
the standby): at most 1 % of requests may fail.

From the client's log and the store it then asserts: every request was
answered — a 200, or a definitive error (an HTTP error status, or an error
event in a stream) — and none hung; every request answered 200 is billed
exactly once (a usage row, unique by request id) with the completion tokens
the client was told; nothing is billed for a request whose client got an
error before any token — except, when the orchestrator itself is killed, the
few requests whose answer had been handed over inside the process (and
marked delivered in its journal) but had not reached the gateway's socket
when it died (at most 10 allowed, each printed; 4 of 3,000 seen). It prints
what the fault cost (failed requests, by second) and the recovery time (from
the fault to the last failed request).

``make chaos`` runs this suite; CI runs it after ``make test``. The clusters
run ``haif up``'s default, mutual TLS on every hop between the services;
with ``CHAOS_TLS=0`` they run with ``internal_tls: false`` (plain HTTP with
sealed envelopes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from harness.api import MODEL, sse_data
from harness.cluster import Up
from harness.own_pg import OwnPostgres

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.cluster]

RATE = 100.0  # requests per second
DURATION_S = 30.0
FAULT_AT_S = 8.0
HANG_S = 60.0  # a request without an answer after this long has hung
LEADER_KILL_RATE = 150.0  # the standby pair's test

Fault = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class Outcome:
    request_id: str
    sent_s: float
    stream: bool
    status: int = 0  # HTTP status; 0: no answer
    tokens: int = 0  # completion tokens the client was told (usage), or received
    error: str | None = None
    hung: bool = False
    done_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class Chaos:
    pg: OwnPostgres
    up: Up
    outcomes: list[Outcome] = field(default_factory=list)


def _config(path: Path, dsn: str, orchestrators: int = 1) -> Path:
    workers = [
        {"id": f"w{i}", "region": "local", "capacity": 16, "mean_s": 0.2, "ttft_s": 0.02}
        for i in (1, 2, 3)
    ]
    config: dict[str, Any] = {
        "store": dsn,
        "colocate_gateway": False,
        "orchestrators": orchestrators,
        "workers": workers,
    }
    if os.environ.get("CHAOS_TLS") == "0":  # the opt-out; mutual TLS is the default
        config["internal_tls"] = False
    if orchestrators == 2:
        # Room for the failover burst: what arrives while the standby takes over (about
        # 1.8 s x 150 req/s = 270 requests) reaches it at once; with 16 slots a worker
        # (48 in all) the burst is refused, no_eligible_worker or, past twice the slots,
        # shed as overloaded (measured: 130 and 194 of 4,501 failed).
        for worker in workers:
            worker["capacity"] = 64
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


async def _cluster(tmp_path: Path, orchestrators: int) -> AsyncIterator[Chaos]:
    pg = OwnPostgres()
    up: Up | None = None
    try:
        pg.start()
        up = Up(tmp_path / "data", _config(tmp_path / "cluster.yaml", pg.dsn, orchestrators))
        up.wait_ready(30)
        yield Chaos(pg, up)
    finally:
        if up is not None:
            print(up.stop()[-3000:])
        pg.close()


@pytest.fixture
async def chaos(tmp_path: Path) -> AsyncIterator[Chaos]:
    async for cluster in _cluster(tmp_path, 1):
        yield cluster


@pytest.fixture
async def chaos_pair(tmp_path: Path) -> AsyncIterator[Chaos]:
    """The cluster with a standby orchestrator."""
    async for cluster in _cluster(tmp_path, 2):
        yield cluster


async def _one(session: aiohttp.ClientSession, url: str, out: Outcome, max_tokens: int) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "chaos", "max_tokens": max_tokens}
    headers = {"x-request-id": out.request_id}
    try:
        if out.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = (await resp.text())[:200]
            elif not out.stream:
                out.tokens = int((await resp.json())["usage"]["completion_tokens"])
            else:
                received = 0
                async for data in sse_data(resp):
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out.error = json.dumps(chunk["error"])[:200]
                        break
                    if chunk.get("usage"):
                        out.tokens = int(chunk["usage"]["completion_tokens"])
                    elif chunk.get("choices"):
                        received += 1
                else:
                    out.error = out.error or "stream cut without [DONE]"
                if out.error is not None:
                    out.tokens = received
    except TimeoutError:
        out.hung = True
        out.error = f"no answer in {HANG_S:.0f} s"
    except aiohttp.ClientError as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:200]
    out.done_s = time.monotonic()


async def _load(
    url: str, fault: Fault, seed: int, rate: float = RATE
) -> tuple[list[Outcome], float]:
    """Open-loop load for DURATION_S with ``fault`` at FAULT_AT_S; (outcomes, fault time)."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=HANG_S)
    connector = aiohttp.TCPConnector(limit=0)
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.monotonic()
        fault_s = start + FAULT_AT_S
        fault_task: asyncio.Task[None] | None = None
        n = 0
        while (now := time.monotonic()) < start + DURATION_S:
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            if fault_task is None and time.monotonic() >= fault_s:
                fault_task = asyncio.create_task(fault())
            out = Outcome(f"chaos-{seed}-{n}", time.monotonic(), stream=n % 3 == 0)
            outcomes.append(out)
            tasks.append(asyncio.create_task(_one(session, url, out, rng.randint(4, 16))))
            n += 1
        assert fault_task is not None
        await fault_task
        await asyncio.gather(*tasks)
    return outcomes, fault_s


async def _usage(dsn: str) -> dict[str, list[int]]:
    """Billed completion tokens per request id (a list: more than one is a double bill)."""
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await con.fetch("SELECT request_id, output_tokens FROM usage")
    finally:
        await con.close()
    billed: dict[str, list[int]] = {}
    for row in rows:
        billed.setdefault(row["request_id"], []).append(int(row["output_tokens"]))
    return billed


def _check(
    name: str,
    outcomes: list[Outcome],
    billed: dict[str, list[int]],
    fault_s: float,
    lost_answers: int = 0,
    rate: float = RATE,
    max_failed: float = 1.0,
) -> None:
    hung = [o for o in outcomes if o.hung]
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    unbilled = [o.request_id for o in ok if o.request_id not in billed]
    twice = [rid for rid, rows in billed.items() if len(rows) > 1]
    wrong = [
        (o.request_id, o.tokens, billed[o.request_id])
        for o in ok
        if o.request_id in billed and billed[o.request_id] != [o.tokens]
    ]
    billed_for_nothing = [
        o.request_id for o in failed if o.tokens == 0 and any(billed.get(o.request_id, []))
    ]
    recovery = max((o.sent_s - fault_s for o in failed), default=0.0)
    print(
        f"\n{name}: {len(outcomes)} sent, {len(ok)} ok, {len(failed)} failed "
        f"({sorted({o.status for o in failed})}), recovery {max(0.0, recovery):.2f} s; "
        f"billed {len(billed)}, unbilled {len(unbilled)}, twice {len(twice)}"
    )
    by_second: dict[int, dict[int, int]] = {}
    for o in failed:
        counts = by_second.setdefault(int(o.sent_s - fault_s), {})
        counts[o.status] = counts.get(o.status, 0) + 1
    for at_s, statuses in sorted(by_second.items()):
        print(f"  +{at_s:>3} s after the fault: failed by status {statuses}")
    for o in failed[:3]:
        print(f"  failed {o.request_id} status {o.status}: {o.error}")
    assert not hung, f"{len(hung)} request(s) hung"
    assert len(outcomes) >= 0.9 * rate * DURATION_S
    assert len(failed) <= max_failed * len(outcomes), f"{len(failed)} failed"
    assert not unbilled, f"served but never billed: {unbilled[:10]}"
    assert not twice, f"billed twice: {twice[:10]}"
    assert not wrong, f"billed tokens differ from delivered: {wrong[:10]}"
    # Only a crash of the orchestrator itself can bill a request whose client saw
    # an error: its answer was handed over inside the process, then the process
    # died before the bytes reached the gateway's socket.
    assert len(billed_for_nothing) <= lost_answers, (
        f"billed, nothing delivered: {billed_for_nothing}"
    )
    if billed_for_nothing:
        print(f"  billed but answer lost in the crash: {billed_for_nothing}")


async def _settled(chaos: Chaos, outcomes: list[Outcome]) -> dict[str, list[int]]:
    """The usage table once every request answered 200 is in it (or after 60 s)."""
    wanted = {o.request_id for o in outcomes if o.ok}
    deadline = time.monotonic() + 60
    while True:
        try:
            billed = await _usage(chaos.pg.dsn)
        except (OSError, asyncpg.PostgresError):
            billed = {}
        if wanted <= set(billed) or time.monotonic() > deadline:
            return billed
        await asyncio.sleep(0.5)


async def _control(up: Up, path: str) -> None:
    status, body = await asyncio.to_thread(up.control, "POST", path)
    assert status == 200, body


async def _run(
    chaos: Chaos,
    name: str,
    fault: Fault,
    lost_answers: int = 0,
    *,
    rate: float = RATE,
    max_failed: float = 1.0,
) -> None:
    outcomes, fault_s = await _load(chaos.up.url, fault, seed=hash(name) & 0xFFFF, rate=rate)
    billed = await _settled(chaos, outcomes)
    _check(name, outcomes, billed, fault_s, lost_answers, rate, max_failed)


async def test_worker_kill_9(chaos: Chaos) -> None:
    async def fault() -> None:
        await _control(chaos.up, "/services/w1/kill")
        await asyncio.sleep(2)
        await _control(chaos.up, "/services/w1/start")

    await _run(chaos, "worker kill -9", fault)


async def test_orchestrator_kill_9(chaos: Chaos) -> None:
    async def fault() -> None:
        await _control(chaos.up, "/services/orchestrator/kill")
        await asyncio.sleep(2)
        await _control(chaos.up, "/services/orchestrator/start")

    await _run(chaos, "orchestrator kill -9", fault, lost_answers=10)


async def _leader(up: Up, timeout_s: float = 10.0, *, not_: str = "") -> str:
    """The name of the orchestrator that leads now (its ``/status`` says so), once one
    other than ``not_`` does (within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            for service in up.state["services"]:
                if service["kind"] != "orchestrator" or service["name"] == not_:
                    continue
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        f"{service['url']}/status", ssl=up.internal_tls or True
                    ) as resp:
                        if (await resp.json())["leader"]:
                            return str(service["name"])
            await asyncio.sleep(0.05)
    raise AssertionError(f"no orchestrator (but {not_!r}) leads after {timeout_s} s")


async def test_leader_orchestrator_kill_9(chaos_pair: Chaos) -> None:
    """The standby takes over; the gateway resends what the dead leader left unanswered."""

    async def fault() -> None:
        leader = await _leader(chaos_pair.up)
        await _control(chaos_pair.up, f"/services/{leader}/kill")
        killed = time.monotonic()
        successor = await _leader(chaos_pair.up, not_=leader)
        print(f"\n{successor} leads {time.monotonic() - killed:.2f} s after {leader} was killed")
        await asyncio.sleep(max(0.0, killed + 2 - time.monotonic()))
        await _control(chaos_pair.up, f"/services/{leader}/start")  # the standby now

    await _run(
        chaos_pair,
        "leader orchestrator kill -9, standby takes over",
        fault,
        lost_answers=10,
        rate=LEADER_KILL_RATE,
        max_failed=0.01,
    )


async def test_postgresql_stopped_10_s(chaos: Chaos) -> None:
    async def fault() -> None:
        await asyncio.to_thread(chaos.pg.stop)
        await asyncio.sleep(10)
        await asyncio.to_thread(chaos.pg.start)

    await _run(chaos, "PostgreSQL stopped 10 s", fault)


async def test_store_writes_slowed(chaos: Chaos) -> None:
    async def sql(statement: str) -> None:
        con = await asyncpg.connect(chaos.pg.dsn, timeout=10)
        try:
            await con.execute(statement)
        finally:
            await con.close()

    async def fault() -> None:
        await sql(
            "CREATE FUNCTION chaos_slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$"
        )
        await sql(
            "CREATE TRIGGER chaos_slow BEFORE INSERT ON usage "
            "FOR EACH ROW EXECUTE FUNCTION chaos_slow()"
        )
        await asyncio.sleep(10)
        await sql("DROP TRIGGER chaos_slow ON usage")

    await _run(chaos, "usage writes +50 ms", fault)
