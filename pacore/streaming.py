"""Stream helpers for the hot path: coalescing chunks that are ready together.

Every chunk that crosses a Serve hop pays that hop's fixed cost, so a hop forwards whatever has
already arrived as one chunk instead of one message per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pacore.types import CompletionChunk

__all__ = ["coalesce", "merge_chunks"]

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
    source: AsyncIterator[CompletionChunk], *, max_items: int = 256
) -> AsyncIterator[CompletionChunk]:
    """Yield ``source``'s chunks, merging those that arrived while the consumer was busy.

    A reader task pulls from ``source`` into a queue; each yield takes everything queued. The
    first chunk is never held back waiting for company. Closing this generator cancels the
    reader and closes ``source``.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def reader() -> None:
        try:
            async for chunk in source:
                queue.put_nowait(chunk)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer side
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    task = asyncio.create_task(reader())
    try:
        while True:
            item = await queue.get()
            batch: list[CompletionChunk] = []
            pending: object = None
            while True:
                if item is _DONE or isinstance(item, BaseException):
                    pending = item
                    break
                assert isinstance(item, CompletionChunk)
                batch.append(item)
                if len(batch) >= max_items or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield merge_chunks(batch)
            if pending is _DONE:
                return
            if isinstance(pending, asyncio.CancelledError):
                raise pending
            if isinstance(pending, BaseException):
                raise pending
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
