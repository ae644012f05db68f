"""How an operator command (``haif dlq``, ``haif keys``) reaches a cluster's data.

Either it asks the running orchestrator over RPC, as the cluster's
``admin`` (over mutual TLS with ``<data-dir>/tls/admin.pem``, or sealed with
``<data-dir>/keys/admin.key`` on a cluster with ``internal_tls: false``), or
it opens the store itself. DuckDB allows one process per
file, so while ``haif up`` runs on a DuckDB store only the orchestrator can
read or change it; a PostgreSQL store can be opened at any time.

:func:`resolve` picks, in this order:

1. ``--orchestrator URL``: that orchestrator (sealed with ``--cluster-key`` /
   ``--cluster-keyring``, else ``<data-dir>/keys/admin.key`` if it exists);
2. ``--store PATH_OR_URL``: that store, opened directly;
3. a ``haif up --data-dir DATA_DIR`` that is running (its
   ``<data-dir>/cluster.json``, :func:`haif.runtime.supervisor.running_state`):
   its orchestrator, with its ``admin`` key; its store is kept as the fallback
   when it is PostgreSQL;
4. else ``<data-dir>/store.duckdb``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from haif.configfile import ConfigError
from haif.runtime.cluster_keys import add_cluster_auth_args, cluster_auth_from_args
from haif.runtime.cluster_tls import (
    TLS_DIR,
    ServiceTls,
    add_cluster_tls_args,
    service_tls_from_args,
)
from haif.runtime.security import Signer

DEFAULT_DATA_DIR = ".haif"
ADMIN_KEY = "admin.key"


@dataclass(frozen=True)
class Target:
    """Where a command reads or changes the cluster's data."""

    orchestrator: str | None = None  # ask this orchestrator over RPC
    signer: Signer | None = None  # sealing those calls
    tls: ServiceTls | None = None  # or calling over mutual TLS with the admin certificate
    store: str | None = None  # or open this store (and the fallback of a running cluster)
    running: bool = False  # found through a running `haif up`'s cluster.json
    standby: str | None = None  # the other orchestrator of a pair: asked if this one is not

    @property
    def store_is_shared(self) -> bool:
        """Whether the store may be opened while a cluster uses it (PostgreSQL)."""
        return self.store is not None and self.store.startswith(("postgresql://", "postgres://"))


def add_target_args(parser: argparse.ArgumentParser, *, store: bool = True) -> None:
    """``--data-dir``, ``--orchestrator``, ``--store`` and the cluster key flags."""
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="the data directory of haif up (default .haif): while that cluster runs, ask "
        "its orchestrator (address from cluster.json, admin key from keys/), else open "
        "its store.duckdb",
    )
    parser.add_argument(
        "--orchestrator",
        default=None,
        metavar="URL",
        help="ask this orchestrator instead (default: the running cluster's)",
    )
    if store:
        parser.add_argument(
            "--store",
            default=None,
            help="open this store instead: a DuckDB file or a postgresql:// URL (a DuckDB file "
            "only while no cluster runs on it)",
        )
    add_cluster_auth_args(parser)
    add_cluster_tls_args(parser)


def admin_tls(args: argparse.Namespace, tls_dir: Path) -> ServiceTls | None:
    """The admin's certificate for an orchestrator behind mutual TLS: the flags, else
    ``<tls_dir>/admin.pem`` if it exists."""
    given = service_tls_from_args(args)
    if given is not None:
        return given
    cert, key, ca = tls_dir / "admin.pem", tls_dir / "admin.key", tls_dir / "ca.pem"
    if not cert.exists():
        return None
    return ServiceTls(cert, key, ca)


def admin_signer(args: argparse.Namespace, keys: Path) -> Signer | None:
    """The key that seals calls to a keyed orchestrator: the flags, else ``keys/admin.key``."""
    auth = cluster_auth_from_args(args)
    if auth is not None:
        return auth.signer
    path = keys / ADMIN_KEY
    if not path.exists():
        return None
    try:
        return Signer.from_file(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot use it as the admin key: {exc}") from None


def resolve(args: argparse.Namespace) -> Target:
    """Where the command goes (see the module docstring)."""
    from haif.runtime.supervisor import running_state

    data_dir = Path(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR)
    orchestrator = getattr(args, "orchestrator", None)
    store = getattr(args, "store", None)
    if orchestrator and store:
        raise ConfigError("give --orchestrator or --store, not both")
    if orchestrator:
        tls = admin_tls(args, data_dir / TLS_DIR) if orchestrator.startswith("https:") else None
        return Target(
            orchestrator=orchestrator, signer=admin_signer(args, data_dir / "keys"), tls=tls
        )
    if store:
        return Target(store=store)
    state: dict[str, Any] | None = running_state(data_dir)
    if state is not None and isinstance(state.get("orchestrator_url"), str):
        keys = Path(str(state.get("keys") or data_dir / "keys"))
        tls_dir = state.get("tls")
        recorded = state.get("store")
        standby = state.get("standby_url")
        return Target(
            orchestrator=state["orchestrator_url"],
            standby=standby if isinstance(standby, str) else None,
            signer=admin_signer(args, keys),
            tls=admin_tls(args, Path(tls_dir)) if isinstance(tls_dir, str) else None,
            store=recorded if isinstance(recorded, str) else None,
            running=True,
        )
    return Target(store=str(data_dir / "store.duckdb"))


async def call(target: Target, method: str, body: Any, timeout_s: float = 30.0) -> Any:
    """``method`` on the target's orchestrator (with a standby: on the one that leads);
    ``RpcError`` / ``RpcUnavailable`` as raised."""
    import aiohttp

    from haif.runtime.rpc import ORCHESTRATOR_AUDIENCE, RpcClient, RpcError, RpcUnavailable

    assert target.orchestrator is not None
    urls = [target.orchestrator, *([target.standby] if target.standby else [])]
    async with aiohttp.ClientSession() as session:
        for i, url in enumerate(urls):
            client = RpcClient(
                session,
                url,
                timeout_s,
                signer=target.signer,
                audience=ORCHESTRATOR_AUDIENCE,
                tls=target.tls if url.startswith("https:") else None,
            )
            try:
                return await client.call(method, body)
            except (RpcError, RpcUnavailable) as exc:
                last = i == len(urls) - 1
                if last or (isinstance(exc, RpcError) and exc.code != "not_leader"):
                    raise
        raise AssertionError("unreachable")


def not_served(code: str | None) -> bool:
    """Whether an RPC error says the orchestrator lacks the method (an older version) or
    does not let the admin key call it (its role table lacks the method)."""
    return code in ("unknown_method", "forbidden")
