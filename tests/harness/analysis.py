"""The analysis commands (``haif compare``, ``sweep``, ...) run in process."""

from __future__ import annotations

import argparse
import sys

from haif.analysis.cli import add_analysis_commands
from haif.configfile import ConfigError


def cli(argv: list[str]) -> int:
    """Parse and run like ``haif.cli.main``: a ConfigError is printed and gives 2."""
    parser = argparse.ArgumentParser(prog="haif")
    sub = parser.add_subparsers(dest="command", required=True)
    add_analysis_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
