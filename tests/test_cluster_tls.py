"""Mutual TLS between services: certificates, every hop encrypted, every refusal.

Real services on loopback, each served with its own certificate from a
cluster CA laid out as ``haif up`` lays it out (:func:`ensure_cluster_certs`):
an in-process orchestrator and gateway, worker ``w1`` as a ``python -m haif
worker`` process given ``--cluster-tls-*`` flags, and an in-process worker
``w2``. No seals anywhere: the certificate is the caller's identity.

Each refusal has its own test, against the real orchestrator's port, with a
positive control (the same call with a good certificate goes through), and
the reason the server's own TLS context gives (a handshake of that very
context in a thread, so "refused" cannot mean "refused for another reason").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness.api import MODEL, expected_text
from harness.cluster import running, serve, shut_down, wait_fresh

from haif.configfile import ConfigError
from haif.contracts import Request
from haif.control.config import CoreConfig
from haif.runtime import gateway as gateway_mod
from haif.runtime import orchestrator as orchestrator_mod
from haif.runtime import worker as worker_mod
from haif.runtime.cluster_tls import (
    CertAuthority,
    Identity,
    ServiceFiles,
    ServiceTls,
    cluster_tls_args,
    ensure_cluster_certs,
    identity_of,
    issue_cert,
    load_ca,
    new_ca,
    rotate_certs,
    tls_hostname,
)
from haif.runtime.gateway import Gateway
from haif.runtime.messages import Announce, InferCall
from haif.runtime.orchestrator import Orchestrator
from haif.runtime.roles import Role
from haif.runtime.rpc import ORCHESTRATOR_AUDIENCE, RpcClient, RpcError, RpcUnavailable
from haif.runtime.store import DuckDBStore
from haif.runtime.worker import Worker, WorkerSpec

on_module_loop = pytest.mark.asyncio(loop_scope="module")

SERVICES = ("gateway", "orchestrator", "admin", "monitor", "w1", "w2", "us-east/H100-80G/0.0")


# ------------------------------------------------------------------ certificates


def test_a_certificate_names_its_role_and_id(tmp_path: Path) -> None:
    files = ensure_cluster_certs(tmp_path / "tls", SERVICES)
    for name in SERVICES:
        cert = x509.load_pem_x509_certificate(files[name].cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        tls = ServiceTls(files[name].cert, files[name].key, files[name].ca)
        assert uris == [tls.identity.uri]
        assert sans.get_values_for_type(x509.DNSName) == [tls_hostname(name)]
        assert tls.identity.name == name
    worker = ServiceTls(*_triple(files["us-east/H100-80G/0.0"]))
    assert worker.identity == Identity(Role.WORKER, "us-east/H100-80G/0.0")
    assert worker.identity.uri == "spiffe://haif/worker/us-east%2FH100-80G%2F0.0"
    assert tls_hostname("orchestrator") == "orchestrator.haif"
    assert tls_hostname("w1") == "w1.worker.haif"
    assert tls_hostname("us-east/H100-80G/0.0").endswith(".worker.haif")
    # Reissued only when needed: a second call keeps every file.
    before = {n: f.cert.read_bytes() for n, f in files.items()}
    again = ensure_cluster_certs(tmp_path / "tls", SERVICES)
    assert {n: f.cert.read_bytes() for n, f in again.items()} == before


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://haif/gateway/gateway", Identity(Role.GATEWAY, "gateway")),
        ("spiffe://haif/worker/w1", Identity(Role.WORKER, "w1")),
        ("spiffe://haif/worker/gateway", None),  # the name says gateway: the role must too
        ("spiffe://haif/gateway/w1", None),
        ("spiffe://haif/root/w1", None),
        ("spiffe://other/gateway/gateway", None),
        ("spiffe://haif/gateway", None),
    ],
)
def test_an_identity_is_read_only_when_role_and_name_agree(
    uri: str, expected: Identity | None
) -> None:
    assert identity_of({"subjectAltName": (("URI", uri),)}) == expected


def test_an_operator_ca_signs_and_a_bad_one_is_named(tmp_path: Path) -> None:
    ca = new_ca("operator CA")
    ca_cert, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    ca_cert.write_bytes(ca.cert_pem)
    ca_key.write_bytes(_pem(ca))
    files = ensure_cluster_certs(tmp_path / "tls", ["gateway"], (ca_cert, ca_key))
    cert = x509.load_pem_x509_certificate(files["gateway"].cert.read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    assert files["gateway"].ca.read_bytes() == ca.cert_pem
    other_key = tmp_path / "other.key"
    other_key.write_bytes(_pem(new_ca()))
    with pytest.raises(ConfigError, match=r"cluster_ca: .*other.key is not the key of"):
        load_ca(ca_cert, other_key)
    leaf_cert, leaf_key = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    leaf_cert.write_bytes(files["gateway"].cert.read_bytes())
    leaf_key.write_bytes(files["gateway"].key.read_bytes())
    with pytest.raises(ConfigError, match="not a CA certificate"):
        load_ca(leaf_cert, leaf_key)
    with pytest.raises(ConfigError, match=r"cluster_ca.cert .*missing.pem: cannot read it"):
        load_ca(tmp_path / "missing.pem", ca_key)


def _pem(ca: CertAuthority) -> bytes:
    return ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _triple(files: ServiceFiles) -> tuple[Path, Path, Path]:
    return files.cert, files.key, files.ca


# ------------------------------------------------------------------ a cluster


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class TlsCluster:
    """Orchestrator + gateway in process, a worker process and an in-process worker,
    every hop on mutual TLS."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dir = tmp / "tls"
        self.files = ensure_cluster_certs(self.dir, SERVICES)
        self.runners: list[web.AppRunner] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.orch: Orchestrator | None = None
        self.orch_url = ""
        self.url = ""
        self.w2: Worker | None = None
        self.w2_url = ""
        self.http: aiohttp.ClientSession | None = None

    def tls(self, name: str) -> ServiceTls:
        return ServiceTls(*_triple(self.files[name]))

    async def _serve(
        self, app: web.Application, context: ssl.SSLContext, sock: socket.socket | None = None
    ) -> str:
        runner, url = await serve(
            app, sock=sock or bound_socket(), shutdown_timeout=1.0, ssl_context=context
        )
        self.runners.append(runner)
        return url

    async def start(self) -> TlsCluster:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        orch_tls = self.tls("orchestrator")
        self.orch = Orchestrator(
            CoreConfig(),
            DuckDBStore(self.tmp / "store.duckdb"),
            idle_timeout_s=3.0,
            service_tls=orch_tls,
        )
        self.orch_url = await self._serve(orchestrator_mod.build_app(self.orch), orch_tls.server)
        assert self.orch_url.startswith("https://")
        self.spawn_worker("w1")
        sock = bound_socket()
        host, port = sock.getsockname()[:2]
        self.w2_url = f"https://{host}:{port}"
        w2_tls = self.tls("w2")
        spec = WorkerSpec("w2", "local", self.w2_url, self.orch_url, mean_s=0.2, heartbeat_s=0.1)
        self.w2 = Worker(spec, service_tls=w2_tls)
        await self._serve(worker_mod.build_app(self.w2), w2_tls.server, sock)
        gw = Gateway(self.orch_url, "local", idle_timeout_s=5.0, tls=self.tls("gateway"))
        self.url = (await serve(gateway_mod.build_app(gw), shutdown_timeout=1.0))[1]
        assert self.url.startswith("http://")  # the client API: plain here, not an internal hop
        await wait_fresh(self.orch, {"w1", "w2"}, self.procs, self.tmp, 30.0)
        return self

    def spawn_worker(self, wid: str) -> None:
        """A real ``haif worker`` process holding its certificate through the CLI flags."""
        with bound_socket() as sock:
            port = sock.getsockname()[1]
        log = (self.tmp / f"worker-{wid}.log").open("wb")
        args = ["--port", str(port), "--id", wid, "--region", "local"]
        args += ["--orchestrator", self.orch_url, "--mean-s", "0.2", "--heartbeat-s", "0.2"]
        args += cluster_tls_args(self.files[wid])
        self.procs[wid] = subprocess.Popen(
            [sys.executable, "-m", "haif", "worker", *args], stdout=log, stderr=subprocess.STDOUT
        )

    def client(self, name: str, url: str = "", audience: str = ORCHESTRATOR_AUDIENCE) -> RpcClient:
        assert self.http is not None
        return RpcClient(
            self.http, url or self.orch_url, 5.0, audience=audience, tls=self.tls(name)
        )

    async def stop(self) -> None:
        await shut_down(self.procs.values(), self.runners)
        if self.http is not None:
            await self.http.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsCluster]:
    async with running(TlsCluster(tmp_path_factory.mktemp("mtls"))) as c:
        yield c


def _request(rid: str = "r-tls") -> Request:
    return Request(rid, "acme", MODEL, 10, 3, 0.0)


@pytest.mark.cluster
@on_module_loop
async def test_every_hop_runs_on_mutual_tls(cluster: TlsCluster) -> None:
    """Both workers announced themselves over mTLS (w1 a separate process), and requests go
    gateway -> orchestrator -> worker, streaming and not."""
    assert cluster.http is not None
    for i in range(4):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 5, "stream": i % 2 == 1}
        async with cluster.http.post(
            f"{cluster.url}/v1/completions", json=body, headers={"x-request-id": f"tls-{i}"}
        ) as resp:
            text = await resp.text()
            assert resp.status == 200, text
        if i % 2 == 0:
            assert resp.headers["content-type"].startswith("application/json")
    answer = await cluster.client("gateway").call("submit", _request("tls-direct"))
    assert answer.text == expected_text("tls-direct", 3)


@pytest.mark.cluster
@on_module_loop
async def test_connections_are_reused_not_handshaken_per_call(cluster: TlsCluster) -> None:
    """Twenty calls from one client open one connection to the orchestrator."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = RpcClient(
            session,
            cluster.orch_url,
            5.0,
            audience=ORCHESTRATOR_AUDIENCE,
            tls=cluster.tls("gateway"),
        )
        handshakes = 0
        original = connector._create_connection

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal handshakes
            handshakes += 1
            return await original(*args, **kwargs)

        connector._create_connection = counted  # type: ignore[method-assign]
        for _ in range(20):
            await client.call("status", None)
    assert handshakes == 1


# ------------------------------------------------------------------ refusals


def _client_context(
    cert: tuple[Path, Path] | None, ca: Path, *, tls12: bool = False
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


async def _status_with(cluster: TlsCluster, context: ssl.SSLContext) -> int:
    """The HTTP status of a ``status`` call presenting ``context``'s certificate."""
    from haif.runtime.rpc import _pack

    assert cluster.http is not None
    envelope = _pack({"v": 1, "type": "status", "id": "x", "trace": None, "body": None})
    async with cluster.http.post(
        f"{cluster.orch_url}/rpc/status",
        data=envelope,
        ssl=context,
        server_hostname=tls_hostname("orchestrator"),
    ) as resp:
        await resp.read()
        return resp.status


def _server_says(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """Why ``server`` (a service's own context) refuses ``client``: one handshake over a
    socket pair, the server's error message ('' when it accepts)."""
    a, b = socket.socketpair()
    error: list[str] = [""]

    def serve_side() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            error[0] = str(exc)

    thread = threading.Thread(target=serve_side)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=tls_hostname("orchestrator")) as tls:
            tls.sendall(b"x")
            tls.recv(1)
    except (ssl.SSLError, OSError):
        pass
    thread.join(10)
    a.close()
    b.close()
    return error[0]


async def _refused_at_handshake(cluster: TlsCluster, context: ssl.SSLContext) -> None:
    """The orchestrator's port closes the connection: no HTTP status at all comes back."""
    with pytest.raises(aiohttp.ClientError):
        await _status_with(cluster, context)


@pytest.mark.cluster
@on_module_loop
async def test_a_peer_without_a_certificate_is_refused(cluster: TlsCluster) -> None:
    ca = cluster.files["gateway"].ca
    good = _client_context((cluster.files["gateway"].cert, cluster.files["gateway"].key), ca)
    assert await _status_with(cluster, good) == 200  # the control: the same call, certified
    none = _client_context(None, ca)
    await _refused_at_handshake(cluster, none)
    reason = _server_says(cluster.tls("orchestrator").server, none)
    assert "peer did not return a certificate" in reason, reason


@pytest.mark.cluster
@on_module_loop
async def test_an_expired_certificate_is_refused(cluster: TlsCluster) -> None:
    ca = load_ca(cluster.dir / "ca.pem", cluster.dir / "ca.key")
    three_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    cert, key = issue_cert(ca, "gateway", days=1, not_before=three_days_ago)
    paths = (cluster.tmp / "expired.pem", cluster.tmp / "expired.key")
    paths[0].write_bytes(cert)
    paths[1].write_bytes(key)
    fresh_cert, fresh_key = issue_cert(ca, "gateway", days=1)
    fresh = (cluster.tmp / "fresh.pem", cluster.tmp / "fresh.key")
    fresh[0].write_bytes(fresh_cert)
    fresh[1].write_bytes(fresh_key)
    ca_pem = cluster.dir / "ca.pem"
    assert await _status_with(cluster, _client_context(fresh, ca_pem)) == 200
    expired = _client_context(paths, ca_pem)
    await _refused_at_handshake(cluster, expired)
    reason = _server_says(cluster.tls("orchestrator").server, expired)
    assert "certificate has expired" in reason, reason


@pytest.mark.cluster
@on_module_loop
async def test_a_certificate_from_another_ca_is_refused(cluster: TlsCluster) -> None:
    other = new_ca("someone else's CA")
    cert, key = issue_cert(other, "gateway")  # the right name, the wrong issuer
    paths = (cluster.tmp / "other.pem", cluster.tmp / "other.key")
    paths[0].write_bytes(cert)
    paths[1].write_bytes(key)
    ca_pem = cluster.dir / "ca.pem"
    foreign = _client_context(paths, ca_pem)
    await _refused_at_handshake(cluster, foreign)
    reason = _server_says(cluster.tls("orchestrator").server, foreign)
    assert "unable to get local issuer certificate" in reason, reason


@pytest.mark.cluster
@on_module_loop
async def test_tls_below_1_3_is_refused(cluster: TlsCluster) -> None:
    files = cluster.files["gateway"]
    old = _client_context((files.cert, files.key), files.ca, tls12=True)
    await _refused_at_handshake(cluster, old)
    reason = _server_says(cluster.tls("orchestrator").server, old)
    assert "unsupported protocol" in reason, reason


@pytest.mark.cluster
@on_module_loop
async def test_plain_http_to_an_internal_port_is_refused(cluster: TlsCluster) -> None:
    """Not a single HTTP answer comes back over plain HTTP, on the orchestrator's port or a
    worker's; with TLS the same request is answered."""
    assert cluster.http is not None
    for url in (cluster.orch_url, cluster.w2_url):
        plain = url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            async with cluster.http.get(f"{plain}/healthz") as resp:
                await resp.read()
    monitor = cluster.tls("monitor")
    async with cluster.http.get(
        f"{cluster.orch_url}/healthz", **monitor.client_kwargs("orchestrator")
    ) as resp:
        assert resp.status == 200


@pytest.mark.cluster
@on_module_loop
async def test_a_role_that_may_not_call_a_method_gets_403(cluster: TlsCluster) -> None:
    """Valid certificates, wrong roles: a worker cannot submit (billed to any tenant) or list
    dead letters, the gateway cannot call a worker or list dead letters, the monitor can call
    nothing; the roles that may, can."""
    refusals = [
        ("w1", "", ORCHESTRATOR_AUDIENCE, "submit", _request("r-w1")),
        ("w1", "", ORCHESTRATOR_AUDIENCE, "dlq_list", None),
        ("gateway", "", ORCHESTRATOR_AUDIENCE, "dlq_list", None),
        ("monitor", "", ORCHESTRATOR_AUDIENCE, "status", None),
        ("admin", "", ORCHESTRATOR_AUDIENCE, "auth_key", "0" * 64),
        ("gateway", "w2", "w2", "infer", InferCall(_request("r-gw"), 0, 1)),
        ("w1", "w2", "w2", "infer", InferCall(_request("r-w1w"), 0, 1)),
    ]
    for name, target, audience, method, body in refusals:
        url = cluster.w2_url if target == "w2" else ""
        with pytest.raises(RpcError) as refused:
            await cluster.client(name, url, audience).call(method, body)
        assert (refused.value.status, refused.value.code) == (403, "forbidden"), (name, method)
        assert name in refused.value.message
    assert await cluster.client("admin").call("dlq_list", None) == []
    reply = await cluster.client("orchestrator", cluster.w2_url, "w2").call(
        "infer", InferCall(_request("r-orch"), 0, 1)
    )
    assert reply.output_tokens == 3


@pytest.mark.cluster
@on_module_loop
async def test_a_worker_announces_only_itself(cluster: TlsCluster) -> None:
    """w1's certificate cannot announce w2 (and draw w2's traffic to its own URL)."""
    assert cluster.w2 is not None
    impostor = Announce(cluster.w2.snapshot(), "https://127.0.0.1:9")
    with pytest.raises(RpcError) as refused:
        await cluster.client("w1").call("heartbeat", impostor)
    assert (refused.value.status, refused.value.code) == (403, "wrong_worker")
    assert cluster.orch is not None
    assert cluster.orch._workers["w2"] == cluster.w2_url


@pytest.mark.cluster
@on_module_loop
async def test_a_client_reaches_only_the_service_it_means(cluster: TlsCluster) -> None:
    """The gateway, handed a worker's address as the orchestrator's, refuses to send it
    anything: the worker's certificate does not name the orchestrator."""
    with pytest.raises(RpcUnavailable, match=r"Hostname mismatch|not valid for"):
        await cluster.client("gateway", cluster.w2_url).call("submit", _request("r-lost"))
    with pytest.raises(ValueError, match="https://"):
        cluster.client("gateway", cluster.orch_url.replace("https://", "http://"))


# ------------------------------------------------------------------ rotation


@pytest.mark.cluster
@on_module_loop
async def test_rotation_keeps_streams_and_new_connections_get_new_certificates(
    cluster: TlsCluster,
) -> None:
    """Streams opened before ``rotate_certs`` finish; every request during and after it
    succeeds; the services present the new certificates on new connections."""
    assert cluster.http is not None and cluster.orch is not None
    orch_tls = cluster.orch.service_tls
    assert orch_tls is not None
    serial_before = await asyncio.to_thread(_peer_serial, cluster.orch_url, cluster.tls("monitor"))

    async def stream(i: int) -> str:
        body = {"model": MODEL, "prompt": "p", "max_tokens": 12, "stream": True}
        assert cluster.http is not None
        async with cluster.http.post(
            f"{cluster.url}/v1/completions", json=body, headers={"x-request-id": f"rot-{i}"}
        ) as resp:
            text = await resp.text()
            assert resp.status == 200, text
            return text

    streams = [asyncio.create_task(stream(i)) for i in range(6)]
    await asyncio.sleep(0.1)
    rotated = rotate_certs(cluster.dir)
    assert set(rotated) == set(SERVICES)
    assert orch_tls.reload()  # what its watch does within 5 s, done now
    for task in streams:
        assert (await task).rstrip().endswith("data: [DONE]")
    after = [asyncio.create_task(stream(100 + i)) for i in range(4)]
    for task in after:
        assert (await task).rstrip().endswith("data: [DONE]")
    serial_after = await asyncio.to_thread(_peer_serial, cluster.orch_url, cluster.tls("monitor"))
    assert serial_after != serial_before
    new = x509.load_pem_x509_certificate(cluster.files["orchestrator"].cert.read_bytes())
    assert serial_after == new.serial_number


def _peer_serial(url: str, tls: ServiceTls) -> int:
    """The serial number of the certificate the server at ``url`` presents now."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    name = tls_hostname("orchestrator")
    with (
        socket.create_connection((host, int(port))) as sock,
        tls.client.wrap_socket(sock, server_hostname=name) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# ------------------------------------------------------------------ configuration


def test_bad_flags_and_files_are_named(tmp_path: Path) -> None:
    import argparse

    from haif.runtime.cluster_tls import service_tls_from_args

    files = ensure_cluster_certs(tmp_path / "tls", ["gateway", "w1"])
    partial = argparse.Namespace(
        cluster_tls_cert=str(files["gateway"].cert), cluster_tls_key=None, cluster_ca=None
    )
    with pytest.raises(ConfigError, match="missing --cluster-tls-key, --cluster-ca"):
        service_tls_from_args(partial)
    with pytest.raises(ConfigError, match=r"--cluster-ca .*nope.pem: no such file"):
        ServiceTls(files["gateway"].cert, files["gateway"].key, tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="not a PEM certificate and its key"):
        ServiceTls(files["gateway"].cert, files["w1"].key, files["gateway"].ca)
    # A worker given a certificate: its orchestrator is https, and the certificate is its own.
    parser = argparse.ArgumentParser()
    worker_mod.add_worker_args(parser)
    base = ["--port", "1", "--region", "local", *cluster_tls_args(files["w1"])]
    plain = parser.parse_args([*base, "--id", "w1", "--orchestrator", "http://127.0.0.1:2"])
    with pytest.raises(ConfigError, match=r"--orchestrator http://127.0.0.1:2: with --cluster"):
        worker_mod.worker_from_args(plain)
    other = parser.parse_args([*base, "--id", "w9", "--orchestrator", "https://127.0.0.1:2"])
    with pytest.raises(ConfigError, match=r"names 'w1', not this worker \('w9'\)"):
        worker_mod.worker_from_args(other)


# ------------------------------------------------------------------ haif up


@pytest.mark.cluster
def test_haif_up_opt_out_is_plain_sealed_and_loud(tmp_path: Path) -> None:
    """``internal_tls: false``: a warning at start, internal URLs over plain HTTP, every
    call sealed with the cluster keys (an unsealed one is refused), no certificates made."""
    import urllib.request

    from harness.up_cli import UpCli

    config = tmp_path / "cluster.yaml"
    config.write_text("internal_tls: false\n")
    up = UpCli(tmp_path / "d", config)
    try:
        assert up.proc.stdout is not None
        warning = up.proc.stdout.readline()  # the line after "haif cluster up ..."
        assert "WARNING: internal_tls: false: every hop between the services is plain" in warning
        assert up.state["orchestrator_url"].startswith("http://")
        assert "internal hops: PLAIN HTTP" in up.output
        assert not (tmp_path / "d" / "tls").exists()
        answer = up.complete(headers={"x-request-id": "plain-1"})
        assert answer["usage"]["completion_tokens"] == 4
        with urllib.request.urlopen(f"{up.state['orchestrator_url']}/healthz", timeout=10) as r:
            assert r.status == 200  # plain HTTP answers here, and only here
    finally:
        up.stop()
    gateway_log = (tmp_path / "d" / "logs" / "gateway.log").read_text()
    assert "plain-1" in gateway_log


def test_opt_out_and_operator_ca_are_validated(tmp_path: Path) -> None:
    from haif.runtime.cluster import load_cluster

    config = tmp_path / "cluster.yaml"
    config.write_text("internal_tls: false\ncluster_ca: {cert: ca.pem, key: ca.key}\n")
    with pytest.raises(ConfigError, match="cluster_ca: only used with internal_tls: true"):
        load_cluster(config)
    config.write_text("internal_tls: nope\n")
    with pytest.raises(ConfigError, match="internal_tls"):
        load_cluster(config)


def test_certs_cli_lists_rotates_and_issues_a_server_certificate(tmp_path: Path) -> None:
    """``haif certs list``, ``rotate`` (every service certificate reissued, its addresses
    kept; a server certificate in the folder left alone) and ``server``."""
    from harness.cluster import run_haif

    data = tmp_path / "d"
    files = ensure_cluster_certs(data / "tls", ["gateway", "w1"], hosts=["127.0.0.1", "h.example"])
    listed = run_haif("certs", "list", "--data-dir", str(data))
    assert listed.returncode == 0, listed.stderr
    assert "gateway gateway" in listed.stdout and "worker w1" in listed.stdout
    served = run_haif(
        "certs",
        "server",
        "--data-dir",
        str(data),
        "--host",
        "db.example",
        "--out",
        str(data / "tls" / "pg"),
    )
    assert served.returncode == 0, served.stderr
    pg = x509.load_pem_x509_certificate((data / "tls" / "pg.pem").read_bytes())
    pg_sans = pg.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert pg_sans.get_values_for_type(x509.DNSName) == ["db.example"]
    assert not pg_sans.get_values_for_type(x509.UniformResourceIdentifier)  # no identity
    assert oct((data / "tls" / "pg.key").stat().st_mode & 0o777) == "0o600"
    before = {name: f.cert.read_bytes() for name, f in files.items()}
    rotated = run_haif("certs", "rotate", "--data-dir", str(data))
    assert rotated.returncode == 0, rotated.stderr
    assert "reissued 2 certificates" in rotated.stdout
    for name, f in files.items():
        assert f.cert.read_bytes() != before[name]
        new = x509.load_pem_x509_certificate(f.cert.read_bytes())
        sans = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "h.example" in sans.get_values_for_type(x509.DNSName)
        assert ServiceTls(*_triple(f)).identity.name == name
    assert x509.load_pem_x509_certificate((data / "tls" / "pg.pem").read_bytes()) == pg
    missing = run_haif("certs", "rotate", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 2
    assert "no cluster CA here" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.cluster
def test_haif_up_encrypts_every_hop_by_default(tmp_path: Path) -> None:
    """``internal_tls`` unset (true by default): internal URLs are https, requests go
    through, the admin tools reach the orchestrator with the admin certificate from
    cluster.json, and neither plain HTTP nor a caller without a certificate gets an
    answer from an internal port."""
    import urllib.error
    import urllib.request

    from harness.cluster import monitor_tls, run_haif
    from harness.up_cli import UpCli

    data = tmp_path / "d"
    up = UpCli(data)
    try:
        orch = up.state["orchestrator_url"]
        assert orch.startswith("https://") and "internal hops: mutual TLS 1.3" in up.output
        workers = [s["url"] for s in up.state["services"] if s["kind"] == "worker"]
        assert workers and all(url.startswith("https://") for url in workers)
        answer = up.complete(headers={"x-request-id": "tls-up-1"})
        assert answer["usage"]["completion_tokens"] == 4
        listed = run_haif("dlq", "list", "--json", "--data-dir", str(data))
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        bare = run_haif("dlq", "list", "--orchestrator", orch, "--data-dir", str(tmp_path / "x"))
        assert bare.returncode == 2 and "certificate" in bare.stderr, bare.stderr
        assert "Traceback" not in bare.stderr
        for url in (orch, *workers):
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                urllib.request.urlopen(url.replace("https://", "http://") + "/healthz", timeout=10)
        context = monitor_tls(data)
        assert context is not None
        with urllib.request.urlopen(f"{orch}/metrics", timeout=10, context=context) as resp:
            assert "haif_tls_certificate_expiry_timestamp_seconds" in resp.read().decode()
    finally:
        output = up.stop()
    assert up.proc.returncode == 0, output
    assert "WARNING" not in output
