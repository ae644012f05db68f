"""``haif up``: a local cluster of processes on loopback.

One orchestrator (with its metadata store), synthetic workers and a
gateway, each its own process started as ``python -m haif <service>``. The
command waits until every service answers ``/healthz``, prints the gateway
URL and runs until interrupted; then it stops the services one at a time,
gateway first (SIGTERM: the gateway stops accepting requests and lets
in-flight streams finish, then the workers, then the orchestrator, which
finishes its store writes) and exports the request records to
``<data-dir>/records.parquet`` in the simulator's schema (from either
store backend).

Cluster YAML (every key optional)::

    seed: 0
    region: local
    gateway_port: 8080
    orchestrator_port: 0            # 0: a free port
    colocate_gateway: false         # true: the gateway runs in the orchestrator's
                                    # process, calling it directly (no RPC hop)
    store: postgresql://postgres@127.0.0.1:5432/haif
                                    # default: <data-dir>/store.duckdb (embedded
                                    # DuckDB); a plain path is a DuckDB file,
                                    # relative to this file
    orchestrator:
      lease_ttl_s: 30.0             # job lease, renewed every lease_ttl_s / 2
      reconcile_interval_s: 5.0     # how often leaked reservations are expired
      evict_after_missed: 3         # heartbeat intervals before a worker is evicted
      store_linger_ms: 50           # store writes no request waits for commit together
                                    # this often (default: DuckDB 50, PostgreSQL 0)
    workers:
      - {id: w1, region: local, capacity: 8, mean_s: 0.05, ttft_s: 0.01}
      - {id: w2, region: local, gpu_class: A100-80G, models: [llama-3-8b],
         timing: profile}            # timed by the simulator's A100 x Llama-3-8B profile
    policy:                         # haif.control.config.CoreConfig
      resume_partial: true          # default true here: resume interrupted streams
      placement: p2c
    auth:
      required: false               # true: every request needs credentials
      key_cache_s: 5.0              # how long the gateway trusts an API-key lookup
      jwt:                          # optional; accept JWTs from this issuer
        issuer: https://issuer.example
        audience: haif
        key_file: jwt-public.pem    # PEM public key / certificate (relative to
                                    # this file), or an HMAC secret in the file
        # secret: "..."             # or an inline HMAC secret (>= 32 bytes)
        algorithms: [RS256]
        tenant_claim: tenant
        leeway_s: 30

API keys live in the store as SHA-256 digests: ``haif keys add --tenant T
--store <data-dir>/store.duckdb`` prints a new key once (while the cluster
is down: DuckDB allows one process per file; a PostgreSQL store can be
changed at any time).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from haif.configfile import ConfigError, load_model
from haif.control.config import CoreConfig

if TYPE_CHECKING:
    from haif.runtime.gateway import GatewayAuth

Port = Annotated[int, Field(ge=0, le=65535)]


def beside(base: Path | None, path: str | Path) -> Path:
    """``path`` as the cluster YAML in ``base`` means it (relative to it; absolute as is)."""
    return Path(path) if base is None else base / path  # base / absolute = absolute


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerConfig(_Strict):
    id: str
    region: str
    gpu_class: str = "A100-80G"
    capacity: Annotated[int, Field(ge=1)] = 8
    models: tuple[str, ...] = ("llama-3-8b",)
    mean_s: Annotated[float, Field(gt=0)] = 0.05
    ttft_s: Annotated[float, Field(ge=0)] = 0.01
    heartbeat_s: Annotated[float, Field(gt=0)] = 0.5
    port: Port = 0
    # The engine (see haif.runtime.engines): synthetic (default), transformers,
    # vllm or openai. Paths are relative to the cluster YAML.
    engine: Literal["synthetic", "transformers", "vllm", "openai"] = "synthetic"
    # Synthetic engine: fixed (mean_s / ttft_s), or timed by the simulator's
    # profile of (gpu_class, model): profile (iteration level) / profile-request.
    timing: Literal["fixed", "profile", "profile-request"] = "fixed"
    # Profile timings only (as the simulator's worker groups): batch bound
    # (default: the profile's), chunked prefill token budget, prefix cache.
    max_batch: Annotated[int, Field(ge=1)] | None = None
    chunked_prefill_tokens: Annotated[int, Field(ge=1)] | None = None
    prefix_cache: bool = False
    profiles: str | None = None  # profile catalog YAML (default: the packaged one)
    artifact_store: str | None = None
    model_ref: str | None = None  # NAME:VERSION in the artifact store
    keyring: str | None = None  # directory of trusted *.pub signing keys
    device: str = "auto"
    upstream_url: str | None = None
    upstream_model: str | None = None

    @model_validator(mode="after")
    def _engine_settings(self) -> WorkerConfig:
        if self.engine in ("transformers", "vllm"):
            for name in ("artifact_store", "model_ref", "keyring"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: required by engine {self.engine!r}")
        if self.engine == "openai" and not (self.upstream_url and self.upstream_model):
            raise ValueError("upstream_url: engine 'openai' needs upstream_url and upstream_model")
        profiled = self.engine == "synthetic" and self.timing != "fixed"
        for name in ("max_batch", "chunked_prefill_tokens", "prefix_cache", "profiles"):
            if getattr(self, name) and not profiled:
                raise ValueError(f"{name}: only for the synthetic engine's profile timings")
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
        return args


_DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA", "HS256")


class JwtSettings(_Strict):
    """Where bearer JWTs come from (see :class:`haif.runtime.security.JwtConfig`)."""

    issuer: Annotated[str, Field(min_length=1)]
    audience: Annotated[str, Field(min_length=1)]
    algorithms: tuple[str, ...] = _DEFAULT_ALGORITHMS
    key_file: str | None = None
    secret: str | None = Field(default=None, repr=False)
    tenant_claim: Annotated[str, Field(min_length=1)] = "tenant"
    leeway_s: Annotated[float, Field(ge=0)] = 30.0

    @model_validator(mode="after")
    def _one_key(self) -> JwtSettings:
        if (self.key_file is None) == (self.secret is None):
            raise ValueError("give exactly one of key_file and secret")
        return self


class AuthConfig(_Strict):
    required: bool = False
    key_cache_s: Annotated[float, Field(ge=0)] = 5.0
    jwt: JwtSettings | None = None


class TlsFiles(_Strict):
    """A PEM certificate chain and its private key (relative to the cluster YAML)."""

    cert: Annotated[str, Field(min_length=1)]
    key: Annotated[str, Field(min_length=1)]

    def resolved(self, base_dir: Path | None) -> tuple[str, str]:
        return str(beside(base_dir, self.cert)), str(beside(base_dir, self.key))


class OrchestratorSettings(_Strict):
    """The orchestrator's upkeep (see :mod:`haif.runtime.orchestrator`)."""

    lease_ttl_s: Annotated[float, Field(gt=0)] = 30.0
    reconcile_interval_s: Annotated[float, Field(gt=0)] = 5.0
    evict_after_missed: Annotated[int, Field(ge=1)] = 3
    #: How long the store writes nobody waits for (job rows of requests without
    #: an Idempotency-Key, status changes, usage, records) gather before they
    #: commit together; None: the backend's default (DuckDB 50 ms, PostgreSQL 0).
    #: Longer costs less CPU per request; a crash loses that much.
    store_linger_ms: Annotated[float, Field(ge=0, le=10_000)] | None = None


class ClusterConfig(_Strict):
    seed: int = 0
    region: str = "local"
    gateway_port: Port = 8080
    orchestrator_port: Port = 0
    store: Annotated[str, Field(min_length=1)] | None = None
    orchestrator: OrchestratorSettings = OrchestratorSettings()
    workers: tuple[WorkerConfig, ...] = (
        WorkerConfig(id="w1", region="local"),
        WorkerConfig(id="w2", region="local"),
    )
    # A live cluster resumes interrupted responses on the next worker.
    policy: CoreConfig = CoreConfig(resume_partial=True)
    auth: AuthConfig = AuthConfig()
    #: Serve the gateway over HTTPS (clients must trust the certificate).
    gateway_tls: TlsFiles | None = None
    #: Run the gateway inside the orchestrator's process (``haif orchestrator
    #: --gateway-port``): no RPC hop between them, one process fewer; they
    #: then fail and restart together.
    colocate_gateway: bool = False

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
    return config.store


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


def worker_args(w: WorkerConfig, orch_url: str, port: int, base: Path | None) -> list[str]:
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
        *w.engine_args(base),
    ]


def run_cluster(config_path: str | None, *, data_dir: Path, port: int | None) -> int:
    from haif.runtime.cluster_keys import cluster_key_args, ensure_cluster_keys
    from haif.runtime.supervisor import ControlServer, Service, Supervisor, write_state

    config = load_cluster(config_path) if config_path else ClusterConfig()
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = data_dir / "keys"
    try:
        ensure_cluster_keys(keys, [*SERVICE_KEYS, *(w.id for w in config.workers)])
    except ValueError as exc:
        print(f"error: workers: {exc}", file=sys.stderr, flush=True)
        return 1
    store = store_url(config, config_path, data_dir)
    gw_port = port if port is not None else config.gateway_port
    orch_port = config.orchestrator_port or free_port()
    orch_url = f"http://127.0.0.1:{orch_port}"
    base = Path(config_path).resolve().parent if config_path else None
    if config.gateway_tls is not None:
        from haif.runtime.services import server_tls

        try:
            server_tls(*config.gateway_tls.resolved(base))  # before anything starts
        except ConfigError as exc:
            raise ConfigError(f"{config_path}: gateway_tls: {exc}") from None
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    supervisor = Supervisor(logs)
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    state_file = data_dir / "cluster.json"
    try:
        scheme = "https" if config.gateway_tls is not None else "http"
        gw_url = f"{scheme}://127.0.0.1:{gw_port}"
        serving = ["--shutdown-timeout-s", str(GATEWAY_SHUTDOWN_S)]
        if config.gateway_tls is not None:
            cert, key = config.gateway_tls.resolved(base)
            serving += ["--tls-cert", cert, "--tls-key", key]
        orch_args = ["orchestrator", "--port", str(orch_port), "--store", store]
        orch_args += ["--journal", str(data_dir / "journal")]
        orch_args += ["--seed", str(config.seed), *cluster_key_args(keys, "orchestrator")]
        if config_path:
            orch_args += ["--config", config_path]
        if config.colocate_gateway:
            orch_args += ["--gateway-port", str(gw_port), *serving]
        supervisor.add(Service("orchestrator", "orchestrator", config.region, orch_url, orch_args))
        for w in config.workers:
            wport = w.port or free_port()
            url = f"http://127.0.0.1:{wport}"
            args = [*worker_args(w, orch_url, wport, base), *cluster_key_args(keys, w.id)]
            # A restarted profile-timed worker reloads its weights, as in the simulator.
            restart = ["--cold-start"] if w.engine == "synthetic" and w.timing != "fixed" else []
            supervisor.add(Service(w.id, "worker", w.region, url, args, restart))
        if not config.colocate_gateway:
            gw_args = ["gateway", "--port", str(gw_port), "--orchestrator", orch_url]
            gw_args += ["--region", config.region, *serving]
            gw_args += ["--config", config_path] if config_path else []
            gw_args += cluster_key_args(keys, "gateway")
            supervisor.add(Service("gateway", "gateway", config.region, gw_url, gw_args))
        with ControlServer(supervisor) as control:
            write_state(state_file, gateway_url=gw_url, control=control)
            print(
                f"haif cluster up: gateway {gw_url} (orchestrator {orch_url}, "
                f"{len(config.workers)} workers); logs in {logs}; "
                f"control {control.url} (token in {state_file}); Ctrl-C to stop",
                flush=True,
            )
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
