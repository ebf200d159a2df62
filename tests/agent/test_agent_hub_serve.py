"""The AgentHub deployment on real Ray Serve, reached only through handles, as the gateway and
the router reach it: one replica over the in-memory bus, and two replicas over Redis (Serve sends
each call to either replica, so the socket's stream and the requests part ways)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle

from agent.app import detect_hardware
from agent.config import AgentConfig
from agent.link import AgentLink, AgentRefused
from agent.tools import ToolBox
from deployments.agent_hub import AgentHubDeployment
from pacore.agents.hub import HubConfig
from pacore.config import Settings
from pacore.errors import NotFoundError, PACoreError, UpstreamError
from pacore.testing.openai_server import OpenAIServer, Scripted
from pacore.types import CompletionChunk, CompletionRequest, Message

REDIS_URL = "redis://127.0.0.1:6379/0"
HUB = HubConfig(ping_interval_s=0.3, missed_pongs=3, liveness_check_s=0.3)


def _redis_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def hub_handle(
    request: pytest.FixtureRequest, local_app: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeploymentHandle]:
    settings: dict[str, Any] = {"data_dir": str(tmp_path_factory.mktemp("hub"))}
    if request.param == "redis":
        if not _redis_reachable():
            pytest.skip("Redis is not reachable at 127.0.0.1:6379")
        settings["redis_url"] = REDIS_URL
    options = AgentHubDeployment.options_for(Settings(**settings))
    if request.param == "redis":
        options.pop("autoscaling_config")
        options["num_replicas"] = 2
    options["ray_actor_options"] = {"num_cpus": 0.05}
    name, prefix = f"test-agent-hub-{request.param}", f"test-agent-hub:{uuid.uuid4().hex}:"
    app = serve.deployment(AgentHubDeployment, name="AgentHub", **options).bind(
        settings, HUB.model_dump(), directory=False, bus_prefix=prefix
    )
    handle = serve.run(app, name=name, route_prefix=None)
    yield handle
    serve.delete(name)
    if request.param == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


class HandleHub:
    """The hub as the gateway sees it: methods called through a deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    def attach(self, agent_id: str, connection_id: str, *, user_id: str) -> Any:
        return self.handle.options(stream=True).attach.remote(
            agent_id, connection_id, user_id=user_id
        )

    async def deliver(self, agent_id: str, frame: str | bytes, *, connection_id: str) -> None:
        await self.handle.deliver.remote(agent_id, frame, connection_id=connection_id)

    async def detach(self, agent_id: str, connection_id: str) -> None:
        await self.handle.detach.remote(agent_id, connection_id)


def _platform_error(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, PACoreError) else exc


@pytest.fixture
async def linked(
    hub_handle: DeploymentHandle, local_app: Any, agent_config: AgentConfig, gateway_double: Any
) -> AsyncIterator[tuple[DeploymentHandle, str, AgentLink]]:
    agent_id, user_id, token = f"agent-{uuid.uuid4().hex[:8]}", "user-s", uuid.uuid4().hex
    gateway = gateway_double(HandleHub(hub_handle), {token: (agent_id, user_id)})
    await gateway.start()
    cfg = agent_config.model_copy(update={"cloud_url": gateway.url, "agent_token": SecretStr(token)})
    link = AgentLink(cfg, local_app.models, ToolBox.from_config(cfg.tools), version="test",
                     hardware=detect_hardware())
    task = asyncio.create_task(link.run())
    async with asyncio.timeout(30):
        while True:
            found = await hub_handle.presence.remote(user_id, [agent_id])
            if found[agent_id].connected and found[agent_id].capabilities:
                break
            await asyncio.sleep(0.05)
    yield hub_handle, agent_id, link
    await link.stop()
    with contextlib.suppress(AgentRefused, asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task
    await gateway.stop()


def ask(text: str) -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content=text)])


async def test_requests_through_handles(
    linked: tuple[DeploymentHandle, str, AgentLink], docs_root: Path
) -> None:
    hub, agent_id, _ = linked
    result = await hub.complete.remote("user-s", agent_id, ask("sun moon"))
    assert result.content == "sun moon sun moon sun moon"
    chunks: list[CompletionChunk] = [
        c async for c in hub.options(stream=True).stream.remote("user-s", agent_id, ask("a b"))
    ]
    assert "".join(c.content for c in chunks) == "a b a b a b"
    assert chunks[-1].finish_reason == "stop"
    out = await hub.call_tool.remote("user-s", agent_id, "file_read", {"path": "handbook.txt"})
    assert out["content"] == (docs_root / "handbook.txt").read_text()
    (listed,) = await hub.connected_agents.remote("user-s")
    assert listed[0] == agent_id and listed[1][0] == "office-llm"
    assert (await hub.health.remote("user-s", agent_id)).healthy
    await hub.ping.remote()


async def test_errors_cross_the_handle(linked: tuple[DeploymentHandle, str, AgentLink]) -> None:
    hub, agent_id, _ = linked
    with pytest.raises(Exception) as info:
        await hub.complete.remote("user-other", agent_id, ask("hi"))
    assert isinstance(_platform_error(info.value), NotFoundError)


async def test_a_dying_agent_fails_the_stream_through_handles(
    linked: tuple[DeploymentHandle, str, AgentLink], upstream: OpenAIServer
) -> None:
    hub, agent_id, link = linked
    upstream.script(Scripted(delay_s=60, delay_after=1))
    stream = hub.options(stream=True).stream.remote("user-s", agent_id, ask("x y"))
    assert (await anext(stream)).content
    ws = link.connection
    assert ws is not None
    ws.transport.abort()
    with pytest.raises(Exception) as info:
        async with asyncio.timeout(15):
            async for _ in stream:
                pass
    assert isinstance(_platform_error(info.value), UpstreamError)
