"""The agent tool loop: a turn whose model may call the tools the user's on-prem agent declared.

The agent's tools join the request's own. While the model's answer ends in calls of the agent's
tools, each call runs on the agent (through the hub), the assistant message and one ``tool``
message per result are appended, and the provider is asked again, at most ``max_rounds`` times.
A call naming one of the request's own tools is the client's to run: it ends the turn and is
returned as an ordinary tool call. Any other name goes to the agent, which refuses what it did
not declare; refusals and tool failures reach the model as the tool's result, never as a crash.

Content streams to the client as it arrives (an answer is never held back); tool-call pieces are
held until their round ends, so the agent's calls never reach the client. Models put no text in
a round that calls tools, except for the odd preface ("let me look that up"), which is shown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pacore.errors import BadRequestError, PACoreError, UpstreamError
from pacore.routing import Target
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    Message,
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
    Usage,
)

__all__ = ["MAX_TOOL_ROUNDS", "AgentTools", "ToolLoop"]

MAX_TOOL_ROUNDS = 5

# One round of the provider call: the request, and the target that answered the previous round
# (None for the first round, which may fall back to another provider).
RoundCall = Callable[
    [CompletionRequest, Target | None], AsyncIterator[tuple[Target, CompletionChunk]]
]


class AgentTools(Protocol):
    """The hub's tool side, as the orchestrator reaches it."""

    async def tools(self, user_id: str, agent_id: str) -> list[ToolDefinition]:
        """The tools ``user_id``'s agent declared (404 if not theirs, 503 if offline)."""
        ...

    async def call_tool(
        self, user_id: str, agent_id: str, name: str, arguments: dict[str, Any]
    ) -> Any: ...


class ToolLoop:
    """One turn's rounds with one agent's tools."""

    def __init__(
        self, hub: AgentTools, user_id: str, agent_id: str, declared: list[ToolDefinition],
        client_tools: list[ToolDefinition] | None, *, max_rounds: int = MAX_TOOL_ROUNDS,
    ) -> None:
        self._hub, self.user_id, self.agent_id = hub, user_id, agent_id
        self.declared = declared
        self.client_tools = list(client_tools or [])
        self.max_rounds = max_rounds
        self.transcript: list[Message] = []
        self.final_text = ""

    @classmethod
    async def open(
        cls, hub: AgentTools, user_id: str, agent_id: str,
        client_tools: list[ToolDefinition] | None,
    ) -> ToolLoop:
        declared = list(await hub.tools(user_id, agent_id))
        clash = sorted({t.name for t in declared} & {t.name for t in client_tools or []})
        if clash:
            raise BadRequestError(
                f"tools named both by the request and by agent '{agent_id}': {', '.join(clash)}",
                param="tools",
            )
        return cls(hub, user_id, agent_id, declared, client_tools)

    @property
    def tools(self) -> list[ToolDefinition]:
        """What the model is offered: the request's own tools and the agent's."""
        return [*self.client_tools, *self.declared]

    async def run(
        self, request: CompletionRequest, call: RoundCall
    ) -> AsyncIterator[tuple[Target, CompletionChunk]]:
        """The turn's chunks as the client sees them; usage is the running total of all rounds.
        :attr:`transcript` ends up holding the rounds' assistant and tool messages, and
        :attr:`final_text` the last round's content."""
        messages = list(request.messages)
        target: Target | None = None
        spent = Usage()
        for round_no in range(self.max_rounds + 1):
            current = _Round()
            chunks = call(request.model_copy(update={"messages": messages}), target)
            async for answered, chunk in chunks:
                target = answered
                current.add(chunk)
                usage = spent + chunk.usage if chunk.usage is not None else None
                yield answered, chunk.model_copy(update={"tool_calls": None, "usage": usage})
            spent = spent + current.usage
            calls = current.tool_calls()
            if not calls:
                self.final_text = current.text()
                return
            names = {t.name for t in self.client_tools}
            for_agent = [c for c in calls if c.name not in names]
            for_client = [c for c in calls if c.name in names]
            if for_client or round_no == self.max_rounds:
                break
            step = [Message(role="assistant", content=current.text(), tool_calls=calls),
                    *await self._run_all(for_agent)]
            messages += step
            self.transcript += step
        if not for_client:
            raise UpstreamError(
                f"the model was still calling the agent's tools after {self.max_rounds} rounds",
                code="tool_rounds_exceeded",
            )
        # The client runs its own calls; the agent's in the same round run now, and are kept
        # with the turn.
        if for_agent:
            self.transcript += [Message(role="assistant", content=current.text(),
                                        tool_calls=for_agent), *await self._run_all(for_agent)]
        self.final_text = "" if for_agent else current.text()
        assert target is not None
        deltas = [ToolCallDelta(index=i, id=c.id, name=c.name, arguments=c.arguments)
                  for i, c in enumerate(for_client)]
        yield target, CompletionChunk(tool_calls=deltas, finish_reason="tool_calls")

    async def _run_all(self, calls: list[ToolCall]) -> list[Message]:
        results = await asyncio.gather(*(self._run(c) for c in calls))
        return [Message(role="tool", content=r, tool_call_id=c.id) for c, r in zip(calls, results, strict=True)]

    async def _run(self, call: ToolCall) -> str:
        """The call's result as the model reads it: the agent's JSON, or the refusal."""
        try:
            arguments = json.loads(call.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError
        except ValueError:
            return _refusal(BadRequestError(
                f"the arguments of '{call.name}' are not a JSON object", code="invalid_arguments"
            ))
        try:
            result = await self._hub.call_tool(self.user_id, self.agent_id, call.name, arguments)
        except PACoreError as exc:
            return _refusal(exc)
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


def _refusal(exc: PACoreError) -> str:
    return json.dumps({"error": {"type": exc.type, "code": exc.code, "message": exc.message}},
                      ensure_ascii=False)


class _Round:
    """One provider answer: its text, its tool calls assembled from their pieces, its usage."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.usage = Usage()

    def add(self, chunk: CompletionChunk) -> None:
        if chunk.content:
            self.parts.append(chunk.content)
        for d in chunk.tool_calls or []:
            call = self.calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] = d.name or call["name"]
            call["arguments"] += d.arguments
        if chunk.usage is not None:
            self.usage = chunk.usage

    def text(self) -> str:
        return "".join(self.parts)

    def tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"] or "{}")
            for i, c in sorted(self.calls.items())
        ]
