"""The pure core stays pure: no clock, no I/O, no global randomness (DESIGN.md §1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE_DIRS = [ROOT / "haif" / "policy", ROOT / "haif" / "control"]
FORBIDDEN = {
    "time",
    "asyncio",
    "aiohttp",
    "simpy",
    "msgpack",
    "os",
    "socket",
    "subprocess",
    "threading",
    "datetime",
    "asyncpg",
    "duckdb",
    "sys",
    "pathlib",
}
GLOBAL_RANDOM = {
    "random",
    "uniform",
    "randint",
    "choice",
    "choices",
    "shuffle",
    "seed",
    "expovariate",
    "gauss",
    "sample",
    "randrange",
    "lognormvariate",
    "getrandbits",
    "normalvariate",
}
PURE_FILES = sorted(p for d in PURE_DIRS for p in d.rglob("*.py"))


def violations(source: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in FORBIDDEN:
                found.append(node.module)
            if node.module == "random":
                found += [
                    f"from random import {a.name}" for a in node.names if a.name in GLOBAL_RANDOM
                ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "random"
            and node.func.attr in GLOBAL_RANDOM
        ):
            found.append(f"random.{node.func.attr}()")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"hash", "open", "print", "input"}
        ):
            found.append(f"{node.func.id}()")
    return found


def test_pure_modules_exist() -> None:
    names = {p.name for p in PURE_FILES}
    assert {
        "ratelimit.py",
        "retry.py",
        "breaker.py",
        "placement.py",
        "admission.py",
        "core.py",
    } <= names


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_pure(path: Path) -> None:
    assert violations(path.read_text()) == []


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os.path",
        "from asyncio import sleep",
        "import random\nx = random.random()",
        "import random\nrandom.shuffle([])",
        "from random import choice",
        "h = hash('x')",
    ],
)
def test_checker_catches(source: str) -> None:
    assert violations(source), source


def test_checker_allows_injected_rng() -> None:
    assert (
        violations("import random\ndef f(rng: random.Random) -> float:\n    return rng.random()\n")
        == []
    )


# ------------------------------------------------------- the shells stay apart

SHELL_RULES = {
    # package -> packages it must not import (DESIGN.md §7)
    "haif/sim": ("haif.runtime", "haif.analysis"),
    "haif/runtime": ("haif.sim", "haif.analysis"),
    "haif/fleet": ("haif.sim", "haif.runtime", "haif.analysis"),
    "haif/control": ("haif.sim", "haif.runtime", "haif.analysis", "haif.fleet"),
    "haif/policy": ("haif.sim", "haif.runtime", "haif.analysis", "haif.fleet", "haif.control"),
}


def imported_modules(source: str) -> list[str]:
    """Every module an ``import`` or ``from ... import`` names, at any depth."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


SHELL_FILES = [
    (package, path) for package in SHELL_RULES for path in sorted((ROOT / package).rglob("*.py"))
]


@pytest.mark.parametrize(
    ("package", "path"), SHELL_FILES, ids=[str(p.relative_to(ROOT)) for _, p in SHELL_FILES]
)
def test_shells_do_not_import_each_other(package: str, path: Path) -> None:
    banned = SHELL_RULES[package]
    bad = [
        m
        for m in imported_modules(path.read_text())
        if any(m == b or m.startswith(b + ".") for b in banned)
    ]
    assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"


def test_import_checker_sees_lazy_imports() -> None:
    source = "def f():\n    from haif.sim.driver import run_scenario\n"
    assert imported_modules(source) == ["haif.sim.driver"]
