"""``haif keys add|list|revoke``: the API keys clients authenticate with.

The store keeps only each key's SHA-256 digest with its tenant, a label and
when it was made; ``add`` makes the key here, in the command, and sends or
stores only the digest, then prints the key once. ``revoke`` takes the key,
its digest, or a prefix of the digest that ``list`` shows (at least 8 hex
digits, naming one key).

Where the keys are (:mod:`haif.runtime.cluster_access`): by default the
running ``haif up --data-dir .haif``, asked over RPC (``keys_add``,
``keys_list``, ``keys_revoke``, which only the cluster's ``admin`` key may
call; :func:`rpc_methods` are the orchestrator's handlers); without one
running, ``<data-dir>/store.duckdb``; or ``--store`` / ``--orchestrator``.
An orchestrator that does not serve these methods (an older one) is
answered by opening its store directly when that is PostgreSQL, which any
number of processes may share; a DuckDB store then has to wait until the
cluster is down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from haif.configfile import ConfigError
from haif.runtime.cluster_access import Target, add_target_args, call, not_served, resolve
from haif.runtime.security import generate_api_key, hash_api_key

T = TypeVar("T")

#: The orchestrator's RPC methods of this module (admin only, see haif.runtime.roles).
METHODS = ("keys_add", "keys_list", "keys_revoke")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_DIGEST_PREFIX = re.compile(r"[0-9a-f]{8,64}")
_TENANT = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{0,256}")


def check_tenant(tenant: str) -> None:
    if not _TENANT.fullmatch(tenant) or tenant != tenant.strip():
        raise ConfigError(
            f"--tenant {tenant!r}: 1-256 characters, no control characters or outer spaces"
        )


def _row(row: Any) -> dict[str, Any]:
    return {
        "key_hash": row.key_hash,
        "tenant": row.tenant,
        "name": row.name,
        "created_s": row.created_s,
        "revoked": row.revoked,
    }


# ------------------------------------------------------------------ the orchestrator's side


def rpc_methods(store: Any) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """The orchestrator's handlers of :data:`METHODS` over its ``store``.

    ``keys_add {key_hash, tenant, name}`` -> bool (False: that digest exists);
    ``keys_list`` -> [{key_hash, tenant, name, created_s, revoked}];
    ``keys_revoke key_hash`` -> bool (True: an active key was revoked now).
    """
    from haif.runtime.rpc import RpcError

    async def keys_add(body: Any) -> bool:
        if not isinstance(body, dict):
            raise RpcError("bad_request", "keys_add expects {key_hash, tenant, name}")
        key_hash, tenant, name = body.get("key_hash"), body.get("tenant"), body.get("name", "")
        if not isinstance(key_hash, str) or not _DIGEST.fullmatch(key_hash):
            raise RpcError("bad_request", "key_hash: a SHA-256 hex digest")
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise RpcError("bad_request", "tenant: 1-256 characters, no control characters")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RpcError("bad_request", "name: at most 256 characters, no control characters")
        return bool(await store.add_api_key(key_hash, tenant, name, time.time()))

    async def keys_list(_body: Any) -> list[dict[str, Any]]:
        return [_row(r) for r in await store.list_api_keys()]

    async def keys_revoke(body: Any) -> bool:
        if not isinstance(body, str) or not _DIGEST.fullmatch(body):
            raise RpcError("bad_request", "keys_revoke expects a SHA-256 hex digest")
        return bool(await store.revoke_api_key(body))

    return {"keys_add": keys_add, "keys_list": keys_list, "keys_revoke": keys_revoke}


# ------------------------------------------------------------------ the command's side


async def _direct(store_url: str, run: Callable[[Any], Awaitable[T]]) -> T:
    from haif.runtime.services import store_error
    from haif.runtime.store import open_store

    hint = (
        "DuckDB allows one process per file: while a cluster runs on it, its orchestrator "
        "must serve the keys_* methods; otherwise stop the cluster first, or use PostgreSQL"
    )
    try:
        store = await open_store(store_url)
    except Exception as exc:
        raise ConfigError(store_error(store_url, exc, hint)) from None
    try:
        return await run(store)
    finally:
        await store.close()


async def _on(target: Target, method: str, body: Any) -> Any:
    """``method`` of :func:`rpc_methods`, on the orchestrator or straight on the store."""
    from haif.runtime.rpc import RpcError, RpcUnavailable

    async def local(store: Any) -> Any:
        return await rpc_methods(store)[method](body)

    if target.orchestrator is not None:
        url = target.orchestrator
        try:
            return await call(target, method, body)
        except RpcUnavailable as exc:
            raise ConfigError(f"orchestrator {url} unavailable: {exc}") from None
        except RpcError as exc:
            if not not_served(exc.code):
                raise ConfigError(f"orchestrator {url}: {exc}") from None
            if target.running and target.store_is_shared:
                assert target.store is not None
                return await _direct(target.store, local)
            raise ConfigError(
                f"orchestrator {url} does not let the admin key manage API keys "
                f"({exc.code}: {exc.message}); its store is DuckDB, which only it may open: "
                "stop the cluster and run the command again, or use a PostgreSQL store"
            ) from None
    assert target.store is not None
    try:
        return await _direct(target.store, local)
    except RpcError as exc:
        raise ConfigError(str(exc)) from None


def _where(target: Target) -> str:
    from haif.runtime.cluster import redact

    if target.orchestrator is not None:
        return f"the store of the orchestrator at {target.orchestrator}"
    assert target.store is not None
    return redact(target.store)


async def add(target: Target, tenant: str, name: str = "") -> str:
    """A new key for ``tenant``, its digest stored; the key itself (shown once)."""
    check_tenant(tenant)
    key = generate_api_key()
    body = {"key_hash": hash_api_key(key), "tenant": tenant, "name": name}
    if not await _on(target, "keys_add", body):
        raise ConfigError("key collision; run the command again")
    return key


async def list_keys(target: Target) -> list[dict[str, Any]]:
    rows = await _on(target, "keys_list", None)
    if not isinstance(rows, list):
        raise ConfigError("bad keys_list reply")
    return [r for r in rows if isinstance(r, dict)]


async def revoke(target: Target, key: str) -> bool:
    """Revoke ``key`` (the key, its digest or a unique digest prefix); True if it was active."""
    if _DIGEST.fullmatch(key):
        digest = key
    elif _DIGEST_PREFIX.fullmatch(key):
        found = [r["key_hash"] for r in await list_keys(target) if r["key_hash"].startswith(key)]
        if len(found) != 1:
            raise ConfigError(
                f"{key!r}: {'no key' if not found else f'{len(found)} keys'} whose digest "
                "starts so; give more of it (haif keys list shows them)"
            )
        digest = found[0]
    else:
        digest = hash_api_key(key)
    return bool(await _on(target, "keys_revoke", digest))


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_list(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2), flush=True)
        return
    if not rows:
        print("no API keys", flush=True)
        return
    table = [("DIGEST", "TENANT", "NAME", "CREATED (UTC)", "STATE")]
    for r in rows:
        state = "revoked" if r["revoked"] else "active"
        table.append((r["key_hash"][:16], r["tenant"], r["name"], _when(r["created_s"]), state))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]), flush=True)
    active = sum(not r["revoked"] for r in rows)
    print(f"{len(rows)} key(s), {active} active", flush=True)


def run_keys(args: argparse.Namespace) -> int:
    """``haif keys add|list|revoke``."""
    target = resolve(args)
    if args.keys_command == "add":
        key = asyncio.run(add(target, args.tenant, args.name))
        print(key, flush=True)
        print(
            f"API key for tenant {args.tenant!r} stored (as a hash) in {_where(target)}; "
            "this is the only time it is shown.",
            file=sys.stderr,
            flush=True,
        )
        return 0
    if args.keys_command == "list":
        _print_list(asyncio.run(list_keys(target)), as_json=args.json)
        return 0
    if asyncio.run(revoke(target, args.key)):
        print("key revoked", file=sys.stderr, flush=True)
        return 0
    print("error: no such active key", file=sys.stderr, flush=True)
    return 1


def add_keys_commands(subparsers: Any) -> None:
    """Register ``haif keys add|list|revoke`` on the CLI's subparsers."""
    keys = subparsers.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="Create, list and revoke the API keys clients authenticate with. By "
        "default they act on the running haif up cluster of --data-dir (through its "
        "orchestrator, with its admin key), or on its store when it is down.",
    )
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    add_p = sub.add_parser("add", help="create an API key; prints it once")
    add_p.add_argument("--tenant", required=True, help="the tenant the key acts for")
    add_p.add_argument("--name", default="", help="a label for the key (shown by list)")
    add_target_args(add_p)
    list_p = sub.add_parser("list", help="list the keys: digest, tenant, label, state")
    list_p.add_argument("--json", action="store_true", help="one JSON array, full digests")
    add_target_args(list_p)
    revoke_p = sub.add_parser("revoke", help="revoke an API key")
    revoke_p.add_argument(
        "key", help="the key, its SHA-256 hex digest, or a prefix of it (8+ hex digits)"
    )
    add_target_args(revoke_p)
    for p in (add_p, list_p, revoke_p):
        p.set_defaults(func=run_keys)
