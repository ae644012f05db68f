""".ci/test_honesty.py, the CI check that every test checks something, on small made-up suites."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "test_honesty.py"


@pytest.fixture(scope="module")
def honesty() -> ModuleType:
    spec = importlib.util.spec_from_file_location("test_honesty_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUITE = """
import pytest
from hypothesis.stateful import RuleBasedStateMachine, invariant, run_state_machine_as_test
from harness.checks import verify


def _helper(x):
    assert x


def _indirect(x):
    _helper(x)


def _quiet(x):
    return x


class Machine(RuleBasedStateMachine):
    @invariant()
    def holds(self):
        assert True


def test_asserts():
    assert 1


def test_raises():
    with pytest.raises(ValueError):
        int("x")


def test_named_helpers(client):
    check_output(client)
    expect_reply(client)
    assert_auth_error(client)


def test_module_helper():
    _indirect(1)


def test_harness_helper():
    verify(1)


def test_state_machine():
    run_state_machine_as_test(Machine)


def test_nested():
    def inner():
        assert 1
    inner()


def test_nothing():
    _quiet(1)


async def test_nothing_async(session):
    await session.get("/")


class TestGroup:
    def test_method_nothing(self):
        pass

    def test_method_ok(self):
        assert 1


@pytest.mark.xfail(reason="flaky")
def test_loose_xfail():
    assert 0


@pytest.mark.xfail(strict=False)
def test_explicitly_loose():
    assert 0


@pytest.mark.xfail
def test_bare_xfail():
    assert 0


@pytest.mark.xfail(strict=True, reason="a known bug")
def test_strict_xfail():
    assert 0


def test_imperative_xfail():
    pytest.xfail("later")
    assert 1
"""


def test_offenders_are_listed_and_honest_tests_pass(honesty: ModuleType, tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    (tests / "harness").mkdir(parents=True)
    (tests / "harness" / "checks.py").write_text("def verify(x):\n    assert x\n")
    (tests / "test_suite.py").write_text(SUITE)
    problems = honesty.audit(tests)
    found = sorted((p.split(":")[1], p.split(": ", 1)[1]) for p in problems)
    lines = SUITE.splitlines()

    def at(text: str) -> str:
        """The line number of the line that is exactly ``text``."""
        return str(lines.index(text) + 1)

    no_check = "no assert and no call of a checking helper"
    loose = "xfail without strict=True (an unexpected pass goes unseen)"
    assert found == sorted(
        [
            (at("def test_nothing():"), f"test_nothing: {no_check}"),
            (at("async def test_nothing_async(session):"), f"test_nothing_async: {no_check}"),
            (at("    def test_method_nothing(self):"), f"test_method_nothing: {no_check}"),
            (at('@pytest.mark.xfail(reason="flaky")'), loose),
            (at("@pytest.mark.xfail(strict=False)"), loose),
            (at("@pytest.mark.xfail"), loose),
            (at('    pytest.xfail("later")'), "pytest.xfail() ends the test without a verdict"),
        ]
    )


def test_the_projects_suite_passes() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(ROOT / "tests")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every test in" in done.stdout
