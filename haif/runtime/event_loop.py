"""The services' event loop: uvloop where it is installed, asyncio's otherwise.

Every service is one event loop doing small socket reads and writes, so the
loop's own cost is a large share of a request's: uvloop (libuv, in C) takes
a good part of it off (``bench/runtime_overhead.py``; docs/benchmarks.md,
"Runtime overhead"). It is a dependency on Linux and macOS; where it is
missing, or with ``HAIF_EVENT_LOOP=asyncio``, the standard loop runs the
same code.
"""

from __future__ import annotations

import asyncio
import os

from haif.configfile import ConfigError

#: Environment variable choosing the loop: ``auto`` (default), ``uvloop``, ``asyncio``.
ENV = "HAIF_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def loop_kind() -> str:
    """``uvloop`` or ``asyncio``: what :func:`new_loop` makes, per ``HAIF_EVENT_LOOP``."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(f"{ENV}=uvloop, but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def new_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop of the kind :func:`loop_kind` names."""
    if loop_kind() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


#: The listen backlog of every service's socket (aiohttp's default is 128).
#: When a standby orchestrator takes over, the gateway's whole backlog of
#: unanswered requests connects to it at once: with 128, connections past the
#: queue were dropped and waited out a connect timeout (seen in the chaos
#: suite's leader kill at 150 req/s). The kernel caps it at ``somaxconn``.
LISTEN_BACKLOG = 4096
