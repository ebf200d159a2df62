"""OpenAIProvider, the official SDK inside, against the loopback OpenAI server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    ContextLengthError,
    TimeoutError,
    UpstreamError,
    UpstreamUnavailableError,
)
from pacore.providers.base import ProviderConfig
from pacore.providers.openai import OpenAIProvider
from pacore.providers.registry import provider_class
from pacore.testing.openai_server import OpenAIServer, Scripted, ScriptedToolCall
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    ImagePart,
    Message,
    TextPart,
    ToolCall,
    ToolDefinition,
)

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(tokens=6, api_key=KEY) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh(server: OpenAIServer) -> None:
    server.reset()


def make(server: OpenAIServer, **overrides: Any) -> OpenAIProvider:
    fields: dict[str, Any] = {
        "kind": "openai", "name": "openai", "api_key": KEY, "base_url": server.base_url,
        "default_model": "gpt-test", "options": {"retry_base_delay_s": 0.01}, "timeout_s": 10.0,
    }
    fields.update(overrides)
    return OpenAIProvider(ProviderConfig(**fields))


@pytest.fixture
async def provider(server: OpenAIServer) -> AsyncIterator[OpenAIProvider]:
    p = make(server)
    yield p
    await p.aclose()


def ask(text: str = "alpha beta gamma", **kw: Any) -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content=text)], **kw)


async def collect(it: AsyncIterator[CompletionChunk]) -> list[CompletionChunk]:
    return [c async for c in it]


def test_registered_under_openai() -> None:
    assert provider_class("openai") is OpenAIProvider


async def test_complete(provider: OpenAIProvider, server: OpenAIServer) -> None:
    result = await provider.complete(ask())
    assert result.content == "alpha beta gamma alpha beta gamma"
    assert result.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 6)
    assert result.usage.total_tokens == 9
    assert (result.model, result.provider) == ("gpt-test", "openai")
    [received] = server.chat_requests
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.body["model"] == "gpt-test"
    assert received.body["messages"] == [{"role": "user", "content": "alpha beta gamma"}]
    assert "stream" not in received.body or received.body["stream"] is False


async def test_request_translation(provider: OpenAIProvider, server: OpenAIServer) -> None:
    request = CompletionRequest(
        model="gpt-other",
        messages=[
            Message(role="system", content="be brief"),
            Message(role="user", content=[
                TextPart(text="what is this"),
                ImagePart(url="https://example.com/cat.png"),
                ImagePart(data="aGk=", media_type="image/png"),
            ]),
            Message(role="assistant", content="", tool_calls=[
                ToolCall(id="call_1", name="lookup", arguments='{"q": "cat"}'),
            ]),
            Message(role="tool", tool_call_id="call_1", content="a cat"),
        ],
        temperature=0.2, top_p=0.9, max_tokens=50, stop=["END"],
        tools=[ToolDefinition(name="lookup", description="search",
                              parameters={"type": "object", "properties": {"q": {"type": "string"}}})],
        tool_choice="lookup",
        extra={"seed": 7, "response_format": {"type": "json_object"}, "model": "ignored"},
    )
    await provider.complete(request)
    body = server.chat_requests[0].body
    assert body["model"] == "gpt-other"
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (
        0.2, 0.9, 50, ["END"]
    )
    assert (body["seed"], body["response_format"]) == (7, {"type": "json_object"})
    system, user, assistant, tool = body["messages"]
    assert system == {"role": "system", "content": "be brief"}
    assert user["content"] == [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
    ]
    assert assistant == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "lookup", "arguments": '{"q": "cat"}'}},
    ]}
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}
    assert body["tools"] == [{"type": "function", "function": {
        "name": "lookup", "description": "search",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}


async def test_invalid_messages_are_bad_requests(provider: OpenAIProvider) -> None:
    with pytest.raises(BadRequestError, match="tool_call_id"):
        await provider.complete(CompletionRequest(messages=[Message(role="tool", content="x")]))
    with pytest.raises(BadRequestError, match="image"):
        await provider.complete(CompletionRequest(
            messages=[Message(role="user", content=[ImagePart(data="aGk=")])]
        ))


async def test_no_model_anywhere(server: OpenAIServer) -> None:
    p = make(server, default_model=None)
    with pytest.raises(BadRequestError) as err:
        await p.complete(ask())
    assert err.value.param == "model"
    await p.aclose()


async def test_missing_key_is_an_authentication_error(server: OpenAIServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    with pytest.raises(AuthenticationError):
        make(server, api_key=None)


async def test_max_tokens_cuts_the_answer(provider: OpenAIProvider) -> None:
    result = await provider.complete(ask(max_tokens=2))
    assert (result.content, result.finish_reason) == ("alpha beta", "length")


async def test_stream(provider: OpenAIProvider, server: OpenAIServer) -> None:
    chunks = await collect(provider.stream(ask()))
    assert [c.content for c in chunks[:-1]] == [
        "alpha", " beta", " gamma", " alpha", " beta", " gamma"
    ]
    assert all(c.usage is None and c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 6)
    body = server.chat_requests[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_stream_tool_call(provider: OpenAIProvider, server: OpenAIServer) -> None:
    call = ScriptedToolCall("get_weather", '{"city": "Paris"}', id="call_w")
    server.script(Scripted(tool_calls=(call,)))
    chunks = await collect(provider.stream(ask("weather?", tools=[
        ToolDefinition(name="get_weather")
    ])))
    deltas = [d for c in chunks for d in c.tool_calls or []]
    assert deltas[0].id == "call_w" and deltas[0].name == "get_weather"
    assert {d.index for d in deltas} == {0}
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris"}'
    assert chunks[-1].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None


async def test_complete_tool_call(provider: OpenAIProvider, server: OpenAIServer) -> None:
    server.script(Scripted(tool_calls=(
        ScriptedToolCall("a", '{"x": 1}', id="c1"), ScriptedToolCall("b", "{}", id="c2"),
    )))
    result = await provider.complete(ask(tools=[ToolDefinition(name="a"), ToolDefinition(name="b")]))
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls == [
        ToolCall(id="c1", name="a", arguments='{"x": 1}'), ToolCall(id="c2", name="b"),
    ]
    assert result.content == ""


async def test_bad_key_is_an_authentication_error(server: OpenAIServer) -> None:
    p = make(server, api_key="sk-wrong")
    with pytest.raises(AuthenticationError) as err:
        await p.complete(ask())
    assert (err.value.status, err.value.provider, err.value.retryable) == (401, "openai", False)
    assert "sk-wrong" not in err.value.message
    assert len(server.chat_requests) == 1
    await p.aclose()


async def test_rate_limit_is_retried_after_retry_after(provider: OpenAIProvider,
                                                       server: OpenAIServer) -> None:
    server.script(Scripted(status=429, headers={"retry-after": "0"}, message="slow down",
                           error_type="rate_limit_error"))
    result = await provider.complete(ask())
    assert result.content
    assert len(server.chat_requests) == 2


async def test_stream_rate_limit_is_retried(provider: OpenAIProvider, server: OpenAIServer) -> None:
    server.script(Scripted(status=429, headers={"retry-after-ms": "5"}))
    chunks = await collect(provider.stream(ask()))
    assert chunks[-1].finish_reason == "stop"
    assert len(server.chat_requests) == 2


async def test_server_errors_exhaust_the_budget(server: OpenAIServer) -> None:
    p = make(server, max_retries=2)
    server.script(*[Scripted(status=500, message="boom")] * 3)
    with pytest.raises(UpstreamError) as err:
        await p.complete(ask())
    assert (err.value.status, err.value.type, err.value.provider) == (502, "upstream_error", "openai")
    assert "boom" in err.value.message
    assert len(server.chat_requests) == 3

    server.reset()
    server.script(*[Scripted(status=503)] * 3)
    with pytest.raises(UpstreamUnavailableError):
        await collect(p.stream(ask()))
    assert len(server.chat_requests) == 3
    await p.aclose()


async def test_context_length_is_not_retried(provider: OpenAIProvider, server: OpenAIServer) -> None:
    server.script(Scripted(status=400, message="This model's maximum context is 8192 tokens",
                           error_type="invalid_request_error", code="context_length_exceeded"))
    with pytest.raises(ContextLengthError) as err:
        await provider.complete(ask())
    assert (err.value.code, err.value.status) == ("context_length_exceeded", 400)
    assert len(server.chat_requests) == 1


async def test_error_after_first_chunk_is_not_retried(provider: OpenAIProvider,
                                                      server: OpenAIServer) -> None:
    server.script(Scripted(truncate_after=2))
    seen: list[str] = []
    with pytest.raises(UpstreamError) as err:
        async for chunk in provider.stream(ask()):
            seen.append(chunk.content)
    assert seen == ["alpha", " beta"]
    assert err.value.provider == "openai"
    assert len(server.chat_requests) == 1


async def test_failure_before_first_chunk_is_retried(provider: OpenAIProvider,
                                                     server: OpenAIServer) -> None:
    server.script(Scripted(truncate_after=0))
    chunks = await collect(provider.stream(ask()))
    assert chunks[-1].finish_reason == "stop"
    assert len(server.chat_requests) == 2


async def test_malformed_stream_is_a_clean_error(provider: OpenAIProvider,
                                                 server: OpenAIServer) -> None:
    server.script(Scripted(malformed_after=1))
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(provider.stream(ask()))
    assert len(server.chat_requests) == 1


async def test_error_event_in_stream(provider: OpenAIProvider, server: OpenAIServer) -> None:
    server.script(Scripted(error_after=1, message="model overloaded"))
    with pytest.raises(UpstreamError, match="model overloaded"):
        await collect(provider.stream(ask()))


async def test_stream_that_stops_without_finishing(provider: OpenAIProvider,
                                                   server: OpenAIServer) -> None:
    server.script(Scripted(end_after=3))
    with pytest.raises(UpstreamError, match="ended before"):
        await collect(provider.stream(ask()))


async def test_timeout(server: OpenAIServer) -> None:
    p = make(server, timeout_s=0.3, max_retries=0)
    server.script(Scripted(delay_s=5.0))
    with pytest.raises(TimeoutError) as err:
        await p.complete(ask())
    assert (err.value.status, err.value.retryable) == (504, True)
    assert await server.wait_for_disconnects(1)
    await p.aclose()


async def test_stream_timeout_between_chunks(server: OpenAIServer) -> None:
    p = make(server, timeout_s=0.3, max_retries=0)
    server.script(Scripted(delay_s=5.0, delay_after=1))
    with pytest.raises(TimeoutError):
        await collect(p.stream(ask()))
    await p.aclose()


async def test_closing_a_stream_closes_the_upstream_connection(provider: OpenAIProvider,
                                                               server: OpenAIServer) -> None:
    server.script(Scripted(delay_s=5.0, delay_after=2))
    stream = provider.stream(ask())
    assert (await anext(stream)).content == "alpha"
    assert (await anext(stream)).content == " beta"
    await stream.aclose()  # type: ignore[attr-defined]
    assert await server.wait_for_disconnects(1)


async def test_cancelling_a_consumer_closes_the_upstream_connection(
    provider: OpenAIProvider, server: OpenAIServer
) -> None:
    server.script(Scripted(delay_s=5.0, delay_after=1))
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(ask()):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await server.wait_for_disconnects(1)


async def test_health_check_and_models(provider: OpenAIProvider, server: OpenAIServer) -> None:
    health = await provider.health_check()
    assert health.healthy and health.latency_ms is not None and health.latency_ms >= 0
    models = await provider.list_models()
    assert [(m.id, m.provider) for m in models] == [("loopback-model", "openai")]

    wrong = make(server, api_key="sk-wrong")
    health = await wrong.health_check()
    assert not health.healthy and health.detail and "API key" in health.detail
    with pytest.raises(AuthenticationError):
        await wrong.list_models()
    await wrong.aclose()


async def test_unreachable_upstream_is_unhealthy() -> None:
    srv = OpenAIServer()
    url = srv.base_url
    srv.stop()  # bound but never served: now nothing listens on that port
    p = OpenAIProvider(ProviderConfig(kind="openai", name="openai", api_key=KEY, base_url=url,
                                      max_retries=0))
    health = await p.health_check()
    assert not health.healthy and health.detail and "connect" in health.detail
    await p.aclose()


def test_server_runs_as_its_own_process() -> None:
    command = [sys.executable, "-m", "pacore.testing.openai_server", "--port", "0",
               "--tokens", "3", "--token-delay-ms", "1", "--words", "x y"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("listening on http://127.0.0.1:")
            base_url = line.split()[-1]
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            answer = httpx.post(f"{base_url}/chat/completions", json=body, timeout=10).json()
            assert answer["choices"][0]["message"]["content"] == "x y x"
            with httpx.stream("POST", f"{base_url}/chat/completions", timeout=10,
                              json={**body, "stream": True}) as response:
                lines = [ln for ln in response.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            assert len(lines) == 1 + 3 + 1 + 1  # role, tokens, finish, [DONE]
        finally:
            proc.terminate()


def sdk_chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> Any:
    from openai.types.chat import ChatCompletionChunk

    # As the SDK builds it from a response: not validated, so unknown values pass through.
    return ChatCompletionChunk.construct(
        id="c", object="chat.completion.chunk", created=0, model="m", choices=choices, usage=usage,
    )


def test_chunk_translation_edge_cases() -> None:
    from pacore.providers.openai import chunk_from_openai

    role_only = sdk_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
    assert chunk_from_openai(role_only) is None
    usage_only = chunk_from_openai(sdk_chunk([], {"prompt_tokens": 2, "completion_tokens": 3,
                                                  "total_tokens": 5}))
    assert usage_only is not None and usage_only.usage is not None
    assert usage_only.usage.total_tokens == 5
    for upstream, ours in [("eos", "stop"), ("function_call", "tool_calls"), ("length", "length")]:
        chunk = chunk_from_openai(sdk_chunk([{"index": 0, "delta": {}, "finish_reason": upstream}]))
        assert chunk is not None and chunk.finish_reason == ours


# Serve awaits a deployment's async __del__ when it stops the replica; the garbage collector
# here calls it once more and cannot.
@pytest.mark.filterwarnings("ignore:coroutine 'ProviderDeployment.__del__':RuntimeWarning")
async def test_streams_in_flight_survive_a_changed_configuration(server: OpenAIServer) -> None:
    """Old and new Router replicas of a rolling upgrade send one label with two configurations
    to the same provider replica: each answer streaming on the old client finishes on it."""
    from deployments.providers import ProviderDeployment

    def config(model: str) -> ProviderConfig:
        return ProviderConfig(kind="openai", name="openai", api_key=KEY,
                              base_url=server.base_url, default_model=model,
                              options={"retry_base_delay_s": 0.01})

    deployment = ProviderDeployment("openai")
    server.token_delay_s = 0.05
    try:
        async def answer(model: str, after_s: float) -> str:
            await asyncio.sleep(after_s)
            chunks = await collect(deployment.stream("alice", config(model), ask()))
            assert chunks[-1].finish_reason == "stop"
            return chunks[-1].model or ""

        models = await asyncio.gather(*(answer("gpt-old" if i % 2 else "gpt-new", 0.03 * i)
                                        for i in range(8)))
    finally:
        server.token_delay_s = 0.0
        await deployment.__del__()
    assert models == ["gpt-new", "gpt-old"] * 4
