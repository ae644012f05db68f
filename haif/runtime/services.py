"""Run one service (gateway, orchestrator or worker) in this process; manage API keys.

``haif orchestrator --store`` takes a DuckDB file or a ``postgresql://``
URL (:func:`haif.runtime.store.open_store`); its ``--config`` cluster YAML
gives the core's ``policy`` and the ``orchestrator`` settings (leases,
reconciler, eviction).

``--cluster-key PATH`` and ``--cluster-keyring DIR`` (all three services)
seal every RPC a service sends and refuse every RPC it receives that is not
sealed by a trusted key (:mod:`haif.runtime.cluster_keys`).
``--cluster-tls-cert``, ``--cluster-tls-key`` and ``--cluster-ca`` put every
internal connection a service makes or serves on mutual TLS 1.3 with its
certificate from the cluster CA (:mod:`haif.runtime.cluster_tls`). Without
either, RPC is unauthenticated (loopback benchmarking only).

:func:`add_key` and :func:`revoke_key` change API keys straight in a store
(tests and scripts); ``haif keys`` (:mod:`haif.runtime.api_keys`) also
reaches a running cluster through its orchestrator.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from haif.configfile import ConfigError

if TYPE_CHECKING:
    from haif.runtime.cluster import ClusterConfig
    from haif.runtime.cluster_keys import ClusterAuth
    from haif.runtime.cluster_tls import ServiceTls
    from haif.runtime.gateway import GatewayAuth
    from haif.runtime.prompt_tokens import PromptTokens

T = TypeVar("T")
_TENANT = re.compile(r"[^\x00-\x1f\x7f]{1,256}")


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The TLS context of ``--tls-cert`` / ``--tls-key`` (both or neither), or None.

    TLS 1.2 at least, the standard library's default ciphers. A missing,
    unreadable or mismatched file is a :class:`ConfigError` naming it.
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate chain and its key ({exc})"
        ) from None
    return context


def run_service(kind: str, args: argparse.Namespace) -> int:
    from haif.runtime import telemetry
    from haif.runtime.cluster import ClusterConfig, load_cluster
    from haif.runtime.cluster_keys import cluster_auth_from_args
    from haif.runtime.cluster_tls import service_tls_from_args
    from haif.runtime.event_loop import LISTEN_BACKLOG, new_loop
    from haif.runtime.gc_pauses import freeze_after_startup

    # Logs (HAIF_LOG_FORMAT, HAIF_LOG_LEVEL) and the tracer provider
    # (HAIF_OTEL_EXPORTER), once per process: see haif.runtime.telemetry.
    telemetry.setup_logging(kind)
    telemetry.setup_tracing(kind)
    shutdown_timeout = 5.0
    tls: ssl.SSLContext | None = None
    app: web.Application | Awaitable[web.Application]
    if kind == "orchestrator":
        cluster = load_cluster(args.config) if args.config else ClusterConfig()
        internal = service_tls_from_args(args)
        _check_identity(internal, "orchestrator")
        app = _orchestrator_app(cluster, args, cluster_auth_from_args(args), internal)
        if args.gateway_port is None and (args.tls_cert or args.tls_key):
            raise ConfigError("--tls-cert / --tls-key serve the client API: add --gateway-port")
        tls = internal.server if internal is not None else None
        if args.gateway_port is not None:  # and the gateway, in this process
            auth = _gateway_auth(cluster, args.config)
            app = _with_gateway(
                app, cluster.region, auth, args, _prompts(cluster, args.config), tls
            )
            shutdown_timeout = args.shutdown_timeout_s
            tls = server_tls(args.tls_cert, args.tls_key)
    elif kind == "worker":
        from haif.runtime import worker

        return worker.run_worker(args)
    elif kind == "gateway":
        from haif.runtime import gateway

        cluster = load_cluster(args.config) if args.config else ClusterConfig()
        keys = cluster_auth_from_args(args)
        internal = service_tls_from_args(args)
        _check_identity(internal, "gateway")
        check_peer_scheme(internal, "--orchestrator", args.orchestrator)
        check_peer_scheme(internal, "--standby", args.standby)
        gw = gateway.Gateway(
            args.orchestrator,
            args.region,
            auth=_gateway_auth(cluster, args.config),
            idle_timeout_s=args.idle_timeout_s,
            signer=keys.signer if keys is not None else None,
            limits=gateway.edge_limits(args),
            standby_url=args.standby,
            prompts=_prompts(cluster, args.config),
            tls=internal,
        )
        app = gateway.build_app(gw, drain_signal=True)
        shutdown_timeout = args.shutdown_timeout_s
        tls = server_tls(args.tls_cert, args.tls_key)
    else:
        raise ValueError(f"unknown service {kind!r}")
    gateway_port = getattr(args, "gateway_port", None)
    # A socket a supervisor listens on and hands over (haif deploy's gateways).
    fd = getattr(args, "listen_fd", None)
    sock = socket.socket(fileno=fd) if fd is not None else None
    web.run_app(
        freeze_after_startup(app),
        host=args.host if sock is None else None,
        port=(args.port if gateway_port is None else gateway_port) if sock is None else None,
        sock=sock,
        print=None,
        shutdown_timeout=shutdown_timeout,
        ssl_context=tls,
        loop=new_loop(),
        backlog=LISTEN_BACKLOG,
    )
    return 0


def _check_identity(tls: ServiceTls | None, role: str) -> None:
    """``ConfigError`` when ``--cluster-tls-cert`` is not a certificate of ``role``."""
    if tls is not None and tls.identity.role.value != role:
        raise ConfigError(
            f"--cluster-tls-cert {tls.cert} is the certificate of {tls.identity.role} "
            f"{tls.identity.name!r}, not of a {role}"
        )


def check_peer_scheme(tls: ServiceTls | None, flag: str, url: str | None) -> None:
    """``ConfigError`` when a peer's URL does not match whether this service uses mTLS."""
    if url is None:
        return
    if tls is not None and not url.startswith("https://"):
        raise ConfigError(f"{flag} {url}: with --cluster-tls-cert, peers are https:// URLs")
    if tls is None and url.startswith("https://"):
        raise ConfigError(
            f"{flag} {url}: an https:// peer needs this service's certificate "
            "(--cluster-tls-cert, --cluster-tls-key, --cluster-ca)"
        )


def _gateway_auth(cluster: ClusterConfig, config: str | None) -> GatewayAuth:
    from haif.runtime.cluster import gateway_auth

    try:
        return gateway_auth(cluster.auth, Path(config).parent if config else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _prompts(cluster: ClusterConfig, config: str | None) -> PromptTokens:
    """Each model's tokenizer as the cluster's workers serve it (paths beside ``config``)."""
    from haif.runtime.prompt_tokens import prompt_tokens_for

    return prompt_tokens_for(cluster.workers, Path(config).parent if config else None)


async def _with_gateway(
    orchestrator_app: Awaitable[web.Application],
    region: str,
    auth: GatewayAuth,
    args: argparse.Namespace,
    prompts: PromptTokens | None = None,
    orchestrator_tls: ssl.SSLContext | None = None,
) -> web.Application:
    """The gateway's app, calling the orchestrator in this process, which it serves too.

    The orchestrator keeps its own port (``args.port``: workers announce
    themselves there, ``haif dlq`` calls it); it starts before the gateway
    takes requests and stops after the gateway has drained its streams.
    """
    from haif.runtime import gateway, orchestrator
    from haif.runtime.event_loop import LISTEN_BACKLOG
    from haif.runtime.rpc import LocalClient

    orch_app = await orchestrator_app
    orch = orch_app[orchestrator.ORCHESTRATOR]
    unary, streams = orchestrator.rpc_methods(orch)
    local = LocalClient(unary, streams, timeout_s=600.0, service="orchestrator")
    gw = gateway.Gateway(
        f"http://{args.host}:{args.port}",
        region,
        auth=auth,
        local=local,
        limits=gateway.edge_limits(args),
        prompts=prompts,
    )
    app = gateway.build_app(gw)
    runner = web.AppRunner(orch_app, handle_signals=False)

    async def start_orchestrator(_app: web.Application) -> None:
        await runner.setup()
        await web.TCPSite(
            runner,
            args.host,
            args.port,
            ssl_context=orchestrator_tls,
            backlog=LISTEN_BACKLOG,
        ).start()

    async def stop_orchestrator(_app: web.Application) -> None:
        await runner.cleanup()

    app.on_startup.insert(0, start_orchestrator)
    app.on_cleanup.append(stop_orchestrator)
    return app


async def _orchestrator_app(
    cluster: ClusterConfig,
    args: argparse.Namespace,
    cluster_auth: ClusterAuth | None = None,
    service_tls: ServiceTls | None = None,
) -> web.Application:
    """The orchestrator's app on the store ``args.store`` names (opened on the app's loop)."""
    from haif.runtime import orchestrator
    from haif.runtime.journal import Journal
    from haif.runtime.store import open_store

    settings = cluster.orchestrator
    linger_ms = settings.store_linger_ms
    try:
        store = await open_store(
            args.store, linger_s=None if linger_ms is None else linger_ms / 1000
        )
    except Exception as exc:
        hint = (
            "another process holds the file, another orchestrator or a `haif keys` "
            "command: DuckDB allows one process per file; use PostgreSQL to share a store"
        )
        raise ConfigError(store_error(args.store, exc, hint)) from None
    lease_s = getattr(args, "leader_lease_s", None)
    if lease_s is not None and (lease_s <= 0 or not args.store.startswith("postgres")):
        raise ConfigError(
            f"--leader-lease-s {lease_s}: a standby pair shares a PostgreSQL store "
            "(a postgresql:// --store) and needs a lease > 0 s"
        )
    orch = orchestrator.Orchestrator(
        cluster.policy,
        store,
        seed=args.seed,
        idle_timeout_s=args.idle_timeout_s,
        lease_ttl_s=settings.lease_ttl_s,
        reconcile_interval_s=settings.reconcile_interval_s,
        evict_after_missed=settings.evict_after_missed,
        # Until a worker's second heartbeat, assume the slowest configured
        # cadence, so no worker is evicted before its first interval is known.
        default_heartbeat_s=max((w.heartbeat_s for w in cluster.workers), default=0.5),
        cluster_auth=cluster_auth,
        service_tls=service_tls,
        region=cluster.region,
        journal=(
            Journal(args.journal, fsync=not getattr(args, "journal_no_fsync", False))
            if getattr(args, "journal", None)
            else None
        ),
        leader_lease_s=lease_s,
        # The lease's own connection, for the thread that renews it.
        lease_store=functools.partial(open_store, args.store, min_size=1, max_size=2),
        name=f"orchestrator:{getattr(args, 'port', '')}",
    )
    return orchestrator.build_app(orch)


def store_error(
    store_url: str,
    exc: BaseException,
    lock_hint: str = "stop the cluster first: DuckDB allows one process per file",
) -> str:
    """A message for a store that cannot be opened (a locked DuckDB file, a bad URL, ...)."""
    from haif.runtime.cluster import redact

    hint = f" ({lock_hint})" if "lock" in str(exc).lower() else ""
    return f"store {redact(store_url)}: {type(exc).__name__}: {exc}{hint}"


def _check_tenant(tenant: str) -> None:
    if not _TENANT.fullmatch(tenant) or tenant != tenant.strip():
        raise ConfigError(
            f"--tenant {tenant!r}: 1-256 characters, no control characters or outer spaces"
        )


def add_key(store_url: str, tenant: str, name: str = "") -> str:
    """Create an API key for ``tenant``; store its digest; return the key (shown once)."""
    from haif.runtime.security import generate_api_key, hash_api_key
    from haif.runtime.store import open_store

    _check_tenant(tenant)

    async def run() -> str:
        store = await open_store(store_url)
        try:
            key = generate_api_key()
            if not await store.add_api_key(hash_api_key(key), tenant, name, time.time()):
                raise ConfigError("key collision; run the command again")
            return key
        finally:
            await store.close()

    return _run_store(run, store_url)


def revoke_key(store_url: str, key: str) -> bool:
    """Revoke ``key`` (the key itself, or its 64-hex digest); True if it was active."""
    from haif.runtime.security import hash_api_key
    from haif.runtime.store import open_store

    key_hash = key if re.fullmatch(r"[0-9a-f]{64}", key) else hash_api_key(key)

    async def run() -> bool:
        store = await open_store(store_url)
        try:
            return await store.revoke_api_key(key_hash)
        finally:
            await store.close()

    return _run_store(run, store_url)


def _run_store(run: Callable[[], Coroutine[Any, Any, T]], store_url: str) -> T:
    try:
        return asyncio.run(run())
    except ConfigError:
        raise
    except Exception as exc:  # a locked DuckDB file, a bad URL, PostgreSQL down
        raise ConfigError(store_error(store_url, exc)) from None
