"""Keep the garbage collector's full passes short in a long-running service.

A service imports a lot (aiohttp, OpenTelemetry, pydantic, DuckDB, pyarrow,
numpy): a few hundred thousand objects that live as long as the process.
CPython's full (generation 2) collection walks every one of them each time:
40-70 ms per pass in each service under load on the 2-core dev machine,
a stall that every request in flight waits out (it was the p99 of
``bench/runtime_overhead.py``). Once a service has started,
:func:`freeze_after_startup` moves what exists then into the permanent
generation that the collector skips, so a full pass walks only what was
made since. Cycles among the frozen objects are never collected, which is
what one wants of modules, classes and configuration.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Awaitable

from aiohttp import web


def freeze_heap() -> None:
    """Collect what is garbage now, then hide everything left from later collections."""
    gc.collect()
    gc.freeze()


async def _freeze(_app: web.Application) -> None:
    freeze_heap()


async def freeze_after_startup(
    app: web.Application | Awaitable[web.Application],
) -> web.Application:
    """``app`` (built, or being built), which freezes the heap after its other startup hooks.

    Pass the result to ``web.run_app``.
    """
    built = await app if inspect.isawaitable(app) else app
    built.on_startup.append(_freeze)
    return built
