"""The orchestrator pipeline against in-process collaborators that implement its protocols."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pacore.errors import BadRequestError, NotFoundError, UpstreamError
from pacore.orchestrator import ContextResult, Orchestrator, TurnDone, TurnRequest, TurnStarted
from pacore.routing import RoutingContext, Target
from pacore.streaming import coalesce, merge_chunks
from pacore.types import CompletionChunk, CompletionRequest, Message, ToolCallDelta, Usage


class Routing:
    def __init__(self, ctx: RoutingContext) -> None:
        self.ctx = ctx

    async def routing_context(self, user_id: str, turn: object = None) -> RoutingContext:
        return self.ctx


class Providers:
    """Each provider name maps to a script: a list of chunks, or an exception to raise before
    (or after, with ``fail_after``) the first chunk."""

    def __init__(self, scripts: dict[str, object], fail_after: dict[str, int] | None = None):
        self.scripts = scripts
        self.fail_after = fail_after or {}
        self.requests: list[tuple[str, CompletionRequest]] = []
        self.closed: list[str] = []

    async def stream(
        self, user_id: str, target: Target, request: CompletionRequest
    ) -> AsyncIterator[CompletionChunk]:
        self.requests.append((target.provider, request))
        script = self.scripts[target.provider]
        try:
            if isinstance(script, Exception):
                raise script
            for i, chunk in enumerate(script):  # type: ignore[attr-defined]
                if self.fail_after.get(target.provider) == i:
                    raise UpstreamError("died mid-stream", provider=target.provider)
                yield chunk
        finally:
            self.closed.append(target.provider)


class Memory:
    def __init__(self, system_text: str | None = None) -> None:
        self.system_text = system_text
        self.stored: list[tuple] = []
        self.known: set[str] = {"c-existing"}

    async def embed_query(self, text: str) -> list[float]:
        return [1.0, 0.0, 0.0]

    async def context_for(self, user_id, vector, messages, conversation_id) -> ContextResult:
        if self.system_text is None:
            return ContextResult(None, [])
        return ContextResult(self.system_text, [("m-1", 0.9)])

    async def check_conversation(self, user_id: str, conversation_id: str) -> None:
        if conversation_id not in self.known:
            raise NotFoundError("conversation not found")

    def store_turn(self, user_id, conversation_id, messages, **kw) -> None:
        self.stored.append((user_id, conversation_id, messages, kw))


class Usage_:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def record(self, user_id, provider, model, usage, latency_ms, status) -> None:
        self.rows.append((provider, model, usage, status))


def chunks(*texts: str) -> list[CompletionChunk]:
    out = [CompletionChunk(content=t) for t in texts]
    out.append(CompletionChunk(finish_reason="stop", usage=Usage.of(3, len(texts)), model="m"))
    return out


def orchestrator(providers, *, default="a", fallbacks=(), memory=None, usage=None):
    ctx = RoutingContext(
        targets={n: Target(n, "openai", "m") for n in providers.scripts},
        default_provider=default, fallbacks=list(fallbacks),
    )
    return Orchestrator(routing=Routing(ctx), providers=providers, memory=memory, usage=usage)


async def run(o: Orchestrator, turn: TurnRequest) -> list[object]:
    return [e async for e in o.run("u1", turn)]


def turn(text: str = "hello", **kw) -> TurnRequest:
    return TurnRequest(messages=[Message(role="user", content=text)], **kw)


async def test_events_in_order_and_turn_stored():
    providers, memory, usage = Providers({"a": chunks("he", "llo")}), Memory(), Usage_()
    events = await run(orchestrator(providers, memory=memory, usage=usage), turn())
    assert isinstance(events[0], TurnStarted) and isinstance(events[-1], TurnDone)
    assert "".join(e.content for e in events if isinstance(e, CompletionChunk)) == "hello"
    done = events[-1]
    assert done.usage.completion_tokens == 2 and done.finish_reason == "stop"
    [(user_id, cid, messages, kw)] = memory.stored
    assert user_id == "u1"
    assert cid == events[0].conversation_id and kw["new"] is True
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[-1].content == "hello"
    assert usage.rows[0][3] == "ok"


async def test_memory_context_is_injected_as_system_message():
    providers = Providers({"a": chunks("ok")})
    events = await run(orchestrator(providers, memory=Memory("Earlier: likes tea")), turn())
    sent = providers.requests[0][1]
    assert sent.messages[0].role == "system" and "likes tea" in sent.messages[0].text()
    assert events[0].context == [("m-1", 0.9)]


async def test_use_memory_false_skips_context():
    providers = Providers({"a": chunks("ok")})
    await run(orchestrator(providers, memory=Memory("ctx")), turn(use_memory=False))
    assert all(m.role != "system" for m in providers.requests[0][1].messages)


async def test_unknown_conversation_is_not_found_before_any_call():
    providers, memory = Providers({"a": chunks("ok")}), Memory()
    with pytest.raises(NotFoundError):
        await run(orchestrator(providers, memory=memory), turn(conversation_id="c-nope"))
    assert providers.requests == [] and memory.stored == []


async def test_existing_conversation_is_continued():
    memory = Memory()
    events = await run(
        orchestrator(Providers({"a": chunks("ok")}), memory=memory),
        turn(conversation_id="c-existing"),
    )
    assert events[0].conversation_id == "c-existing"
    assert memory.stored[0][3]["new"] is False


class SlowMemory(Memory):
    """Records when the conversation check and the query's embedding start and end."""

    def __init__(self, embed_error: Exception | None = None) -> None:
        super().__init__()
        self.log: list[str] = []
        self.embed_error = embed_error
        self.check_cancelled = False

    async def embed_query(self, text: str) -> list[float]:
        self.log.append("embed start")
        await asyncio.sleep(0.02)
        if self.embed_error is not None:
            raise self.embed_error
        self.log.append("embed end")
        return [1.0, 0.0, 0.0]

    async def check_conversation(self, user_id: str, conversation_id: str) -> None:
        self.log.append("check start")
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.check_cancelled = True
            raise
        self.log.append("check end")


async def test_conversation_check_runs_while_the_query_is_embedded():
    memory = SlowMemory()
    await run(orchestrator(Providers({"a": chunks("ok")}), memory=memory),
              turn(conversation_id="c-existing"))
    assert memory.log.index("check start") < memory.log.index("embed end")


async def test_a_failed_embedding_cancels_the_conversation_check():
    memory = SlowMemory(embed_error=UpstreamError("embedder down"))
    with pytest.raises(UpstreamError):
        await run(orchestrator(Providers({"a": chunks("ok")}), memory=memory),
                  turn(conversation_id="c-existing"))
    await asyncio.sleep(0)
    assert memory.check_cancelled and "check end" not in memory.log


async def test_fallback_before_first_token():
    providers = Providers({"a": UpstreamError("down"), "b": chunks("from b")})
    usage = Usage_()
    events = await run(orchestrator(providers, fallbacks=["b"], usage=usage), turn())
    assert events[0].provider == "b" and "fallback" in events[0].route_reason
    assert [p for p, _ in providers.requests] == ["a", "b"]
    assert "a" in providers.closed


async def test_no_fallback_for_bad_requests():
    providers = Providers({"a": BadRequestError("bad"), "b": chunks("x")})
    with pytest.raises(BadRequestError):
        await run(orchestrator(providers, fallbacks=["b"]), turn())
    assert [p for p, _ in providers.requests] == ["a"]


async def test_failure_after_first_token_is_not_retried_and_nothing_stored():
    providers, memory, usage = Providers({"a": chunks("x", "y", "z"), "b": chunks("b")},
                                         fail_after={"a": 1}), Memory(), Usage_()
    o = orchestrator(providers, fallbacks=["b"], memory=memory, usage=usage)
    seen: list[object] = []
    with pytest.raises(UpstreamError):
        async for e in o.run("u1", turn()):
            seen.append(e)
    assert isinstance(seen[0], TurnStarted)
    assert [p for p, _ in providers.requests] == ["a"]
    assert memory.stored == [] and usage.rows[0][3] == "error"


async def test_tool_call_deltas_are_assembled():
    script = [
        CompletionChunk(tool_calls=[ToolCallDelta(index=0, id="call_1", name="lookup")]),
        CompletionChunk(tool_calls=[ToolCallDelta(index=0, arguments='{"q":')]),
        CompletionChunk(tool_calls=[ToolCallDelta(index=0, arguments=' "x"}')]),
        CompletionChunk(finish_reason="tool_calls"),
    ]
    events = await run(orchestrator(Providers({"a": script})), turn())
    done = events[-1]
    assert done.finish_reason == "tool_calls"
    assert done.tool_calls[0].name == "lookup" and done.tool_calls[0].arguments == '{"q": "x"}'


async def test_merge_and_coalesce():
    merged = merge_chunks([CompletionChunk(content="a"), CompletionChunk(content="b",
                                                                          finish_reason="stop")])
    assert merged.content == "ab" and merged.finish_reason == "stop"

    async def source() -> AsyncIterator[object]:
        yield "meta"
        for t in "abc":
            yield CompletionChunk(content=t)
        await asyncio.sleep(0)
        yield CompletionChunk(content="d")

    out = [x async for x in coalesce(source())]
    assert out[0] == "meta"
    assert "".join(c.content for c in out[1:]) == "abcd"
    assert len(out) <= 5


async def test_coalesce_propagates_errors_and_closes_source():
    closed = []

    async def source() -> AsyncIterator[CompletionChunk]:
        try:
            yield CompletionChunk(content="a")
            raise UpstreamError("boom")
        finally:
            closed.append(True)

    with pytest.raises(UpstreamError):
        async for _ in coalesce(source()):
            pass
    assert closed == [True]


async def _paced(n: int, gap_s: float) -> AsyncIterator[object]:
    yield "started"
    for i in range(n):
        await asyncio.sleep(gap_s)
        yield CompletionChunk(content=f"{i},")
    yield "done"


async def test_coalesce_lingers_after_the_first_chunk():
    # 30 chunks 1 ms apart through a hop that sends at most one message per 10 ms: the first
    # chunk alone, the rest in a few merged messages, nothing lost or reordered, and the end
    # event is never held back.
    out = [x async for x in coalesce(_paced(30, 0.001), linger_s=0.010)]
    assert out[0] == "started" and out[-1] == "done"
    chunks = out[1:-1]
    assert chunks[0].content == "0,"
    assert "".join(c.content for c in chunks) == "".join(f"{i}," for i in range(30))
    assert len(chunks) < 15


async def test_coalesce_passes_a_slow_stream_chunk_by_chunk():
    # Chunks further apart than the linger are never merged (nothing waits for company).
    out = [x async for x in coalesce(_paced(5, 0.030), linger_s=0.002)]
    assert [c.content for c in out[1:-1]] == ["0,", "1,", "2,", "3,", "4,"]
