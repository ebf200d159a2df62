"""Shared fixtures: one loopback OpenAI-compatible upstream, one local Serve app of the agent
(fractional CPUs, shut down at the end), and the gateway's side of agent sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, WebSocket

from agent.config import AgentConfig
from pacore.agents.hub import AgentHub, LinkClosed
from pacore.agents.protocol import CLOSE_UNAUTHORIZED
from pacore.testing.openai_server import OpenAIServer

MODEL = "office-llm"
TINY = "tiny-cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def upstream() -> Iterator[OpenAIServer]:
    """The office's model server (LM Studio, llama.cpp…): OpenAI-compatible, on loopback."""
    with OpenAIServer(tokens=6, models=("qwen-local",)) as server:
        yield server


@pytest.fixture(scope="session")
def docs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    (root / "handbook.txt").write_text("the office opens at nine")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any] | None:
    """A tiny random-weight Llama for the agent's ``cpu`` kind, when the cpu extra is here."""
    try:
        from pacore.testing.tiny_model import build_tiny_llama

        path = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    except ImportError:
        return None
    return {
        "name": TINY, "kind": "cpu", "model": str(path), "num_cpus": 0.1,
        "options": {"device": "cpu", "max_tokens": 8},
    }


@pytest.fixture(scope="session")
def agent_config(
    upstream: OpenAIServer, docs_root: Path, tiny_model: dict[str, Any] | None
) -> AgentConfig:
    return AgentConfig.model_validate({
        "cloud_url": "http://127.0.0.1:9",  # each test points its link at its own gateway
        "agent_token": "unused",
        "name": "office",
        "models": [{
            "name": MODEL, "kind": "openai-compatible", "base_url": upstream.base_url,
            "model": "qwen-local", "context_length": 4096, "num_cpus": 0.05,
            "options": {"retry_base_delay_s": 0.01},
        }, *([tiny_model] if tiny_model else [])],
        "tools": {"file_read": {"root": str(docs_root)}},
        "local_api": {"enabled": True, "port": free_port()},
        "runtime": {"num_cpus": 2},
        "link": {"reconnect_base_s": 0.05, "reconnect_max_s": 0.3, "open_timeout_s": 5},
    })


@pytest.fixture(scope="session")
def local_app(agent_config: AgentConfig) -> Iterator[Any]:
    """The agent's local Serve app, started once for the whole session."""
    from agent.app import LocalApp

    app = LocalApp.start(agent_config)
    yield app
    app.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream: OpenAIServer) -> None:
    upstream.reset()


@pytest.fixture
def gateway_double() -> type[GatewayDouble]:
    return GatewayDouble


class GatewayDouble:
    """The gateway's side of agent sockets, calling the hub exactly as the gateway does: each
    inbound frame to ``hub.deliver`` (in order), everything ``hub.attach`` yields down the
    socket, ``LinkClosed`` as the close code, ``hub.detach`` when the socket closes."""

    def __init__(self, hub: AgentHub, agents: dict[str, tuple[str, str]]) -> None:
        self.hub = hub
        self.agents = agents  # token → (agent_id, user_id)
        self.port = free_port()
        self.connections = 0
        self.closes: list[int] = []
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = FastAPI()
        self.app.add_api_websocket_route("/v1/agents/connect", self._connect)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _connect(self, ws: WebSocket) -> None:
        token = ws.headers.get("authorization", "").removeprefix("Bearer ")
        who = self.agents.get(token)
        if who is None:
            await ws.close(code=CLOSE_UNAUTHORIZED)
            return
        agent_id, user_id = who
        await ws.accept()
        self.connections += 1
        connection_id = uuid.uuid4().hex
        ready = asyncio.Event()
        pump = asyncio.create_task(self._pump(ws, agent_id, connection_id, user_id, ready))
        try:
            await ready.wait()  # attach's first item: the link is registered
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                frame = message.get("text") or message.get("bytes")
                if frame is not None:
                    await self.hub.deliver(agent_id, frame, connection_id=connection_id)
        finally:
            await self.hub.detach(agent_id, connection_id)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    async def _pump(
        self, ws: WebSocket, agent_id: str, connection_id: str, user_id: str, ready: asyncio.Event
    ) -> None:
        try:
            async for item in self.hub.attach(agent_id, connection_id, user_id=user_id):
                if isinstance(item, LinkClosed):
                    self.closes.append(item.code)
                    await ws.close(code=item.code, reason=item.reason)
                    return
                await ws.send_text(item)
                ready.set()
        finally:
            ready.set()

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None
