"""Cached per-request reads: each replica keeps what it read until any replica announces a
change, so a revocation or a new provider key takes effect on the very next request anywhere."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from pacore.db.changes import FileChangeCounter, ReadCache, RedisChangeCounter, change_counter_for
from pacore.db.engine import Database
from pacore.db.models import Base
from pacore.db.stores import Stores
from pacore.db.stores._base import utcnow
from pacore.security.crypto import AesGcmCipher

REDIS_URL = "redis://127.0.0.1:6379/0"


def _bump_many(path: str, times: int) -> None:
    counter = FileChangeCounter(Path(path))
    for _ in range(times):
        asyncio.run(counter.bump())


async def test_file_counter_is_shared_by_processes(tmp_path: Path) -> None:
    path = tmp_path / "pacore.db.changes"
    reader = FileChangeCounter(path)
    assert await reader.current() == 0
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_bump_many, args=(str(path), 50)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert await reader.current() == 200  # no bump lost between processes
    assert path.stat().st_mode & 0o777 == 0o600
    await reader.aclose()


async def test_counter_choice(tmp_path: Path) -> None:
    assert isinstance(change_counter_for(None, tmp_path / "x.db"), FileChangeCounter)
    redis = change_counter_for(REDIS_URL, tmp_path / "x.db")
    assert isinstance(redis, RedisChangeCounter)
    await redis.aclose()
    assert change_counter_for(None, None) is None


async def test_read_cache_keeps_values_until_a_change(tmp_path: Path) -> None:
    counter = FileChangeCounter(tmp_path / "c")
    cache = ReadCache(counter, max_entries=2)
    loads: list[str] = []

    async def load(key: str) -> str:
        loads.append(key)
        return key.upper()

    for _ in range(3):
        assert await cache.get("a", lambda: load("a")) == "A"
    assert loads == ["a"]
    await FileChangeCounter(tmp_path / "c").bump()  # another replica writes
    assert await cache.get("a", lambda: load("a")) == "A"
    assert loads == ["a", "a"]
    for key in ("b", "c", "a"):  # at most two entries: the oldest goes
        await cache.get(key, lambda k=key: load(k))  # type: ignore[misc]
    assert loads == ["a", "a", "b", "c", "a"]


async def test_without_a_counter_nothing_is_cached() -> None:
    cache = ReadCache(None)
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert [await cache.get("k", load) for _ in range(3)] == [1, 2, 3]


async def test_a_value_loaded_across_a_change_is_not_kept(tmp_path: Path) -> None:
    counter = FileChangeCounter(tmp_path / "c")
    cache = ReadCache(counter)

    async def load_while_changing() -> str:
        await counter.bump()  # a write lands while the read is in flight
        return "maybe stale"

    assert await cache.get("k", load_while_changing) == "maybe stale"
    assert await cache.get("k", _const("fresh")) == "fresh"


def _const(value: str) -> Any:
    async def load() -> str:
        return value

    return load


# ---------------------------------------------------------------- two replicas, one database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres,
                                                                   pytest.mark.redis])])
async def replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Stores, Stores]]:
    """Two replicas' stores over one database, each with its own connection to the counter."""
    key = f"pacore:test:changes:{uuid.uuid4().hex}"
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'pacore.db'}"

        def counter() -> Any:
            return FileChangeCounter(tmp_path / "pacore.db.changes")
    else:
        url = request.getfixturevalue("pg_url")
        await _require_redis()

        def counter() -> Any:
            return RedisChangeCounter(REDIS_URL, key=key)
    dbs = [Database(url, pool_size=2, changes=counter()) for _ in range(2)]
    if request.param == "sqlite":
        async with dbs[0].engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
    else:  # the session's migrated database, emptied
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        async with dbs[0].transaction() as session:
            await session.execute(text(f"TRUNCATE {tables} CASCADE"))
    cipher = AesGcmCipher(os.urandom(32))
    yield Stores(dbs[0], cipher), Stores(dbs[1], cipher)
    for db in dbs:
        await db.dispose()


async def _require_redis() -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception:  # noqa: BLE001
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    finally:
        await client.aclose()


async def test_revocation_reaches_every_replica_at_once(replicas: tuple[Stores, Stores]) -> None:
    a, b = replicas
    user = await a.users.create(f"{uuid.uuid4().hex[:8]}@example.com", "a long password")
    await a.tokens.record("jti-1", user.id, "cli", "api", None)
    for _ in range(3):
        assert await a.tokens.is_active("jti-1")  # cached in replica a after the first
    await b.tokens.revoke(user.id, "jti-1")
    assert not await a.tokens.is_active("jti-1")
    assert not await a.tokens.is_active("unknown-jti")


async def test_unpairing_an_agent_revokes_its_token_on_every_replica(
    replicas: tuple[Stores, Stores],
) -> None:
    a, b = replicas
    user = await a.users.create(f"{uuid.uuid4().hex[:8]}@example.com", "a long password")
    agent = await a.agents.create(user.id, "office box", "agent-jti")
    assert await a.tokens.is_active("agent-jti")
    await b.agents.revoke(user.id, agent.id)
    assert not await a.tokens.is_active("agent-jti")


async def test_a_cached_token_still_expires(replicas: tuple[Stores, Stores]) -> None:
    a, _ = replicas
    user = await a.users.create(f"{uuid.uuid4().hex[:8]}@example.com", "a long password")
    await a.tokens.record("jti-2", user.id, "cli", "api", utcnow() + timedelta(seconds=0.5))
    assert await a.tokens.is_active("jti-2")
    await asyncio.sleep(0.6)
    assert not await a.tokens.is_active("jti-2")  # no write happened; the clock decides


async def test_provider_changes_bump_the_counter(replicas: tuple[Stores, Stores]) -> None:
    a, b = replicas
    changes = a.db.changes
    assert changes is not None
    user = await a.users.create(f"{uuid.uuid4().hex[:8]}@example.com", "a long password")
    before = await changes.current()
    await b.providers.put(user.id, "openai", "openai", api_key="sk-1")
    after_put = await changes.current()
    assert after_put > before
    from pacore.protocol import SettingsBody

    await b.settings.put(user.id, SettingsBody(default_provider="openai"))
    after_settings = await changes.current()
    assert after_settings > after_put
    await b.providers.delete(user.id, "openai")
    assert await changes.current() > after_settings
