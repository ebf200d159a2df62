"""Schema migrations run from code: ``upgrade``/``downgrade`` an Alembic revision for a URL."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from pacore.db.engine import sqlite_path

__all__ = ["alembic_config", "current_revision", "downgrade", "head_revision", "upgrade"]

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` that needs no ini file."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (creating a SQLite file's directory).

    Safe to call from inside a running event loop: Alembic's async environment runs its own
    loop, so it is then run in a worker thread and this call blocks until it is done.
    """
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    _off_loop(lambda: command.upgrade(alembic_config(url), revision))


def downgrade(url: str, revision: str = "-1") -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops every table)."""
    _off_loop(lambda: command.downgrade(alembic_config(url), revision))


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None, "the migrations directory holds no revision"
    return head


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at, or None when it was never migrated."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None  # rather than creating an empty file just to look inside

    async def read() -> str | None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_revision()
                )
        finally:
            await engine.dispose()

    result: str | None = _off_loop(lambda: asyncio.run(read()))
    return result


def _off_loop(fn: Callable[[], T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pacore-migrate") as pool_:
        return pool_.submit(fn).result()
