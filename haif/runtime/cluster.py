"""``haif up``: a local cluster of processes.

One orchestrator (with its metadata store), workers and a gateway, each its
own process started as ``python -m haif <service>``, listening on ``host``
(127.0.0.1 by default). The command waits until every service answers
``/healthz``, prints the gateway URL and runs until interrupted; then it
stops the services one at a time, gateway first (SIGTERM: the gateway stops
accepting requests and lets in-flight streams finish, then the workers, then
the orchestrator, which finishes its store writes) and exports the request
records to ``<data-dir>/records.parquet`` in the simulator's schema (from
either store backend).

While it runs, ``<data-dir>/cluster.json`` (mode 0600) records where
everything is: the gateway, the orchestrator, the control endpoint and its
token, the store and the key directory; ``haif dlq``, ``haif keys`` and
``haif replay --faults`` find the cluster there.
``<data-dir>/prometheus-targets.json`` lists every service's ``/metrics``
for Prometheus's ``file_sd_configs``.

The cluster YAML is :class:`ClusterConfig`; every key is optional and
documented by its field's description: ``haif up --schema`` prints the
reference (``clusters/SCHEMA.md``), and ``clusters/`` holds examples.
``haif up``'s flags (``--host``, ``--port``, ``--orchestrator-port``,
``--standby-port``, ``--control-port``, ``--worker-port``, ``--store``) override the YAML
(:class:`UpFlags`).

API keys live in the store as SHA-256 digests: ``haif keys add --tenant T``
prints a new key once (see :mod:`haif.runtime.api_keys`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from haif.configfile import ConfigError, load_model
from haif.control.config import CoreConfig

if TYPE_CHECKING:
    from haif.runtime.gateway import GatewayAuth

Port = Annotated[int, Field(ge=0, le=65535)]
#: Seconds ``haif up`` waits for a started service to answer ``/healthz``.
START_TIMEOUT_S = 30.0
#: The same for a worker that loads a local model first (vLLM on a CPU: about a minute).
MODEL_LOAD_TIMEOUT_S = 300.0
#: What ``haif up`` says when ``internal_tls`` is false (the opt-out, for loopback
#: benchmarks and the simulator-vs-live comparison).
PLAIN_WARNING = (
    "WARNING: internal_tls: false: every hop between the services is plain HTTP "
    "(prompts, completions and API-key lookups readable on the path), authenticated by "
    "Ed25519 seals only: keep it on loopback. internal_tls: true encrypts every hop."
)


def beside(base: Path | None, path: str | Path) -> Path:
    """``path`` as the cluster YAML in ``base`` means it (relative to it; absolute as is)."""
    return Path(path) if base is None else base / path  # base / absolute = absolute


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerConfig(_Strict):
    """One worker process: its identity, capacity, engine and timing."""

    id: str = Field(description="the worker's id, unique in the cluster (also its key's name)")
    region: str = Field(description="the region it announces")
    gpu_class: str = Field(
        default="A100-80G",
        description="the GPU class it announces; profile timings use the simulator's "
        "profile of this GPU class x the request's model",
    )
    capacity: Annotated[int, Field(ge=1)] = Field(
        default=8,
        description="requests it runs at once (fixed timing; profile timings batch themselves)",
    )
    models: tuple[str, ...] = Field(
        default=("llama-3-8b",), description="the models it serves; the first is loaded at start"
    )
    mean_s: Annotated[float, Field(gt=0)] = Field(
        default=0.05,
        description="synthetic engine, fixed timing: mean time per response, in seconds",
    )
    ttft_s: Annotated[float, Field(ge=0)] = Field(
        default=0.01,
        description="synthetic engine, fixed timing: time to the first token, in seconds",
    )
    heartbeat_s: Annotated[float, Field(gt=0)] = Field(
        default=0.5, description="seconds between its heartbeats to the orchestrator"
    )
    port: Port = Field(
        default=0,
        description="port it listens on; 0: a free one (or the next of haif up --worker-port)",
    )
    engine: Literal["synthetic", "transformers", "vllm", "openai"] = Field(
        default="synthetic",
        description="synthetic: deterministic tokens; transformers: PyTorch (haif[torch]); "
        "vllm: in-process vLLM; openai: an upstream OpenAI-compatible server",
    )
    timing: Literal["fixed", "profile", "profile-request"] = Field(
        default="fixed",
        description="synthetic engine: fixed (mean_s, ttft_s), or timed by the simulator's "
        "profile of (gpu_class, model): profile (iteration level) or profile-request",
    )
    max_batch: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="profile timings: batch bound (default: the profile's)"
    )
    chunked_prefill_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="profile timings: chunked prefill token budget (default: none)"
    )
    prefix_cache: bool = Field(
        default=False, description="profile timings: model a prefix cache in the KV pool"
    )
    prefix_cache_max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description="profile timings: cap on the prefix cache's evictable blocks, in tokens "
        "(default: what the KV pool holds; needs prefix_cache)",
    )
    profiles: str | None = Field(
        default=None,
        description="profile timings: a profile catalog YAML (default: the packaged one)",
    )
    artifact_store: str | None = Field(
        default=None,
        description="transformers / vllm: the signed artifact store directory (relative to "
        "this file)",
    )
    model_ref: str | None = Field(
        default=None, description="transformers / vllm: the model in the store, NAME:VERSION"
    )
    keyring: str | None = Field(
        default=None,
        description="transformers / vllm: directory of trusted *.pub keys that sign "
        "artifacts (relative to this file)",
    )
    device: str = Field(
        default="auto", description="transformers: torch device (auto, cpu, cuda, ...)"
    )
    upstream_url: str | None = Field(
        default=None, description="openai: the upstream server's base URL (with /v1)"
    )
    upstream_model: str | None = Field(default=None, description="openai: the model name upstream")
    vllm_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="vllm: vLLM engine arguments (fields of vllm.AsyncEngineArgs), e.g. "
        "{enforce_eager: true, max_model_len: 2048}",
    )
    start_timeout_s: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="seconds haif up waits for the worker to answer after starting it, its "
        "model load included (default 30; 300 for transformers and vllm)",
    )

    @model_validator(mode="after")
    def _engine_settings(self) -> WorkerConfig:
        if self.engine in ("transformers", "vllm"):
            for name in ("artifact_store", "model_ref", "keyring"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: required by engine {self.engine!r}")
        if self.vllm_args and self.engine != "vllm":
            raise ValueError("vllm_args: only for engine 'vllm'")
        if self.engine == "openai" and not (self.upstream_url and self.upstream_model):
            raise ValueError("upstream_url: engine 'openai' needs upstream_url and upstream_model")
        profiled = self.engine == "synthetic" and self.timing != "fixed"
        for name in ("max_batch", "chunked_prefill_tokens", "prefix_cache", "profiles"):
            if getattr(self, name) and not profiled:
                raise ValueError(f"{name}: only for the synthetic engine's profile timings")
        if self.prefix_cache_max_tokens is not None and not self.prefix_cache:
            raise ValueError("prefix_cache_max_tokens: needs prefix_cache: true")
        return self

    def engine_args(self, base: Path | None) -> list[str]:
        """Command-line options of ``haif worker`` for this engine."""
        args = ["--engine", self.engine]
        if self.engine == "synthetic" and self.timing != "fixed":
            args += ["--timing", self.timing]
            if self.max_batch is not None:
                args += ["--max-batch", str(self.max_batch)]
            if self.chunked_prefill_tokens is not None:
                args += ["--chunked-prefill-tokens", str(self.chunked_prefill_tokens)]
            if self.prefix_cache:
                args.append("--prefix-cache")
            if self.prefix_cache_max_tokens is not None:
                args += ["--prefix-cache-max-tokens", str(self.prefix_cache_max_tokens)]
            if self.profiles is not None:
                args += ["--profiles", str(beside(base, self.profiles))]
        for name in ("artifact_store", "keyring"):
            value = getattr(self, name)
            if value is not None:
                args += [f"--{name.replace('_', '-')}", str(beside(base, value))]
        if self.model_ref:
            args += ["--model-ref", self.model_ref]
        if self.engine == "transformers":
            args += ["--device", self.device]
        if self.upstream_url and self.upstream_model:
            args += ["--upstream-url", self.upstream_url, "--upstream-model", self.upstream_model]
        for key, value in self.vllm_args.items():
            args += ["--engine-arg", f"{key}={json.dumps(value)}"]
        return args

    def start_timeout(self) -> float:
        """Seconds to wait for the started worker to answer (a local model loads first)."""
        if self.start_timeout_s is not None:
            return self.start_timeout_s
        return MODEL_LOAD_TIMEOUT_S if self.engine in ("transformers", "vllm") else START_TIMEOUT_S


_DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA", "HS256")


class JwtSettings(_Strict):
    """Where bearer JWTs come from (see :class:`haif.runtime.security.JwtConfig`)."""

    issuer: Annotated[str, Field(min_length=1)] = Field(
        description="the iss claim a token must carry"
    )
    audience: Annotated[str, Field(min_length=1)] = Field(
        description="the aud claim a token must carry"
    )
    algorithms: tuple[str, ...] = Field(
        default=_DEFAULT_ALGORITHMS, description="signature algorithms accepted (never none)"
    )
    key_file: str | None = Field(
        default=None,
        description="PEM public key or certificate (relative to this file), or a file "
        "holding an HMAC secret; give this or secret",
    )
    secret: str | None = Field(
        default=None, repr=False, description="an inline HMAC secret (>= 32 bytes)"
    )
    tenant_claim: Annotated[str, Field(min_length=1)] = Field(
        default="tenant", description="the claim that names the request's tenant"
    )
    leeway_s: Annotated[float, Field(ge=0)] = Field(
        default=30.0, description="clock skew allowed on exp and nbf, in seconds"
    )

    @model_validator(mode="after")
    def _one_key(self) -> JwtSettings:
        if (self.key_file is None) == (self.secret is None):
            raise ValueError("give exactly one of key_file and secret")
        return self


class AuthConfig(_Strict):
    """How the gateway authenticates clients."""

    required: bool = Field(
        default=False,
        description="true: every request needs an API key or a JWT; false: requests "
        "without one act as tenant anonymous (an invalid one is still refused)",
    )
    key_cache_s: Annotated[float, Field(ge=0)] = Field(
        default=5.0, description="how long the gateway trusts an API-key lookup, in seconds"
    )
    jwt: JwtSettings | None = Field(default=None, description="accept JWTs from this issuer")


class TlsFiles(_Strict):
    """A PEM certificate chain and its private key (relative to the cluster YAML)."""

    cert: Annotated[str, Field(min_length=1)] = Field(description="PEM certificate chain")
    key: Annotated[str, Field(min_length=1)] = Field(description="PEM private key")

    def resolved(self, base_dir: Path | None) -> tuple[str, str]:
        return str(beside(base_dir, self.cert)), str(beside(base_dir, self.key))


class OrchestratorSettings(_Strict):
    """The orchestrator's upkeep (see :mod:`haif.runtime.orchestrator`)."""

    lease_ttl_s: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="job lease in seconds, renewed every lease_ttl_s / 2"
    )
    reconcile_interval_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="how often reservations leaked by a dead orchestrator are expired"
    )
    evict_after_missed: Annotated[int, Field(ge=1)] = Field(
        default=3, description="heartbeat intervals a worker may miss before it is evicted"
    )
    store_linger_ms: Annotated[float, Field(ge=0, le=10_000)] | None = Field(
        default=None,
        description="how long store writes no request waits for (job rows without an "
        "Idempotency-Key, status changes, usage, records) gather to commit together; "
        "default: DuckDB 200, PostgreSQL 0. Longer costs less CPU; usage is journaled first, "
        "so a crash loses none of it",
    )
    leader_lease_s: Annotated[float, Field(gt=0, le=60)] = Field(
        default=2.0,
        description="with orchestrators: 2, the leader lease in seconds (renewed every "
        "quarter of it): a dead leader's requests go to the standby within about this long",
    )
    journal_fsync: bool = Field(
        default=True,
        description="fsync the usage journal before each answer ends (grouped); false: "
        "written but not fsynced, which survives the orchestrator's crash but not the "
        "machine's, and spares each answer the disk's wait",
    )


LOOPBACK = "127.0.0.1"


class ClusterConfig(_Strict):
    """A local cluster: what ``haif up`` starts (every key optional)."""

    seed: int = Field(default=0, description="seed of the orchestrator's placement and retry draws")
    region: str = Field(
        default="local", description="the region of the gateway and the orchestrator"
    )
    host: Annotated[str, Field(min_length=1)] = Field(
        default=LOOPBACK,
        description="address the gateway, orchestrator and workers listen on "
        "(0.0.0.0: every interface); the control endpoint stays on 127.0.0.1",
    )
    gateway_port: Port = Field(default=8080, description="the client API's port")
    orchestrator_port: Port = Field(
        default=0, description="the orchestrator's RPC and /metrics port; 0: a free one"
    )
    standby_port: Port = Field(
        default=0,
        description="with orchestrators: 2, the standby orchestrator's port; 0: a free one",
    )
    control_port: Port = Field(
        default=0,
        description="the control endpoint's port (haif replay --faults, fault injection); "
        "0: a free one",
    )
    store: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        description="the metadata store: a DuckDB file (relative to this file) or a "
        "postgresql:// URL; default <data-dir>/store.duckdb",
    )
    orchestrator: OrchestratorSettings = Field(
        default=OrchestratorSettings(), description="the orchestrator's upkeep"
    )
    workers: tuple[WorkerConfig, ...] = Field(
        default=(
            WorkerConfig(id="w1", region="local"),
            WorkerConfig(id="w2", region="local"),
        ),
        description="the workers; default two synthetic workers w1 and w2 in region local",
    )
    policy: CoreConfig = Field(
        default=CoreConfig(resume_partial=True),
        description="the control core's settings, as a scenario's policy "
        "(resume_partial defaults to true here: interrupted streams resume on the next worker)",
    )
    auth: AuthConfig = Field(default=AuthConfig(), description="client authentication")
    gateway_tls: TlsFiles | None = Field(
        default=None,
        description="serve the gateway over HTTPS with these files (clients must trust the "
        "certificate)",
    )
    internal_tls: bool = Field(
        default=True,
        description="true (the default): mutual TLS 1.3 on every connection between the "
        "services (gateway, orchestrator, workers, haif dlq / keys), with certificates from "
        "the cluster CA (cluster_ca, else one haif up creates in <data-dir>/tls/). false: "
        "plain HTTP sealed with Ed25519 cluster keys, readable on the path: an opt-out for "
        "loopback benchmarks (haif up warns on every start)",
    )
    cluster_ca: TlsFiles | None = Field(
        default=None,
        description="the CA (PEM certificate and its ECDSA key, relative to this file) that "
        "signs the services' certificates; default: one haif up creates in <data-dir>/tls/",
    )
    store_ca: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        description="a PostgreSQL store over TLS: the PEM CA certificate (relative to this "
        "file) its server certificate is checked against; adds sslmode=verify-full and "
        "sslrootcert to the store URL (unless the URL sets sslmode itself)",
    )
    colocate_gateway: bool = Field(
        default=False,
        description="run the gateway in the orchestrator's process (no RPC hop, one process "
        "fewer; the two then fail and restart together)",
    )
    orchestrators: Annotated[int, Field(ge=1, le=2)] = Field(
        default=1,
        description="2: a leader and a standby sharing the PostgreSQL store; the gateway and "
        "the workers know both, and the standby takes over when the leader's lease lapses",
    )

    @model_validator(mode="after")
    def _standby_needs_a_shared_store(self) -> ClusterConfig:
        if self.orchestrators == 2:
            if self.store is None or not self.store.startswith(("postgresql:", "postgres:")):
                raise ValueError(
                    "orchestrators: 2 needs a shared store: set store to a postgresql:// URL"
                )
            if self.colocate_gateway:
                raise ValueError(
                    "orchestrators: 2 and colocate_gateway: true do not go together "
                    "(a gateway inside one orchestrator dies with it)"
                )
        return self

    @model_validator(mode="after")
    def _tls_settings(self) -> ClusterConfig:
        if self.cluster_ca is not None and not self.internal_tls:
            raise ValueError("cluster_ca: only used with internal_tls: true")
        if self.store_ca is not None and (
            self.store is None or not self.store.startswith(("postgresql:", "postgres:"))
        ):
            raise ValueError("store_ca: only for a postgresql:// store")
        return self

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if value is not None:
            from haif.runtime.store import store_backend

            store_backend(value)  # ValueError names the schemes allowed
        return value

    @field_validator("policy", mode="before")
    @classmethod
    def _resume_by_default(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {"resume_partial": True, **value}
        return value


def gateway_auth(auth: AuthConfig, base_dir: Path | None = None) -> GatewayAuth:
    """The gateway's authentication settings; ``ValueError`` names the bad field."""
    from haif.runtime.gateway import GatewayAuth
    from haif.runtime.security import JwtConfig

    jwt = None
    if auth.jwt is not None:
        s = auth.jwt
        key: str | bytes
        if s.key_file is not None:
            path = beside(base_dir, s.key_file)
            try:
                key = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"auth.jwt.key_file: cannot read {path}: {exc.strerror}") from None
        else:
            assert s.secret is not None
            key = s.secret
        try:
            jwt = JwtConfig(
                issuer=s.issuer,
                audience=s.audience,
                algorithms=s.algorithms,
                key=key,
                tenant_claim=s.tenant_claim,
                leeway_s=s.leeway_s,
            )
        except ValueError as exc:
            raise ValueError(f"auth.jwt: {exc}") from None
    return GatewayAuth(required=auth.required, jwt=jwt, key_cache_s=auth.key_cache_s)


GATEWAY_SHUTDOWN_S = 10.0
#: Cluster keys besides the workers' (see haif.runtime.cluster_keys): the
#: services, and ``admin`` for operator tools such as ``haif dlq``.
SERVICE_KEYS = ("gateway", "orchestrator", "admin")


def load_cluster(path: str | Path) -> ClusterConfig:
    config = load_model(ClusterConfig, path)
    try:
        gateway_auth(config.auth, Path(path).parent)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def store_url(config: ClusterConfig, config_path: str | Path | None, data_dir: Path) -> str:
    """The orchestrator's ``--store``: the YAML's ``store`` or the data dir's DuckDB file.

    A DuckDB path in the YAML is relative to the YAML file.
    """
    if config.store is None:
        return str(data_dir / "store.duckdb")
    from haif.runtime.store import store_backend

    backend, target = store_backend(config.store)
    if backend == "duckdb" and target != ":memory:" and config_path is not None:
        return str(beside(Path(config_path).parent, target))
    if config.store_ca is not None:
        base = Path(config_path).resolve().parent if config_path is not None else None
        return verify_full(config.store, beside(base, config.store_ca))
    return config.store


def verify_full(url: str, ca: Path) -> str:
    """``url`` (postgresql://) with ``sslmode=verify-full`` and ``sslrootcert=ca`` added:
    the server must present a certificate from ``ca`` naming the URL's host. A URL that
    sets ``sslmode`` itself is kept as it is. ``ConfigError`` when ``ca`` is missing."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if not ca.is_file():
        raise ConfigError(f"store_ca {ca}: no such file")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "sslmode" for k, _ in query):
        return url
    query += [("sslmode", "verify-full"), ("sslrootcert", str(ca.resolve()))]
    return urlunsplit(parts._replace(query=urlencode(query)))


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_args(
    w: WorkerConfig, orch_url: str, port: int, base: Path | None, standby_url: str | None = None
) -> list[str]:
    """The ``haif worker`` command line of one worker entry."""
    return [
        "worker",
        "--port",
        str(port),
        "--id",
        w.id,
        "--region",
        w.region,
        "--orchestrator",
        orch_url,
        "--gpu-class",
        w.gpu_class,
        "--capacity",
        str(w.capacity),
        "--models",
        ",".join(w.models),
        "--mean-s",
        str(w.mean_s),
        "--ttft-s",
        str(w.ttft_s),
        "--heartbeat-s",
        str(w.heartbeat_s),
        *(["--standby", standby_url] if standby_url else []),
        *w.engine_args(base),
    ]


def gateway_serving_args(config: ClusterConfig, base: Path | None) -> list[str]:
    """How a gateway serves clients: its drain time, and HTTPS where ``gateway_tls`` says."""
    serving = ["--shutdown-timeout-s", str(GATEWAY_SHUTDOWN_S)]
    if config.gateway_tls is not None:
        cert, key = config.gateway_tls.resolved(base)
        serving += ["--tls-cert", cert, "--tls-key", key]
    return serving


def orchestrator_args(
    config: ClusterConfig,
    *,
    host: str,
    port: int,
    store: str,
    journal: Path,
    identity: list[str],
    config_path: str | None,
    serving: list[str],
) -> list[str]:
    """The ``haif orchestrator`` command line of one orchestrator of ``config``
    (``serving``: :func:`gateway_serving_args`, used when the gateway is colocated)."""
    settings = config.orchestrator
    args = ["orchestrator", "--host", host, "--port", str(port), "--store", store]
    args += ["--journal", str(journal)]
    if not settings.journal_fsync:
        args.append("--journal-no-fsync")
    args += ["--seed", str(config.seed), *identity]
    if config_path:
        args += ["--config", config_path]
    if config.colocate_gateway:
        args += ["--gateway-port", str(config.gateway_port), *serving]
    if config.orchestrators == 2:
        args += ["--leader-lease-s", str(settings.leader_lease_s)]
    return args


def gateway_args(
    config: ClusterConfig,
    *,
    host: str,
    orchestrator_url: str,
    standby_url: str | None,
    identity: list[str],
    config_path: str | None,
    serving: list[str],
) -> list[str]:
    """The ``haif gateway`` command line of ``config``'s gateway."""
    args = ["gateway", "--host", host, "--port", str(config.gateway_port)]
    args += ["--orchestrator", orchestrator_url, "--region", config.region, *serving]
    args += ["--standby", standby_url] if standby_url else []
    args += ["--config", config_path] if config_path else []
    return [*args, *identity]


@dataclass(frozen=True)
class UpFlags:
    """``haif up``'s flags that override the cluster YAML (None: the YAML's value)."""

    host: str | None = None
    gateway_port: int | None = None
    orchestrator_port: int | None = None
    standby_port: int | None = None
    control_port: int | None = None
    #: The first worker's port; the next workers take the ports after it.
    worker_port: int | None = None
    #: The store (a path here is relative to the working directory, not the YAML).
    store: str | None = None


def with_flags(config: ClusterConfig, flags: UpFlags) -> ClusterConfig:
    """``config`` with the flags given applied (``ConfigError`` for a bad store URL)."""
    update: dict[str, Any] = {
        name: getattr(flags, name)
        for name in ("host", "gateway_port", "orchestrator_port", "standby_port", "control_port")
        if getattr(flags, name) is not None
    }
    if flags.store is not None:
        from haif.runtime.store import store_backend

        try:
            store_backend(flags.store)
        except ValueError as exc:
            raise ConfigError(f"--store: {exc}") from None
        update["store"] = flags.store
    if flags.worker_port is not None:
        last = flags.worker_port + len(config.workers) - 1
        if last > 65535:
            raise ConfigError(
                f"--worker-port {flags.worker_port}: the last worker would get {last}"
            )
        update["workers"] = tuple(
            w.model_copy(update={"port": flags.worker_port + i})
            for i, w in enumerate(config.workers)
        )
    return config.model_copy(update=update)


_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def service_url(host: str, port: int, scheme: str = "http") -> str:
    """The URL to reach a service listening on ``host`` (a wildcard: via loopback)."""
    where = LOOPBACK if host in _WILDCARDS else host
    if ":" in where:
        where = f"[{where}]"
    return f"{scheme}://{where}:{port}"


def _check_free(host: str, port: int, what: str) -> None:
    """``ConfigError`` naming ``what`` when ``port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{what} {port} on {host}: {exc.strerror}") from None


#: File-based service discovery for Prometheus (``file_sd_configs``), in the data dir.
PROMETHEUS_TARGETS = "prometheus-targets.json"


def write_prometheus_targets(path: Path, services: list[dict[str, Any]]) -> None:
    """One target group per service (``/metrics`` of each), labelled ``component``
    (gateway, orchestrator, worker), ``service`` (its name) and ``region``."""
    groups = [
        {
            "targets": [row["url"].split("://", 1)[1]],
            "labels": {
                "component": row["kind"],
                "service": row["name"],
                "region": row["region"],
                **({"__scheme__": "https"} if row["url"].startswith("https:") else {}),
            },
        }
        for row in services
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    tmp.replace(path)  # Prometheus may read it at any time: never half-written


def run_cluster(
    config_path: str | None,
    *,
    data_dir: Path,
    port: int | None = None,
    flags: UpFlags | None = None,
) -> int:
    """``haif up``: start the cluster, run until a signal, stop it; the exit status.

    ``port`` (the gateway's) and ``flags`` override the YAML.
    """
    from haif.runtime.cluster_keys import cluster_key_args, ensure_cluster_keys
    from haif.runtime.cluster_tls import (
        MONITOR,
        TLS_DIR,
        ServiceFiles,
        cluster_tls_args,
        ensure_cluster_certs,
        liveness_context,
    )
    from haif.runtime.supervisor import ControlServer, Service, Supervisor, write_state

    flags = flags or UpFlags()
    if port is not None:
        flags = replace(flags, gateway_port=port)
    config = load_cluster(config_path) if config_path else ClusterConfig()
    config = with_flags(config, flags)
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = data_dir / "keys"
    tls_dir = data_dir / TLS_DIR
    base = Path(config_path).resolve().parent if config_path else None
    names = [*SERVICE_KEYS, *(w.id for w in config.workers)]
    certs: dict[str, ServiceFiles] = {}
    try:
        if config.internal_tls:
            ca_files = None
            if config.cluster_ca is not None:
                cert, key = config.cluster_ca.resolved(base)
                ca_files = (Path(cert), Path(key))
            try:
                # Addresses too, for tools that check them (Prometheus scraping /metrics).
                hosts = ["127.0.0.1", "localhost"]
                hosts += [] if config.host in _WILDCARDS or config.host in hosts else [config.host]
                certs = ensure_cluster_certs(tls_dir, [*names, MONITOR], ca_files, hosts=hosts)
            except ConfigError as exc:
                raise ConfigError(f"{config_path}: {exc}") from None
        else:
            ensure_cluster_keys(keys, names)
    except ValueError as exc:
        print(f"error: workers: {exc}", file=sys.stderr, flush=True)
        return 1

    def identity_args(name: str) -> list[str]:
        """The flags that make ``name`` that service: its certificate, or its key."""
        if certs:
            return cluster_tls_args(certs[name])
        return cluster_key_args(keys, name)

    internal = "https" if certs else "http"
    store = store_url(config, None if flags.store else config_path, data_dir)
    host = config.host
    gw_port = config.gateway_port
    for what, fixed in (
        ("gateway_port (--port)", gw_port),
        ("orchestrator_port (--orchestrator-port)", config.orchestrator_port),
        *((f"workers[{w.id}].port (--worker-port)", w.port) for w in config.workers),
    ):
        if fixed:
            _check_free(host, fixed, what)
    orch_port = config.orchestrator_port or free_port()
    orch_url = service_url(host, orch_port, internal)
    standby_port: int | None = None
    if config.orchestrators == 2:
        standby_port = config.standby_port or free_port()
        if config.standby_port:
            _check_free(host, standby_port, "standby_port (--standby-port)")
    standby_url = service_url(host, standby_port, internal) if standby_port is not None else None
    if config.gateway_tls is not None:
        from haif.runtime.services import server_tls

        try:
            server_tls(*config.gateway_tls.resolved(base))  # before anything starts
        except ConfigError as exc:
            raise ConfigError(f"{config_path}: gateway_tls: {exc}") from None
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    liveness = None
    if certs:  # health checks of internal ports present the monitor's certificate
        liveness = liveness_context(certs[MONITOR])
    supervisor = Supervisor(logs, liveness)
    try:
        control = ControlServer(supervisor, port=config.control_port)
    except OSError as exc:
        raise ConfigError(
            f"control_port (--control-port) {config.control_port}: {exc.strerror}"
        ) from None
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    state_file = data_dir / "cluster.json"
    targets = data_dir / PROMETHEUS_TARGETS
    try:
        scheme = "https" if config.gateway_tls is not None else "http"
        gw_url = service_url(host, gw_port, scheme)
        serving = gateway_serving_args(config, base)
        pair = [("orchestrator", orch_port, "journal")]
        if standby_port is not None:
            pair.append(("orchestrator2", standby_port, "journal2"))
        for name, port, journal in pair:
            orch_args = orchestrator_args(
                config,
                host=host,
                port=port,
                store=store,
                journal=data_dir / journal,
                identity=identity_args("orchestrator"),
                config_path=config_path,
                serving=serving,
            )
            url = service_url(host, port, internal)
            supervisor.add(Service(name, "orchestrator", config.region, url, orch_args))
        for w in config.workers:
            wport = w.port or free_port()
            url = service_url(host, wport, internal)
            args = [*worker_args(w, orch_url, wport, base, standby_url), "--host", host]
            args += identity_args(w.id)
            # A restarted profile-timed worker reloads its weights, as in the simulator.
            restart = ["--cold-start"] if w.engine == "synthetic" and w.timing != "fixed" else []
            supervisor.add(Service(w.id, "worker", w.region, url, args, restart, w.start_timeout()))
        gateway = Service("gateway", "gateway", config.region, gw_url, [])
        if not config.colocate_gateway:
            gateway.args = gateway_args(
                config,
                host=host,
                orchestrator_url=orch_url,
                standby_url=standby_url,
                identity=identity_args("gateway"),
                config_path=config_path,
                serving=serving,
            )
            supervisor.add(gateway)
        with control:
            scraped = supervisor.table()
            if config.colocate_gateway:  # served by the orchestrator's process, on its port
                scraped.append(gateway.row())
            write_prometheus_targets(targets, scraped)
            write_state(
                state_file,
                gateway_url=gw_url,
                control=control,
                orchestrator_url=orch_url,
                **({"standby_url": standby_url} if standby_url else {}),
                store=store,
                data_dir=str(data_dir.resolve()),
                **({"tls": str(tls_dir.resolve())} if certs else {"keys": str(keys.resolve())}),
                prometheus_targets=str(targets.resolve()),
            )
            print(
                f"haif cluster up: gateway {gw_url} (orchestrator {orch_url}"
                f"{f', standby {standby_url}' if standby_url else ''}, "
                f"{len(config.workers)} workers; internal hops: "
                f"{'mutual TLS 1.3, CA ' + str(tls_dir / 'ca.pem') if certs else 'PLAIN HTTP'}); "
                f"logs in {logs}; "
                f"control {control.url} (token in {state_file}); "
                f"Prometheus targets in {targets}; Ctrl-C to stop",
                flush=True,
            )
            if not certs:  # after the line above, which tools wait for
                print(PLAIN_WARNING, file=sys.stderr, flush=True)
            while not stop:
                for service in supervisor.unexpected_exits():
                    code = service.proc.returncode if service.proc else None
                    if service.kind == "worker":
                        print(f"worker {service.name} exited with code {code}", flush=True)
                    else:
                        print(f"{service.name} exited with code {code}; stopping", flush=True)
                        stop = True
                time.sleep(0.2)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return_code = 1
    else:
        return_code = 0
    finally:
        state_file.unlink(missing_ok=True)
        targets.unlink(missing_ok=True)
        control.close()
        # Gateway first (it drains in-flight streams), then workers, then the
        # orchestrator, so nothing still running loses the service behind it.
        supervisor.shutdown(("gateway", "worker", "orchestrator"), GATEWAY_SHUTDOWN_S + 5)
    from haif.runtime.store import open_store, store_backend

    backend, target = store_backend(store)
    if backend != "duckdb" or Path(target).exists():

        async def export() -> int:
            db = await open_store(store)
            try:
                await db.export_parquet(data_dir / "records.parquet")
                return len(await db.records())
            finally:
                await db.close()

        try:
            n = asyncio.run(export())
        except Exception as exc:
            print(f"could not export the records of {redact(store)}: {exc}", flush=True)
        else:
            print(f"{n} request records in {data_dir / 'records.parquet'}", flush=True)
    return return_code
