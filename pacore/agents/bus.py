"""Cross-replica delivery for the agent hub: pub/sub channels and expiring keys.

Hub replicas never share memory: the replica holding an agent's socket, the replica a response
frame is delivered to and the replica a caller waits on may all differ. They meet on a
:class:`Bus`: channels carry frames (published to whoever subscribes at that moment, lost
otherwise), keys carry presence with expiry. :class:`InMemoryBus` serves a single hub replica;
:class:`RedisBus` serves any number of them through one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

__all__ = ["Bus", "InMemoryBus", "RedisBus", "Subscription"]

log = logging.getLogger(__name__)


class Subscription(Protocol):
    async def get(self, wait_s: float | None = None) -> tuple[str, str] | None:
        """The next ``(channel, message)``, or None when ``wait_s`` seconds pass first."""
        ...


class Bus(Protocol):
    """Channels and keys shared by every hub replica. Names are logical; a bus may prefix them."""

    async def publish(self, channel: str, message: str) -> int:
        """Send ``message`` to the channel's current subscribers; returns how many got it
        (0 means nobody listens). Redis counts one per subscribed process, not per caller."""
        ...

    def subscribe(self, *channels: str) -> AbstractAsyncContextManager[Subscription]:
        """Listen to ``channels``; entering returns once messages published from then on are
        sure to arrive."""
        ...

    async def get(self, key: str) -> str | None: ...

    async def get_many(self, keys: list[str]) -> list[str | None]: ...

    async def put(self, key: str, value: str, *, ttl_s: float | None = None) -> None: ...

    async def swap(self, key: str, value: str, *, ttl_s: float | None = None) -> str | None:
        """Set ``key`` and return the value it held before, atomically."""
        ...

    async def delete(self, *keys: str) -> None: ...

    async def refresh_if(self, key: str, expected: str, *, ttl_s: float) -> bool:
        """Extend the key's life only while it still holds ``expected``."""
        ...

    async def delete_if(self, key: str, expected: str) -> bool:
        """Delete the key only while it still holds ``expected``."""
        ...

    async def add_member(self, key: str, member: str) -> None:
        """Add ``member`` to the set at ``key`` (sets never expire)."""
        ...

    async def remove_member(self, key: str, member: str) -> None: ...

    async def members(self, key: str) -> set[str]: ...

    async def aclose(self) -> None: ...


class _Inbox:
    """One subscriber's queue of ``(channel, message)``."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def put(self, channel: str, message: str) -> None:
        self._queue.put_nowait((channel, message))

    async def get(self, wait_s: float | None = None) -> tuple[str, str] | None:
        try:
            async with asyncio.timeout(wait_s):
                return await self._queue.get()
        except TimeoutError:
            return None


class _Fanout:
    """Local subscribers by channel, shared by both buses."""

    def __init__(self) -> None:
        self._subs: dict[str, set[_Inbox]] = {}

    def add(self, channel: str, inbox: _Inbox) -> bool:
        """Register ``inbox``; True when it is the channel's first local subscriber."""
        subs = self._subs.setdefault(channel, set())
        subs.add(inbox)
        return len(subs) == 1

    def remove(self, channel: str, inbox: _Inbox) -> bool:
        """Unregister ``inbox``; True when the channel has no local subscriber left."""
        subs = self._subs.get(channel)
        if subs is None or inbox not in subs:
            return False
        subs.discard(inbox)
        if subs:
            return False
        del self._subs[channel]
        return True

    def dispatch(self, channel: str, message: str) -> int:
        subs = self._subs.get(channel, ())
        for inbox in subs:
            inbox.put(channel, message)
        return len(subs)


class InMemoryBus:
    """A bus inside one process: correct for exactly one hub replica."""

    def __init__(self) -> None:
        self._fanout = _Fanout()
        self._keys: dict[str, tuple[str, float | None]] = {}
        self._sets: dict[str, set[str]] = {}

    async def publish(self, channel: str, message: str) -> int:
        return self._fanout.dispatch(channel, message)

    @contextlib.asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[Subscription]:
        inbox = _Inbox()
        for channel in channels:
            self._fanout.add(channel, inbox)
        try:
            yield inbox
        finally:
            for channel in channels:
                self._fanout.remove(channel, inbox)

    def _live(self, key: str) -> str | None:
        item = self._keys.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            del self._keys[key]
            return None
        return value

    @staticmethod
    def _deadline(ttl_s: float | None) -> float | None:
        return None if ttl_s is None else time.monotonic() + ttl_s

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def get_many(self, keys: list[str]) -> list[str | None]:
        return [self._live(k) for k in keys]

    async def put(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        self._keys[key] = (value, self._deadline(ttl_s))

    async def swap(self, key: str, value: str, *, ttl_s: float | None = None) -> str | None:
        previous = self._live(key)
        self._keys[key] = (value, self._deadline(ttl_s))
        return previous

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._keys.pop(key, None)

    async def refresh_if(self, key: str, expected: str, *, ttl_s: float) -> bool:
        if self._live(key) != expected:
            return False
        self._keys[key] = (expected, self._deadline(ttl_s))
        return True

    async def delete_if(self, key: str, expected: str) -> bool:
        if self._live(key) != expected:
            return False
        del self._keys[key]
        return True

    async def add_member(self, key: str, member: str) -> None:
        self._sets.setdefault(key, set()).add(member)

    async def remove_member(self, key: str, member: str) -> None:
        self._sets.get(key, set()).discard(member)

    async def members(self, key: str) -> set[str]:
        return set(self._sets.get(key, ()))

    async def aclose(self) -> None:
        self._keys.clear()
        self._sets.clear()


_REFRESH_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisBus:
    """A bus over Redis: keys with expiry, and pub/sub over one shared connection.

    Each process keeps a single pub/sub connection whatever the number of waiting callers; a
    reader task fans messages out to local subscribers, and Redis is told to (un)subscribe only
    when a channel gains its first or loses its last local subscriber. Every key and channel
    name gets ``prefix``, so several platforms (or tests) can share one Redis.
    """

    def __init__(self, url: str, *, prefix: str = "pacore:agents:", confirm_timeout_s: float = 5.0):
        import redis.asyncio as aioredis  # the cloud extra; the agent never builds a RedisBus

        self._redis: Any = aioredis.from_url(url, decode_responses=True)
        self._pubsub: Any = self._redis.pubsub()
        self._prefix = prefix
        self._confirm_timeout_s = confirm_timeout_s
        self._fanout = _Fanout()
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._unconfirmed: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._refresh_if = self._redis.register_script(_REFRESH_IF)
        self._delete_if = self._redis.register_script(_DELETE_IF)

    def _k(self, name: str) -> str:
        return self._prefix + name

    # ------------------------------------------------------------------ channels

    async def publish(self, channel: str, message: str) -> int:
        return int(await self._redis.publish(self._k(channel), message))

    @contextlib.asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[Subscription]:
        inbox = _Inbox()
        try:
            for channel in channels:
                await self._add(channel, inbox)
            yield inbox
        finally:
            for channel in channels:
                await self._remove(channel, inbox)

    async def _add(self, channel: str, inbox: _Inbox) -> None:
        ready = self._ready.get(channel)
        if ready is None:
            ready = self._ready[channel] = asyncio.get_running_loop().create_future()
        if self._fanout.add(channel, inbox):
            # Counted before sending: a confirmation can only follow its own SUBSCRIBE.
            self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
            await self._pubsub.subscribe(self._k(channel))
            self._ensure_reader()
        async with asyncio.timeout(self._confirm_timeout_s):
            await asyncio.shield(ready)

    async def _remove(self, channel: str, inbox: _Inbox) -> None:
        if self._fanout.remove(channel, inbox):
            ready = self._ready.pop(channel, None)
            if ready is not None and not ready.done():
                ready.cancel()
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(self._k(channel))

    def _confirmed(self, channel: str) -> None:
        left = self._unconfirmed.get(channel, 0) - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return
        self._unconfirmed.pop(channel, None)
        ready = self._ready.get(channel)
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        strip = len(self._prefix)
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - redis-py reconnects and resubscribes
                log.warning("agent bus: redis pub/sub read failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if not msg:
                continue
            channel = str(msg["channel"])[strip:]
            if msg["type"] == "message":
                self._fanout.dispatch(channel, msg["data"])
            elif msg["type"] == "subscribe":
                self._confirmed(channel)

    # ------------------------------------------------------------------ keys

    @staticmethod
    def _px(ttl_s: float | None) -> int | None:
        return None if ttl_s is None else max(1, int(ttl_s * 1000))

    async def get(self, key: str) -> str | None:
        value = await self._redis.get(self._k(key))
        return None if value is None else str(value)

    async def get_many(self, keys: list[str]) -> list[str | None]:
        if not keys:
            return []
        return list(await self._redis.mget([self._k(k) for k in keys]))

    async def put(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        await self._redis.set(self._k(key), value, px=self._px(ttl_s))

    async def swap(self, key: str, value: str, *, ttl_s: float | None = None) -> str | None:
        previous = await self._redis.set(self._k(key), value, px=self._px(ttl_s), get=True)
        return None if previous is None else str(previous)

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._redis.delete(*(self._k(k) for k in keys))

    async def refresh_if(self, key: str, expected: str, *, ttl_s: float) -> bool:
        return bool(await self._refresh_if(keys=[self._k(key)], args=[expected, max(1, int(ttl_s * 1000))]))

    async def delete_if(self, key: str, expected: str) -> bool:
        return bool(await self._delete_if(keys=[self._k(key)], args=[expected]))

    async def add_member(self, key: str, member: str) -> None:
        await self._redis.sadd(self._k(key), member)

    async def remove_member(self, key: str, member: str) -> None:
        await self._redis.srem(self._k(key), member)

    async def members(self, key: str) -> set[str]:
        return {str(m) for m in await self._redis.smembers(self._k(key))}

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        await self._redis.aclose()
