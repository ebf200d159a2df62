"""Alembic migrations on an empty SQLite file and an empty PostgreSQL database: upgrade builds
exactly the models' schema, downgrade removes it, and both run from inside an event loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from typer.testing import CliRunner

from pacore.cli.admin import register
from pacore.db.engine import Database
from pacore.db.migrate import current_revision, downgrade, head_revision, upgrade
from pacore.db.models import Base
from pacore.db.stores import Stores
from pacore.security.crypto import AesGcmCipher

TABLES = {t.name for t in Base.metadata.sorted_tables}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'dir' / 'pacore.db'}"
    else:
        yield request.getfixturevalue("empty_pg_url")


async def _schema(url: str) -> tuple[set[str], list[Any]]:
    """The tables in the database, and its differences from the models."""
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            diff = await conn.run_sync(
                lambda c: compare_metadata(
                    MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await db.dispose()
    return tables, diff


async def test_upgrade_builds_the_models_schema_and_downgrade_removes_it(empty_url: str) -> None:
    # Called from inside this test's running event loop on purpose.
    assert current_revision(empty_url) is None
    upgrade(empty_url)
    assert current_revision(empty_url) == head_revision()
    tables, diff = await _schema(empty_url)
    assert TABLES <= tables
    assert diff == [], f"the migrations and the models disagree: {diff}"

    db = Database(empty_url)
    try:
        stores = Stores(db, AesGcmCipher(b"k" * 32))
        user = await stores.users.create("m@example.com", "password")
        conv = await stores.conversations.create(user.id)
        assert (await stores.conversations.get(user.id, conv.id)).id == conv.id
    finally:
        await db.dispose()

    downgrade(empty_url, "base")
    assert current_revision(empty_url) is None
    tables, _ = await _schema(empty_url)
    assert tables & TABLES == set()

    upgrade(empty_url)  # and back up again, from a downgraded database
    tables, diff = await _schema(empty_url)
    assert TABLES <= tables and diff == []


def test_upgrade_outside_an_event_loop(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'sync.db'}"
    upgrade(url)
    upgrade(url)  # already at head: nothing to do
    assert current_revision(url) == head_revision()
    downgrade(url)
    assert current_revision(url) is None


def test_db_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACORE_DATABASE_URL", raising=False)
    monkeypatch.delenv("PACORE_CONFIG_FILE", raising=False)
    monkeypatch.setenv("PACORE_DATA_DIR", str(tmp_path / "data"))
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"at revision {head_revision()}" in result.output
    assert (tmp_path / "data" / "pacore.db").exists()
    assert (tmp_path / "data").stat().st_mode & 0o077 == 0

    result = runner.invoke(app, ["db", "current"])
    assert result.exit_code == 0 and f"at {head_revision()}, newest {head_revision()}" in result.output

    result = runner.invoke(app, ["db", "downgrade", "--revision", "base"])
    assert result.exit_code == 0 and "base (empty)" in result.output

    other = tmp_path / "elsewhere.db"
    result = runner.invoke(app, ["db", "upgrade", "--url", f"sqlite+aiosqlite:///{other}"])
    assert result.exit_code == 0 and other.exists()

    result = runner.invoke(app, ["db", "upgrade", "--revision", "no-such-revision"])
    assert result.exit_code == 1 and "error:" in result.output
