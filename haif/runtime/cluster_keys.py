"""Cluster keys: who may talk to whom inside a HAIF cluster.

Every service (gateway, orchestrator, each worker) holds one Ed25519 private
key and a keyring directory of trusted public keys (``*.pub``, one per
service, named after it). It seals every RPC it sends with its key and
accepts only RPCs sealed by a key in its keyring (:mod:`haif.runtime.rpc`).
A worker's key must be in the orchestrator's keyring as ``<worker id>.pub``:
the orchestrator accepts an announcement for a worker id only under the key
of that name.

Flags, the same on ``haif gateway``, ``haif orchestrator`` and ``haif worker``
(given together or not at all; without them RPC is unauthenticated, as on
loopback)::

    --cluster-key PATH      this service's private key (PEM, mode 0600)
    --cluster-keyring DIR   trusted public keys (*.pub)

(``--keyring`` on a worker is something else: the keys that sign model
artifacts.) :func:`ensure_cluster_keys` lays out a cluster's keys in one
directory and :func:`cluster_key_args` gives each service its flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from haif.configfile import ConfigError
from haif.runtime.security import Keyring, Signer, generate_keypair

__all__ = [
    "KEYRING_DIR",
    "ClusterAuth",
    "add_cluster_auth_args",
    "cluster_auth_from_args",
    "cluster_key_args",
    "ensure_cluster_keys",
    "load_cluster_auth",
]

#: The keyring's folder inside a cluster key directory.
KEYRING_DIR = "keyring"
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,128}")

log = logging.getLogger("haif.cluster_keys")


@dataclass(frozen=True)
class ClusterAuth:
    """A service's cluster identity: its signing key and the keys it trusts."""

    signer: Signer
    keyring: Keyring


def load_cluster_auth(key: str | Path, keyring: str | Path) -> ClusterAuth:
    """Read a private key file and a keyring directory; ``ConfigError`` naming what is wrong."""
    try:
        signer = Signer.from_file(key)
    except OSError as exc:
        raise ConfigError(f"--cluster-key {key}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"--cluster-key {key}: {exc}") from None
    try:
        ring = Keyring.from_dir(keyring)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--cluster-keyring {keyring}: {exc}") from None
    if not len(ring):
        raise ConfigError(f"--cluster-keyring {keyring}: no *.pub keys in it")
    if signer.key_id not in ring:
        log.warning(
            "this service's key %s (%s) is not in its keyring %s: peers with the same "
            "keyring will refuse it",
            signer.key_id,
            key,
            keyring,
        )
    return ClusterAuth(signer, ring)


def add_cluster_auth_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--cluster-key`` and ``--cluster-keyring`` (see the module docstring)."""
    parser.add_argument(
        "--cluster-key",
        default=None,
        metavar="PATH",
        help="this service's Ed25519 private key (PEM): seal every RPC it sends",
    )
    parser.add_argument(
        "--cluster-keyring",
        default=None,
        metavar="DIR",
        help="trusted cluster public keys (*.pub): refuse RPCs not sealed by one of them",
    )


def cluster_auth_from_args(args: argparse.Namespace) -> ClusterAuth | None:
    """The :class:`ClusterAuth` the flags describe; ``None`` without them."""
    key = getattr(args, "cluster_key", None)
    ring = getattr(args, "cluster_keyring", None)
    if key is None and ring is None:
        return None
    if ring is None:
        raise ConfigError("--cluster-key needs --cluster-keyring too (give both or neither)")
    if key is None:
        raise ConfigError("--cluster-keyring needs --cluster-key too (give both or neither)")
    return load_cluster_auth(key, ring)


def _check_names(services: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in services:
        if not _NAME.fullmatch(name):
            raise ValueError(f"service name {name!r} cannot name a key: 1-128 printable characters")
        if name in seen:
            raise ValueError(f"service name {name!r} given twice: each service needs its own key")
        seen.add(name)


def key_file_stem(name: str) -> str:
    """The file name of ``name``'s keys: percent-encoded, so worker ids like
    ``us-east/H100-80G/0.0`` name files (:meth:`Keyring.from_dir` decodes it)."""
    return quote(name, safe="")


def _write_private(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def ensure_cluster_keys(directory: Path, services: Sequence[str]) -> dict[str, tuple[Path, Path]]:
    """One key pair per service in ``directory``; ``{name: (private key, public key)}``.

    Private keys are ``<directory>/<name>.key`` (mode 0600; an existing one is
    reused, its mode tightened), public keys ``<directory>/keyring/<name>.pub``
    (rewritten from the private key, so they always match). Use worker ids as
    the workers' names (the orchestrator binds a worker id to the key of that
    name). Keys of services not named here are left alone, and stay trusted.
    Raises ``ValueError`` for a name that cannot be a file name or repeats.
    """
    _check_names(services)
    ring = directory / KEYRING_DIR
    ring.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    out: dict[str, tuple[Path, Path]] = {}
    for name in services:
        stem = key_file_stem(name)
        key_path, pub_path = directory / f"{stem}.key", ring / f"{stem}.pub"
        if key_path.exists():
            if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
                key_path.chmod(0o600)
            try:
                public = Signer.from_file(key_path).public_pem
            except ValueError as exc:
                raise ValueError(f"{key_path}: {exc}") from None
        else:
            private, public = generate_keypair()
            _write_private(key_path, private)
        if not pub_path.exists() or pub_path.read_bytes() != public:
            pub_path.write_bytes(public)
        out[name] = (key_path, pub_path)
    return out


def cluster_key_args(directory: Path, service: str) -> list[str]:
    """The flags that give ``service`` its key from :func:`ensure_cluster_keys`'s ``directory``."""
    return [
        "--cluster-key",
        str(directory / f"{key_file_stem(service)}.key"),
        "--cluster-keyring",
        str(directory / KEYRING_DIR),
    ]
