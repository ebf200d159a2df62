"""Running a turn through the Router from the gateway: first event first, then the rest."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deployments import _handles
from pacore.errors import UpstreamError
from pacore.orchestrator import TurnDone, TurnRequest, TurnStarted
from pacore.protocol import CompleteBody
from pacore.types import CompletionChunk

__all__ = ["OpenTurn", "open_turn", "run_whole", "turn_from_complete"]


def turn_from_complete(body: CompleteBody) -> TurnRequest:
    return TurnRequest(
        messages=body.to_messages(), provider=body.provider, model=body.model,
        conversation_id=body.conversation_id, use_memory=body.use_memory,
        temperature=body.temperature, max_tokens=body.max_tokens,
        data_residency=body.data_residency, tags=body.tags, agent_tools=body.agent_tools,
        stream=body.stream,
    )


@dataclass(slots=True)
class OpenTurn:
    """A turn whose first event has arrived: routing and memory have succeeded."""

    started: TurnStarted
    rest: AsyncGenerator[Any, None]
    done: TurnDone | None = None
    parts: list[str] = field(default_factory=list)

    async def chunks(self) -> AsyncIterator[CompletionChunk]:
        async for event in self.rest:
            if isinstance(event, CompletionChunk):
                self.parts.append(event.content)
                yield event
            elif isinstance(event, TurnDone):
                self.done = event
        if self.done is None:
            raise UpstreamError("the answer ended before it was complete")

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()


async def open_turn(gw: Any, user_id: str, turn: TurnRequest) -> OpenTurn:
    """Start the turn and wait for its first event, so that errors before the first token
    (validation, routing, provider down after fallbacks) surface as plain HTTP errors."""
    events = _handles.stream(gw.router, "run", user_id, turn)
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        raise UpstreamError("the router ended the turn without an answer") from None
    except BaseException:
        await events.aclose()
        raise
    if not isinstance(first, TurnStarted):
        await events.aclose()
        raise UpstreamError("the router answered out of order")
    return OpenTurn(first, events)


async def run_whole(gw: Any, user_id: str, turn: TurnRequest) -> tuple[TurnStarted, str, TurnDone]:
    """A turn for a client that does not stream: one call to the Router, one answer."""
    events = await _handles.call(gw.router, "run_whole", user_id, turn)
    started, done = events[0], events[-1]
    if not isinstance(started, TurnStarted) or not isinstance(done, TurnDone):
        raise UpstreamError("the router answered out of order")
    content = "".join(e.content for e in events if isinstance(e, CompletionChunk))
    return started, content, done
