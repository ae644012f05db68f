"""The wheels a host installs from: haif's, built here, and its dependencies'.

The hosts need no package index: everything ``pip install --no-index``
needs is copied to them. Two parts:

- the *dependencies*' wheelhouse, built once per dependency set and Python
  (``pip wheel`` of pyproject's runtime dependencies, no extras: no torch or
  vLLM) and cached in ``~/.cache/haif-deploy/wheelhouse-<hash>``
  (``$HAIF_DEPLOY_CACHE``), so a second deploy, or CI, does not build it again;
- haif's own wheel, built from this checkout at each deploy (its digest names
  the host's virtualenv, so an upgrade makes a new one beside the old).

A host is sent only the wheels it lacks (same name and size).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from haif.configfile import ConfigError

#: What goes into haif's wheel from the checkout.
_SOURCES = ("pyproject.toml", "README.md", "haif")


@dataclass(frozen=True)
class Wheelhouse:
    """Dependency wheels and haif's wheel, ready to copy."""

    deps: tuple[Path, ...]
    haif: Path
    #: sha256 of haif's wheel and the dependency names: names the host's virtualenv.
    key: str


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "haif-deploy"
    return Path(os.environ.get("HAIF_DEPLOY_CACHE", default)).expanduser()


def source_root() -> Path:
    """The checkout haif runs from (``ConfigError`` for an installed copy)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(
            f"haif deploy builds haif's wheel from a checkout; {root} has no pyproject.toml"
        )
    return root


def runtime_requirements(root: Path) -> list[str]:
    """pyproject's ``dependencies`` (no extras)."""
    with (root / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [str(d) for d in deps]


#: Fixed timestamps in haif's wheel: the same sources give the same wheel (and digest),
#: so deploying an unchanged checkout again reuses the hosts' virtualenvs.
_EPOCH = "315532800"


def _pip(*args: str, what: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SOURCE_DATE_EPOCH": _EPOCH}
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ConfigError(f"{what} failed:\n{tail}")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build(root: Path | None = None, say: Callable[[str], None] = print) -> Wheelhouse:
    """haif's wheel from ``root`` and the dependencies' wheelhouse (cached)."""
    root = root or source_root()
    requirements = runtime_requirements(root)
    py = f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"
    key = hashlib.sha256("\n".join([py, *sorted(requirements)]).encode()).hexdigest()[:16]
    cache = cache_dir()
    house = cache / f"wheelhouse-{key}"
    if not (house / ".complete").exists():
        say(f"building the dependencies' wheelhouse in {house} (once per dependency set)")
        tmp = Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=cache_dir_made(cache)))
        try:
            _pip("wheel", "-q", "--wheel-dir", str(tmp), *requirements, what="pip wheel")
            (tmp / ".complete").touch()
            shutil.rmtree(house, ignore_errors=True)
            tmp.rename(house)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    deps = tuple(sorted(house.glob("*.whl")))
    say("building haif's wheel from " + str(root))
    with tempfile.TemporaryDirectory(prefix="haif-src-") as src_dir:
        src = Path(src_dir)
        for name in _SOURCES:
            if (root / name).is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(root / name, src / name, ignore=ignore)
            else:
                shutil.copy2(root / name, src / name)
        out = src / "dist"
        # Offline and quicker with the setuptools at hand; else pip fetches it.
        isolation = (
            [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        )
        _pip(
            "wheel", "-q", "--no-deps", *isolation, "--wheel-dir", str(out), str(src),
            what="building haif's wheel",
        )  # fmt: skip
        wheel = next(out.glob("haif-*.whl"))
        digest = _digest(wheel)
        kept = cache_dir_made(cache / "haif" / digest[:16]) / wheel.name
        if not kept.exists():
            shutil.copy2(wheel, kept)
    venv_key = hashlib.sha256("\n".join([digest, *(p.name for p in deps)]).encode()).hexdigest()[
        :16
    ]
    return Wheelhouse(deps, kept, venv_key)


def cache_dir_made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
