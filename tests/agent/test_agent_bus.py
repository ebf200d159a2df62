"""The hub's bus, in memory and over Redis: channels reach whoever listens at that moment, keys
expire, conditional updates hold, and prefixes keep platforms apart."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from pacore.agents.bus import Bus, InMemoryBus, RedisBus

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_bus(prefix: str) -> RedisBus:
    return RedisBus(REDIS_URL, prefix=prefix)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        yield InMemoryBus()
        return
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"test-bus:{uuid.uuid4().hex}:"
    redis_bus = _redis_bus(prefix)
    yield redis_bus
    await redis_bus.aclose()
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_messages_reach_current_subscribers_only(bus: Bus) -> None:
    assert await bus.publish("c1", "before anyone listens") == 0
    async with bus.subscribe("c1", "c2") as one, bus.subscribe("c1") as two:
        assert await bus.publish("c1", "hello") >= 1
        assert await bus.publish("c2", "only one") >= 1
        assert await one.get(5) == ("c1", "hello")
        assert await one.get(5) == ("c2", "only one")
        assert await two.get(5) == ("c1", "hello")
        assert await two.get(0.05) is None
    assert await bus.publish("c1", "after everyone left") == 0


async def test_order_is_kept_on_a_channel(bus: Bus) -> None:
    async with bus.subscribe("ordered") as sub:
        for i in range(50):
            await bus.publish("ordered", str(i))
        got = [await sub.get(5) for _ in range(50)]
    assert [m[1] for m in got if m] == [str(i) for i in range(50)]


async def test_keys_expire_and_update_conditionally(bus: Bus) -> None:
    await bus.put("k", "v1", ttl_s=0.1)
    assert await bus.get("k") == "v1"
    await asyncio.sleep(0.3)
    assert await bus.get("k") is None
    assert await bus.swap("k", "v2", ttl_s=30) is None
    assert await bus.swap("k", "v3", ttl_s=30) == "v2"
    assert await bus.refresh_if("k", "v2", ttl_s=30) is False
    assert await bus.refresh_if("k", "v3", ttl_s=30) is True
    assert await bus.delete_if("k", "v2") is False
    assert await bus.get_many(["k", "missing"]) == ["v3", None]
    assert await bus.delete_if("k", "v3") is True
    assert await bus.get("k") is None
    await bus.put("forever", "x")
    await bus.delete("forever", "never-set")
    assert await bus.get("forever") is None


async def test_sets(bus: Bus) -> None:
    assert await bus.members("s") == set()
    await bus.add_member("s", "a")
    await bus.add_member("s", "b")
    await bus.add_member("s", "a")
    await bus.remove_member("s", "b")
    assert await bus.members("s") == {"a"}


@pytest.mark.redis
async def test_prefixes_keep_platforms_apart() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    tag = uuid.uuid4().hex
    first, second = _redis_bus(f"a-{tag}:"), _redis_bus(f"b-{tag}:")
    try:
        await first.put("k", "first's")
        assert await second.get("k") is None
        async with second.subscribe("c") as sub:
            assert await first.publish("c", "not for you") == 0
            assert await sub.get(0.1) is None
        await first.delete("k")
    finally:
        await first.aclose()
        await second.aclose()
