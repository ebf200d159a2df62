"""The agent tool loop inside the orchestrator, against in-process collaborators: the agent's
calls run between rounds and never reach the client, the client's own calls end the turn,
failures and refusals become tool results, and the rounds are bounded."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pacore.errors import (
    BadRequestError,
    NotFoundError,
    PACoreError,
    PermissionDeniedError,
    UpstreamError,
)
from pacore.orchestrator import ContextResult, Orchestrator, TurnDone, TurnRequest, TurnStarted
from pacore.routing import RoutingContext, Target
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    Message,
    ToolCallDelta,
    ToolDefinition,
    Usage,
)

AGENT = "a-1"
FILE_READ = ToolDefinition(name="file_read", description="read a file")
WEATHER = ToolDefinition(name="get_weather", description="the client's own tool")


class Routing:
    async def routing_context(self, user_id: str, turn: object = None) -> RoutingContext:
        return RoutingContext(targets={"openai": Target("openai", "openai", "gpt")})


class Rounds:
    """A provider answering each request with the next scripted round."""

    def __init__(self, *rounds: list[CompletionChunk]) -> None:
        self.rounds = list(rounds)
        self.requests: list[CompletionRequest] = []

    async def stream(
        self, user_id: str, target: Target, request: CompletionRequest
    ) -> AsyncIterator[CompletionChunk]:
        self.requests.append(request)
        for chunk in self.rounds.pop(0):
            yield chunk


class Agent:
    """The hub's tool side for one agent that declared ``file_read``."""

    def __init__(self, owner: str = "u1", fail: PACoreError | None = None) -> None:
        self.owner = owner
        self.fail = fail
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def tools(self, user_id: str, agent_id: str) -> list[ToolDefinition]:
        if user_id != self.owner or agent_id != AGENT:
            raise NotFoundError(f"agent '{agent_id}' not found")
        return [FILE_READ]

    async def call_tool(
        self, user_id: str, agent_id: str, name: str, arguments: dict[str, Any]
    ) -> Any:
        self.calls.append((name, arguments))
        if name != "file_read":
            raise BadRequestError(f"agent has no tool '{name}'", code="unknown_tool")
        if self.fail is not None:
            raise self.fail
        return {"path": arguments["path"], "content": "the office opens at nine"}


class Memory:
    def __init__(self) -> None:
        self.stored: list[list[Message]] = []

    async def embed_query(self, text: str) -> list[float]:
        return [1.0]

    async def context_for(self, *args: Any) -> ContextResult:
        return ContextResult(None, [])

    async def check_conversation(self, user_id: str, conversation_id: str) -> None:
        return None

    def store_turn(self, user_id: str, conversation_id: str, messages: list[Message],
                   **kw: Any) -> None:
        self.stored.append(messages)


def call(name: str, arguments: str, call_id: str = "call_1", index: int = 0) -> list[CompletionChunk]:
    """A tool call streamed in pieces, as providers do."""
    half = len(arguments) // 2
    return [
        CompletionChunk(tool_calls=[ToolCallDelta(index=index, id=call_id, name=name)]),
        CompletionChunk(tool_calls=[ToolCallDelta(index=index, arguments=arguments[:half])]),
        CompletionChunk(tool_calls=[ToolCallDelta(index=index, arguments=arguments[half:])]),
    ]


def end(reason: str, prompt: int = 10, completion: int = 2) -> CompletionChunk:
    return CompletionChunk(finish_reason=reason, usage=Usage.of(prompt, completion))


def answer(text: str) -> list[CompletionChunk]:
    return [CompletionChunk(content=w) for w in text.split(" ")] + [end("stop")]


def orchestrator(provider: Rounds, agent: Agent | None, memory: Memory | None = None) -> Orchestrator:
    return Orchestrator(routing=Routing(), providers=provider, memory=memory, agent_tools=agent)


async def run(orch: Orchestrator, **turn: Any) -> list[Any]:
    request = TurnRequest(
        messages=[Message(role="user", content="when does the office open?")],
        use_memory=False, agent_tools=AGENT, **turn,
    )
    return [e async for e in orch.run("u1", request)]


def chunks(events: list[Any]) -> list[CompletionChunk]:
    return [e for e in events if isinstance(e, CompletionChunk)]


async def test_the_agents_tool_runs_between_rounds() -> None:
    provider = Rounds(
        [*call("file_read", '{"path": "handbook.txt"}'), end("tool_calls")],
        answer("at nine"),
    )
    agent, memory = Agent(), Memory()
    events = await run(orchestrator(provider, agent, memory))

    assert isinstance(events[0], TurnStarted)
    assert "".join(c.content for c in chunks(events)) == "atnine"
    assert all(not c.tool_calls for c in chunks(events))
    assert agent.calls == [("file_read", {"path": "handbook.txt"})]
    assert [t.name for t in provider.requests[0].tools or []] == ["file_read"]
    second = provider.requests[1].messages
    assert [m.role for m in second] == ["user", "assistant", "tool"]
    assert second[1].tool_calls is not None and second[1].tool_calls[0].name == "file_read"
    assert second[2].tool_call_id == "call_1"
    assert json.loads(second[2].text())["content"] == "the office opens at nine"
    done = events[-1]
    assert isinstance(done, TurnDone)
    assert (done.finish_reason, done.tool_calls) == ("stop", None)
    assert done.usage == Usage.of(20, 4)  # both rounds
    stored = memory.stored[0]
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[-1].text() == "atnine"


async def test_tool_failures_and_refusals_are_the_tools_results() -> None:
    outside = PermissionDeniedError("file_read may only read under its root",
                                    code="path_outside_root")
    provider = Rounds(
        [*call("file_read", '{"path": "../etc/passwd"}', "c1", 0),
         *call("shell", '{"cmd": "ls"}', "c2", 1),
         *call("file_read", "not json", "c3", 2), end("tool_calls")],
        answer("sorry"),
    )
    agent = Agent(fail=outside)
    events = await run(orchestrator(provider, agent))

    assert isinstance(events[-1], TurnDone) and events[-1].finish_reason == "stop"
    # Names the request does not own go to the agent, which refuses what it did not declare.
    assert [name for name, _ in agent.calls] == ["file_read", "shell"]
    results = {m.tool_call_id: json.loads(m.text())["error"]
               for m in provider.requests[1].messages if m.role == "tool"}
    assert results["c1"]["code"] == "path_outside_root"
    assert results["c2"]["code"] == "unknown_tool"
    assert results["c3"]["code"] == "invalid_arguments"


async def test_the_clients_own_tools_end_the_turn() -> None:
    provider = Rounds([*call("get_weather", '{"city": "Oslo"}'), end("tool_calls")])
    agent = Agent()
    events = await run(orchestrator(provider, agent), tools=[WEATHER])

    assert [t.name for t in provider.requests[0].tools or []] == ["get_weather", "file_read"]
    assert agent.calls == []
    returned = [d for c in chunks(events) for d in c.tool_calls or []]
    assert [(d.name, d.arguments) for d in returned] == [("get_weather", '{"city": "Oslo"}')]
    done = events[-1]
    assert isinstance(done, TurnDone) and done.finish_reason == "tool_calls"
    assert done.tool_calls is not None and done.tool_calls[0].name == "get_weather"
    assert len(provider.requests) == 1


async def test_a_round_mixing_both_runs_the_agents_and_returns_the_clients() -> None:
    provider = Rounds([*call("file_read", '{"path": "a"}', "c1", 0),
                       *call("get_weather", "{}", "c2", 1), end("tool_calls")])
    agent, memory = Agent(), Memory()
    events = await run(orchestrator(provider, agent, memory), tools=[WEATHER])

    assert agent.calls == [("file_read", {"path": "a"})]
    done = events[-1]
    assert isinstance(done, TurnDone)
    assert [c.id for c in done.tool_calls or []] == ["c2"]
    assert [m.role for m in memory.stored[0]] == ["user", "assistant", "tool", "assistant"]


async def test_rounds_are_bounded() -> None:
    provider = Rounds(*([*call("file_read", '{"path": "a"}'), end("tool_calls")]
                        for _ in range(10)))
    with pytest.raises(UpstreamError) as info:
        await run(orchestrator(provider, Agent()))
    assert info.value.code == "tool_rounds_exceeded"
    assert len(provider.requests) == 6  # the first answer and five rounds of tool results


async def test_the_agent_must_be_the_users_and_its_tools_unambiguous() -> None:
    provider = Rounds(answer("never"))
    with pytest.raises(NotFoundError):
        await run(orchestrator(provider, Agent(owner="someone-else")))
    clash = ToolDefinition(name="file_read", description="the client's own")
    with pytest.raises(BadRequestError, match="file_read"):
        await run(orchestrator(provider, Agent()), tools=[clash])
    with pytest.raises(NotFoundError, match="not enabled"):
        await run(orchestrator(provider, None))
    assert provider.requests == []


async def test_without_agent_tools_tool_calls_stream_as_before() -> None:
    provider = Rounds([*call("get_weather", "{}"), end("tool_calls")])
    request = TurnRequest(messages=[Message(role="user", content="weather?")], use_memory=False,
                          tools=[WEATHER])
    events = [e async for e in orchestrator(provider, Agent()).run("u1", request)]
    streamed = [c for c in chunks(events) if c.tool_calls]
    assert len(streamed) == 3  # the pieces pass through as they come
