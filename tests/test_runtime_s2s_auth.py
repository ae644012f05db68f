"""Service-to-service authentication: sealed RPC envelopes and signed worker announcements.

Real services on loopback: an in-process orchestrator and gateway with
cluster keys, worker ``w1`` as a ``python -m haif worker`` process given
``--cluster-key`` / ``--cluster-keyring``, and in-process workers (so the
test can read their token counters) holding good, foreign or stolen keys.
Keys come from :func:`ensure_cluster_keys`, as ``haif up`` lays them out.
Expiry is driven by hand-set clocks, never by sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import pytest_asyncio
from aiohttp import web
from harness.api import MODEL, expected_text
from harness.cluster import running, serve, shut_down, wait_fresh

from haif import wire
from haif.configfile import ConfigError
from haif.contracts import Request
from haif.control.config import CoreConfig
from haif.runtime import gateway as gateway_mod
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime import worker as worker_mod
from haif.runtime.cluster_keys import (
    ClusterAuth,
    cluster_auth_from_args,
    cluster_key_args,
    ensure_cluster_keys,
    load_cluster_auth,
)
from haif.runtime.gateway import Gateway
from haif.runtime.messages import Announce, InferCall
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.rpc import (
    ORCHESTRATOR_AUDIENCE,
    EnvelopeAuth,
    RpcClient,
    RpcError,
    add_rpc_routes,
    caller_key_id,
)
from haif.runtime.security import Keyring, ReplayCache, Signer, generate_keypair
from haif.runtime.store import DuckDBStore
from haif.runtime.worker import Worker, WorkerSpec

#: The cluster fixture lives on the module's loop.
on_module_loop = pytest.mark.asyncio(loop_scope="module")

#: Every key the cluster trusts; workers are named by their ids.
SERVICES = ("gateway", "orchestrator", "w1", "w2", "w-evil", "w-late", "w-replay", "w-tamper")


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def tokens_of(worker: Worker) -> float:
    value = worker.metrics.registry.get_sample_value("haif_worker_tokens_generated_total")
    return value or 0.0


class KeyedCluster:
    """Orchestrator + gateway in process, all with cluster keys, plus workers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = tmp / "keys"
        ensure_cluster_keys(self.keys, SERVICES)
        self.keyring = self.keys / "keyring"
        stranger_private, _ = generate_keypair()
        self.stranger = Signer(stranger_private)  # a key no one trusts
        self.runners: list[web.AppRunner] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: dict[str, Worker] = {}
        self.orch: Orchestrator | None = None
        self.orch_url = ""
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    def auth(self, name: str) -> ClusterAuth:
        return load_cluster_auth(self.keys / f"{name}.key", self.keyring)

    def signer(self, name: str) -> Signer:
        return Signer.from_file(self.keys / f"{name}.key")

    async def _serve(self, app: web.Application, sock: socket.socket | None = None) -> str:
        runner, url = await serve(app, sock=sock or bound_socket(), shutdown_timeout=1.0)
        self.runners.append(runner)
        return url

    async def start(self) -> KeyedCluster:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        policy = CoreConfig()
        store = DuckDBStore(self.tmp / "store.duckdb")
        self.orch = Orchestrator(
            policy, store, idle_timeout_s=3.0, cluster_auth=self.auth("orchestrator")
        )
        self.orch_url = await self._serve(orchestrator_mod.build_app(self.orch))
        self.spawn_worker("w1")
        await self.add_worker("w2", self.auth("w2"))
        gw = Gateway(self.orch_url, "local", idle_timeout_s=5.0, signer=self.signer("gateway"))
        self.url = await self._serve(gateway_mod.build_app(gw))
        await self.wait_fresh({"w1", "w2"})
        return self

    def spawn_worker(self, wid: str) -> None:
        """A real ``haif worker`` process holding its key through the CLI flags."""
        with bound_socket() as sock:
            port = sock.getsockname()[1]
        log = (self.tmp / f"worker-{wid}.log").open("wb")
        args = ["--port", str(port), "--id", wid, "--region", "local"]
        args += ["--orchestrator", self.orch_url, "--mean-s", "0.2", "--heartbeat-s", "0.2"]
        args += cluster_key_args(self.keys, wid)
        self.procs[wid] = subprocess.Popen(
            [sys.executable, "-m", "haif", "worker", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def add_worker(
        self, wid: str, auth: ClusterAuth | None, *, name: str | None = None
    ) -> Worker:
        """An in-process worker announcing itself as ``wid`` (``name``: our handle for it)."""
        sock = bound_socket()
        host, port = sock.getsockname()[:2]
        spec = WorkerSpec(
            worker_id=wid,
            region="local",
            url=f"http://{host}:{port}",
            orchestrator_url=self.orch_url,
            mean_s=0.2,
            heartbeat_s=0.1,
        )
        worker = Worker(spec, cluster_auth=auth)
        await self._serve(worker_mod.build_app(worker), sock)
        self.workers[name or wid] = worker
        return worker

    def client(
        self, signer: Signer | None, audience: str = ORCHESTRATOR_AUDIENCE, **kw: Any
    ) -> RpcClient:
        assert self.http is not None
        return RpcClient(self.http, self.orch_url, 5.0, signer=signer, audience=audience, **kw)

    def present(self) -> set[str]:
        """Workers the orchestrator holds a heartbeat of (fresh or stale)."""
        assert self.orch is not None
        return set(self.orch.status().outstanding)

    async def wait_fresh(self, ids: set[str], timeout_s: float = 30.0) -> None:
        assert self.orch is not None
        await wait_fresh(self.orch, ids, self.procs, self.tmp, timeout_s)

    async def complete(self, rid: str, max_tokens: int = 6) -> dict[str, Any]:
        assert self.http is not None
        body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens}
        async with self.http.post(
            f"{self.url}/v1/completions", json=body, headers={"x-request-id": rid}
        ) as resp:
            answer: dict[str, Any] = await resp.json()
            assert resp.status == 200, answer
        return answer

    async def post_raw(self, method: str, envelope: bytes) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        async with self.http.post(f"{self.orch_url}/rpc/{method}", data=envelope) as resp:
            reply: dict[str, Any] = msgpack.unpackb(await resp.read(), raw=False)
            return resp.status, reply

    async def stop(self) -> None:
        await shut_down(self.procs.values(), self.runners)
        if self.http is not None:
            await self.http.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KeyedCluster]:
    async with running(KeyedCluster(tmp_path_factory.mktemp("s2s"))) as c:
        yield c


def announce_as(wid: str, url: str = "http://127.0.0.1:9") -> Announce:
    spec = WorkerSpec(worker_id=wid, region="local", url=url, orchestrator_url="")
    return Announce(Worker(spec).snapshot(), url)


# ------------------------------------------------------------------ end to end


@on_module_loop
@pytest.mark.cluster
async def test_a_keyed_cluster_serves_completions_on_both_workers(cluster: KeyedCluster) -> None:
    served: set[str] = set()
    assert cluster.orch is not None
    for i in range(8):
        rid = f"e2e-{i}"
        answer = await cluster.complete(rid)
        assert answer["choices"][0]["text"] == expected_text(rid, 6)
        records = {r.request_id: r for r in await cluster.orch.store.records()}
        for _ in range(100):
            if rid in records:
                break
            await asyncio.sleep(0.05)
            records = {r.request_id: r for r in await cluster.orch.store.records()}
        assert records[rid].status == "ok"
        served.add(records[rid].worker_id or "")
        if served == {"w1", "w2"}:
            break
    # w1 (a process with the CLI flags) and w2 (in process) both served sealed calls.
    assert served == {"w1", "w2"}
    assert tokens_of(cluster.workers["w2"]) > 0


@on_module_loop
@pytest.mark.cluster
async def test_a_submit_whose_seal_lapsed_in_line_is_sent_again_sealed_afresh(
    cluster: KeyedCluster,
) -> None:
    """An orchestrator that reads a submit after its seal's end refuses it unread
    (``expired``); the gateway sends it again with a fresh seal, and the client
    gets its answer, not a 503. The orchestrator's clock stands in for the wait."""
    assert cluster.orch is not None and cluster.orch.envelope_auth is not None
    verifier = cluster.orch.envelope_auth
    reads: list[str] = []

    def late_once() -> float:
        reads.append("late" if not reads else "now")
        return time.time() + (60.0 if reads[-1] == "late" else 0.0)

    verifier.clock = late_once
    try:
        answer = await cluster.complete("seal-lapsed")
    finally:
        verifier.clock = time.time
    assert answer["choices"][0]["text"] == expected_text("seal-lapsed", 6)
    assert reads[0] == "late" and len(reads) >= 2  # refused once, read again


# ------------------------------------------------------------------ announcements


@on_module_loop
@pytest.mark.cluster
async def test_refused_announcements_register_nothing_and_draw_no_traffic(
    cluster: KeyedCluster,
) -> None:
    # Workers that keep heartbeating: unsigned, and signed by a key no one trusts.
    unsigned = await cluster.add_worker("w-unsigned", None)
    foreign = await cluster.add_worker(
        "w-foreign", ClusterAuth(cluster.stranger, Keyring.from_dir(cluster.keyring))
    )
    for worker, code in ((unsigned, "unsigned"), (foreign, "unknown_key")):
        signer = worker.cluster_auth.signer if worker.cluster_auth is not None else None
        with pytest.raises(RpcError) as refused:
            await cluster.client(signer).call(
                "heartbeat", Announce(worker.snapshot(), worker.spec.url)
            )
        assert (refused.value.status, refused.value.code) == (401, code)

    # Sealed with a trusted key, but two minutes ago (a 10 s seal): expired.
    late = await cluster.add_worker("w-late", None, name="late")
    past = time.time() - 120.0
    stale_client = cluster.client(cluster.signer("w-late"), clock=lambda: past)
    with pytest.raises(RpcError) as refused:
        await stale_client.call("heartbeat", Announce(late.snapshot(), late.spec.url))
    assert (refused.value.status, refused.value.code) == (401, "expired")

    for i in range(6):
        await cluster.complete(f"refused-{i}")
    present = cluster.present()
    assert {"w1", "w2"} <= present
    assert not present & {"w-unsigned", "w-foreign", "w-late"}
    for worker in (unsigned, foreign, late):
        assert tokens_of(worker) == 0


@on_module_loop
@pytest.mark.cluster
async def test_a_replayed_announcement_is_refused(cluster: KeyedCluster) -> None:
    assert cluster.orch is not None
    envelope = cluster.client(cluster.signer("w-replay")).envelope(
        "heartbeat", announce_as("w-replay")
    )
    status, reply = await cluster.post_raw("heartbeat", envelope)
    assert status == 200 and reply["ok"], reply
    assert "w-replay" in cluster.present()
    # It stops heartbeating and is evicted; replaying its announcement must not revive it.
    deadline = time.monotonic() + 20.0
    while "w-replay" not in cluster.orch.presence()["evicted_workers"]:
        assert time.monotonic() < deadline, "w-replay was never evicted"
        await asyncio.sleep(0.05)
    status, reply = await cluster.post_raw("heartbeat", envelope)
    assert status == 401 and reply["error"]["code"] == "replayed"
    assert "w-replay" not in cluster.present()
    assert "w-replay" in cluster.orch.presence()["evicted_workers"]


@on_module_loop
@pytest.mark.cluster
async def test_an_envelope_changed_after_sealing_is_refused(cluster: KeyedCluster) -> None:
    client = cluster.client(cluster.signer("w-tamper"))
    sealed = msgpack.unpackb(client.envelope("heartbeat", announce_as("w-tamper")), raw=False)

    def repacked(**changes: Any) -> bytes:
        return bytes(msgpack.packb({**sealed, **changes}, use_bin_type=True))

    body = dict(sealed["body"])
    body["url"] = "http://127.0.0.1:1"  # redirect the worker's traffic
    cases = {
        "heartbeat": [
            repacked(body=body),
            repacked(id="another-id"),
            repacked(trace="00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
            repacked(auth={**sealed["auth"], "exp": sealed["auth"]["exp"] + 60}),
        ],
        "status": [repacked()],  # the same seal presented for another method
    }
    for method, envelopes in cases.items():
        for envelope in envelopes:
            status, reply = await cluster.post_raw(method, envelope)
            assert status == 401 and reply["error"]["code"] == "bad_signature", reply
    # Sealed for a worker, sent to the orchestrator.
    misdirected = cluster.client(cluster.signer("w-tamper"), audience="w1")
    with pytest.raises(RpcError) as refused:
        await misdirected.call("heartbeat", announce_as("w-tamper"))
    assert (refused.value.status, refused.value.code) == (401, "wrong_audience")
    assert "w-tamper" not in cluster.present()


@on_module_loop
@pytest.mark.cluster
async def test_a_worker_key_cannot_announce_another_worker_id(
    cluster: KeyedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker holding w-evil's (trusted) key claims to be w1 and w2.
    evil = await cluster.add_worker("w1", cluster.auth("w-evil"), name="evil")
    caplog.set_level(logging.WARNING, logger="haif.orchestrator")
    for victim in ("w1", "w2"):
        with pytest.raises(RpcError) as refused:
            await cluster.client(cluster.signer("w-evil")).call(
                "heartbeat", announce_as(victim, evil.spec.url)
            )
        assert (refused.value.status, refused.value.code) == (403, "wrong_worker")
    assert any(
        "refused the announcement of worker 'w2'" in r.getMessage() and "w-evil" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    for i in range(6):
        await cluster.complete(f"impersonated-{i}")
    assert tokens_of(evil) == 0
    assert "w-evil" not in cluster.present()


# ------------------------------------------------------------------ other RPCs


@on_module_loop
@pytest.mark.cluster
async def test_unsigned_calls_to_a_keyed_orchestrator_or_worker_get_401(
    cluster: KeyedCluster,
) -> None:
    assert cluster.orch is not None and cluster.http is not None
    request = Request("unsigned-submit", "t", MODEL, 1, 4, 0.0)
    with pytest.raises(RpcError) as refused:
        await cluster.client(None).call("submit", request)
    assert (refused.value.status, refused.value.code) == (401, "unsigned")
    assert await cluster.orch.store.get_job("unsigned-submit") is None  # never reserved

    w2 = cluster.workers["w2"]
    before = tokens_of(w2)
    call = InferCall(Request("direct", "t", MODEL, 1, 4, 0.0))
    unsigned = RpcClient(cluster.http, w2.spec.url, 5.0)
    with pytest.raises(RpcError) as refused:
        await unsigned.call("infer", call)
    assert (refused.value.status, refused.value.code) == (401, "unsigned")
    with pytest.raises(RpcError) as refused:
        async for _ in unsigned.stream("infer_stream", call, idle_timeout_s=5.0):
            pass
    assert (refused.value.status, refused.value.code) == (401, "unsigned")
    # The orchestrator's own key, but sealed for w1: w2 refuses it.
    orch_key = cluster.signer("orchestrator")
    for_w1 = RpcClient(cluster.http, w2.spec.url, 5.0, signer=orch_key, audience="w1")
    with pytest.raises(RpcError) as refused:
        await for_w1.call("infer", call)
    assert (refused.value.status, refused.value.code) == (401, "wrong_audience")
    assert tokens_of(w2) == before
    # Sealed properly, the same call runs.
    for_w2 = RpcClient(cluster.http, w2.spec.url, 5.0, signer=orch_key, audience="w2")
    reply = await for_w2.call("infer", call)
    assert reply.text == expected_text("direct", 4) and tokens_of(w2) == before + 4


# ------------------------------------------------------------------ rpc layer


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture(loop_scope="module")
async def echo() -> AsyncIterator[tuple[str, list[tuple[str, Any, str | None]], Clock, Signer]]:
    """A bare RPC server (``echo`` unary, ``count`` stream) checking seals on a hand clock."""
    private, public = generate_keypair()
    signer, clock = Signer(private), Clock(1_000_000.0)
    calls: list[tuple[str, Any, str | None]] = []

    async def echo_handler(body: object) -> object:
        calls.append(("echo", body, caller_key_id()))
        return body

    async def count(body: object) -> AsyncIterator[int]:
        calls.append(("count", body, caller_key_id()))
        assert isinstance(body, int)
        for i in range(body):
            yield i

    app = web.Application()
    auth = EnvelopeAuth(Keyring([public]), "srv", clock=clock, replay=ReplayCache())
    add_rpc_routes(app, {"echo": echo_handler}, {"count": count}, service="test", auth=auth)
    runner, url = await serve(app, sock=bound_socket())
    try:
        yield url, calls, clock, signer
    finally:
        await runner.cleanup()


@on_module_loop
async def test_rpc_seals_are_checked_before_any_handler_runs(
    echo: tuple[str, list[tuple[str, Any, str | None]], Clock, Signer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, calls, clock, signer = echo
    caplog.set_level(logging.WARNING, logger="haif.rpc")
    async with aiohttp.ClientSession() as http:
        good = RpcClient(http, url, 5.0, signer=signer, audience="srv", clock=clock)
        assert await good.call("echo", {"x": [1, 2.5, "é", b"\x00"]}) == {
            "x": [1, 2.5, "é", b"\x00"]
        }
        assert [i async for i in good.stream("count", 3, idle_timeout_s=5.0)] == [0, 1, 2]
        assert calls == [
            ("echo", {"x": [1, 2.5, "é", b"\x00"]}, signer.key_id),
            ("count", 3, signer.key_id),
        ]

        async def refused(client: RpcClient, method: str = "echo") -> tuple[int, str]:
            with pytest.raises(RpcError) as exc:
                if method == "count":
                    async for _ in client.stream("count", 2, idle_timeout_s=5.0):
                        pass
                else:
                    await client.call(method, "hi")
            return exc.value.status, exc.value.code

        unsigned = RpcClient(http, url, 5.0)
        assert await refused(unsigned) == (401, "unsigned")
        assert await refused(unsigned, "count") == (401, "unsigned")
        assert await refused(unsigned, "no_such_method") == (401, "unsigned")
        other = Signer(generate_keypair()[0])
        stranger = RpcClient(http, url, 5.0, signer=other, audience="srv", clock=clock)
        assert await refused(stranger) == (401, "unknown_key")
        elsewhere = RpcClient(http, url, 5.0, signer=signer, audience="other", clock=clock)
        assert await refused(elsewhere) == (401, "wrong_audience")

        # The server's clock moves on: a seal from 60 s ago has expired, and one
        # from 60 s in the future is not valid yet.
        sealed_now = good.envelope("echo", "late")
        clock.now += 60.0
        async with http.post(f"{url}/rpc/echo", data=sealed_now) as resp:
            reply = msgpack.unpackb(await resp.read(), raw=False)
            assert resp.status == 401 and reply["error"]["code"] == "expired"
        early = RpcClient(http, url, 5.0, signer=signer, audience="srv", clock=lambda: 2e6)
        assert await refused(early) == (401, "expired")

        # Accepted once, then replayed; a changed body never verifies.
        envelope = good.envelope("echo", "once")
        for status in (200, 401):
            async with http.post(f"{url}/rpc/echo", data=envelope) as resp:
                assert resp.status == status
        plain = msgpack.unpackb(good.envelope("echo", "pay 1"), raw=False)
        plain["body"] = "pay 1000"
        async with http.post(
            f"{url}/rpc/echo", data=msgpack.packb(plain, use_bin_type=True)
        ) as resp:
            assert resp.status == 401
            assert msgpack.unpackb(await resp.read())["error"]["code"] == "bad_signature"
    # Nothing refused reached a handler.
    assert [c[1] for c in calls] == [{"x": [1, 2.5, "é", b"\x00"]}, 3, "once"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused echo" in m and "unsigned" in m for m in messages), messages
    assert any("replayed" in m for m in messages), messages


@on_module_loop
async def test_unkeyed_rpc_is_unchanged(tmp_path: Path) -> None:
    """Without an EnvelopeAuth a server takes unsigned calls (and ignores a seal)."""
    seen: list[str | None] = []

    async def who(_body: object) -> None:
        seen.append(caller_key_id())

    app = web.Application()
    add_rpc_routes(app, {"who": who})
    runner, url = await serve(app, sock=bound_socket())
    try:
        async with aiohttp.ClientSession() as http:
            await RpcClient(http, url, 5.0).call("who", None)
            signer = Signer(generate_keypair()[0])
            await RpcClient(http, url, 5.0, signer=signer).call("who", None)
            envelope = msgpack.unpackb(RpcClient(http, url, 5.0).envelope("who", 1), raw=False)
            assert set(envelope) == {"v", "type", "id", "trace", "body"}  # no "auth"
    finally:
        await runner.cleanup()
    assert seen == [None, None]


# ------------------------------------------------------------------ keys and flags


def test_ensure_cluster_keys_creates_reuses_and_names_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = ensure_cluster_keys(keys, ["gateway", "orchestrator", "w1"])
    assert set(made) == {"gateway", "orchestrator", "w1"}
    for name, (private, public) in made.items():
        assert private == keys / f"{name}.key" and public == keys / "keyring" / f"{name}.pub"
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    ring = Keyring.from_dir(keys / "keyring")
    ids = {name: Signer.from_file(p).key_id for name, (p, _) in made.items()}
    assert {ring.name_of(kid) for kid in ids.values()} == set(ids)
    assert ring.name_of(ids["w1"]) == "w1"

    # Run again with one more service: old keys reused, a lost public key rewritten.
    (keys / "keyring" / "w1.pub").unlink()
    (keys / "w1.key").chmod(0o644)
    again = ensure_cluster_keys(keys, ["gateway", "orchestrator", "w1", "w2"])
    assert {n: Signer.from_file(p).key_id for n, (p, _) in again.items() if n != "w2"} == ids
    assert stat.S_IMODE((keys / "w1.key").stat().st_mode) == 0o600
    assert len(Keyring.from_dir(keys / "keyring")) == 4

    for bad in ([""], ["w\n1"], ["w1", "w1"]):
        with pytest.raises(ValueError, match="service name"):
            ensure_cluster_keys(keys, bad)
    # Any printable id names a key: a simulator worker id, even "../w1", stays in the folder.
    odd = ensure_cluster_keys(keys, ["us-east/H100-80G/0.0", "../w1"])
    for name, (private, public) in odd.items():
        assert private.parent == keys and public.parent == keys / "keyring"
        kid = Signer.from_file(private).key_id
        assert Keyring.from_dir(keys / "keyring").name_of(kid) == name
    (keys / "broken.key").write_text("not a key")
    with pytest.raises(ValueError, match=r"broken\.key"):
        ensure_cluster_keys(keys, ["broken"])


def worker_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    worker_mod.add_worker_args(parser)
    return parser.parse_args(
        ["--port", "1", "--id", "w1", "--region", "r", "--orchestrator", "http://x", *extra]
    )


def test_cluster_key_flags(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    ensure_cluster_keys(keys, ["orchestrator", "w1"])
    worker = worker_mod.worker_from_args(worker_args(*cluster_key_args(keys, "w1")))
    assert worker.cluster_auth is not None
    assert worker.cluster_auth.signer.key_id == Signer.from_file(keys / "w1.key").key_id
    assert len(worker.cluster_auth.keyring) == 2
    # The artifact keyring flag is still its own thing.
    assert worker_args("--keyring", "art-keys").keyring == "art-keys"
    assert worker_mod.worker_from_args(worker_args()).cluster_auth is None

    cases: list[tuple[list[str], str]] = [
        (["--cluster-key", str(keys / "w1.key")], "needs --cluster-keyring"),
        (["--cluster-keyring", str(keys / "keyring")], "needs --cluster-key"),
        (cluster_key_args(keys, "nobody"), "nobody.key: cannot read it"),
        (["--cluster-key", str(keys / "w1.key"), "--cluster-keyring", str(tmp_path)], "no *.pub"),
        (
            ["--cluster-key", str(keys / "keyring" / "w1.pub"), "--cluster-keyring", str(keys)],
            "private key",
        ),
    ]
    for flags, message in cases:
        with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
            cluster_auth_from_args(worker_args(*flags))


@pytest.mark.cluster
def test_haif_worker_with_a_missing_cluster_key_exits_with_a_clear_error(tmp_path: Path) -> None:
    args = ["--port", "1", "--id", "w1", "--region", "r", "--orchestrator", "http://127.0.0.1:1"]
    args += ["--cluster-key", str(tmp_path / "missing.key"), "--cluster-keyring", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "haif", "worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "missing.key: cannot read it" in done.stderr
    assert "Traceback" not in done.stderr


@on_module_loop
async def test_the_sealed_body_is_the_wire_body() -> None:
    """The envelope's body is the contract exactly as haif.wire encodes it, next to its seal."""
    signer = Signer(generate_keypair()[0])
    announce = announce_as("w9")
    async with aiohttp.ClientSession() as http:
        packed = RpcClient(http, "http://x", 1.0, signer=signer).envelope("heartbeat", announce)
    decoded = msgpack.unpackb(packed, raw=False)
    assert decoded["type"] == "heartbeat" and decoded["auth"]["kid"] == signer.key_id
    assert wire.from_plain(decoded["body"]) == announce
