"""``haif certs``: the cluster's certificates (see :mod:`haif.runtime.cluster_tls`)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from cryptography import x509

from haif.configfile import ConfigError
from haif.runtime.cluster_access import DEFAULT_DATA_DIR
from haif.runtime.cluster_tls import (
    TLS_DIR,
    certificate_identity,
    issue_server_cert,
    load_ca,
    rotate_certs,
)

DESCRIPTION = """\
The cluster's TLS certificates, in DATA_DIR/tls/ (haif up makes them):

  list    each certificate: name, role and expiry
  rotate  reissue every service certificate from the cluster CA; a running
          cluster's services load theirs within 5 s, and connections already
          open (and the streams on them) go on until they close
  server  a server certificate from the cluster CA for a server outside the
          services that clients check with verify-full, such as PostgreSQL
          (its ssl_cert_file / ssl_key_file; tls/ca.pem is then the cluster
          YAML's store_ca)

With a cluster_ca in the cluster YAML (--config), that CA signs."""


def add_certs_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser(
        "certs",
        help="the cluster's TLS certificates: list, rotate, issue a server certificate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = certs.add_subparsers(dest="verb", required=True)
    for name, help_text in (
        ("list", "each certificate: name, role, expiry"),
        ("rotate", "reissue every service certificate (running services load them in 5 s)"),
        ("server", "issue a server certificate for hosts outside the services (PostgreSQL)"),
    ):
        verb = verbs.add_parser(name, help=help_text, description=help_text)
        verb.add_argument(
            "--data-dir", default=DEFAULT_DATA_DIR, help="haif up's data directory (default .haif)"
        )
        if name != "list":
            verb.add_argument("--config", help="the cluster YAML (its cluster_ca signs, if set)")
        if name == "server":
            verb.add_argument(
                "--host",
                action="append",
                required=True,
                help="a DNS name or address clients reach the server by (repeat for several)",
            )
            verb.add_argument("--out", required=True, help="write OUT.pem and OUT.key (mode 0600)")
            verb.add_argument("--days", type=float, default=365.0, help="validity (default 365)")
        verb.set_defaults(func=_run)


def _ca_files(config: str | None) -> tuple[Path, Path] | None:
    if not config:
        return None
    from haif.runtime.cluster import load_cluster

    cluster = load_cluster(config)
    if cluster.cluster_ca is None:
        return None
    cert, key = cluster.cluster_ca.resolved(Path(config).resolve().parent)
    return Path(cert), Path(key)


def _run(args: argparse.Namespace) -> int:
    tls = Path(args.data_dir) / TLS_DIR
    if not (tls / "ca.pem").exists():
        raise ConfigError(
            f"{tls}: no cluster CA here; `haif up --data-dir {args.data_dir}` makes one"
        )
    if args.verb == "list":
        for path in sorted(tls.glob("*.pem")):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            identity = certificate_identity(cert)
            who = f"{identity.role.value} {identity.name}" if identity else "(CA or server)"
            left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
            print(
                f"{path.name:32} {who:40} until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                f"({left.days} days)"
            )
        return 0
    ca_files = _ca_files(args.config)
    if args.verb == "rotate":
        names = rotate_certs(tls, ca_files)
        print(f"reissued {len(names)} certificates in {tls}; running services load them within 5 s")
        return 0
    ca = load_ca(*(ca_files or (tls / "ca.pem", tls / "ca.key")))
    cert_pem, key = issue_server_cert(ca, args.host, days=args.days)
    out = Path(args.out)
    out.with_suffix(".pem").write_bytes(cert_pem)
    key_path = out.with_suffix(".key")
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(key)
    hosts = ", ".join(args.host)
    print(f"{out.with_suffix('.pem')} and {key_path} for {hosts}; CA {tls / 'ca.pem'}")
    return 0
