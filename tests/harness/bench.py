"""Load a ``bench/`` script as a module, so a test can call its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/NAME.py`` as the module ``haif_bench_NAME`` (registered in ``sys.modules``:
    dataclasses look their module up by name)."""
    script = BENCH / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"haif_bench_{name}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
