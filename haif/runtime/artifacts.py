"""Model artifacts: a content-addressed store of signed model manifests, and a warm-model cache.

Layout of a store (a plain directory, shareable read-only between workers)::

    <root>/blobs/sha256/<64 hex>            file contents, named by their SHA-256
    <root>/manifests/<name>/<version>.json  one signed manifest per model version

A manifest names the model, its version, the engine it is meant for, when it
was created and, for every file of the model (``config.json``,
``model.safetensors``, ``tokenizer.json``, ...), the SHA-256 digest and size
of its content::

    {"schema": "haif-artifact-v1", "name": "tiny-gpt2", "version": "1",
     "engine": "transformers", "created": "2025-01-01T00:00:00Z",
     "files": {"config.json": {"sha256": "...", "size": 818}, ...},
     "kid": "<signer key id>", "signature": "<Ed25519, base64url>"}

It is signed with a cluster Ed25519 key (:func:`haif.runtime.security.sign_manifest`:
canonical JSON, domain-separated, so a manifest signature never passes as an RPC
seal). :func:`verify` / :func:`fetch` check, in this order, and raise
:class:`ArtifactError` with a ``code`` at the first failure:

1. the name and version are well formed (no path tricks) and the manifest
   exists (``not_found``) and is a JSON object (``bad_manifest``);
2. the signer's key is in the keyring (``untrusted_signer``) and the signature
   matches the manifest, i.e. nothing in it changed after signing
   (``bad_signature``);
3. the manifest is for the name and version asked for (``bad_manifest``: a
   validly signed manifest of another version copied over this one is refused)
   and lists only safe relative file names with well-formed digests;
4. every blob exists (``missing_blob``) and has the signed size and digest
   (``digest_mismatch``).

Only then are paths returned. :func:`fetch` copies the blobs into a private
directory under their file names, hashing while copying, so what an engine
loads is exactly the bytes that were verified, even if the store is changed
afterwards (no check-then-use race); this is also the directory layout that
``from_pretrained`` expects.

:class:`ModelCache` keeps up to ``max_models`` loaded models warm, evicting
the least recently used one that is not pinned.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from haif.runtime.security import AuthError, Keyring, Signer, sign_manifest, verify_manifest

__all__ = [
    "SCHEMA",
    "ArtifactError",
    "ArtifactRef",
    "ModelCache",
    "ModelCacheFull",
    "blob_path",
    "fetch",
    "list_artifacts",
    "load_manifest",
    "manifest_path",
    "publish",
    "verify",
]

SCHEMA = "haif-artifact-v1"
#: Largest manifest accepted (a manifest lists files; it is never large).
MAX_MANIFEST_BYTES = 4 << 20
_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")


class ArtifactError(Exception):
    """An artifact that cannot be used; ``code`` says why, the message says what to do.

    Codes: ``bad_name``, ``not_found``, ``exists``, ``bad_manifest``,
    ``untrusted_signer``, ``bad_signature``, ``missing_blob``,
    ``digest_mismatch``, ``bad_file``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """A model version in a store: ``name:version``."""

    name: str
    version: str

    @classmethod
    def parse(cls, text: str) -> ArtifactRef:
        """``"tiny-gpt2:1"`` -> ``ArtifactRef("tiny-gpt2", "1")`` (both parts required)."""
        name, sep, version = text.partition(":")
        if not sep:
            raise ArtifactError("bad_name", f"model ref {text!r}: expected NAME:VERSION")
        _check_name("name", name)
        _check_name("version", version)
        return cls(name, version)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ArtifactError(
            "bad_name",
            f"artifact {what} {value!r}: 1-128 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit",
        )


def _check_file_name(name: object) -> str:
    """A manifest file name: a relative path of safe parts (``a/b.json``), never ``..``."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise ArtifactError("bad_file", f"bad file name {name!r} in manifest")
    parts = name.split("/")
    if any(not _FILE_PART.fullmatch(p) or p in (".", "..") for p in parts):
        raise ArtifactError(
            "bad_file", f"file name {name!r}: relative path of A-Z a-z 0-9 . _ + - parts"
        )
    return name


def manifest_path(root: str | Path, name: str, version: str) -> Path:
    _check_name("name", name)
    _check_name("version", version)
    return Path(root) / "manifests" / name / f"{version}.json"


def blob_path(root: str | Path, digest: str) -> Path:
    if not _HEX64.fullmatch(digest):
        raise ArtifactError("bad_manifest", f"{digest!r} is not a sha256 hex digest")
    return Path(root) / "blobs" / "sha256" / digest


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _copy_hashing(src: Path, dest: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dest`` (atomically, via a temporary file); return (sha256, size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    size = 0
    try:
        with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest(), size


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp_name).replace(path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _add_blob(root: Path, src: Path) -> tuple[str, int]:
    """Store ``src`` under its digest (a blob already there with that content is kept)."""
    staging = root / "blobs" / "sha256" / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=staging)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        digest, size = _copy_hashing(src, tmp)
        final = blob_path(root, digest)
        if final.exists() and _sha256_file(final) == (digest, size):
            tmp.unlink()
        else:  # absent, or a corrupted copy: replace it
            tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, size


def publish(
    root: str | Path,
    name: str,
    version: str,
    files: Mapping[str, Path],
    signer: Signer,
    *,
    engine: str = "transformers",
    created: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Add ``files`` (manifest name -> local path) as ``name:version``; return the signed manifest.

    Versions are immutable: publishing an existing ``name:version`` raises
    ``ArtifactError("exists")`` unless ``overwrite``. ``metadata`` (JSON
    values) is stored, and signed, under ``"metadata"``.
    """
    store = Path(root)
    target = manifest_path(store, name, version)
    if target.exists() and not overwrite:
        raise ArtifactError("exists", f"{name}:{version} is already published in {store}")
    if not files:
        raise ArtifactError("bad_file", "an artifact needs at least one file")
    entries: dict[str, dict[str, Any]] = {}
    for file_name, src in sorted(files.items()):
        _check_file_name(file_name)
        src = Path(src)
        if not src.is_file():
            raise ArtifactError("bad_file", f"{src} is not a file")
        digest, size = _add_blob(store, src)
        entries[file_name] = {"sha256": digest, "size": size}
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "engine": engine,
        "created": created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": entries,
    }
    if metadata:
        manifest["metadata"] = dict(metadata)
    signed = sign_manifest(manifest, signer)
    text = json.dumps(signed, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False)
    _write_atomic(target, text.encode("ascii") + b"\n")
    return signed


def _read_manifest(root: Path, name: str, version: str) -> dict[str, Any]:
    path = manifest_path(root, name, version)
    if not path.is_file():
        raise ArtifactError("not_found", f"no artifact {name}:{version} in store {root} ({path})")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError("manifest too large")
        signed = json.loads(raw)
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError("bad_manifest", f"manifest {path} is unreadable: {exc}") from None
    if not isinstance(signed, dict):
        raise ArtifactError("bad_manifest", f"manifest {path} is not a JSON object")
    return signed


def load_manifest(root: str | Path, name: str, version: str, keyring: Keyring) -> dict[str, Any]:
    """The verified manifest of ``name:version`` (signature and schema; blobs not checked)."""
    store = Path(root)
    signed = _read_manifest(store, name, version)
    ref = f"{name}:{version}"
    try:
        manifest = verify_manifest(signed, keyring)
    except AuthError as exc:
        if exc.code == "unknown_key":
            trusted = ", ".join(keyring.key_ids) or "none"
            raise ArtifactError(
                "untrusted_signer",
                f"manifest of {ref} is signed by key {str(signed.get('kid'))[:32]!r}, which is "
                f"not in the keyring (trusted keys: {trusted})",
            ) from None
        if exc.code == "unsigned":
            raise ArtifactError("bad_signature", f"manifest of {ref} is not signed") from None
        raise ArtifactError(
            "bad_signature",
            f"manifest of {ref} does not match its signature: it was modified after signing",
        ) from None
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError("bad_manifest", f"manifest of {ref}: schema is not {SCHEMA!r}")
    if manifest.get("name") != name or manifest.get("version") != version:
        raise ArtifactError(
            "bad_manifest",
            f"manifest stored as {ref} is signed for "
            f"{manifest.get('name')}:{manifest.get('version')} (substituted manifest?)",
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError("bad_manifest", f"manifest of {ref} lists no files")
    for file_name, entry in files.items():
        _check_file_name(file_name)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _HEX64.fullmatch(entry["sha256"])
            or isinstance(entry.get("size"), bool)
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
        ):
            raise ArtifactError("bad_manifest", f"manifest of {ref}: bad entry for {file_name}")
    return manifest


def _files(manifest: Mapping[str, Any]) -> Iterator[tuple[str, str, int]]:
    for file_name, entry in sorted(manifest["files"].items()):
        yield file_name, entry["sha256"], entry["size"]


def _missing(ref: str, file_name: str, digest: str, path: Path) -> ArtifactError:
    return ArtifactError(
        "missing_blob", f"{ref}: blob of {file_name} (sha256 {digest[:16]}...) is missing: {path}"
    )


def _mismatch(ref: str, file_name: str, digest: str, got: str, size: int, got_size: int) -> str:
    return (
        f"{ref}: {file_name} is corrupted or tampered with: expected sha256 {digest[:16]}... "
        f"({size} bytes), found sha256 {got[:16]}... ({got_size} bytes)"
    )


def verify(root: str | Path, name: str, version: str, keyring: Keyring) -> dict[str, Path]:
    """Verify the manifest's signature and every blob's digest; return file name -> blob path.

    The paths point into the store: load them only if nothing can write it
    between this check and the load; otherwise use :func:`fetch`.
    """
    store = Path(root)
    manifest = load_manifest(store, name, version, keyring)
    ref = f"{name}:{version}"
    out: dict[str, Path] = {}
    for file_name, digest, size in _files(manifest):
        path = blob_path(store, digest)
        if not path.is_file():
            raise _missing(ref, file_name, digest, path)
        got, got_size = _sha256_file(path)
        if got != digest or got_size != size:
            raise ArtifactError(
                "digest_mismatch", _mismatch(ref, file_name, digest, got, size, got_size)
            )
        out[file_name] = path
    return out


def fetch(
    root: str | Path,
    name: str,
    version: str,
    keyring: Keyring,
    dest: str | Path,
    only: Callable[[str], bool] | None = None,
) -> dict[str, Path]:
    """Copy ``name:version`` into ``dest/<file name>``, verified; return file name -> path.

    The signature is checked first; each blob is hashed while it is copied
    and the copy is kept only if it matches, so the returned files are the
    signed bytes. On any failure nothing partial is left under those names.
    ``only``: copy just the files whose manifest name it accepts (e.g. a
    model's tokenizer files without its weights).
    """
    store = Path(root)
    manifest = load_manifest(store, name, version, keyring)
    ref = f"{name}:{version}"
    out_dir = Path(dest)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    try:
        for file_name, digest, size in _files(manifest):
            if only is not None and not only(file_name):
                continue
            src = blob_path(store, digest)
            if not src.is_file():
                raise _missing(ref, file_name, digest, src)
            target = out_dir / file_name
            got, got_size = _copy_hashing(src, target)
            out[file_name] = target
            if got != digest or got_size != size:
                raise ArtifactError(
                    "digest_mismatch", _mismatch(ref, file_name, digest, got, size, got_size)
                )
    except BaseException:
        for path in out.values():
            path.unlink(missing_ok=True)
        raise
    return out


def list_artifacts(root: str | Path) -> list[dict[str, Any]]:
    """Every manifest in the store, as stored (NOT verified), sorted by name and version.

    Unreadable manifests are listed with an ``"error"`` key.
    """
    base = Path(root) / "manifests"
    found: list[dict[str, Any]] = []
    if not base.is_dir():
        return found
    for path in sorted(base.glob("*/*.json")):
        name, version = path.parent.name, path.stem
        try:
            found.append(_read_manifest(Path(root), name, version))
        except ArtifactError as exc:
            found.append({"name": name, "version": version, "error": exc.message})
    return found


# ----------------------------------------------------------------- warm cache

V = TypeVar("V")


class ModelCacheFull(Exception):
    """Every cached model is pinned and there is no room for another one."""


class ModelCache(Generic[V]):
    """Up to ``max_models`` loaded models, least recently used evicted first, pinned never.

    ``get(key, loader)`` returns the cached model or calls ``loader()`` (after
    making room, so the evicted model's memory can be freed first: see
    ``on_evict``). ``get_async`` does the same with an async loader, and
    concurrent callers for one key share a single load. Pins may name models
    that are not loaded yet (they are then kept once loaded). When every slot
    holds a pinned model, loading another raises :class:`ModelCacheFull`
    before the loader is called.
    """

    def __init__(self, max_models: int, on_evict: Callable[[str, V], None] | None = None) -> None:
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        self.max_models = max_models
        self.on_evict = on_evict
        self._models: OrderedDict[str, V] = OrderedDict()
        self._pinned: set[str] = set()
        self._loading: dict[str, asyncio.Future[V]] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.load_failures = 0
        self.evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self._models

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._models)

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def pin(self, key: str) -> None:
        with self._lock:
            self._pinned.add(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pinned.discard(key)

    def peek(self, key: str) -> V | None:
        """The cached model or None, without counting a hit or changing the LRU order."""
        return self._models.get(key)

    def evict(self, key: str) -> bool:
        """Drop ``key`` even if pinned (unpinning it); True if it was cached."""
        with self._lock:
            self._pinned.discard(key)
            if key not in self._models:
                return False
            value = self._models.pop(key)
            self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key, value)
        return True

    def _make_room(self) -> None:
        """Evict LRU unpinned models until one more fits (raise if all are pinned)."""
        evicted: list[tuple[str, V]] = []
        with self._lock:
            while len(self._models) >= self.max_models:
                victim = next((k for k in self._models if k not in self._pinned), None)
                if victim is None:
                    raise ModelCacheFull(
                        f"all {self.max_models} cached models are pinned "
                        f"({', '.join(self._models)}); unpin one or raise max_models"
                    )
                evicted.append((victim, self._models.pop(victim)))
                self.evictions += 1
        if self.on_evict is not None:
            for key, value in evicted:
                self.on_evict(key, value)

    def _store(self, key: str, value: V) -> None:
        with self._lock:
            self._models[key] = value
            self._models.move_to_end(key)
            self.loads += 1

    def get(self, key: str, loader: Callable[[], V]) -> V:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key]
            self.misses += 1
            self._make_room()
            try:
                loaded = loader()
            except BaseException:
                self.load_failures += 1
                raise
            self._store(key, loaded)
            return loaded

    async def get_async(self, key: str, loader: Callable[[], Awaitable[V]]) -> V:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key]
        pending = self._loading.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        self.misses += 1
        self._make_room()
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            loaded = await loader()
        except BaseException as exc:
            self.load_failures += 1
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else must
            else:
                future.cancel()
            raise
        finally:
            self._loading.pop(key, None)
        self._store(key, loaded)
        future.set_result(loaded)
        return loaded

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "max_models": self.max_models,
                "models": list(self._models),
                "pinned": sorted(self._pinned),
                "hits": self.hits,
                "misses": self.misses,
                "loads": self.loads,
                "load_failures": self.load_failures,
                "evictions": self.evictions,
            }
