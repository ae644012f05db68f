"""``haif keys add|list|revoke`` and ``haif dlq`` reaching a cluster: the store directly,
an orchestrator over sealed RPC (``keys_*``, admin only), or the running ``haif up``
its ``cluster.json`` names."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from harness.cluster import run_haif, serve
from harness.up_cli import UpCli

from haif.configfile import ConfigError
from haif.runtime import api_keys
from haif.runtime.cluster_access import Target, resolve
from haif.runtime.cluster_keys import ensure_cluster_keys
from haif.runtime.roles import ORCHESTRATOR_METHODS, Role
from haif.runtime.rpc import ORCHESTRATOR_AUDIENCE, EnvelopeAuth, RpcError, add_rpc_routes
from haif.runtime.security import Keyring, Signer, hash_api_key
from haif.runtime.store import MetadataStore, open_store

#: The role table with the key methods, as haif.runtime.roles is to have it.
WITH_KEYS = {**ORCHESTRATOR_METHODS, **{m: frozenset({Role.ADMIN}) for m in api_keys.METHODS}}


def _args(**given: Any) -> argparse.Namespace:
    defaults = {"data_dir": ".haif", "orchestrator": None, "store": None}
    defaults |= {"cluster_key": None, "cluster_keyring": None}
    return argparse.Namespace(**{**defaults, **given})


# ------------------------------------------------------------------ where commands go


def test_resolve_without_a_cluster_opens_the_data_dirs_store(tmp_path: Path) -> None:
    target = resolve(_args(data_dir=str(tmp_path)))
    assert target == Target(store=str(tmp_path / "store.duckdb"))
    assert resolve(_args(store="postgresql://h/db")).store_is_shared
    with pytest.raises(ConfigError, match="not both"):
        resolve(_args(store="x", orchestrator="http://o"))


def test_resolve_finds_the_running_cluster(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    ensure_cluster_keys(keys, ["admin"])
    state = {
        "control_url": "http://127.0.0.1:1",
        "orchestrator_url": "http://127.0.0.1:2",
        "store": "postgresql://postgres@127.0.0.1:5432/x",
        "keys": str(keys),
        "pid": os.getpid(),  # alive
    }
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    target = resolve(_args(data_dir=str(tmp_path)))
    assert target.orchestrator == "http://127.0.0.1:2" and target.running
    assert target.signer is not None
    assert target.signer.key_id == Signer.from_file(keys / "admin.key").key_id
    assert target.store_is_shared
    # One left behind by a haif up that died: not a running cluster.
    state["pid"] = 2**22 + 12345
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    assert resolve(_args(data_dir=str(tmp_path))).orchestrator is None


# ------------------------------------------------------------------ over RPC


@dataclass
class Served:
    url: str
    store: MetadataStore
    keys: Path


@pytest_asyncio.fixture
async def orchestrator_keys(tmp_path: Path) -> AsyncIterator[Served]:
    """The key methods served as the orchestrator is to serve them: sealed, admin only."""
    keys = tmp_path / "keys"
    ensure_cluster_keys(keys, ["admin", "gateway", "orchestrator"])
    store = await open_store(str(tmp_path / "store.duckdb"))
    app = web.Application()
    auth = EnvelopeAuth(
        Keyring.from_dir(keys / "keyring"), ORCHESTRATOR_AUDIENCE, methods=WITH_KEYS
    )
    add_rpc_routes(app, api_keys.rpc_methods(store), service="orchestrator", auth=auth)
    runner, url = await serve(app)
    try:
        yield Served(url, store, keys)
    finally:
        await runner.cleanup()
        await store.close()


async def test_keys_over_rpc_with_the_admin_key(orchestrator_keys: Served) -> None:
    served = orchestrator_keys
    admin = Target(orchestrator=served.url, signer=Signer.from_file(served.keys / "admin.key"))
    key = await api_keys.add(admin, "acme", "ci")
    assert key.startswith("haif-")
    assert await served.store.tenant_for_key(hash_api_key(key)) == "acme"
    [row] = await api_keys.list_keys(admin)
    assert row["key_hash"] == hash_api_key(key)  # the digest, never the key
    assert (row["tenant"], row["name"], row["revoked"]) == ("acme", "ci", False)
    assert await api_keys.revoke(admin, row["key_hash"][:10])  # a prefix list shows
    assert not await api_keys.revoke(admin, key)  # already revoked
    assert await served.store.tenant_for_key(hash_api_key(key)) is None
    with pytest.raises(ConfigError, match="no key whose digest"):
        await api_keys.revoke(admin, "0123456789")
    gateway = Target(orchestrator=served.url, signer=Signer.from_file(served.keys / "gateway.key"))
    with pytest.raises(ConfigError, match="does not let the admin key manage API keys"):
        await api_keys.list_keys(gateway)  # 403: only the admin role


async def test_key_methods_check_their_bodies(tmp_path: Path) -> None:
    store = await open_store(str(tmp_path / "s.duckdb"))
    try:
        methods = api_keys.rpc_methods(store)
        for method, body in [
            ("keys_add", "not a dict"),
            ("keys_add", {"key_hash": "abc", "tenant": "t"}),
            ("keys_add", {"key_hash": "a" * 64, "tenant": "bad\ntenant"}),
            ("keys_revoke", "not-a-digest"),
        ]:
            with pytest.raises(RpcError) as info:
                await methods[method](body)
            assert info.value.code == "bad_request"
        assert await methods["keys_add"]({"key_hash": "a" * 64, "tenant": "t", "name": "n"})
        assert not await methods["keys_add"]({"key_hash": "a" * 64, "tenant": "t"})  # exists
    finally:
        await store.close()


async def test_an_orchestrator_without_key_methods_and_a_duckdb_store(tmp_path: Path) -> None:
    """Today's orchestrator (no keys_* yet) on DuckDB: a clear error, nothing half done."""
    app = web.Application()
    add_rpc_routes(app, {}, service="orchestrator")
    runner, url = await serve(app)
    try:
        target = Target(orchestrator=url, store=str(tmp_path / "s.duckdb"), running=True)
        with pytest.raises(ConfigError, match="stop the cluster"):
            await api_keys.add(target, "acme")
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------ the commands


def test_keys_commands_on_a_stopped_clusters_store(tmp_path: Path) -> None:
    data = str(tmp_path)
    added = run_haif("keys", "add", "--tenant", "acme", "--name", "laptop", "--data-dir", data)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert "only time it is shown" in added.stderr
    listed = run_haif("keys", "list", "--data-dir", data)
    assert listed.returncode == 0, listed.stderr
    assert "acme" in listed.stdout and "laptop" in listed.stdout and key not in listed.stdout
    assert hash_api_key(key)[:16] in listed.stdout
    revoked = run_haif("keys", "revoke", key, "--store", str(tmp_path / "store.duckdb"))
    assert revoked.returncode == 0, revoked.stderr
    again = run_haif("keys", "revoke", key, "--data-dir", data)
    assert again.returncode == 1 and "no such active key" in again.stderr
    rows = json.loads(run_haif("keys", "list", "--json", "--data-dir", data).stdout)
    assert [r["revoked"] for r in rows] == [True]


@pytest.mark.cluster
def test_dlq_and_keys_reach_a_running_duckdb_cluster(tmp_path: Path) -> None:
    """While `haif up` holds its DuckDB file, `haif dlq` asks its orchestrator (address
    from cluster.json, the admin key from keys/) instead of failing on the file's lock."""
    data = tmp_path / "d"
    up = UpCli(data)
    try:
        up.complete()
        listed = run_haif("dlq", "list", "--data-dir", str(data))
        assert listed.returncode == 0, listed.stderr
        assert "no dead letters" in listed.stdout
        shown = run_haif("dlq", "show", "nope", "--data-dir", str(data))
        assert shown.returncode == 1, shown.stderr
        added = run_haif("keys", "add", "--tenant", "acme", "--data-dir", str(data))
        if "keys_add" not in ORCHESTRATOR_METHODS:
            # The orchestrator does not serve the key methods yet: refused, and why.
            assert added.returncode == 2
            assert "stop the cluster" in added.stderr, added.stderr
        else:
            assert added.returncode == 0, added.stderr
            key = added.stdout.strip()
            listed = run_haif("keys", "list", "--json", "--data-dir", str(data))
            assert [r["key_hash"] for r in json.loads(listed.stdout)] == [hash_api_key(key)]
    finally:
        out = up.stop()
    assert up.proc.returncode == 0, out
