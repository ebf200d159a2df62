"""The agent hub end to end: a real agent link dials a gateway double on loopback, its local Serve
app serves a loopback OpenAI-compatible model, and callers use the hub.

Each test runs twice: over one in-memory bus (one hub replica), and over Redis with the socket
attached to one hub and every request entering through another (two replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import websockets
from pydantic import SecretStr

from agent.app import detect_hardware
from agent.config import AgentConfig
from agent.link import AgentLink, AgentRefused
from agent.tools import ToolBox
from pacore.agents.bus import Bus, InMemoryBus, RedisBus
from pacore.agents.hub import AgentHub, HubConfig
from pacore.agents.protocol import (
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_REPLACED,
    CLOSE_REVOKED,
    CLOSE_UNSUPPORTED_PROTOCOL,
    Capabilities,
    Hello,
    ModelCapability,
    encode,
)
from pacore.errors import (
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    TimeoutError,
    UpstreamError,
    UpstreamUnavailableError,
)
from pacore.testing.openai_server import OpenAIServer, Scripted
from pacore.types import CompletionRequest, Message

MODEL = "office-llm"  # the session agent's default model (conftest's agent_config)
TINY = "tiny-cpu"  # its model on its own cpu engine, when the cpu extra is installed
REDIS_URL = "redis://127.0.0.1:6379/0"
HUB = HubConfig(ping_interval_s=0.2, missed_pongs=3, liveness_check_s=0.3, idle_timeout_s=30,
                request_timeout_s=60)
TOKENS = {"tok-a": ("agent-a", "user-a")}


def ask(text: str = "alpha beta gamma", **kw: Any) -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content=text)], **kw)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


def _redis_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        return False
    return True


@dataclass
class Buses:
    gateway: Bus  # what the replica holding the socket uses
    caller: Bus  # what the replica the request enters uses


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def buses(request: pytest.FixtureRequest) -> AsyncIterator[Buses]:
    if request.param == "memory":
        bus = InMemoryBus()
        yield Buses(bus, bus)
        return
    if not _redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"test-agents:{uuid.uuid4().hex}:"
    gateway, caller = RedisBus(REDIS_URL, prefix=prefix), RedisBus(REDIS_URL, prefix=prefix)
    yield Buses(gateway, caller)
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    await gateway.aclose()
    await caller.aclose()


def make_link(config: AgentConfig, local_app: Any, url: str, token: str) -> AgentLink:
    cfg = config.model_copy(update={"cloud_url": url, "agent_token": SecretStr(token)})
    return AgentLink(
        cfg, local_app.models, ToolBox.from_config(cfg.tools), version="test",
        hardware=detect_hardware(),
    )


@dataclass
class Env:
    hub: AgentHub  # the caller's hub replica
    gateway: Any  # the gateway double holding the agent's socket
    link: AgentLink
    task: asyncio.Task[None]
    models: list[str]  # what the agent serves, its default first

    async def connected(self) -> bool:
        found = await self.hub.presence("user-a", ["agent-a"])
        return found["agent-a"].connected and bool(found["agent-a"].capabilities)


async def _stop(link: AgentLink, task: asyncio.Task[None]) -> None:
    await link.stop()
    with contextlib.suppress(AgentRefused, asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task


@pytest.fixture
async def env(
    buses: Buses, local_app: Any, agent_config: AgentConfig, gateway_double: Any
) -> AsyncIterator[Env]:
    gateway = gateway_double(AgentHub(buses.gateway, HUB), TOKENS)
    await gateway.start()
    link = make_link(agent_config, local_app, gateway.url, "tok-a")
    task = asyncio.create_task(link.run())
    e = Env(AgentHub(buses.caller, HUB), gateway, link, task, [m.name for m in agent_config.models])
    await eventually(e.connected)
    yield e
    await _stop(link, task)
    await gateway.stop()


# --------------------------------------------------------------------------- completions


async def test_complete_through_the_hub(env: Env, upstream: OpenAIServer) -> None:
    result = await env.hub.complete("user-a", "agent-a", ask(model=MODEL))
    assert result.content == "alpha beta gamma alpha beta gamma"
    assert result.provider == "agent:agent-a"
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 6
    # The local deployment asked its upstream for the upstream's own model id.
    assert upstream.chat_requests[-1].body["model"] == "qwen-local"


async def test_stream_through_the_hub(env: Env) -> None:
    chunks = [c async for c in env.hub.stream("user-a", "agent-a", ask("one two three"))]
    assert "".join(c.content for c in chunks) == "one two three one two three"
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 6
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])


async def test_concurrent_streams_share_one_socket(env: Env) -> None:
    async def one(i: int) -> str:
        stream = env.hub.stream("user-a", "agent-a", ask(f"w{i} x{i}"))
        return "".join([c.content async for c in stream])

    answers = await asyncio.gather(*(one(i) for i in range(8)))
    assert answers == [f"w{i} x{i} w{i} x{i} w{i} x{i}" for i in range(8)]
    assert env.gateway.connections == 1


async def test_the_model_limit_and_errors_come_through(env: Env, upstream: OpenAIServer) -> None:
    result = await env.hub.complete("user-a", "agent-a", ask(max_tokens=2))
    assert (result.content, result.finish_reason) == ("alpha beta", "length")
    with pytest.raises(NotFoundError) as info:
        await env.hub.complete("user-a", "agent-a", ask(model="no-such-model"))
    assert "no-such-model" in info.value.message
    upstream.script(Scripted(status=400, message="prompt is malformed"))
    with pytest.raises(BadRequestError) as bad:
        await env.hub.complete("user-a", "agent-a", ask())
    assert bad.value.provider == "agent:agent-a"


async def test_a_model_on_the_agents_own_engine(env: Env) -> None:
    if TINY not in env.models:
        pytest.skip("the cpu extra (transformers, torch) is not installed")
    whole = await env.hub.complete("user-a", "agent-a", ask(model=TINY, max_tokens=4))
    assert whole.finish_reason in ("length", "stop")
    assert 1 <= whole.usage.completion_tokens <= 4
    chunks = [c async for c in env.hub.stream("user-a", "agent-a", ask(model=TINY, max_tokens=4))]
    assert "".join(c.content for c in chunks) == whole.content  # greedy: the same answer
    assert chunks[-1].finish_reason == whole.finish_reason


# --------------------------------------------------------------------------- who may use it


async def test_another_users_agent_is_not_found(env: Env) -> None:
    calls = [
        env.hub.complete("user-b", "agent-a", ask()),
        env.hub.call_tool("user-b", "agent-a", "file_read", {"path": "handbook.txt"}),
        env.hub.call_tool("user-b", "agent-a", "undeclared", {}),
        env.hub.health("user-b", "agent-a"),
        env.hub.revoke("agent-a", user_id="user-b"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as info:
            await call
        assert "agent-a" in info.value.message
    with pytest.raises(NotFoundError):
        async for _ in env.hub.stream("user-b", "agent-a", ask()):
            pass
    assert (await env.hub.presence("user-b", ["agent-a"]))["agent-a"].connected is False
    assert await env.hub.connected_agents("user-b") == []
    assert await env.hub.connected_agents("user-a") == [("agent-a", env.models)]
    assert await env.connected()  # the refused revoke left the link alone


async def test_presence_and_health(env: Env) -> None:
    seen = (await env.hub.presence("user-a", ["agent-a"]))["agent-a"]
    assert seen.connected and seen.last_seen is not None
    assert seen.capabilities["models"][0] == {
        "id": MODEL, "kind": "openai-compatible", "context_length": 4096
    }
    assert [m["id"] for m in seen.capabilities["models"]] == env.models
    assert [t["name"] for t in seen.capabilities["tools"]] == ["file_read"]
    assert seen.capabilities["hardware"]["cpus"] >= 1
    health = await env.hub.health("user-a", "agent-a")
    assert health.healthy and health.latency_ms is not None


class _Directory:
    def __init__(self, owners: dict[str, str]) -> None:
        self.owners = owners
        self.recorded: list[tuple[str, dict[str, Any] | None]] = []

    async def owner_of(self, agent_id: str) -> str | None:
        return self.owners.get(agent_id)

    async def record(self, agent_id: str, capabilities: dict[str, Any] | None) -> None:
        self.recorded.append((agent_id, capabilities))


async def test_offline_agent_is_unavailable_at_once(env: Env, buses: Buses) -> None:
    hub = AgentHub(buses.caller, HUB, directory=_Directory({"agent-z": "user-a"}))
    with pytest.raises(UpstreamUnavailableError) as info:
        await hub.complete("user-a", "agent-z", ask())
    assert info.value.status == 503
    with pytest.raises(NotFoundError):
        await hub.complete("user-b", "agent-z", ask())
    await _stop(env.link, env.task)
    await eventually(lambda: _not(env.connected()))
    with pytest.raises(UpstreamUnavailableError):
        await env.hub.complete("user-a", "agent-a", ask())


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


# --------------------------------------------------------------------------- tools


async def test_tool_round_trip(env: Env) -> None:
    out = await env.hub.call_tool("user-a", "agent-a", "file_read", {"path": "handbook.txt"})
    assert out["content"] == "the office opens at nine"
    with pytest.raises(PermissionDeniedError):
        await env.hub.call_tool("user-a", "agent-a", "file_read", {"path": "../../etc/passwd"})
    with pytest.raises(BadRequestError) as info:
        await env.hub.call_tool("user-a", "agent-a", "file_read", {"file": "handbook.txt"})
    assert info.value.code == "invalid_arguments"


async def test_undeclared_tool_is_refused(env: Env, buses: Buses) -> None:
    with pytest.raises(BadRequestError) as by_hub:
        await env.hub.call_tool("user-a", "agent-a", "http_get", {"url": "http://x/"})
    assert by_hub.value.code == "unknown_tool"
    # Without the announced capabilities the request reaches the agent, which refuses it too.
    await buses.caller.delete("caps:agent-a")
    with pytest.raises(BadRequestError) as by_agent:
        await env.hub.call_tool("user-a", "agent-a", "http_get", {"url": "http://x/"})
    assert by_agent.value.code == "unknown_tool"
    assert "not declared on this agent" in by_agent.value.message


# --------------------------------------------------------------------------- failures


async def test_killed_agent_fails_the_stream_and_comes_back(
    env: Env, upstream: OpenAIServer
) -> None:
    upstream.script(Scripted(delay_s=60, delay_after=2))
    stream = env.hub.stream("user-a", "agent-a", ask())
    first = await anext(stream)
    assert first.content
    ws = env.link.connection
    assert ws is not None
    ws.transport.abort()  # the agent's process dies: the TCP connection just drops
    with pytest.raises(UpstreamError):
        async with asyncio.timeout(15):
            async for _ in stream:
                pass
    # The agent stopped its work upstream, then reconnected by itself.
    assert await upstream.wait_for_disconnects(1, timeout_s=10)
    await eventually(env.connected)
    result = await env.hub.complete("user-a", "agent-a", ask())
    assert result.content
    assert env.gateway.connections == 2


async def test_caller_going_away_cancels_on_the_agent(env: Env, upstream: OpenAIServer) -> None:
    upstream.script(Scripted(delay_s=60, delay_after=1))
    stream = env.hub.stream("user-a", "agent-a", ask())
    await anext(stream)
    await stream.aclose()
    assert await upstream.wait_for_disconnects(1, timeout_s=10)
    assert (await env.hub.complete("user-a", "agent-a", ask())).content


async def test_a_silent_answer_times_out_and_is_cancelled(
    env: Env, buses: Buses, upstream: OpenAIServer
) -> None:
    impatient = AgentHub(buses.caller, HUB.model_copy(update={"idle_timeout_s": 0.5}))
    upstream.script(Scripted(delay_s=60, delay_after=1))
    with pytest.raises(TimeoutError):
        async for _ in impatient.stream("user-a", "agent-a", ask()):
            pass
    assert await upstream.wait_for_disconnects(1, timeout_s=10)
    upstream.script(Scripted(delay_s=60))
    with pytest.raises(TimeoutError):
        await env.hub.complete("user-a", "agent-a", ask(), timeout_s=0.5)
    assert await upstream.wait_for_disconnects(2, timeout_s=10)


async def test_reconnects_after_the_cloud_restarts(env: Env) -> None:
    await env.gateway.stop()
    await eventually(lambda: _not(env.connected()))
    with pytest.raises(UpstreamUnavailableError):
        await env.hub.complete("user-a", "agent-a", ask())
    await env.gateway.start()
    await eventually(env.connected)
    assert (await env.hub.complete("user-a", "agent-a", ask())).content
    assert env.gateway.connections == 2


async def test_revoke_drops_the_link_for_good(
    env: Env, local_app: Any, agent_config: AgentConfig
) -> None:
    await env.hub.revoke("agent-a", user_id="user-a")
    with pytest.raises(AgentRefused) as info:
        async with asyncio.timeout(10):
            await env.task
    assert str(CLOSE_REVOKED) in str(info.value)
    assert CLOSE_REVOKED in env.gateway.closes
    with pytest.raises(NotFoundError):
        await env.hub.complete("user-a", "agent-a", ask())
    assert await env.hub.connected_agents("user-a") == []
    # The same token dialling again is turned away too.
    again = make_link(agent_config, local_app, env.gateway.url, "tok-a")
    with pytest.raises(AgentRefused):
        async with asyncio.timeout(10):
            await again.run()


async def test_a_second_connection_replaces_the_first(
    env: Env, local_app: Any, agent_config: AgentConfig
) -> None:
    second = make_link(agent_config, local_app, env.gateway.url, "tok-a")
    task = asyncio.create_task(second.run())
    try:
        with pytest.raises(AgentRefused) as info:
            async with asyncio.timeout(10):
                await env.task
        assert str(CLOSE_REPLACED) in str(info.value)
        await eventually(env.connected)
        assert (await env.hub.complete("user-a", "agent-a", ask())).content
    finally:
        await _stop(second, task)


async def test_unknown_token_is_refused_for_good(
    env: Env, local_app: Any, agent_config: AgentConfig
) -> None:
    stranger = make_link(agent_config, local_app, env.gateway.url, "tok-unknown")
    with pytest.raises(AgentRefused) as info:
        async with asyncio.timeout(10):
            await stranger.run()
    assert "token" in str(info.value)


# --------------------------------------------------------------------------- raw frames


@pytest.fixture
async def bare_gateway(buses: Buses, gateway_double: Any) -> AsyncIterator[Any]:
    gateway = gateway_double(AgentHub(buses.gateway, HUB), TOKENS)
    await gateway.start()
    yield gateway
    await gateway.stop()


def _dial(gateway: Any) -> Any:
    return websockets.connect(
        f"ws://127.0.0.1:{gateway.port}/v1/agents/connect",
        additional_headers={"Authorization": "Bearer tok-a"}, ping_interval=None,
    )


async def _announce(ws: Any) -> None:
    await ws.send(encode(Hello(agent_version="raw", protocol_versions=[1])))
    await ws.send(encode(Capabilities(models=[ModelCapability(id="m", kind="ollama")])))


async def _next_non_ping(ws: Any) -> dict[str, Any]:
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] != "ping":
            return frame  # type: ignore[no-any-return]
        await ws.send(json.dumps({"v": 1, "type": "pong", "id": frame["id"]}))


async def test_an_agent_that_stops_answering_pings_is_dropped(
    bare_gateway: Any, buses: Buses
) -> None:
    async with _dial(bare_gateway) as ws:
        await _announce(ws)
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                async for _ in ws:
                    pass  # never answer a ping
        assert ws.close_code == CLOSE_HEARTBEAT_TIMEOUT
    hub = AgentHub(buses.caller, HUB)
    assert (await hub.presence("user-a", ["agent-a"]))["agent-a"].connected is False
    with pytest.raises(UpstreamUnavailableError):
        await hub.complete("user-a", "agent-a", ask())


async def test_bad_frames_are_answered_and_the_link_survives(bare_gateway: Any) -> None:
    async with _dial(bare_gateway) as ws:
        await _announce(ws)
        await ws.send("this is not json")
        reply = await _next_non_ping(ws)
        assert (reply["type"], reply["error"]["code"]) == ("error", "invalid_frame")
        await ws.send(json.dumps({"v": 7, "type": "pong", "id": "r7"}))
        reply = await _next_non_ping(ws)
        assert (reply["id"], reply["error"]["code"]) == ("r7", "unsupported_version")
        await ws.send(json.dumps({"v": 1, "type": "warp", "id": "r8"}))
        reply = await _next_non_ping(ws)
        assert (reply["id"], reply["error"]["code"]) == ("r8", "unknown_type")
        await ws.send(encode(Capabilities(id="r9", models=[])).replace('"models":[]', '"models":7'))
        assert (await _next_non_ping(ws))["id"] == "r9"
        await ws.send(json.dumps({"v": 1, "type": "cancel", "id": "r10"}))
        reply = await _next_non_ping(ws)
        assert (reply["id"], reply["error"]["code"]) == ("r10", "unexpected_frame")
        await ws.send(json.dumps({"v": 1, "type": "ping", "id": "r11"}))
        assert await _next_non_ping(ws) == {"v": 1, "type": "pong", "id": "r11"}


async def test_no_common_protocol_version_closes_the_link(bare_gateway: Any) -> None:
    async with _dial(bare_gateway) as ws:
        await ws.send(encode(Hello(agent_version="future", protocol_versions=[99])))
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                async for _ in ws:
                    pass
        assert ws.close_code == CLOSE_UNSUPPORTED_PROTOCOL
