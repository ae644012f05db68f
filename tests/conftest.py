"""Fixtures shared by the test modules.

The harness itself (live clusters, HTTP and SSE helpers, PostgreSQL, CLI
runners) is the ``harness`` package next to this file; test modules import it
(``from harness.cluster import LiveCluster``) and never import one another.

Markers (registered in pyproject.toml): ``cluster`` starts service processes
or a live cluster, ``postgres`` needs the PostgreSQL server, ``slow`` takes
more than a few seconds. ``make test-fast`` leaves all three out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from haif.analysis.queueing import QueueingCheck, queueing_checks


@pytest.fixture
def http_timeout_s() -> float:
    """Total time allowed per request of ``session``; a module may override it."""
    return 30.0


@pytest_asyncio.fixture(loop_scope="module")
async def session(http_timeout_s: float) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client on the module's event loop (where the live cluster fixtures run)."""
    timeout = aiohttp.ClientTimeout(total=http_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        yield s


@pytest.fixture(scope="session")
def quick_queueing() -> list[QueueingCheck]:
    """The queueing checks' quick points, run once (about a minute) for every test that
    reads them (tests/test_validation.py, and the README's table in test_validate.py)."""
    return queueing_checks(quick=True)
