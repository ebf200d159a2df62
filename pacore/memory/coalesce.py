"""Coalescing of background work: items that arrive close together are handled in one call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Collects items for ``wait_s`` after the first of a batch arrives (or until they weigh
    ``max_weight``), then hands the whole batch to ``run`` in one call.

    :meth:`submit` returns when its item's batch is done and raises what that batch raised, so
    a caller can retry its own item. :meth:`start_now` ends the current window early, for
    callers that must see every submitted item handled (a flush, a delete). A batch runs in a
    task of its own: a submitter that is cancelled does not cancel the others' batch.
    """

    def __init__(
        self, run: Callable[[list[T]], Awaitable[None]], *, wait_s: float, max_weight: int
    ) -> None:
        self._run = run
        self._wait_s = wait_s
        self._max_weight = max(1, max_weight)
        self._items: list[T] = []
        self._done: list[asyncio.Future[None]] = []
        self._weight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T, weight: int = 1) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._items.append(item)
        self._done.append(done)
        self._weight += weight
        if self._weight >= self._max_weight:
            self.start_now()
        elif self._timer is None:
            self._timer = loop.call_later(self._wait_s, self.start_now)
        await asyncio.shield(done)

    def start_now(self) -> None:
        """Run the batch collected so far without waiting out its window."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        items, done = self._items, self._done
        self._items, self._done, self._weight = [], [], 0
        task = asyncio.get_running_loop().create_task(self._run_batch(items, done))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_batch(self, items: list[T], done: list[asyncio.Future[None]]) -> None:
        try:
            await self._run(items)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            for d in done:
                if d.done():
                    continue
                if cancelled:
                    d.cancel()
                else:
                    d.set_exception(exc)
                    d.exception()  # a submitter cancelled meanwhile never retrieves it
            if cancelled:
                raise
        else:
            for d in done:
                if not d.done():
                    d.set_result(None)
