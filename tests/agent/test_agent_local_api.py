"""The agent's local OpenAI-compatible API, driven by the official openai client: office clients
use the local models directly, through the agent's Serve app."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from agent.config import AgentConfig
from pacore.testing.openai_server import OpenAIServer, Scripted, ScriptedToolCall

MODEL = "office-llm"


@pytest.fixture
async def client(local_app: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    url = local_app.local_api_url
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        pytest.skip("Serve was started by another suite without the agent's HTTP proxy")
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as c:
        yield c


async def test_models_are_listed(client: openai.AsyncOpenAI, agent_config: AgentConfig) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [m.name for m in agent_config.models]


async def test_chat_completion(client: openai.AsyncOpenAI, upstream: OpenAIServer) -> None:
    answer = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "red green"}], max_tokens=3
    )
    assert answer.choices[0].message.content == "red green red"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    sent = upstream.chat_requests[-1].body
    assert (sent["model"], sent["max_tokens"]) == ("qwen-local", 3)


async def test_streamed_chat_completion(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "up down"}], stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert text == "up down up down up down"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 6


async def test_tool_calls_come_back(client: openai.AsyncOpenAI, upstream: OpenAIServer) -> None:
    upstream.script(Scripted(tool_calls=(ScriptedToolCall("lookup", '{"q": "x"}', "call_7"),)))
    answer = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "find x"}],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
    )
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.id, call.function.name, call.function.arguments) == ("call_7", "lookup", '{"q": "x"}')
    assert answer.choices[0].finish_reason == "tool_calls"
    assert upstream.chat_requests[-1].body["tools"][0]["function"]["name"] == "lookup"


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "hi"}], stream=stream
            )


async def test_upstream_errors_keep_their_status(
    client: openai.AsyncOpenAI, upstream: OpenAIServer
) -> None:
    upstream.script(Scripted(status=400, message="the prompt is malformed"))
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert "malformed" in str(info.value)
