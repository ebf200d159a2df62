"""The request pipeline the Router runs: memory context, routing, the provider call, the turn.

Every collaborator is a small protocol, so the pipeline runs the same against Serve handles (in
the graph) and against in-process objects (in unit tests). The pipeline yields events: one
:class:`TurnStarted`, then :class:`~pacore.types.CompletionChunk` s, then one :class:`TurnDone`.
Storing the turn and its usage happens after the answer is complete, off the response path.
A turn that names one of the user's agents in ``agent_tools`` makes its provider calls through
:class:`~pacore.tool_loop.ToolLoop`, which runs the agent's tools between rounds.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pacore.errors import NotFoundError, PACoreError
from pacore.metrics import record_first_token, record_provider_error, record_turn
from pacore.routing import (
    QueryClassifier,
    Residency,
    RouteDecision,
    RoutingContext,
    Target,
    choose_route,
)
from pacore.tool_loop import AgentTools, ToolLoop
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    Message,
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
    Usage,
)

__all__ = [
    "AgentTools",
    "ContextResult",
    "MemoryClient",
    "Orchestrator",
    "ProviderClient",
    "RoutingSource",
    "TurnDone",
    "TurnEvent",
    "TurnRequest",
    "TurnStarted",
    "UsageSink",
]

logger = logging.getLogger("pacore.orchestrator")


@dataclass(slots=True)
class TurnRequest:
    """One completion as the Router receives it (wire formats already translated)."""

    messages: list[Message]
    provider: str | None = None
    model: str | None = None
    conversation_id: str | None = None
    use_memory: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: str | None = None
    data_residency: Residency = None
    tags: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    agent_tools: str | None = None  # an agent of the user's whose tools the model may call
    stream: bool = True  # False: the client wants the whole answer, fetched in one call
    request_id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex)


@dataclass(slots=True)
class TurnStarted:
    id: str
    conversation_id: str
    provider: str
    model: str | None
    route_reason: str
    context: list[tuple[str, float]]


@dataclass(slots=True)
class TurnDone:
    id: str
    conversation_id: str
    provider: str
    model: str
    usage: Usage
    finish_reason: str
    tool_calls: list[ToolCall] | None
    latency_ms: float


TurnEvent = TurnStarted | CompletionChunk | TurnDone


@dataclass(slots=True)
class ContextResult:
    system_text: str | None
    refs: list[tuple[str, float]]


class MemoryClient(Protocol):
    async def embed_query(self, text: str) -> list[float]: ...

    async def context_for(
        self, user_id: str, vector: list[float], messages: list[Message], conversation_id: str | None
    ) -> ContextResult: ...

    async def check_conversation(self, user_id: str, conversation_id: str) -> None:
        """Raise NotFoundError unless the conversation exists and is the user's."""

    def store_turn(
        self, user_id: str, conversation_id: str, messages: list[Message], *, provider: str,
        model: str, usage: Usage, latency_ms: float, tags: list[str] | None, new: bool,
        known_vector: tuple[str, list[float]] | None = None,
    ) -> None:
        """Fire and forget: write the turn (SQL first, vectors later). ``known_vector`` is the
        query's text and embedding, so that the stored question is not encoded again."""


class RoutingSource(Protocol):
    async def routing_context(
        self, user_id: str, turn: TurnRequest | None = None
    ) -> RoutingContext:
        """The user's targets and preferences; ``turn`` lets the source skip lookups that this
        request cannot need (e.g. which agents are online, unless residency may pick one)."""


class ProviderClient(Protocol):
    def stream(
        self, user_id: str, target: Target, request: CompletionRequest
    ) -> AsyncIterator[CompletionChunk]: ...

    async def complete(
        self, user_id: str, target: Target, request: CompletionRequest
    ) -> CompletionResult:
        """The whole answer in one call (for clients that do not stream)."""


class UsageSink(Protocol):
    def record(
        self, user_id: str, provider: str, model: str, usage: Usage, latency_ms: float, status: str
    ) -> None: ...


class Orchestrator:
    """Runs one turn: context → route → call (with fallback before the first token) → store."""

    def __init__(
        self,
        *,
        routing: RoutingSource,
        providers: ProviderClient,
        memory: MemoryClient | None,
        usage: UsageSink | None = None,
        classifier: QueryClassifier | None = None,
        agent_tools: AgentTools | None = None,
    ) -> None:
        self._routing = routing
        self._providers = providers
        self._memory = memory
        self._usage = usage
        self._classifier = classifier
        self._agent_tools = agent_tools

    def set_classifier(self, classifier: QueryClassifier) -> None:
        self._classifier = classifier

    async def run(self, user_id: str, turn: TurnRequest) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        new_conversation = turn.conversation_id is None
        conversation_id = turn.conversation_id or str(uuid.uuid4())
        ctx_task = asyncio.ensure_future(self._routing.routing_context(user_id, turn))
        try:
            vector, context = await self._memory_context(user_id, turn)
            decision = self._route(await ctx_task, turn, vector)
        finally:
            if not ctx_task.done():
                ctx_task.cancel()
        logger.debug(
            "route user=%s provider=%s model=%s reason=%s",
            user_id, decision.target.provider, decision.target.model, decision.reason,
        )
        loop = await self._tool_loop(user_id, turn)
        messages = list(turn.messages)
        if context.system_text:
            messages.insert(0, Message(role="system", content=context.system_text))
        request = CompletionRequest(
            messages=messages, model=decision.target.model, temperature=turn.temperature,
            top_p=turn.top_p, max_tokens=turn.max_tokens, stop=turn.stop,
            tools=loop.tools if loop is not None else turn.tools,
            tool_choice=turn.tool_choice, extra=turn.extra,
        )
        answer = _Answer()
        target = decision.target
        status = "error"
        try:
            async for target, chunk in self._call(
                user_id, decision, request, loop, stream=turn.stream
            ):
                if answer.first:
                    answer.first = False
                    record_first_token(target.kind, target.model, time.perf_counter() - started)
                    yield TurnStarted(
                        turn.request_id, conversation_id, target.provider, target.model,
                        decision.reason if target == decision.target else
                        f"fallback after '{decision.target.provider}' failed", context.refs,
                    )
                answer.add(chunk)
                if chunk.content or chunk.tool_calls:
                    yield chunk
            status = "ok"
        finally:
            latency_ms = (time.perf_counter() - started) * 1000
            model = answer.model or target.model or ""
            record_turn(target.kind, model, answer.usage, latency_ms / 1000,
                        None if status == "ok" else sys.exc_info()[1])
            if self._usage is not None:
                self._usage.record(user_id, target.provider, model, answer.usage, latency_ms, status)
        if answer.first:  # the provider ended without a single chunk
            yield TurnStarted(
                turn.request_id, conversation_id, target.provider, target.model,
                decision.reason, context.refs,
            )
        if self._memory is not None:
            rounds = loop.transcript if loop is not None else []
            text = loop.final_text if loop is not None else answer.text()
            self._memory.store_turn(
                user_id, conversation_id,
                [*turn.messages, *rounds,
                 Message(role="assistant", content=text, tool_calls=answer.tool_calls())],
                provider=target.provider, model=model, usage=answer.usage,
                latency_ms=latency_ms, tags=turn.tags, new=new_conversation,
                known_vector=(_query_text(turn.messages), vector) if vector is not None else None,
            )
        yield TurnDone(
            turn.request_id, conversation_id, target.provider, model, answer.usage,
            answer.finish_reason or "stop", answer.tool_calls(), latency_ms,
        )

    async def _memory_context(
        self, user_id: str, turn: TurnRequest
    ) -> tuple[list[float] | None, ContextResult]:
        memory = self._memory
        empty = ContextResult(None, [])
        if memory is None:
            if turn.conversation_id is not None:
                raise NotFoundError("conversation not found", param="conversation_id")
            return None, empty
        needs_vector = turn.use_memory or self._needs_classification(turn)
        query = _query_text(turn.messages)
        # The conversation's check runs while the query is embedded, not after it.
        check = (
            asyncio.ensure_future(memory.check_conversation(user_id, turn.conversation_id))
            if turn.conversation_id is not None
            else None
        )
        try:
            vector = await memory.embed_query(query) if needs_vector and query else None
        except BaseException:
            if check is not None:
                check.cancel()
            raise
        if check is not None:
            await check
        if not turn.use_memory or vector is None:
            return vector, empty
        return vector, await memory.context_for(
            user_id, vector, turn.messages, turn.conversation_id
        )

    def _needs_classification(self, turn: TurnRequest) -> bool:
        return turn.provider is None and (turn.model is None or turn.model == "auto" or
                                          "/" not in turn.model)

    def _route(
        self, ctx: RoutingContext, turn: TurnRequest, vector: list[float] | None
    ) -> RouteDecision:
        query_type = None
        how = ""
        if self._needs_classification(turn) and any(ctx.routing.values()):
            query = _query_text(turn.messages)
            if self._classifier is not None:
                query_type, how = self._classifier.classify(vector, query)
            else:
                from pacore.routing import keyword_query_type

                query_type, how = keyword_query_type(query), "keywords"
        decision = choose_route(
            ctx, provider=turn.provider, model=turn.model, residency=turn.data_residency,
            query_type=query_type,
        )
        if query_type is not None and "query type" in decision.reason:
            decision = RouteDecision(
                decision.target, f"{decision.reason} (classified by {how})",
                decision.fallbacks, decision.query_type,
            )
        return decision

    async def _tool_loop(self, user_id: str, turn: TurnRequest) -> ToolLoop | None:
        if turn.agent_tools is None:
            return None
        if self._agent_tools is None:
            raise NotFoundError("on-prem agents are not enabled on this deployment",
                                param="agent_tools")
        return await ToolLoop.open(self._agent_tools, user_id, turn.agent_tools, turn.tools)

    def _call(
        self, user_id: str, decision: RouteDecision, request: CompletionRequest,
        loop: ToolLoop | None, *, stream: bool = True,
    ) -> AsyncIterator[tuple[Target, CompletionChunk]]:
        if loop is None:
            return self._call_with_fallback(user_id, decision, request, stream=stream)

        def one_round(
            req: CompletionRequest, answered: Target | None
        ) -> AsyncIterator[tuple[Target, CompletionChunk]]:
            # Later rounds stay with the provider that answered the first: it holds the thread.
            pinned = decision if answered is None else RouteDecision(answered, decision.reason)
            return self._call_with_fallback(user_id, pinned, req)

        return loop.run(request, one_round)

    async def _call_with_fallback(
        self, user_id: str, decision: RouteDecision, request: CompletionRequest,
        *, stream: bool = True,
    ) -> AsyncIterator[tuple[Target, CompletionChunk]]:
        candidates: Sequence[Target] = (decision.target, *decision.fallbacks)
        last_error: PACoreError | None = None
        for i, target in enumerate(candidates):
            req = request if target.model == request.model else request.model_copy(
                update={"model": target.model}
            )
            # A client that does not stream gets one upstream call and one message per hop.
            chunks = (
                self._providers.stream(user_id, target, req) if stream
                else _one_chunk(self._providers.complete(user_id, target, req))
            )
            got_first = False
            try:
                async for chunk in chunks:
                    got_first = True
                    yield target, chunk
                return
            except PACoreError as exc:
                record_provider_error(target.kind, exc.type)
                if got_first or i == len(candidates) - 1 or not _may_fall_back(exc):
                    raise
                logger.warning(
                    "provider %s failed before its first token (%s); falling back",
                    target.provider, exc.type,
                )
                last_error = exc
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
        if last_error is not None:  # pragma: no cover - loop always returns or raises
            raise last_error


async def _one_chunk(result: Awaitable[CompletionResult]) -> AsyncIterator[CompletionChunk]:
    """A whole answer as the single chunk of a stream."""
    r = await result
    deltas = [
        ToolCallDelta(index=i, id=c.id, name=c.name, arguments=c.arguments)
        for i, c in enumerate(r.tool_calls or [])
    ] or None
    yield CompletionChunk(
        content=r.content, tool_calls=deltas, finish_reason=r.finish_reason, usage=r.usage,
        model=r.model or None,
    )


def _may_fall_back(exc: PACoreError) -> bool:
    # A bad request would fail the same way elsewhere; anything the provider's side caused
    # (down, overloaded, rate limited, timed out, rejected our key) is worth another provider.
    return exc.retryable or exc.status in (401, 403, 404)


def _query_text(messages: list[Message]) -> str:
    for m in reversed(messages):
        if m.role == "user":
            return m.text()
    return messages[-1].text() if messages else ""


class _Answer:
    """Accumulates a streamed answer."""

    def __init__(self) -> None:
        self.first = True
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.model: str | None = None

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
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.model:
            self.model = chunk.model

    def text(self) -> str:
        return "".join(self.parts)

    def tool_calls(self) -> list[ToolCall] | None:
        if not self.calls:
            return None
        return [
            ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"] or "{}")
            for i, c in sorted(self.calls.items())
        ]
