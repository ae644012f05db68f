"""The development PostgreSQL server (127.0.0.1:5432, user ``postgres``).

Override with ``HAIF_TEST_PG_ADMIN_DSN``. Tests that need it carry the
``postgres`` marker; when the server is unreachable they skip, except under
``CI=true`` where they fail (the PostgreSQL backend must be tested there).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ADMIN_DSN = os.environ.get(
    "HAIF_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def dsn_for(database: str) -> str:
    """The admin DSN pointed at ``database``."""
    return urlunsplit(urlsplit(ADMIN_DSN)._replace(path=f"/{database}"))


def pg_unavailable(error: str) -> NoReturn:
    """Skip the test, or fail it under ``CI=true``."""
    parts = urlsplit(ADMIN_DSN)  # host and port only: never print a password
    message = f"PostgreSQL is unreachable at {parts.hostname}:{parts.port or 5432}: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the PostgreSQL backend must be tested)", pytrace=False)
    pytest.skip(message)


async def pg_admin(sql: str) -> None:
    """Run ``sql`` on the admin database (CREATE / DROP DATABASE)."""
    con = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await con.execute(sql)
    finally:
        await con.close()


@contextlib.asynccontextmanager
async def fresh_database(prefix: str) -> AsyncIterator[str]:
    """A new, uniquely named database on the server (its DSN), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        await pg_admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # refused, timed out, auth: no server to test against
        pg_unavailable(f"{type(exc).__name__}: {exc}")
    try:
        yield dsn_for(name)
    finally:
        await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
