"""Coalescer: items arriving within the window run as one batch, errors reach every submitter."""

from __future__ import annotations

import asyncio

import pytest

from pacore.memory.coalesce import Coalescer


class Batches:
    def __init__(self, fail: int = 0) -> None:
        self.seen: list[list[str]] = []
        self.fail = fail

    async def __call__(self, items: list[str]) -> None:
        self.seen.append(items)
        await asyncio.sleep(0)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("down")


async def test_items_within_the_window_run_together() -> None:
    run = Batches()
    window = Coalescer(run, wait_s=0.05, max_weight=100)
    first = asyncio.create_task(window.submit("a"))
    await asyncio.sleep(0.01)
    await asyncio.gather(first, window.submit("b"), window.submit("c"))
    assert run.seen == [["a", "b", "c"]]
    await window.submit("d")  # a later item opens a window of its own
    assert run.seen == [["a", "b", "c"], ["d"]]


async def test_a_full_batch_does_not_wait_out_the_window() -> None:
    run = Batches()
    window = Coalescer(run, wait_s=30, max_weight=3)
    await asyncio.wait_for(
        asyncio.gather(window.submit("a", weight=2), window.submit("b")), timeout=5
    )
    assert run.seen == [["a", "b"]]


async def test_start_now_ends_the_window_early() -> None:
    run = Batches()
    window = Coalescer(run, wait_s=30, max_weight=100)
    pending = asyncio.create_task(window.submit("a"))
    await asyncio.sleep(0)
    window.start_now()
    await asyncio.wait_for(pending, timeout=5)
    assert run.seen == [["a"]]
    window.start_now()  # nothing waiting: nothing runs
    assert run.seen == [["a"]]


async def test_a_failed_batch_fails_every_submitter() -> None:
    window = Coalescer(Batches(fail=1), wait_s=0.01, max_weight=100)
    results = await asyncio.gather(window.submit("a"), window.submit("b"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    await window.submit("c")  # the next batch is unaffected


async def test_a_cancelled_submitter_leaves_the_batch_running() -> None:
    run = Batches(fail=1)
    window = Coalescer(run, wait_s=0.05, max_weight=100)
    leaving = asyncio.create_task(window.submit("a"))
    staying = asyncio.create_task(window.submit("b"))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(ConnectionError):
        await staying
    assert run.seen == [["a", "b"]]
    with pytest.raises(asyncio.CancelledError):
        await leaving
