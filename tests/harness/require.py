"""Optional components the project claims: skip without them, fail under ``CI=true``.

``pytest.importorskip`` turns a missing install into a skip, which is right on
a developer's machine without ``haif[torch]`` and wrong in CI, whose setup
(``make test``) installs every engine the README says is tested: there a
silent skip would hide that the engine path never ran. Like
:func:`harness.pg.pg_unavailable` for the PostgreSQL server.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, *, extra: str = "torch") -> ModuleType:
    """Import ``module``; when it is missing, skip the test, or fail it under ``CI=true``.

    ``extra`` names the optional extra that installs it (``pip install 'haif[EXTRA]'``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not installed (pip install 'haif[{extra}]'): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: this component must be tested)", pytrace=False)
        pytest.skip(message)
