"""Async engines and sessions: SQLite (aiosqlite) for embedded use, PostgreSQL (asyncpg) in
production."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from pacore.config import Settings
from pacore.db.changes import ChangeCounter, change_counter_for
from pacore.errors import ConfigurationError

__all__ = ["Database", "create_engine", "sqlite_path"]

SQLITE_BUSY_TIMEOUT_MS = 10_000


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for another backend or an in-memory database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    """An async engine for ``url``.

    SQLite gets WAL (readers never wait for the writer), enforced foreign keys (cascades) and a
    busy timeout (writers queue instead of failing); its directory is created, and a file keeps
    ``pool_size`` connections open (each is a thread of aiosqlite's, and a new one repeats the
    pragmas, so the pool's default of 5 kept opening and closing them under load). PostgreSQL gets a
    pool of ``pool_size`` connections, checked before use so a restarted server is survived.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        pool: dict[str, Any] = {}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            pool = {"pool_size": pool_size, "max_overflow": pool_size}
        engine = create_async_engine(url, echo=echo, **pool)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class Database:
    """An engine and its session factory. Sessions do not expire objects on commit, so rows
    read inside a session can be turned into records after it."""

    def __init__(
        self, url: str, *, pool_size: int = 10, echo: bool = False,
        changes: ChangeCounter | None = None,
    ) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size, echo=echo)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.changes = changes

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        if not settings.embedded and not settings.database_url:
            raise ConfigurationError(
                "production mode needs PACORE_DATABASE_URL (e.g. "
                "postgresql+asyncpg://user:password@host/db): the embedded SQLite file serves "
                "one machine only"
            )
        url = settings.resolved_database_url
        return cls(
            url, pool_size=settings.database_pool_size,
            changes=change_counter_for(settings.redis_url, sqlite_path(url)),
        )

    async def changed(self) -> None:
        """Announce a committed write that replicas may have cached a read of."""
        if self.changes is not None:
            await self.changes.bump()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session; the caller commits. Whatever is not committed is rolled back on exit."""
        async with self.sessionmaker() as session:
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self.sessionmaker() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.changes is not None:
            await self.changes.aclose()

    def __repr__(self) -> str:
        return f"Database({make_url(self.url).render_as_string(hide_password=True)!r})"
