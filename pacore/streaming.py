"""Stream helpers for the hot path: coalescing chunks that are ready together.

Every chunk that crosses a Serve hop pays that hop's fixed cost, so a hop forwards whatever has
already arrived as one chunk instead of one message per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from pacore.types import CompletionChunk

__all__ = ["coalesce", "merge_chunks"]

T = TypeVar("T")

_DONE = object()


def merge_chunks(chunks: list[CompletionChunk]) -> CompletionChunk:
    """One chunk equivalent to ``chunks`` in order (content joined, deltas kept in order)."""
    if len(chunks) == 1:
        return chunks[0]
    content = "".join(c.content for c in chunks)
    tool_calls = [d for c in chunks for d in (c.tool_calls or [])] or None
    finish = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), None)
    usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)
    model = next((c.model for c in reversed(chunks) if c.model), None)
    return CompletionChunk(
        content=content, tool_calls=tool_calls, finish_reason=finish, usage=usage, model=model
    )


async def coalesce(
    source: AsyncIterator[T], *, linger_s: float = 0.0, max_items: int = 256
) -> AsyncIterator[T]:
    """Yield ``source``'s items, merging runs of chunks into one.

    A reader task pulls from ``source`` into a queue. The first chunk goes out at once; after
    it, a run takes every chunk queued and, with ``linger_s``, those arriving until ``linger_s``
    after the previous message went out — so a hop sends at most one message per ``linger_s``
    while a fast answer streams, and an answer that streams slower than that passes chunk by
    chunk, unchanged. Items that are not chunks (meta events, the end) pass through unmerged
    and in order, and end a run at once. Closing this generator cancels the reader and closes
    ``source``.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def reader() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer side
            queue.put_nowait(_Failure(exc))
        finally:
            queue.put_nowait(_DONE)

    task = asyncio.create_task(reader())
    last_sent: float | None = None  # when the previous run went out; None before the first
    try:
        item: object = await queue.get()
        while True:
            if isinstance(item, CompletionChunk):
                deadline = None if last_sent is None else last_sent + linger_s
                run, item = await _take_run(queue, item, deadline, max_items, loop)
                yield merge_chunks(run)  # type: ignore[misc]
                last_sent = loop.time()
                if item is None:
                    item = await queue.get()
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
            item = await queue.get()
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - closing must not mask the outcome
                pass


async def _take_run(
    queue: asyncio.Queue[object], first: CompletionChunk, deadline: float | None,
    max_items: int, loop: asyncio.AbstractEventLoop,
) -> tuple[list[CompletionChunk], object]:
    """``first`` and the chunks after it that are queued or arrive before ``deadline``; and the
    item that ended the run (None when the run ended for lack of chunks)."""
    run = [first]
    while len(run) < max_items:
        if not queue.empty():
            item = queue.get_nowait()
        elif deadline is not None and (remaining := deadline - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                break
        else:
            break
        if not isinstance(item, CompletionChunk):
            return run, item
        run.append(item)
    return run, None


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
