"""Mutual TLS between a cluster's services: a cluster CA, one certificate per service.

Theory of operation
===================

Every service-to-service connection (gateway -> orchestrator, orchestrator
-> workers, workers -> orchestrator, ``haif dlq`` / ``haif keys`` -> the
orchestrator) is TLS 1.3 with a certificate on *both* sides, each issued by
the cluster's certificate authority. ``haif up`` creates that CA in
``<data-dir>/tls/`` (or signs with the one the cluster YAML's ``cluster_ca``
names) and issues every service its certificate there
(:func:`ensure_cluster_certs`).

*What a certificate says.* A service's certificate names its role and its
name (the same names as the cluster keys, :mod:`haif.runtime.cluster_keys`):

- a URI SAN ``spiffe://haif/<role>/<name, percent-encoded>`` (SPIFFE's
  shape): the identity a *server* reads from its caller's certificate, and
  what the RPC authorization (:mod:`haif.runtime.roles`) decides on. The role
  must be the one the name implies (:func:`haif.runtime.roles.role_of`), so a
  certificate cannot call itself ``worker`` under the name ``gateway``;
- a DNS SAN, :func:`tls_hostname` of the name (``orchestrator.haif``,
  ``w1.worker.haif``): what a *client* asks OpenSSL to check during the
  handshake (``server_hostname``), so a call meant for the orchestrator or for
  worker ``w1`` is never sent to any other cluster member, however it got that
  member's address. Addresses themselves are not in the certificates: a
  service may move without being reissued a certificate.

*What is refused.* Servers demand a client certificate (``CERT_REQUIRED``)
from the cluster CA: a peer with none, an expired one or one from another CA
fails the handshake and never sends a byte of HTTP; a client speaking plain
HTTP to an internal port gets no HTTP answer. A caller whose certificate is
valid but whose role may not call the method is answered 403
(:class:`haif.runtime.rpc.PeerAuth`). TLS 1.3 only: no version or cipher
negotiation to get wrong.

*Cost.* One :class:`ServiceTls` per process holds one server and one client
``SSLContext``, built once; aiohttp's connector keeps connections open, so a
handshake is paid per connection, not per request (see docs/operations.md for
the measured cost).

*Rotation.* :meth:`ServiceTls.reload` loads the certificate files again into
the *same* contexts: new connections present the new certificate, open ones
(and the streams on them) keep going on the old one until they close.
:meth:`ServiceTls.watch` reloads whenever the certificate file changes, so
``haif certs rotate`` (:func:`rotate_certs`) only has to write new files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from haif.configfile import ConfigError
from haif.runtime.roles import Role, role_of

__all__ = [
    "TLS_DIR",
    "CertAuthority",
    "Identity",
    "ServiceTls",
    "add_cluster_tls_args",
    "cluster_tls_args",
    "ensure_cluster_certs",
    "identity_of",
    "issue_cert",
    "issue_server_cert",
    "load_ca",
    "new_ca",
    "rotate_certs",
    "service_tls_from_args",
    "tls_hostname",
]

log = logging.getLogger("haif.cluster_tls")

#: The certificates' folder inside a cluster's data directory.
TLS_DIR = "tls"
#: The identity health checks and Prometheus present (may call no RPC method).
MONITOR = "monitor"
#: The trust domain of the identities' URIs.
TRUST_DOMAIN = "haif"
_URI_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
#: How long ``haif up`` makes a service certificate valid, and a CA.
SERVICE_CERT_DAYS = 30
CA_DAYS = 3650
#: A certificate with less than this share of its lifetime left is reissued.
RENEW_FRACTION = 1 / 3
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified certificate says its holder is."""

    role: Role
    name: str

    @property
    def uri(self) -> str:
        return f"{_URI_PREFIX}{self.role.value}/{quote(self.name, safe='')}"


def _label(name: str) -> str:
    """A DNS label for ``name``: itself when it is one, else ``h-`` and a digest of it."""
    if _DNS_LABEL.fullmatch(name) and not name.startswith("h-"):
        return name
    return "h-" + hashlib.sha256(name.encode()).hexdigest()[:24]


def tls_hostname(name: str) -> str:
    """The DNS name in ``name``'s certificate, which a client calling it checks.

    ``orchestrator`` -> ``orchestrator.haif``; a worker ``w1`` ->
    ``w1.worker.haif``; a name that is no DNS label (``us-east/H100/0``) is
    replaced by ``h-`` and 24 hex digits of its SHA-256.
    """
    if role_of(name) is Role.WORKER:
        return f"{_label(name)}.worker.{TRUST_DOMAIN}"
    return f"{_label(name)}.{TRUST_DOMAIN}"


def certificate_identity(cert: x509.Certificate) -> Identity | None:
    """The identity a loaded certificate names (its URI SANs), as :func:`identity_of`."""
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return identity_of({"subjectAltName": tuple(("URI", u) for u in uris)})


def identity_of(peercert: Mapping[str, Any] | None) -> Identity | None:
    """The identity in a verified peer certificate (``ssl``'s ``getpeercert()`` dict).

    ``None`` when there is no certificate or it carries no well-formed
    ``spiffe://haif/<role>/<name>`` URI whose role is the one its name implies.
    """
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind != "URI" or not isinstance(value, str) or not value.startswith(_URI_PREFIX):
            continue
        role_text, sep, encoded = value[len(_URI_PREFIX) :].partition("/")
        if not sep or "/" in encoded:
            return None
        try:
            role = Role(role_text)
        except ValueError:
            return None
        name = unquote(encoded)
        if not _NAME.fullmatch(name) or role_of(name) is not role:
            return None
        return Identity(role, name)
    return None


# ----------------------------------------------------------------- issuing


@dataclass(frozen=True)
class CertAuthority:
    """A CA's certificate and private key, to issue service certificates with."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_ca(common_name: str = "HAIF cluster CA", days: int = CA_DAYS) -> CertAuthority:
    """A fresh self-signed CA (ECDSA P-256), valid from an hour ago for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - dt.timedelta(hours=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAuthority(cert, key)


def load_ca(cert_path: str | Path, key_path: str | Path, what: str = "cluster_ca") -> CertAuthority:
    """Read a CA's PEM certificate and key; ``ConfigError`` naming ``what`` and the file."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"{what}.cert {cert_path}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{what}.cert {cert_path}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{what}.key {key_path}: cannot read it: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}.key {key_path}: not an unencrypted PEM key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{what}.key {key_path}: an ECDSA key is needed")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{what}: {key_path} is not the key of {cert_path}")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise ConfigError(f"{what}.cert {cert_path}: not a CA certificate (basicConstraints)")
    return CertAuthority(cert, key)


def issue_cert(
    ca: CertAuthority,
    name: str,
    *,
    days: float = SERVICE_CERT_DAYS,
    not_before: dt.datetime | None = None,
    hosts: Sequence[str] = (),
) -> tuple[bytes, bytes]:
    """A certificate for the service ``name`` (its role: :func:`role_of`) and its key, PEM.

    Client and server use (one certificate serves both ends); HAIF's clients
    check it by :func:`tls_hostname`. ``hosts`` (addresses or DNS names the
    service is reached at) are added for tools that check the address, such as
    Prometheus scraping ``/metrics``. ``not_before`` (default: an hour ago)
    lets a test issue an expired one.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"service name {name!r} cannot name a certificate")
    identity = Identity(role_of(name), name)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(hours=1))
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(identity.uri),
        x509.DNSName(tls_hostname(name)),
        *_host_names(hosts),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    import ipaddress

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue_server_cert(
    ca: CertAuthority, hosts: Sequence[str], *, days: float = 365
) -> tuple[bytes, bytes]:
    """A TLS server certificate (and its key, PEM) for ``hosts`` (DNS names or
    addresses), with no HAIF identity in it: for a server outside the cluster's
    services that its clients check with ``verify-full``, such as PostgreSQL.
    Its holder cannot call any service (it names no role)."""
    if not hosts:
        raise ValueError("a server certificate names at least one host")
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - dt.timedelta(hours=1)
    sans = _host_names(hosts)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def _stem(name: str) -> str:
    return quote(name, safe="")


@dataclass(frozen=True)
class ServiceFiles:
    """Where one service's certificate, key and the CA it trusts are."""

    cert: Path
    key: Path
    ca: Path


def _needs_renewal(
    path: Path, ca: CertAuthority, now: dt.datetime, hosts: Sequence[str] = ()
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return True
    if not set(_host_names(hosts)) <= set(sans):
        return True
    if cert.issuer != ca.cert.subject:
        return True
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, Exception):
        return True
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * RENEW_FRACTION


def ensure_cluster_certs(
    directory: Path,
    services: Iterable[str],
    ca_files: tuple[Path, Path] | None = None,
    *,
    days: float = SERVICE_CERT_DAYS,
    force: bool = False,
    hosts: Sequence[str] = (),
) -> dict[str, ServiceFiles]:
    """A CA and one certificate per service in ``directory``; ``{name: files}``.

    The CA is ``ca_files`` (certificate, key: the operator's) or
    ``<directory>/ca.pem`` + ``ca.key``, created on first use. Each service
    gets ``<name>.pem`` and ``<name>.key`` (0600), reissued when missing, not
    from this CA, or with less than a third of its life left (every
    certificate with ``force``: :func:`rotate_certs`) or not naming every one
    of ``hosts`` (see :func:`issue_cert`). ``<directory>/ca.pem`` is always
    the CA the services trust.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_pem = directory / "ca.pem"
    if ca_files is not None:
        ca = load_ca(*ca_files)
        if not ca_pem.exists() or ca_pem.read_bytes() != ca.cert_pem:
            _write(ca_pem, ca.cert_pem, 0o644)
    elif (directory / "ca.key").exists() and ca_pem.exists():
        ca = load_ca(ca_pem, directory / "ca.key", what=f"{directory} CA")
    else:
        ca = new_ca()
        _write(directory / "ca.key", _key_pem(ca.key), 0o600)
        _write(ca_pem, ca.cert_pem, 0o644)
    now = _now()
    out: dict[str, ServiceFiles] = {}
    for name in services:
        stem = _stem(name)
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        if force or not key_path.exists() or _needs_renewal(cert_path, ca, now, hosts):
            cert, key = issue_cert(ca, name, days=days, hosts=hosts)
            _write(key_path, key, 0o600)  # the key first: a reloader reads the pair after the cert
            _write(cert_path, cert, 0o644)
        out[name] = ServiceFiles(cert_path, key_path, ca_pem)
    return out


def _identity_in(path: Path) -> Identity | None:
    """The HAIF identity a PEM certificate file names (None: a CA, a server's, unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    return identity_of({"subjectAltName": tuple(("URI", u) for u in uris)})


def rotate_certs(
    directory: Path, ca_files: tuple[Path, Path] | None = None, *, days: float = SERVICE_CERT_DAYS
) -> list[str]:
    """Reissue every service certificate in ``directory``; the names reissued.

    Running services load the new files within their watch interval
    (:meth:`ServiceTls.watch`); connections already open are not touched.
    """
    names: list[str] = []
    hosts: set[str] = set()  # the addresses they name, kept
    for path in sorted(directory.glob("*.pem")):
        identity = _identity_in(path)
        if identity is None:
            continue
        names.append(identity.name)
        sans = x509.load_pem_x509_certificate(path.read_bytes()).extensions
        alt = sans.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts |= {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
        hosts |= {d for d in alt.get_values_for_type(x509.DNSName) if not d.endswith(".haif")}
    if not names:
        raise ConfigError(f"{directory}: no service certificates to rotate")
    ensure_cluster_certs(directory, names, ca_files, days=days, force=True, hosts=sorted(hosts))
    return names


# ----------------------------------------------------------------- contexts


def _tls13(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


class ServiceTls:
    """One service's TLS: its certificate, the CA it trusts, a server and a client context.

    Built once per process; the contexts are the ones every connection uses,
    so :meth:`reload` changes what new connections present.
    ``ConfigError`` names a file that is missing, unreadable or mismatched.
    """

    def __init__(self, cert: str | Path, key: str | Path, ca: str | Path) -> None:
        self.cert, self.key, self.ca = Path(cert), Path(key), Path(ca)
        for flag, path in (
            ("--cluster-tls-cert", self.cert),
            ("--cluster-tls-key", self.key),
            ("--cluster-ca", self.ca),
        ):
            if not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        self.server = _tls13(ssl.PROTOCOL_TLS_SERVER)
        self.server.verify_mode = ssl.CERT_REQUIRED
        self.client = _tls13(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname, CERT_REQUIRED
        for context in (self.server, self.client):
            try:
                context.load_verify_locations(cafile=str(self.ca))
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(
                    f"--cluster-ca {self.ca}: not a PEM certificate ({exc})"
                ) from None
        self.identity: Identity
        self.not_after: float
        self._mtime = 0.0
        self._kwargs: dict[str, dict[str, Any]] = {}
        self.reload()

    def _read(self) -> tuple[Identity, float, bytes]:
        """The certificate's identity and expiry, and the certificate and key as one PEM:
        both files read once, their match checked, so a pair caught half-rewritten is
        refused here instead of half-loaded (OpenSSL drops a certificate whose key does
        not match, which would leave the contexts with none)."""
        try:
            cert_pem = self.cert.read_bytes()
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"--cluster-tls-cert {self.cert}: not a PEM certificate ({exc})"
            ) from None
        try:
            key_pem = self.key.read_bytes()
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"--cluster-tls-key {self.key}: not an unencrypted PEM key ({exc})"
            ) from None
        if key.public_key() != cert.public_key():
            raise ConfigError(
                f"--cluster-tls-cert {self.cert} / --cluster-tls-key {self.key}: "
                "not a PEM certificate and its key (they do not match)"
            )
        identity = certificate_identity(cert)
        if identity is None:
            raise ConfigError(
                f"--cluster-tls-cert {self.cert}: names no HAIF service "
                f"(a URI SAN {_URI_PREFIX}<role>/<name>)"
            )
        return identity, cert.not_valid_after_utc.timestamp(), cert_pem + b"\n" + key_pem

    def reload(self) -> bool:
        """Load the certificate and key files into both contexts; whether they changed."""
        import tempfile

        mtime = max(self.cert.stat().st_mtime, self.key.stat().st_mtime)
        identity, not_after, pair = self._read()
        # Loaded from one private file holding what was read and checked above.
        with tempfile.NamedTemporaryFile(prefix="haif-tls-", suffix=".pem") as tmp:
            tmp.write(pair)
            tmp.flush()
            for context in (self.server, self.client):
                try:
                    context.load_cert_chain(tmp.name)
                except (ssl.SSLError, ValueError) as exc:
                    raise ConfigError(
                        f"--cluster-tls-cert {self.cert} / --cluster-tls-key {self.key}: "
                        f"not a PEM certificate and its key ({exc})"
                    ) from None
        changed = mtime != self._mtime
        self.identity, self.not_after, self._mtime = identity, not_after, mtime
        return changed

    async def watch(self, every_s: float = 5.0) -> None:
        """Reload whenever the certificate or key file changes (run as a task)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                mtime = max(self.cert.stat().st_mtime, self.key.stat().st_mtime)
                if mtime != self._mtime and self.reload():
                    log.info(
                        "loaded a new certificate for %s (%s), valid until %s",
                        self.identity.name,
                        self.cert,
                        dt.datetime.fromtimestamp(self.not_after, dt.UTC).isoformat(),
                    )
            except (OSError, ConfigError) as exc:  # half-written; keep the old one
                log.warning(
                    "certificate reload from %s failed (kept the old one): %s", self.cert, exc
                )

    def client_kwargs(self, peer: str) -> dict[str, Any]:
        """aiohttp request arguments for a call to the service named ``peer`` (shared: do
        not change it)."""
        kwargs = self._kwargs.get(peer)
        if kwargs is None:
            if len(self._kwargs) > 4096:
                self._kwargs.clear()
            kwargs = self._kwargs[peer] = {
                "ssl": self.client,
                "server_hostname": tls_hostname(peer),
            }
        return kwargs


def add_cluster_tls_args(parser: argparse.ArgumentParser) -> None:
    """``--cluster-tls-cert``, ``--cluster-tls-key``, ``--cluster-ca`` (all or none)."""
    parser.add_argument(
        "--cluster-tls-cert",
        default=None,
        metavar="PEM",
        help="this service's certificate from the cluster CA: mutual TLS 1.3 on every "
        "internal connection (with --cluster-tls-key and --cluster-ca)",
    )
    parser.add_argument(
        "--cluster-tls-key", default=None, metavar="PEM", help="the key of --cluster-tls-cert"
    )
    parser.add_argument(
        "--cluster-ca",
        default=None,
        metavar="PEM",
        help="the cluster CA's certificate: peers must present a certificate it issued",
    )


def service_tls_from_args(args: argparse.Namespace) -> ServiceTls | None:
    """The :class:`ServiceTls` the flags describe; ``None`` without them."""
    given: dict[str, str | None] = {
        flag: getattr(args, attr, None)
        for flag, attr in (
            ("--cluster-tls-cert", "cluster_tls_cert"),
            ("--cluster-tls-key", "cluster_tls_key"),
            ("--cluster-ca", "cluster_ca"),
        )
    }
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ConfigError(
            "--cluster-tls-cert, --cluster-tls-key and --cluster-ca go together: "
            f"missing {', '.join(missing)}"
        )
    cert, key, ca = (str(v) for v in given.values())
    return ServiceTls(cert, key, ca)


def cluster_tls_args(files: ServiceFiles) -> list[str]:
    """The flags that give a service the files :func:`ensure_cluster_certs` made."""
    return [
        "--cluster-tls-cert",
        str(files.cert),
        "--cluster-tls-key",
        str(files.key),
        "--cluster-ca",
        str(files.ca),
    ]


#: The metric each service exports: when its certificate stops being valid.
EXPIRY_METRIC = "haif_tls_certificate_expiry_timestamp_seconds"


def export_expiry(registry: Any, tls: ServiceTls) -> None:
    """Add :data:`EXPIRY_METRIC` to a Prometheus ``registry``: the UNIX time the
    certificate this service presents now stops being valid (read at each scrape, so a
    rotation shows at once). Alerted on by ``HaifCertificateExpiresSoon``."""
    from prometheus_client import Gauge

    gauge = Gauge(
        EXPIRY_METRIC,
        "When this service's cluster TLS certificate expires (UNIX seconds)",
        registry=registry,
    )
    gauge.set_function(lambda: tls.not_after)


def liveness_context(files: ServiceFiles) -> ssl.SSLContext:
    """A client context for ``haif up``'s health checks of its own children on loopback:
    it presents ``files``' certificate (internal ports demand one) and asks only
    whether the child answers, so it does not check the server's certificate (an
    https gateway's is the clients', from any CA)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(files.cert), str(files.key))
    return context


def peer_identity(transport: asyncio.BaseTransport | None) -> Identity | None:
    """The verified identity of the peer on ``transport`` (None: no TLS or no certificate)."""
    if transport is None:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        return identity_of(transport.get_extra_info("peercert"))
    return None
