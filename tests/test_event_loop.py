"""The services' event loop: uvloop by default where installed, asyncio on request."""

from __future__ import annotations

import asyncio

import pytest

from haif.configfile import ConfigError
from haif.runtime.event_loop import ENV, loop_kind, new_loop


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "uvloop"),
        ("", "uvloop"),
        ("auto", "uvloop"),
        ("uvloop", "uvloop"),
        ("AsyncIO", "asyncio"),
    ],
)
def test_the_loop_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, kind: str
) -> None:
    pytest.importorskip("uvloop")
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    assert loop_kind() == kind
    loop = new_loop()
    try:
        assert type(loop).__module__.split(".")[0] == kind
        assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
    finally:
        loop.close()


def test_an_unknown_loop_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "trio")
    with pytest.raises(ConfigError, match=r"HAIF_EVENT_LOOP='trio': expected one of auto, uvloop"):
        loop_kind()
