"""``haif up``: a local cluster of processes on loopback.

One orchestrator (with the embedded DuckDB store), synthetic workers and a
gateway, each its own process started as ``python -m haif <service>``. The
command waits until every service answers ``/healthz``, prints the gateway
URL and runs until interrupted; then it stops the services (SIGTERM, so the
orchestrator finishes its store writes) and exports the request records to
``<data-dir>/records.parquet`` in the simulator's schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from haif.configfile import ConfigError, load_model
from haif.control.config import CoreConfig

Port = Annotated[int, Field(ge=0, le=65535)]


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


class ClusterConfig(_Strict):
    seed: int = 0
    region: str = "local"
    gateway_port: Port = 8080
    orchestrator_port: Port = 0
    workers: tuple[WorkerConfig, ...] = (
        WorkerConfig(id="w1", region="local"),
        WorkerConfig(id="w2", region="local"),
    )
    policy: CoreConfig = CoreConfig()


def load_cluster(path: str | Path) -> ClusterConfig:
    return load_model(ClusterConfig, path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"{url}: service exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise ConfigError(f"{url}: not healthy after {timeout_s:.0f} s")


def run_cluster(config_path: str | None, *, data_dir: Path, port: int | None) -> int:
    config = load_cluster(config_path) if config_path else ClusterConfig()
    data_dir.mkdir(parents=True, exist_ok=True)
    store = data_dir / "store.duckdb"
    gw_port = port if port is not None else config.gateway_port
    orch_port = config.orchestrator_port or free_port()
    orch_url = f"http://127.0.0.1:{orch_port}"
    py = [sys.executable, "-m", "haif"]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)

    def spawn(name: str, args: list[str], url: str) -> None:
        out = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen([*py, *args], stdout=out, stderr=subprocess.STDOUT)
        procs.append((name, proc))
        _wait_healthy(url, proc)

    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        orch_args = [
            "orchestrator",
            "--port",
            str(orch_port),
            "--store",
            str(store),
            "--seed",
            str(config.seed),
        ]
        if config_path:
            orch_args += ["--config", config_path]
        spawn("orchestrator", orch_args, orch_url)
        for w in config.workers:
            wport = w.port or free_port()
            spawn(
                f"worker-{w.id}",
                [
                    "worker",
                    "--port",
                    str(wport),
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
                ],
                f"http://127.0.0.1:{wport}",
            )
        gw_url = f"http://127.0.0.1:{gw_port}"
        spawn(
            "gateway",
            [
                "gateway",
                "--port",
                str(gw_port),
                "--orchestrator",
                orch_url,
                "--region",
                config.region,
            ],
            gw_url,
        )
        print(
            f"haif cluster up: gateway {gw_url} (orchestrator {orch_url}, "
            f"{len(config.workers)} workers); logs in {logs}; Ctrl-C to stop",
            flush=True,
        )
        while not stop:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping", flush=True)
                    stop = True
            time.sleep(0.2)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return_code = 1
    else:
        return_code = 0
    finally:
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    if store.exists():
        from haif.runtime.store import DuckDBStore

        async def export() -> int:
            db = DuckDBStore(store)
            try:
                await db.export_parquet(data_dir / "records.parquet")
                return len(await db.records())
            finally:
                await db.close()

        with contextlib.suppress(Exception):
            n = asyncio.run(export())
            print(f"{n} request records in {data_dir / 'records.parquet'}", flush=True)
    return return_code
