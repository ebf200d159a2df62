"""Database fixtures for the integration suites: SQLite in a temporary file, and PostgreSQL at
127.0.0.1:5432 in a database of this test session's own (other suites share the server)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from pacore.db.engine import Database
from pacore.db.migrate import upgrade
from pacore.db.models import Base
from pacore.db.stores import Stores
from pacore.security.crypto import AesGcmCipher
from pacore.usage import PriceTable

T = TypeVar("T")

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
PG_ADMIN_DB = "test"


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even where an event loop is running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=5
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it answers."""
    import asyncpg

    try:
        run_async(lambda: _admin("SELECT 1"))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} (database {PG_ADMIN_DB!r}) did not answer: {exc}"
    return None


@contextmanager
def temp_pg_database(prefix: str = "pacore_t") -> Iterator[str]:
    """A new, uniquely named, empty PostgreSQL database; its async URL; dropped afterwards."""
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    name = f"{prefix}_{secrets.token_hex(6)}"
    run_async(lambda: _admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        run_async(lambda: _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database for the whole test session."""
    with temp_pg_database() as url:
        upgrade(url)
        yield url


async def _truncate(db: Database) -> None:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with db.transaction() as session:
        from sqlalchemy import text

        await session.execute(text(f"TRUNCATE {tables} CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Database]:
    """An empty, migrated database on each backend."""
    if request.param == "sqlite":
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'pacore.db'}")
        async with database.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
    else:
        database = Database(request.getfixturevalue("pg_url"), pool_size=5)
        await _truncate(database)
    yield database
    await database.dispose()


@pytest.fixture
def master_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def stores(db: Database, master_key: bytes) -> Stores:
    return Stores(db, AesGcmCipher(master_key), PriceTable())


@pytest.fixture
def empty_pg_url() -> Iterator[str]:
    """A fresh, empty (never migrated) PostgreSQL database for one test."""
    with temp_pg_database("pacore_empty") as url:
        yield url
