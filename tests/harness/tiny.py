"""``haif artifacts make-tiny`` into a temporary store, for the tests that load the tiny model."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.require import require


def make_tiny_store(base: Path) -> tuple[Path, Path]:
    """Build and publish the tiny GPT-2 under ``base``: (store, keyring dir)."""
    require("torch")
    require("transformers")
    from haif.runtime.artifacts_cli import add_artifact_commands

    store, key = base / "store", base / "keys" / "cluster.key"
    parser = argparse.ArgumentParser(prog="haif")
    add_artifact_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["artifacts", "make-tiny", "--store", str(store), "--key", str(key)])
    assert args.func(args) == 0
    return store, key.parent
