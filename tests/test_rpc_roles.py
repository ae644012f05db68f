"""RPC authorization by role: every method, every role, allowed or 403.

The table (:mod:`haif.runtime.roles`) is checked cell by cell; then a real
orchestrator and a real worker app on loopback, with cluster keys, are
called over sealed RPC by keys of each role: a trusted key whose role may
not call a method gets 403 ``forbidden``, whatever the method's body.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from harness.cluster import serve

from haif.contracts import Request
from haif.control.config import CoreConfig
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime import worker as worker_mod
from haif.runtime.cluster_keys import ensure_cluster_keys, load_cluster_auth
from haif.runtime.messages import InferCall
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.roles import ORCHESTRATOR_METHODS, WORKER_METHODS, Role, allowed, role_of
from haif.runtime.rpc import ORCHESTRATOR_AUDIENCE, RpcClient, RpcError
from haif.runtime.security import Signer
from haif.runtime.store import DuckDBStore
from haif.runtime.worker import Worker, WorkerSpec

# ------------------------------------------------------------------ the table

KEYS = {Role.GATEWAY: "gateway", Role.ORCHESTRATOR: "orchestrator", Role.ADMIN: "admin"}
KEYS[Role.WORKER] = "w1"
KEYS[Role.MONITOR] = "monitor"  # health checks and scrapes: no RPC method at all

EXPECTED = {
    # method: roles allowed (anything else: 403)
    "submit": {Role.GATEWAY, Role.ADMIN},
    "submit_stream": {Role.GATEWAY},
    "auth_key": {Role.GATEWAY},
    "heartbeat": {Role.WORKER},
    "status": {Role.GATEWAY, Role.ADMIN},
    "dlq_list": {Role.ADMIN},
    "dlq_show": {Role.ADMIN},
    "dlq_replay": {Role.ADMIN},
    "keys_add": {Role.ADMIN},
    "keys_list": {Role.ADMIN},
    "keys_revoke": {Role.ADMIN},
}


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("gateway", Role.GATEWAY),
        ("gateway-eu", Role.GATEWAY),
        ("orchestrator", Role.ORCHESTRATOR),
        ("orchestrator-2", Role.ORCHESTRATOR),
        ("admin", Role.ADMIN),
        ("monitor", Role.MONITOR),
        ("w1", Role.WORKER),
        ("gateways", Role.WORKER),  # not "gateway" nor "gateway-...": a worker id
        ("us-east/H100-80G/0.0", Role.WORKER),
    ],
)
def test_a_keys_role_comes_from_its_name(name: str, role: Role) -> None:
    assert role_of(name) == role


@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("role", list(Role))
def test_orchestrator_methods_by_role(method: str, role: Role) -> None:
    assert allowed(ORCHESTRATOR_METHODS, method, KEYS[role]) == (role in EXPECTED[method])


@pytest.mark.parametrize("method", ["infer", "infer_stream"])
@pytest.mark.parametrize("role", list(Role))
def test_worker_methods_by_role(method: str, role: Role) -> None:
    assert allowed(WORKER_METHODS, method, KEYS[role]) == (role is Role.ORCHESTRATOR)


def test_every_served_method_is_in_a_table_and_unknown_ones_are_closed(tmp_path: Path) -> None:
    orch = Orchestrator(CoreConfig(), DuckDBStore(tmp_path / "store.duckdb"))
    unary, streams = orchestrator_mod.rpc_methods(orch)
    assert set(unary) | set(streams) == set(ORCHESTRATOR_METHODS) == set(EXPECTED)
    assert not any(allowed(ORCHESTRATOR_METHODS, "drop_tables", KEYS[r]) for r in Role)


# ------------------------------------------------------------------ on the wire


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[Path, str, str]]:
    """(key dir, orchestrator URL, worker w1 URL), both services with cluster keys."""
    keys = tmp_path / "keys"
    ensure_cluster_keys(keys, ["gateway", "orchestrator", "admin", "monitor", "w1"])
    ring = keys / "keyring"
    orch = Orchestrator(
        CoreConfig(),
        DuckDBStore(tmp_path / "store.duckdb"),
        cluster_auth=load_cluster_auth(keys / "orchestrator.key", ring),
    )
    orch_runner, orch_url = await serve(orchestrator_mod.build_app(orch), shutdown_timeout=1.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    worker_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    worker = Worker(
        WorkerSpec("w1", "local", worker_url, orch_url, capacity=2),
        cluster_auth=load_cluster_auth(keys / "w1.key", ring),
    )
    worker_runner, _ = await serve(worker_mod.build_app(worker), sock=sock, shutdown_timeout=1.0)
    try:
        yield keys, orch_url, worker_url
    finally:
        await worker_runner.cleanup()
        await orch_runner.cleanup()


def _body(method: str) -> object:
    request = Request("r1", "acme", "llama-3-8b", 10, 2, 0.0)
    return {
        "submit": request,
        "submit_stream": request,
        "auth_key": "0" * 64,
        "status": None,
        "dlq_list": None,
        "dlq_show": "nope",
        "dlq_replay": "nope",
        "infer": InferCall(request, 0, 1),
        "infer_stream": InferCall(request, 0, 1),
    }[method]


async def _call(
    session: aiohttp.ClientSession, url: str, signer: Signer, audience: str, method: str
) -> int:
    """The HTTP status of one sealed call (200 when it answered, else the refusal's)."""
    client = RpcClient(session, url, 10.0, signer=signer, audience=audience)
    try:
        if method.endswith("_stream"):
            frames = client.stream(method, _body(method), idle_timeout_s=5.0)
            async for _ in frames:
                break
            await frames.aclose()
        else:
            await client.call(method, _body(method))
    except RpcError as exc:
        return exc.status
    return 200


@pytest.mark.cluster
async def test_each_role_may_call_only_its_methods(keyed: tuple[Path, str, str]) -> None:
    keys, orch_url, worker_url = keyed
    refused: dict[tuple[str, str], int] = {}
    async with aiohttp.ClientSession() as session:
        for role, name in KEYS.items():
            signer = Signer.from_file(keys / f"{name}.key")
            for method in ("submit", "auth_key", "status", "dlq_list", "dlq_show", "dlq_replay"):
                status = await _call(session, orch_url, signer, ORCHESTRATOR_AUDIENCE, method)
                refused[(name, method)] = status
                if role in EXPECTED[method]:
                    assert status != 403, (name, method, status)
                else:
                    assert status == 403, (name, method, status)
            status = await _call(session, worker_url, signer, "w1", "infer_stream")
            assert (status == 403) == (role is not Role.ORCHESTRATOR), (name, status)
    # The holes of the previous design, closed: a worker's key cannot submit
    # (billed to any tenant), list dead letters or look up a key's tenant.
    assert refused[("w1", "submit")] == refused[("w1", "dlq_list")] == 403
    assert refused[("w1", "auth_key")] == refused[("gateway", "dlq_list")] == 403
