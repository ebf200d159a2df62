"""How replicas learn that what they cached from the database is stale.

Requests read the same few rows again and again: is this token still active, which providers
and settings does this user have. Replicas keep those in memory (:class:`ReadCache`) and ask a
shared *change counter* on each request whether anything they cache has changed since they read
it; every write that could change such a row bumps the counter after it commits. Asking costs a
memory read (embedded) or one Redis GET, never a database query, and a bump is seen by every
replica on the next request: a revoked token is refused at once, a new provider key is used at
once.

* :class:`FileChangeCounter` (embedded mode, SQLite): an 8-byte counter in a file beside the
  database, memory-mapped by every process. The database is a local file, so every replica
  that uses it runs on this host and shares the page.
* :class:`RedisChangeCounter`: a Redis key, for replicas spread over several hosts.
* Neither (PostgreSQL without Redis): nothing is cached; every request reads the database.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pacore.lru import Lru

__all__ = [
    "ChangeCounter",
    "FileChangeCounter",
    "ReadCache",
    "RedisChangeCounter",
    "change_counter_for",
]

logger = logging.getLogger("pacore.db")

T = TypeVar("T")

_COUNTER = struct.Struct("<Q")
REDIS_KEY = "pacore:db:changes"


class ChangeCounter(Protocol):
    async def current(self) -> int:
        """The number of changes so far; any difference from an earlier answer means stale."""

    async def bump(self) -> None:
        """Announce a committed change."""

    async def aclose(self) -> None: ...


class FileChangeCounter:
    """A counter shared by the processes of one host through a memory-mapped file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_size < _COUNTER.size:
                    os.ftruncate(fd, _COUNTER.size)
                fcntl.flock(fd, fcntl.LOCK_UN)
                self._map = mmap.mmap(fd, _COUNTER.size, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        return self._map

    def read(self) -> int:
        value: int = _COUNTER.unpack_from(self._mapped(), 0)[0]
        return value

    async def current(self) -> int:
        return self.read()

    async def bump(self) -> None:
        mapped = self._mapped()
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # bumps from several processes never lose one
            _COUNTER.pack_into(mapped, 0, (_COUNTER.unpack_from(mapped, 0)[0] + 1) % 2**64)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class RedisChangeCounter:
    """A counter in Redis, shared by replicas on any host."""

    def __init__(self, url: str, key: str = REDIS_KEY) -> None:
        import redis.asyncio as aioredis  # the cloud extra

        self._redis: Any = aioredis.from_url(url)
        self._key = key

    async def current(self) -> int:
        value = await self._redis.get(self._key)
        return int(value) if value is not None else 0

    async def bump(self) -> None:
        await self._redis.incr(self._key)

    async def aclose(self) -> None:
        await self._redis.aclose()


def change_counter_for(redis_url: str | None, sqlite_file: Path | None) -> ChangeCounter | None:
    """Redis when replicas share one, else a file beside an embedded database, else none."""
    if redis_url:
        return RedisChangeCounter(redis_url)
    if sqlite_file is not None:
        return FileChangeCounter(sqlite_file.with_name(sqlite_file.name + ".changes"))
    logger.info("no Redis configured: per-request reads (tokens, providers) are not cached")
    return None


class ReadCache:
    """Values read from the database (never None), kept until the change counter moves (and at
    most ``max_entries`` of them). Without a counter nothing is kept."""

    def __init__(self, changes: ChangeCounter | None, max_entries: int = 10_000) -> None:
        self._changes = changes
        self._seen: int | None = None
        self._entries: Lru[Hashable, Any] = Lru(max_entries)

    async def get(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        if self._changes is None:
            return await load()
        seen = await self._changes.current()
        if seen != self._seen:
            self._entries.clear()
            self._seen = seen
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        value = await load()
        # A change announced while loading may not be in what was loaded: keep it only if the
        # counter has not moved since (checked on the next request at the latest).
        if self._seen == seen:
            self._entries.put(key, value)
        return value
