"""tests/harness/require.py: a claimed component that is missing skips here, fails in CI."""

from __future__ import annotations

import pytest
from harness.require import require

MISSING = "haif_no_such_module_for_the_test"


def test_a_present_component_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require("json", extra="test").dumps([1]) == "[1]"


def test_a_missing_component_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=rf"{MISSING} is not installed .*haif\[torch\]"):
        require(MISSING)


def test_a_missing_component_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: this component must be tested"):
        require(MISSING, extra="otlp")
