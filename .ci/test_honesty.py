#!/usr/bin/env python3
"""Test honesty: every test checks something, and no failure is quietly expected.

Run by ``make lint`` (and so by CI). It reads the test files with the ``ast``
module (nothing is imported or run) and fails, listing each offender as
``path:line: name: why``, on:

- a test function (``test_*`` at module level or in a ``Test*`` class) with
  neither an ``assert`` nor a call of a checking helper anywhere in its body
  (nested functions included). Checking helpers are ``pytest.raises`` /
  ``warns`` / ``fail`` / ``deprecated_call``, any name starting with
  ``assert``, ``check`` or ``expect`` (``assert_auth_error``,
  ``check_output``, ...), and any function of the same module, of
  ``tests/harness`` or ``tests/conftest.py`` whose own body asserts or calls a
  checking helper (found to a fixed point, so a helper of a helper counts);
- ``xfail`` that is not strict: ``pytest.mark.xfail(...)`` without
  ``strict=True`` (pyproject's ``xfail_strict`` is not relied on), and the
  imperative ``pytest.xfail(...)``, which ends a test without a verdict.

Usage: ``python .ci/test_honesty.py [TESTS_DIR]`` (default ``tests``).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Callees that are checks in themselves (matched on the last name: pytest.raises -> raises).
CHECK_CALLS = {"raises", "warns", "fail", "deprecated_call"}
CHECK_PREFIXES = ("assert", "check", "expect")

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def callee_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def is_check_name(name: str) -> bool:
    return name in CHECK_CALLS or name.lower().startswith(CHECK_PREFIXES)


class Helpers:
    """What counts as a check besides ``assert``: functions to call, classes to hand on."""

    def __init__(self, functions: Iterable[str] = (), classes: Iterable[str] = ()) -> None:
        self.functions = set(functions)
        self.classes = set(classes)


def checks(node: ast.AST, helpers: Helpers) -> bool:
    """Whether ``node`` asserts, or calls a checking helper, anywhere inside."""
    handed = helpers.functions | helpers.classes
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assert):
            return True
        if isinstance(sub, ast.Call):
            name = callee_name(sub)
            if name is not None and (is_check_name(name) or name in helpers.functions):
                return True
            # A checking function or class handed to a runner:
            # run_state_machine_as_test(Machine), asyncio.to_thread(run_checks, ...).
            if any(isinstance(a, ast.Name) and a.id in handed for a in sub.args):
                return True
    return False


def checking_helpers(trees: Iterable[ast.Module], known: Helpers | None = None) -> Helpers:
    """The functions of ``trees`` that check something, and the classes one of
    whose methods does (a Hypothesis state machine's rules and invariants),
    found to a fixed point."""
    found = Helpers(known.functions, known.classes) if known else Helpers()
    nodes = [n for tree in trees for n in tree.body]
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if isinstance(node, FunctionNode):
                kind = found.functions
                if node.name.startswith("test"):
                    continue
            elif isinstance(node, ast.ClassDef):
                kind = found.classes
            else:
                continue
            if node.name not in kind and checks(node, found):
                kind.add(node.name)
                changed = True
    return found


def is_test(node: FunctionNode, in_class: str | None) -> bool:
    return node.name.startswith("test") and (in_class is None or in_class.startswith("Test"))


def tests_of(tree: ast.Module) -> Iterator[FunctionNode]:
    for node in tree.body:
        if isinstance(node, FunctionNode) and is_test(node, None):
            yield node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, FunctionNode) and is_test(sub, node.name):
                    yield sub


def xfail_problems(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and callee_name(node) == "xfail":
            func = node.func
            imperative = (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "pytest"
            )
            if imperative:
                yield node.lineno, "pytest.xfail() ends the test without a verdict"
                continue
            strict = next((k.value for k in node.keywords if k.arg == "strict"), None)
            if not (isinstance(strict, ast.Constant) and strict.value is True):
                yield node.lineno, "xfail without strict=True (an unexpected pass goes unseen)"


def bare_xfail_decorators(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``@pytest.mark.xfail`` with no call at all (not strict either)."""
    for node in ast.walk(tree):
        if isinstance(node, FunctionNode | ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Attribute) and deco.attr == "xfail":
                    yield deco.lineno, "xfail without strict=True (an unexpected pass goes unseen)"


def audit(root: Path) -> list[str]:
    harness_files = [*sorted((root / "harness").glob("*.py")), root / "conftest.py"]
    shared = [ast.parse(p.read_text(), str(p)) for p in harness_files if p.exists()]
    shared_helpers = checking_helpers(shared)
    problems: list[str] = []
    for path in sorted(root.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        helpers = checking_helpers([tree], shared_helpers)
        for test in tests_of(tree):
            if not checks(test, helpers):
                problems.append(
                    f"{path}:{test.lineno}: {test.name}: no assert and no call of a checking helper"
                )
        for line, why in [*xfail_problems(tree), *bare_xfail_decorators(tree)]:
            problems.append(f"{path}:{line}: {why}")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "tests")
    if not root.is_dir():
        print(f"test_honesty: no such folder {root}", file=sys.stderr)
        return 2
    problems = audit(root)
    for line in problems:
        print(line, flush=True)
    count = sum(1 for _ in root.rglob("test_*.py"))
    if problems:
        print(f"test_honesty: {len(problems)} problem(s) in {count} test files", file=sys.stderr)
        return 1
    print(f"test_honesty: every test in {count} files checks something; no loose xfail")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
