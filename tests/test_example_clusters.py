"""The example clusters in ``clusters/`` and the cluster YAML reference.

Each example is started as a user would (``haif up FILE``, every port given
by flag so the files' fixed ports cannot clash), serves one completion and
stops; the reference ``clusters/SCHEMA.md`` is what ``haif up --schema``
prints, from field descriptions that every key must have.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.cluster import monitor_tls, run_haif
from harness.pg import dsn_for, pg_admin, pg_unavailable
from harness.up_cli import UpCli

from haif.configfile import ConfigError
from haif.records import read_parquet
from haif.runtime import cluster_schema
from haif.runtime.cluster import ClusterConfig, UpFlags, load_cluster, service_url, with_flags

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
EXAMPLES = sorted(CLUSTERS.glob("*.yaml"))


# ------------------------------------------------------------------ the reference


def test_schema_reference_is_current() -> None:
    """clusters/SCHEMA.md is the output of `haif up --schema` (regenerate it if not)."""
    expected = cluster_schema.reference()
    assert (CLUSTERS / "SCHEMA.md").read_text() == expected, (
        f"clusters/SCHEMA.md is stale: run `{cluster_schema.REGENERATE}`"
    )
    done = run_haif("up", "--schema")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_every_cluster_key_is_described() -> None:
    for model in cluster_schema.models():
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            assert name in cluster_schema.reference()


def test_examples_are_valid_and_listed() -> None:
    listed = (CLUSTERS / "README.md").read_text()
    assert [p.name for p in EXAMPLES] == [
        "colocated.yaml",
        "postgresql.yaml",
        "single-region.yaml",
        "standby.yaml",
        "tiny-llama-openai.yaml",
        "tiny-llama-vllm.yaml",
        "tiny-model.yaml",
    ]
    for path in EXAMPLES:
        config = load_cluster(path)
        assert f"]({path.name})" in listed, path.name
        assert config.gateway_port == 8080 and config.control_port == 8082, path.name


def test_flags_override_the_file() -> None:
    config = load_cluster(CLUSTERS / "single-region.yaml")
    flags = UpFlags(
        host="0.0.0.0",
        gateway_port=9080,
        orchestrator_port=9081,
        control_port=9082,
        worker_port=9091,
        store="postgresql://postgres@db:5432/haif",
    )
    got = with_flags(config, flags)
    assert (got.host, got.gateway_port, got.orchestrator_port, got.control_port) == (
        "0.0.0.0",
        9080,
        9081,
        9082,
    )
    assert [w.port for w in got.workers] == [9091, 9092, 9093]
    assert got.store == "postgresql://postgres@db:5432/haif"
    assert with_flags(config, UpFlags()) == config
    with pytest.raises(ConfigError, match="--store"):
        with_flags(config, UpFlags(store="mysql://x"))
    with pytest.raises(ConfigError, match="--worker-port 65535"):
        with_flags(config, UpFlags(worker_port=65535))
    assert service_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert service_url("::1", 80) == "http://[::1]:80"


def test_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_haif("up", "--port", str(port), "--data-dir", str(tmp_path / "d"), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"gateway_port (--port) {port} on 127.0.0.1" in done.stderr


# ------------------------------------------------------------------ started for real


def _check_started(up: UpCli, workers: int, orchestrators: int = 1) -> None:
    """The flags decided every address, and cluster.json / the targets file say so; the
    internal ports are behind mutual TLS (the default), the CA in <data-dir>/tls/."""
    state = up.state
    assert state["gateway_url"] == up.url
    assert state["orchestrator_url"] == f"https://127.0.0.1:{up.orchestrator_port}"
    assert state["control_url"] == f"http://127.0.0.1:{up.control_port}"
    worker_urls = sorted(s["url"] for s in state["services"] if s["kind"] == "worker")
    assert worker_urls == [f"https://127.0.0.1:{up.worker_port + i}" for i in range(workers)]
    assert "internal hops: mutual TLS 1.3" in up.output
    assert monitor_tls(up.data) is not None
    targets = json.loads(Path(state["prometheus_targets"]).read_text())
    components = sorted(t["labels"]["component"] for t in targets)
    expected = ["gateway", *["orchestrator"] * orchestrators, *["worker"] * workers]
    assert components == sorted(expected)


def _stopped(up: UpCli) -> list[str]:
    out = up.stop()
    assert up.proc.returncode == 0, out
    assert not (up.data / "cluster.json").exists()
    return [r.request_id for r in read_parquet(up.data / "records.parquet")]


@pytest.mark.cluster
@pytest.mark.parametrize("name", ["single-region", "colocated"])
def test_example_cluster_serves_a_completion(name: str, tmp_path: Path) -> None:
    path = CLUSTERS / f"{name}.yaml"
    workers = len(load_cluster(path).workers)
    up = UpCli(tmp_path / "d", path, workers=workers)
    try:
        _check_started(up, workers)
        answer = up.complete(headers={"x-request-id": f"example-{name}"})
        assert answer["usage"]["completion_tokens"] == 4
    finally:
        records = _stopped(up)
    assert f"example-{name}" in records


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the example (dropped afterwards)."""
    name = f"haif_example_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(pg_admin(f"CREATE DATABASE {name}"))
    except (OSError, TimeoutError) as exc:
        pg_unavailable(repr(exc))
    try:
        yield dsn_for(name)
    finally:
        asyncio.run(pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.mark.cluster
@pytest.mark.postgres
def test_postgresql_example_with_keys_while_it_runs(tmp_path: Path, pg_database: str) -> None:
    """The PostgreSQL example, on a database of its own (--store): auth is required, and
    `haif keys` reaches the running cluster's store through its cluster.json."""
    path = CLUSTERS / "postgresql.yaml"
    assert load_cluster(path).store == "postgresql://postgres@127.0.0.1:5432/haif"
    data = tmp_path / "d"
    up = UpCli(data, path, extra=("--store", pg_database))
    try:
        _check_started(up, 2)
        assert up.state["store"] == pg_database
        status, answer = up.post("/v1/completions", {"model": "llama-3-8b", "prompt": "x"})
        assert status == 401, answer
        added = run_haif("keys", "add", "--tenant", "acme", "--name", "ex", "--data-dir", str(data))
        assert added.returncode == 0, added.stderr
        key = added.stdout.strip()
        answer = up.complete(headers={"Authorization": f"Bearer {key}", "x-request-id": "ex-pg"})
        assert answer["usage"]["completion_tokens"] == 4
        listed = run_haif("keys", "list", "--json", "--data-dir", str(data))
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert (row["tenant"], row["name"], row["revoked"]) == ("acme", "ex", False)
        gone = run_haif("keys", "revoke", row["key_hash"][:12], "--data-dir", str(data))
        assert gone.returncode == 0, gone.stderr
    finally:
        records = _stopped(up)
    assert "ex-pg" in records


@pytest.mark.cluster
@pytest.mark.postgres
def test_standby_example_leads_with_one_and_answers_admin_tools(
    tmp_path: Path, pg_database: str
) -> None:
    """The standby pair: one of the two leads; `haif dlq list` finds the leader through
    cluster.json, whichever it is."""
    path = CLUSTERS / "standby.yaml"
    assert load_cluster(path).orchestrators == 2
    data = tmp_path / "d"
    up = UpCli(data, path, extra=("--store", pg_database))
    try:
        _check_started(up, 2, orchestrators=2)
        assert up.state["standby_url"] == f"https://127.0.0.1:{up.standby_port}"
        answer = up.complete(headers={"x-request-id": "ex-standby"})
        assert answer["usage"]["completion_tokens"] == 4
        leaders = []
        for port in (up.orchestrator_port, up.standby_port):
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/status", timeout=10, context=monitor_tls(data)
            ) as resp:
                leaders.append(json.loads(resp.read())["leader"])
        assert sorted(leaders) == [False, True]
        listed = run_haif("dlq", "list", "--json", "--data-dir", str(data))
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
    finally:
        records = _stopped(up)
    assert "ex-standby" in records


@pytest.mark.cluster
@pytest.mark.slow
def test_tiny_model_example(tmp_path: Path) -> None:
    """The transformers example, copied beside an artifact store built as its comment says."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    shutil.copy(CLUSTERS / "tiny-model.yaml", tmp_path / "tiny-model.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [
            *(sys.executable, "-m", "haif", "artifacts", "make-tiny"),
            *("--store", "tiny-model/art", "--key", "tiny-model/keys/cluster.key"),
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    up = UpCli(
        tmp_path / "d",
        tmp_path / "tiny-model.yaml",
        workers=1,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    try:
        answer = up.complete(
            model="tiny-gpt2", headers={"x-request-id": "ex-tiny"}, timeout_s=300.0
        )
        assert answer["model"] == "tiny-gpt2"
        assert answer["usage"]["completion_tokens"] > 0
    finally:
        records = _stopped(up)
    assert "ex-tiny" in records


def test_default_config_has_a_schema() -> None:
    """The built-in cluster (no file) validates against its own schema."""
    assert ClusterConfig.model_validate({}) == ClusterConfig()
