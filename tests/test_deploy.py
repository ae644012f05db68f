"""``haif deploy``: the deploy YAML, host-key refusal, and a live three-host cluster.

The hosts are network namespaces with a real OpenSSH sshd each
(:mod:`harness.netns`); without root, namespaces or sshd these tests skip
with the reason (fail under ``CI=true``).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from haif.configfile import ConfigError
from haif.deploy.config import load_deploy
from haif.deploy.supervise import Spec, unit_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "clusters" / "deploy" / "example.yaml"

HOST = """  - name: {name}
    address: {address}
    user: root
    key_file: client_key
    known_hosts: known_hosts
    dir: {dir}
    services: [{services}]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the YAML


def test_the_example_is_valid_and_planned() -> None:
    plan = load_deploy(EXAMPLE)
    where = {s.label: s.url for s in plan.services}
    assert where == {
        "edge:orchestrator": "https://10.0.0.10:7070",
        "gpu1:w1": "https://10.0.0.11:7100",
        "gpu2:w2": "https://10.0.0.12:7100",
        "edge:gateway": "http://10.0.0.10:8080",
    }
    assert plan.tls and plan.gateway_urls() == ["http://10.0.0.10:8080"]
    assert [s.name for s in plan.find("gpu1:w1")] == ["w1"]


def test_workers_sharing_a_host_get_their_own_ports(tmp_path: Path) -> None:
    hosts = HOST.format(name="a", address="10.1.0.1", dir="/d", services="gateway, orchestrator")
    hosts += HOST.format(name="b", address="10.1.0.2", dir="/d", services="w1, w2, w3")
    workers = "".join(f"    - {{id: w{i}, region: r}}\n" for i in (1, 2, 3))
    plan = load_deploy(_write(tmp_path, f"hosts:\n{hosts}cluster:\n  workers:\n{workers}"))
    assert [s.port for s in plan.services if s.kind == "worker"] == [7100, 7101, 7102]
    assert plan.orchestrator_url == "https://10.1.0.1:7070"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("services: [gateway, orchestrator, w9]", "hosts.0.services: no service 'w9'"),
        ("services: [gateway]", "hosts: no host runs orchestrator, w1"),
        ("services: [gateway, orchestrator, w1, w1]", "'w1' is placed twice"),
        ("services: [gateway, orchestrator, w1]\n    port: 70000", "hosts.0.port"),
        ("services: [gateway, orchestrator, w1]\n    colour: red", "hosts.0.colour"),
    ],
)
def test_bad_hosts_name_the_field_and_line(tmp_path: Path, body: str, expected: str) -> None:
    text = (
        "hosts:\n  - name: a\n    address: 10.1.0.1\n    key_file: k\n    known_hosts: kh\n"
        f"    {body}\ncluster:\n  workers: [{{id: w1, region: r}}]\n"
    )
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_deploy(path)
    message = str(err.value)
    assert expected in message and f"{path}:" in message


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        ("host: 0.0.0.0", "cluster.host: set per host by haif deploy"),
        ("internal_tls: false", "insecure_plain_internal_http: true"),
        ("colocate_gateway: true", "cluster.colocate_gateway: not supported"),
    ],
)
def test_cluster_keys_deploy_decides_are_refused(
    tmp_path: Path, cluster: str, expected: str
) -> None:
    hosts = HOST.format(name="a", address="10.1.0.1", dir="/d", services="gateway, orchestrator")
    hosts += HOST.format(name="b", address="10.1.0.2", dir="/d", services="w1, w2")
    with pytest.raises(ConfigError, match=expected):
        load_deploy(_write(tmp_path, f"hosts:\n{hosts}cluster:\n  {cluster}\n"))


def test_the_systemd_unit_runs_the_supervisor_and_drains_on_stop() -> None:
    spec = Spec(name="w1", kind="worker", python="/h/venv/bin/python", args=[], url="x")
    unit = unit_text(Path("/h"), spec)
    assert "ExecStart=/h/venv/bin/python -m haif.deploy.supervise run w1 --dir /h" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit and "Restart=on-failure" in unit
    assert "KillMode=mixed" in unit and "TimeoutStopSec=55" in unit


# ------------------------------------------------------------------ real SSH hosts


def _yaml(lab: object, layout: list[list[str]], extra: str = "", name: str = "t") -> str:
    from harness.netns import Lab

    assert isinstance(lab, Lab)
    hosts = "".join(
        HOST.format(
            name=f"h{i}", address=lab.addresses[i], dir=lab.dir(i), services=", ".join(services)
        )
        + "    supervisor: detached\n"
        for i, services in enumerate(layout)
    )
    return f"name: {name}\nhosts:\n{hosts}{extra}"


def _haif(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "haif", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def one_host() -> Iterator[object]:
    from harness.netns import Lab

    lab = Lab(1)
    try:
        yield lab
    finally:
        lab.close()


def test_a_changed_or_unknown_host_key_stops_the_deploy(one_host: object) -> None:
    from harness.netns import Lab

    lab = one_host
    assert isinstance(lab, Lab)
    path = lab.root / "deploy.yaml"
    path.write_text(
        _yaml(lab, [["gateway", "orchestrator", "w1"]])
        + "cluster:\n  workers: [{id: w1, region: local}]\n"
    )
    good = lab.known_hosts.read_text()
    # Another key recorded for this address: the host's key "changed".
    other = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(lab.root / "other")],
        check=True,
    )
    assert other.returncode == 0
    kind, blob = (lab.root / "other.pub").read_text().split()[:2]
    lab.known_hosts.write_text(f"{lab.addresses[0]} {kind} {blob}\n")
    done = _haif("deploy", str(path))
    assert done.returncode == 2
    assert "HOST KEY CHANGED" in done.stderr and "Nothing was deployed" in done.stderr
    assert not lab.dir(0).exists()
    # No entry for the host at all.
    lab.known_hosts.write_text(good.replace(lab.addresses[0], "10.255.255.254"))
    done = _haif("deploy", "status", str(path))
    assert done.returncode == 2 and "no key for it in" in done.stderr
    # The private key is never printed, whatever happens.
    secret = (lab.client_key).read_text().splitlines()[1]
    assert secret not in done.stdout + done.stderr


async def _load(
    url: str, stop: asyncio.Event, counts: dict[str, int], errors: list[str], workers: int = 4
) -> None:
    """Stream chat completions through the gateway with the openai SDK until ``stop``."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)

    async def one() -> None:
        while not stop.is_set():
            try:
                stream = await client.chat.completions.create(
                    model="llama-3-8b",
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=12,
                    stream=True,
                )
                text = ""
                finish = None
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                if not text or finish is None:
                    raise RuntimeError(f"incomplete stream: {text!r}, finish {finish}")
                counts["ok"] += 1
            except Exception as exc:
                counts["failed"] += 1
                errors.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")

    try:
        await asyncio.gather(*(one() for _ in range(workers)))
    finally:
        await client.close()


async def _under_load(
    url: str, *command: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, int], list[str]]:
    """Run ``haif COMMAND`` while streaming through ``url``; its result and the load's."""
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(url, stop, counts, errors))
    await asyncio.sleep(2.0)  # steady load before the change
    done = await asyncio.to_thread(_haif, *command)
    await asyncio.sleep(2.0)
    stop.set()
    await load
    return done, counts, errors


@pytest.fixture
def three_hosts() -> Iterator[tuple[object, object]]:
    from harness.netns import Lab
    from harness.own_pg import OwnPostgres

    lab = Lab(3)
    pg = None
    try:
        pg = OwnPostgres(listen=f"{lab.subnet}.1", allow=f"{lab.subnet}.0/24")
        pg.start()
        yield lab, pg
    finally:
        if pg is not None:
            pg.close()
        lab.close()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_three_hosts_deploy_serve_recover_upgrade_and_stop(
    three_hosts: tuple[object, object],
) -> None:
    from harness.netns import Lab
    from harness.own_pg import OwnPostgres

    lab, pg = three_hosts
    assert isinstance(lab, Lab) and isinstance(pg, OwnPostgres)
    cluster = (
        "cluster:\n"
        f"  store: {pg.dsn}\n"
        "  orchestrators: 2\n"
        "  orchestrator:\n    leader_lease_s: 1.0\n"
        "  workers:\n"
        "    - {id: w1, region: local, mean_s: 0.3, heartbeat_s: 0.25}\n"
        "    - {id: w2, region: local, mean_s: 0.3, heartbeat_s: 0.25}\n"
    )
    layout = [["gateway", "orchestrator", "orchestrator2"], ["w1"], ["w2"]]
    path = lab.root / "deploy.yaml"
    path.write_text(_yaml(lab, layout, cluster, name=lab.tag))
    gateway = f"http://{lab.addresses[0]}:8080"

    # 1. Deploy: every service healthy, the endpoint printed, tight modes on the hosts.
    t0 = time.monotonic()
    done = _haif("deploy", str(path), timeout_s=400)
    assert done.returncode == 0, done.stdout + done.stderr
    deployed_s = time.monotonic() - t0
    assert f"{gateway}  (ready)" in done.stdout
    secret = lab.client_key.read_text().splitlines()[1]
    assert secret not in done.stdout + done.stderr
    for i in range(3):
        root = lab.dir(i)
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        for key in (root / "etc" / "tls").glob("*.key"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert not (root / "etc" / "tls" / "ca.key").exists()  # the CA's key stays here
    assert sorted(p.name for p in (lab.dir(1) / "etc" / "tls").glob("*.key")) == [
        "monitor.key",
        "w1.key",
    ]

    # 2. Completions stream through it (openai SDK), and status says all is well.
    done, counts, errors = await _under_load(gateway, "deploy", "status", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts["ok"] > 0 and counts["failed"] == 0, _with_logs(path, errors)
    logs = _haif("deploy", "logs", str(path), "h1:w1", "-n", "3")
    assert logs.returncode == 0 and "worker w1 (local, A100-80G) serves" in logs.stdout
    assert 1 <= len(logs.stdout.splitlines()) <= 3, logs.stdout

    # 3. A host's services all killed (supervisor too), under load: w2 carries it,
    # status shows w1 down, and deploying again brings it back.
    counts = {"ok": 0, "failed": 0}
    errors = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(gateway, stop, counts, errors))
    await asyncio.sleep(1.5)
    assert lab.kill_host(1)
    await asyncio.sleep(3.0)
    stop.set()
    await load
    assert counts["ok"] > 0 and counts["failed"] == 0, _with_logs(path, errors)
    down = _haif("deploy", "status", str(path))
    assert down.returncode == 1 and "down" in down.stdout, down.stdout
    again = _haif("deploy", str(path))
    assert again.returncode == 0, again.stdout + again.stderr
    status = _haif("deploy", "status", str(path))
    assert status.returncode == 0 and status.stdout.count("(leader)") == 1, status.stdout

    # 4. Rolling upgrade under steady load: zero failed requests.
    done, counts, errors = await _under_load(gateway, "deploy", "upgrade", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts["ok"] > 20 and counts["failed"] == 0, _with_logs(path, errors)
    replaced = [line for line in done.stdout.splitlines() if "replacing" in line]
    order = [line.split(":")[1] for line in replaced]
    assert order[:2] == ["w1", "w2"] and order[4:] == ["gateway"], replaced
    assert sorted(order[2:4]) == ["orchestrator", "orchestrator2"], replaced
    assert "(the standby)" in replaced[2] and "(the leader)" in replaced[3], replaced
    assert done.stdout.count("running (generation 1)") == 5, done.stdout
    assert _haif("deploy", "status", str(path)).returncode == 0

    # 5. Stop: nothing but sshd is left on the hosts.
    done = _haif("deploy", "stop", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    for i in range(3):
        assert all(_comm(pid) == "sshd" for pid in lab.pids(i)), [_comm(p) for p in lab.pids(i)]
    print(f"deployed in {deployed_s:.0f} s")


def _with_logs(path: Path, errors: list[str]) -> str:
    """The load's errors and the control plane's last log lines: what a failure needs."""
    parts = ["\n".join(errors)]
    for service in ("h0:gateway", "h0:orchestrator", "h0:orchestrator2"):
        logs = _haif("deploy", "logs", str(path), service, "-n", "40")
        parts.append(f"--- {service}\n{logs.stdout}{logs.stderr}")
    return "\n".join(parts)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"


def test_the_readme_shows_the_example() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying to your machines") :]
    shown = section[section.index("```yaml\n") + 8 : section.index("```\n", 8)]
    assert yaml.safe_load(shown) == yaml.safe_load(EXAMPLE.read_text())


# ------------------------------------------------------------------ the supervisor, locally


def _supervise(directory: Path, *args: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "haif.deploy.supervise", *args, "--dir", str(directory)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(answer, dict)
    return answer


@pytest.mark.cluster
def test_supervise_restarts_a_crash_replaces_on_reload_and_stops(tmp_path: Path) -> None:
    from haif.deploy.supervise import read_state
    from haif.runtime.cluster import free_port

    port = free_port()
    args = ["worker", "--port", str(port), "--id", "w1", "--region", "r"]
    args += ["--orchestrator", "http://127.0.0.1:9", "--heartbeat-s", "5"]
    spec = Spec(
        name="w1",
        kind="worker",
        python=sys.executable,
        args=args,
        url=f"http://127.0.0.1:{port}",
        drain_s=5,
    )
    (tmp_path / "run").mkdir()
    spec.write(tmp_path)
    started = _supervise(tmp_path, "start", "w1", "--via", "detached")
    assert started["state"] == "running" and started["how"] == "detached haif supervise"
    first = started["pid"]
    assert isinstance(first, int)
    os.kill(first, 9)  # a crash: started again, counted
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = read_state(tmp_path, "w1")
        if state.get("state") == "running" and state.get("pid") != first:
            break
        time.sleep(0.1)
    assert state["restarts"] == 1 and state["generation"] == 0, state
    reloaded = _supervise(tmp_path, "reload", "w1")
    assert reloaded["state"] == "running" and reloaded["generation"] == 1
    rows = _supervise_status(tmp_path)
    assert [(r["name"], r["state"], r["healthy"], r["in_flight"]) for r in rows] == [
        ("w1", "running", True, 0)
    ]
    assert _supervise(tmp_path, "stop", "w1")["stopped"] is True
    assert read_state(tmp_path, "w1")["state"] == "stopped"
    assert stat.S_IMODE((tmp_path / "logs" / "w1.log").stat().st_mode) == 0o600


def _supervise_status(directory: Path) -> list[dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "haif.deploy.supervise", "status", "--dir", str(directory)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    rows = json.loads(done.stdout)
    assert isinstance(rows, list)
    return rows


async def test_a_draining_worker_leaves_placement_and_reports_in_flight() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from haif.runtime.worker import Worker, WorkerSpec, build_app

    spec = WorkerSpec(
        worker_id="w1", region="r", url="http://127.0.0.1:1", orchestrator_url="http://127.0.0.1:9"
    )
    worker = Worker(spec)
    async with TestClient(TestServer(build_app(worker))) as client:
        assert (await client.get("/readyz")).status == 200
        assert worker.snapshot().healthy
        worker.drain()
        assert not worker.snapshot().healthy
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["reason"] == "draining"
        health = await (await client.get("/healthz")).json()
        assert health["draining"] is True and health["in_flight"] == 0


def test_the_plain_http_opt_out_is_explicit_and_loud(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from haif.cli import main
    from haif.deploy.config import PLAIN_HTTP_WARNING

    hosts = HOST.format(name="a", address="10.1.0.1", dir="/d", services="gateway, orchestrator")
    hosts += HOST.format(name="b", address="10.1.0.2", dir="/d", services="w1, w2")
    path = _write(tmp_path, f"insecure_plain_internal_http: true\nhosts:\n{hosts}")
    plan = load_deploy(path)
    assert not plan.tls and plan.orchestrator_url == "http://10.1.0.1:7070"
    # The warning comes first; the missing key file is then named (no traceback).
    assert main(["deploy", "status", str(path)]) == 2
    err = capsys.readouterr().err
    assert PLAIN_HTTP_WARNING in err
    assert "key_file" in err and "no such file" in err and "Traceback" not in err


class _LocalHost:
    """What :mod:`haif.deploy.remote` uses of an SSH host, on this machine's files."""

    def __init__(self, root: Path, name: str = "gpu1") -> None:
        from haif.deploy.config import HostConfig

        self.config = HostConfig(
            name=name, address="10.1.0.2", key_file="k", known_hosts="kh", services=("w1",)
        )
        self.dir = str(root)

    def path(self, *parts: str) -> str:
        return str(Path(self.dir, *parts))

    async def run_args(self, args: list[str], *, what: str | None = None) -> str:
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout

    async def write(self, remote: str, data: bytes, mode: int) -> None:
        fd = os.open(remote, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    async def put(self, local: Path, remote: str, mode: int = 0o644) -> None:
        await self.write(remote, local.read_bytes(), mode)

    async def listdir(self, remote: str) -> dict[str, int]:
        folder = Path(remote)
        return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}


async def test_a_workers_signed_model_is_verified_copied_and_named_by_its_flags(
    tmp_path: Path,
) -> None:
    from haif.deploy import remote
    from haif.runtime.artifacts import publish, verify
    from haif.runtime.security import Keyring, Signer, generate_keypair

    private, public = generate_keypair()
    (tmp_path / "keyring").mkdir()
    (tmp_path / "keyring" / "release.pub").write_bytes(public)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00" * 1000)
    publish(tmp_path / "store", "tiny", "1", {"model.bin": weights}, Signer(private))
    hosts = HOST.format(name="edge", address="10.1.0.1", dir="/d", services="gateway, orchestrator")
    hosts += HOST.format(name="gpu1", address="10.1.0.2", dir="/d", services="w1")
    worker = (
        "    - {id: w1, region: r, engine: transformers, artifact_store: store, "
        "keyring: keyring, model_ref: 'tiny:1'}\n"
    )
    plan = load_deploy(_write(tmp_path, f"hosts:\n{hosts}cluster:\n  workers:\n{worker}"))
    host_root = tmp_path / "host"
    host_root.mkdir()
    host = _LocalHost(host_root)
    w = await remote.worker_files(host, plan, plan.config.cluster.workers[0])  # type: ignore[arg-type]
    assert w.artifact_store == str(host_root / "artifacts" / "w1" / "store")
    assert w.keyring is not None and w.artifact_store is not None
    files = verify(w.artifact_store, "tiny", "1", Keyring.from_dir(w.keyring))
    assert files["model.bin"].read_bytes() == weights.read_bytes()
    # The cluster YAML the host's services read: no local paths left in it.
    (host_root / "etc").mkdir()
    config = await remote.push_config(host, plan)  # type: ignore[arg-type]
    shipped = yaml.safe_load(Path(config).read_text())
    assert shipped["internal_tls"] is True and "artifact_store" not in shipped["workers"][0]
    assert stat.S_IMODE(Path(config).stat().st_mode) == 0o600
    # A tampered blob is refused here, before anything is sent.
    blob = next((tmp_path / "store" / "blobs" / "sha256").iterdir())
    blob.write_bytes(b"\x01" * 1000)
    with pytest.raises(ConfigError, match="worker w1: model tiny:1"):
        await remote.worker_files(host, plan, plan.config.cluster.workers[0])  # type: ignore[arg-type]


@pytest.mark.cluster
def test_a_gateway_reload_hands_its_socket_over_without_a_refused_request(
    tmp_path: Path,
) -> None:
    """The supervisor holds the gateway's socket: a new gateway takes over beside the old
    one, and a client polling all along (kept-alive and new connections) sees no error."""
    import http.client
    import threading

    from haif.runtime.cluster import free_port

    port = free_port()
    args = ["gateway", "--port", str(port), "--orchestrator", "http://127.0.0.1:9"]
    spec = Spec(
        name="gateway",
        kind="gateway",
        python=sys.executable,
        args=args,
        url=f"http://127.0.0.1:{port}",
        bind_host="127.0.0.1",
        bind_port=port,
        drain_s=5,
    )
    (tmp_path / "run").mkdir()
    spec.write(tmp_path)
    first = _supervise(tmp_path, "start", "gateway", "--via", "detached")["pid"]
    seen: dict[object, int] = {}
    errors: list[str] = []
    stop = threading.Event()

    def poll(keep_alive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                body = json.loads(resp.read())
                seen[body["pid"]] = seen.get(body["pid"], 0) + 1
                if not keep_alive or resp.getheader("Connection") == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.close()

    threads = [threading.Thread(target=poll, args=(k,)) for k in (True, True, False)]
    for t in threads:
        t.start()
    try:
        reloaded = _supervise(tmp_path, "reload", "gateway")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        _supervise(tmp_path, "stop", "gateway")
    assert reloaded["generation"] == 1 and reloaded["pid"] != first
    assert not errors, errors[:5]
    assert seen.get(first, 0) > 0 and seen.get(reloaded["pid"], 0) > 0, seen
