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


async def coalesce(source: AsyncIterator[T], *, max_items: int = 256) -> AsyncIterator[T]:
    """Yield ``source``'s items, merging runs of chunks that arrived while the consumer was busy.

    A reader task pulls from ``source`` into a queue; each yield takes every chunk queued. Items
    that are not chunks (meta events) pass through unmerged and in order. The first chunk is
    never held back waiting for company. Closing this generator cancels the reader and closes
    ``source``.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def reader() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer side
            queue.put_nowait(_Failure(exc))
        finally:
            queue.put_nowait(_DONE)

    task = asyncio.create_task(reader())
    try:
        item: object = await queue.get()
        while True:
            run: list[CompletionChunk] = []
            while isinstance(item, CompletionChunk):
                run.append(item)
                if len(run) >= max_items or queue.empty():
                    item = None
                    break
                item = queue.get_nowait()
            if run:
                yield merge_chunks(run)  # type: ignore[misc]
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


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
