"""Usage logging off the response path: entries are queued and written in batches.

One INSERT per completion would put a database write on every request; the writer instead
flushes whatever has queued every ``interval_s`` (or sooner when ``max_batch`` are waiting), in
one transaction, and flushes the rest when it is closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime

from pacore.db.stores.usage import UsageEntry, UsageStore

__all__ = ["UsageWriter"]

logger = logging.getLogger("pacore.usage")


class UsageWriter:
    def __init__(
        self, store: UsageStore, *, interval_s: float = 0.5, max_batch: int = 500,
        max_queued: int = 100_000,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._queue: list[UsageEntry] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def add(self, entry: UsageEntry) -> None:
        if len(self._queue) >= self._max_queued:
            self.dropped += 1  # the database is far behind: bounded memory beats a crash
            return
        if entry.at is None:
            entry = dataclasses.replace(entry, at=datetime.now(UTC))
        self._queue.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def _run(self) -> None:
        while self._queue:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                await self._store.record_many(batch)
            except Exception:  # usage logs must never take a request down
                logger.exception("writing %d usage entries failed; they are dropped", len(batch))

    async def aclose(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()

