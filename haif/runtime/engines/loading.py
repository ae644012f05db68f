"""Artifact glue of the local-model engines: verify, then copy, before anything loads.

A model is served only from a signed artifact (:mod:`haif.runtime.artifacts`)
whose signature and every digest verify against the worker's keyring, copied
into a private directory, with safetensors weights only.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from haif.runtime.artifacts import ArtifactError, ArtifactRef, fetch, load_manifest
from haif.runtime.engines.base import EngineError, EngineUnavailable
from haif.runtime.security import Keyring

__all__ = ["artifact_ref", "fetch_verified", "require_modules", "trusted_keyring"]


def require_modules(engine: str, modules: Sequence[str], extra: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailable(
            f"the {engine} engine needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'haif[{extra}]'"
        )


def trusted_keyring(keyring: Keyring | str | Path) -> Keyring:
    if isinstance(keyring, Keyring):
        return keyring
    try:
        return Keyring.from_dir(keyring)
    except (OSError, ValueError) as exc:
        raise EngineError(f"keyring {keyring}: {exc}") from None


def artifact_ref(model_ref: ArtifactRef | str) -> ArtifactRef:
    if isinstance(model_ref, ArtifactRef):
        return model_ref
    try:
        return ArtifactRef.parse(model_ref)
    except ArtifactError as exc:
        raise EngineError(exc.message) from None


def fetch_verified(
    store: Path, ref: ArtifactRef, keyring: Keyring, engine: str, workdir: Path | None
) -> tuple[Path, dict[str, Any]]:
    """Verify ``ref`` and copy it into a fresh private directory; return (dir, manifest).

    Refuses artifacts meant for another engine and weights that are not
    safetensors (a pickled checkpoint can run code when loaded).
    """
    manifest = load_manifest(store, ref.name, ref.version, keyring)
    meant_for = manifest.get("engine")
    if meant_for not in ("transformers", "vllm", "any"):
        raise ArtifactError("bad_manifest", f"{ref} is for the {meant_for} engine, not {engine}")
    names = list(manifest["files"])
    if not any(n.endswith(".safetensors") for n in names):
        raise ArtifactError("bad_file", f"{ref} has no .safetensors weights")
    pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    if pickled:
        raise ArtifactError("bad_file", f"{ref} holds pickled weights ({', '.join(pickled)})")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"haif-{ref.name}-{ref.version}-", dir=workdir))
    try:
        fetch(store, ref.name, ref.version, keyring, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest, manifest
