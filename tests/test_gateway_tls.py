"""The gateway serves HTTPS with ``--tls-cert`` / ``--tls-key`` (a real TLS server on loopback)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness.cluster import Up

from haif.configfile import ConfigError
from haif.runtime.cluster import free_port
from haif.runtime.services import server_tls


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haif test gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _gateway(port: int, *tls: str) -> subprocess.Popen[str]:
    orchestrator = f"http://127.0.0.1:{free_port()}"  # nothing there
    cmd = [sys.executable, "-m", "haif", "gateway", "--port", str(port)]
    return subprocess.Popen(
        [*cmd, "--orchestrator", orchestrator, *tls],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def https_gateway(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext]]:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    proc = _gateway(port, "--tls-cert", str(cert), "--tls-key", str(key))
    trusting = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1, context=trusting):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "the HTTPS gateway did not come up"
                time.sleep(0.1)
        yield url, trusting
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.cluster
def test_the_gateway_serves_https(https_gateway: tuple[str, ssl.SSLContext]) -> None:
    url, trusting = https_gateway
    # The whole API over TLS: no orchestrator behind this gateway, so an
    # OpenAI-shaped 503 comes back through the encrypted connection.
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=b'{"model": "m", "prompt": "hi", "max_tokens": 1}',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10, context=trusting)
    assert refused.value.code == 503
    assert b"service_unavailable" in refused.value.read()
    # A client that does not trust the certificate is stopped by verification...
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"{url}/healthz", timeout=5, context=ssl.create_default_context())
    # ...and plain HTTP gets no answer from the TLS port.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(url.replace("https", "http") + "/healthz", timeout=5)


def test_tls_flags_are_checked(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    assert server_tls(None, None) is None
    assert isinstance(server_tls(str(cert), str(key)), ssl.SSLContext)
    with pytest.raises(ConfigError, match="give both or neither"):
        server_tls(str(cert), None)
    with pytest.raises(ConfigError, match=r"--tls-key .*missing\.pem: no such file"):
        server_tls(str(cert), str(tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a PEM certificate chain"):
        server_tls(str(garbage), str(key))
    with pytest.raises(ConfigError, match="not a PEM certificate chain"):
        server_tls(str(cert), str(cert))  # a certificate is not its key


@pytest.mark.cluster
def test_a_bad_tls_flag_stops_the_gateway_with_a_message(tmp_path: Path) -> None:
    _, key = _self_signed(tmp_path)
    proc = _gateway(free_port(), "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "--tls-cert" in out and "nope.pem: no such file" in out
    assert "Traceback" not in out


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.parametrize("colocate", [False, True], ids=["separate", "colocated"])
def test_haif_up_serves_its_gateway_over_https_to_the_openai_sdk(
    tmp_path: Path, colocate: bool
) -> None:
    """`gateway_tls` in the cluster YAML: the SDK streams a completion over TLS (from a
    gateway of its own, or one in the orchestrator's process)."""
    import openai

    cert, _ = _self_signed(tmp_path)
    config = tmp_path / "cluster.yaml"
    config.write_text(  # paths relative to the YAML
        "gateway_tls: {cert: cert.pem, key: key.pem}\n"
        + f"colocate_gateway: {str(colocate).lower()}\n"
    )
    up = Up(tmp_path / "data", config)
    try:
        url = up.url.replace("http://", "https://")
        assert f"gateway {url}" in up.output
        client = openai.OpenAI(
            base_url=f"{url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(
                verify=ssl.create_default_context(cafile=str(cert))
            ),
        )
        deadline = time.monotonic() + 20
        while True:  # until the workers' first heartbeats are in
            try:
                stream = client.completions.create(
                    model="llama-3-8b", prompt="over tls", max_tokens=5, stream=True
                )
                break
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and time.monotonic() < deadline, exc
                time.sleep(0.2)
        assert len("".join(c.choices[0].text for c in stream).split()) == 5
    finally:
        output = up.stop()
    assert up.proc.returncode == 0, output


@pytest.mark.cluster
def test_tls_flags_on_an_orchestrator_need_its_gateway_port(tmp_path: Path) -> None:
    """An orchestrator serves TLS only to clients (``--gateway-port``); without it the
    flags would be ignored, so they are refused."""
    cert, key = _self_signed(tmp_path)
    cmd = [sys.executable, "-m", "haif", "orchestrator", "--port", str(free_port())]
    cmd += ["--store", str(tmp_path / "s.duckdb"), "--tls-cert", str(cert), "--tls-key", str(key)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "add --gateway-port" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.cluster
def test_haif_up_refuses_a_missing_tls_file_before_starting(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("gateway_tls: {cert: gone.pem, key: gone.key}\n")
    cmd = [sys.executable, "-m", "haif", "up", str(config), "--port", str(free_port())]
    done = subprocess.run(
        [*cmd, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "gateway_tls: --tls-cert" in done.stderr and "gone.pem: no such file" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
