"""Usage entries queued off the response path reach the database in batches, on both backends."""

from __future__ import annotations

import asyncio

from pacore.db.stores import Stores
from pacore.db.stores.usage import UsageEntry
from pacore.usage_writer import UsageWriter


async def test_batched_usage_lands_and_is_priced(stores: Stores):
    user = await stores.users.create("usage@example.com", "password123")
    writer = UsageWriter(stores.usage, interval_s=0.05, max_batch=7)
    for i in range(20):
        writer.add(UsageEntry(user.id, "openai", "gpt-4o", 1000, 100 + i, 12.5))
    writer.add(UsageEntry(user.id, "cpu", "tiny", 10, 10, 3.0, "error", kind="cpu"))
    await asyncio.sleep(0.3)  # the timer flushes without being asked
    summary = await stores.usage.summary(user.id)
    assert summary.requests == 21
    await writer.aclose()
    assert writer.dropped == 0


async def test_close_flushes_what_is_queued(stores: Stores):
    user = await stores.users.create("usage2@example.com", "password123")
    writer = UsageWriter(stores.usage, interval_s=60)
    for _ in range(3):
        writer.add(UsageEntry(user.id, "anthropic", "claude-sonnet-4", 10, 5, 1.0))
    await writer.aclose()
    assert (await stores.usage.summary(user.id)).requests == 3


async def test_queue_is_bounded(stores: Stores):
    writer = UsageWriter(stores.usage, interval_s=60, max_queued=2)
    user = await stores.users.create("usage3@example.com", "password123")
    for _ in range(5):
        writer.add(UsageEntry(user.id, "openai", "gpt-4o", 1, 1, 1.0))
    assert writer.dropped == 3
    await writer.aclose()
