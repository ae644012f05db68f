"""TLS to PostgreSQL: ``sslmode=verify-full`` with the CA from the cluster config.

A PostgreSQL server of the test's own (:class:`harness.own_pg.OwnPostgres`,
never the shared one) serves TLS 1.3 only (``ssl=on``), with a server
certificate from a cluster CA (:func:`issue_server_cert`), and rejects plain
connections (``hostnossl ... reject``). The store opens through
:func:`verify_full` (what ``store_ca`` in the cluster YAML does); a CA that
did not sign the server's certificate, or a certificate for another host, is
refused; and ``haif up`` with ``store_ca`` runs a request over it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from harness.own_pg import OwnPostgres
from harness.up_cli import UpCli

from haif.configfile import ConfigError
from haif.runtime.cluster import load_cluster, verify_full
from haif.runtime.cluster_tls import CertAuthority, issue_server_cert, new_ca
from haif.runtime.store import open_store

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    return new_ca("store CA")


@pytest.fixture(scope="module")
def pg(ca: CertAuthority) -> Iterator[OwnPostgres]:
    server = OwnPostgres(tls=issue_server_cert(ca, ["127.0.0.1", "localhost"]))
    try:
        server.start()
        yield server
    finally:
        server.close()


def _ca_file(where: Path, ca: CertAuthority) -> Path:
    path = where / "store-ca.pem"
    path.write_bytes(ca.cert_pem)
    return path


async def _ssl_of_my_connection(dsn: str) -> tuple[bool, str]:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await con.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert row is not None
        return bool(row["ssl"]), str(row["version"])
    finally:
        await con.close()


async def test_the_store_opens_over_verified_tls(
    pg: OwnPostgres, ca: CertAuthority, tmp_path: Path
) -> None:
    dsn = verify_full(pg.dsn, _ca_file(tmp_path, ca))
    assert "sslmode=verify-full" in dsn and "sslrootcert=" in dsn
    assert await _ssl_of_my_connection(dsn) == (True, "TLSv1.3")
    store = await open_store(dsn)
    try:
        assert await store.records() == []  # migrated and readable over TLS
    finally:
        await store.close()


async def test_plain_connections_are_rejected_by_the_server(pg: OwnPostgres) -> None:
    """The server's side of it: without TLS, no connection (the control: the test above)."""
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(pg.dsn + "?sslmode=disable", timeout=10)


async def test_a_server_certificate_from_another_ca_is_refused(
    pg: OwnPostgres, tmp_path: Path
) -> None:
    dsn = verify_full(pg.dsn, _ca_file(tmp_path, new_ca("not the store's CA")))
    with pytest.raises(Exception, match="certificate verify failed"):
        await open_store(dsn)


async def test_a_server_certificate_for_another_host_is_refused(
    ca: CertAuthority, tmp_path: Path
) -> None:
    server = OwnPostgres(tls=issue_server_cert(ca, ["db.example.com"]))
    try:
        server.start()
        dsn = verify_full(server.dsn, _ca_file(tmp_path, ca))
        with pytest.raises(Exception, match=r"IP address mismatch|Hostname mismatch"):
            await open_store(dsn)
        # verify-ca checks the issuer but not the name: the same server is reached.
        relaxed = dsn.replace("sslmode=verify-full", "sslmode=verify-ca")
        assert (await _ssl_of_my_connection(relaxed))[0] is True
    finally:
        server.close()


def test_store_ca_is_validated_and_named(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("store_ca: ca.pem\n")
    with pytest.raises(ConfigError, match=r"store_ca: only for a postgresql:// store"):
        load_cluster(config)
    with pytest.raises(ConfigError, match=r"store_ca .*missing.pem: no such file"):
        verify_full("postgresql://u@h/db", tmp_path / "missing.pem")
    # A URL that chose its sslmode keeps it.
    kept = "postgresql://u@h/db?sslmode=require"
    assert verify_full(kept, _ca_file(tmp_path, new_ca())) == kept


@pytest.mark.cluster
def test_haif_up_runs_on_a_store_over_tls(
    pg: OwnPostgres, ca: CertAuthority, tmp_path: Path
) -> None:
    """``store_ca`` in the cluster YAML: the orchestrator's every store connection is TLS."""
    _ca_file(tmp_path, ca)
    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps({"store": pg.dsn, "store_ca": "store-ca.pem"}))
    up = UpCli(tmp_path / "data", config)
    try:
        assert "sslmode=verify-full" in up.state["store"]
        answer = up.complete(headers={"x-request-id": "over-tls"})
        assert answer["usage"]["completion_tokens"] > 0
    finally:
        output = up.stop()
    assert up.proc.returncode == 0, output
    # Exported after the services stopped, by haif up itself, over the same TLS store URL.
    assert "request records in" in output, output
