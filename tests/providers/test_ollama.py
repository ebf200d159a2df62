"""OllamaProvider (httpx inside) against the loopback Ollama server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PACoreError,
    UpstreamError,
    UpstreamUnavailableError,
)
from pacore.errors import TimeoutError as PACoreTimeoutError
from pacore.providers.base import ProviderConfig
from pacore.providers.ollama import OllamaProvider
from pacore.providers.registry import provider_class
from pacore.testing.loopback import Reply, StreamFault
from pacore.testing.ollama_server import OllamaServer
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    ImagePart,
    Message,
    TextPart,
    ToolCall,
    ToolDefinition,
)

MODEL = "llama3.2"


@pytest.fixture(scope="module")
def running_server() -> Iterator[OllamaServer]:
    with OllamaServer() as s:
        yield s


@pytest.fixture
def server(running_server: OllamaServer) -> OllamaServer:
    running_server.reset()
    return running_server


def make_provider(base_url: str, **overrides: object) -> OllamaProvider:
    fields: dict[str, object] = {
        "kind": "ollama",
        "name": "local",
        "base_url": base_url,
        "default_model": MODEL,
        "max_retries": 2,
        "timeout_s": 10.0,
        "options": {"retry_base_delay_s": 0.01},
    }
    fields.update(overrides)
    provider = provider_class("ollama")(ProviderConfig.model_validate(fields))
    assert isinstance(provider, OllamaProvider)
    return provider


@pytest.fixture
async def provider(server: OllamaServer) -> AsyncIterator[OllamaProvider]:
    p = make_provider(server.url)
    yield p
    await p.aclose()


def ask(text: str = "hello there world", **kw: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"messages": [{"role": "user", "content": text}], **kw})


async def collect(provider: OllamaProvider, request: CompletionRequest) -> list[CompletionChunk]:
    return [chunk async for chunk in provider.stream(request)]


def chats(server: OllamaServer) -> list[dict[str, object]]:
    return [r.body for r in server.requests_to("/api/chat")]


# --- answers ----------------------------------------------------------------------------------


async def test_complete_returns_the_answer_with_usage(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    result = await provider.complete(ask("hello there world"))

    assert result.content == "echo: hello there world"
    assert (result.finish_reason, result.model, result.provider) == ("stop", MODEL, "local")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 4)
    (body,) = chats(server)
    assert body == {
        "model": MODEL,
        "stream": False,
        "messages": [{"role": "user", "content": "hello there world"}],
    }


async def test_stream_yields_chunks_in_order_and_usage_last(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    chunks = await collect(provider, ask("one two three"))

    assert [c.content for c in chunks[:-1]] == ["echo:", " one", " two", " three"]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)
    assert chats(server)[0]["stream"] is True


async def test_options_are_mapped(server: OllamaServer, provider: OllamaProvider) -> None:
    request = ask(
        "a b c d e",
        temperature=0.3,
        top_p=0.8,
        max_tokens=3,
        stop=["###"],
        extra={"num_ctx": 8192, "keep_alive": "5m"},
    )
    result = await provider.complete(request)

    body = chats(server)[0]
    assert body["options"] == {
        "temperature": 0.3,
        "top_p": 0.8,
        "num_predict": 3,
        "stop": ["###"],
        "num_ctx": 8192,
    }
    assert body["keep_alive"] == "5m"
    assert result.content == "echo: a b" and result.finish_reason == "length"


async def test_system_prompt_and_conversation_are_sent_in_order(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(role="system", content="Be brief."),
            Message(role="user", content="hi"),
            Message(role="assistant", content="hello"),
            Message(role="user", content="how are you"),
        ]
    )
    result = await provider.complete(request)

    assert chats(server)[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]
    assert result.content == "echo: how are you"


async def test_images_are_sent_as_a_base64_list(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(
                role="user",
                content=[
                    TextPart(text="describe"),
                    ImagePart(data="iVBORw0KGgo=", media_type="image/png"),
                    ImagePart(url="data:image/jpeg;base64,/9j/4AAQ"),
                ],
            )
        ]
    )
    await provider.complete(request)

    assert chats(server)[0]["messages"] == [
        {"role": "user", "content": "describe", "images": ["iVBORw0KGgo=", "/9j/4AAQ"]},
    ]


async def test_an_image_url_is_a_bad_request(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(role="user", content=[ImagePart(url="https://example.com/cat.png")]),
        ]
    )
    with pytest.raises(BadRequestError) as info:
        await provider.complete(request)
    assert info.value.provider == "local"
    assert server.requests == []


# --- tools ------------------------------------------------------------------------------------

WEATHER = ToolDefinition(
    name="get_weather",
    description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)


async def test_tools_a_prior_tool_call_and_its_result_are_translated(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(role="user", content="weather in Paris?"),
            Message(
                role="assistant",
                tool_calls=[
                    ToolCall(id="call_7", name="get_weather", arguments='{"city": "Paris"}'),
                ],
            ),
            Message(role="tool", tool_call_id="call_7", content="18C and sunny"),
        ],
        tools=[WEATHER],
        tool_choice="auto",
    )
    await provider.complete(request)

    body = chats(server)[0]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER.parameters,
            },
        }
    ]
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18C and sunny", "tool_name": "get_weather"},
    ]


async def test_tool_choice_none_drops_the_tools_and_forcing_is_refused(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    await provider.complete(ask(tools=[WEATHER.model_dump()], tool_choice="none"))
    assert "tools" not in chats(server)[0]
    for choice in ("required", "get_weather"):
        with pytest.raises(BadRequestError):
            await provider.complete(ask(tools=[WEATHER.model_dump()], tool_choice=choice))


async def test_a_tool_call_answer_becomes_a_tool_call(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    server.queue(Reply.tool_call("get_weather", {"city": "Paris"}, id="call_9"))
    result = await provider.complete(ask(tools=[WEATHER.model_dump()]))

    assert result.finish_reason == "tool_calls"
    assert result.tool_calls is not None
    (call,) = result.tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "call_9",
        "get_weather",
        {"city": "Paris"},
    )


async def test_a_streamed_tool_call_becomes_deltas_with_generated_ids(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    server.queue(Reply.tool_call("get_weather", {"city": "Paris"}, id=""))
    chunks = await collect(provider, ask(tools=[WEATHER.model_dump()]))

    deltas = [d for c in chunks for d in (c.tool_calls or [])]
    assert len(deltas) == 1
    (delta,) = deltas
    assert (delta.index, delta.name) == (0, "get_weather")
    assert delta.id and delta.id.startswith("call_")
    assert json.loads(delta.arguments) == {"city": "Paris"}
    assert chunks[-1].finish_reason == "tool_calls"


# --- errors and retries -----------------------------------------------------------------------


async def test_an_unknown_model_is_not_found_and_not_retried(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    with pytest.raises(NotFoundError) as info:
        await provider.complete(ask(model="mistral"))
    assert "mistral" in info.value.message
    assert len(chats(server)) == 1


async def test_a_bad_key_at_a_proxy_is_an_authentication_error() -> None:
    async with OllamaServer(api_key="proxy-key") as server:
        provider = make_provider(server.url, api_key="wrong")
        good = make_provider(server.url, api_key="proxy-key")
        try:
            with pytest.raises(AuthenticationError):
                await collect(provider, ask())
            assert (await good.complete(ask("ok"))).content == "echo: ok"
        finally:
            await provider.aclose()
            await good.aclose()
        assert server.requests[-1].headers["authorization"] == "Bearer proxy-key"
        assert len(server.requests_to("/api/chat")) == 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_429_with_retry_after_is_retried_then_succeeds(
    server: OllamaServer, provider: OllamaProvider, streaming: bool
) -> None:
    server.queue(Reply.error(429, "too many requests", headers={"retry-after": "0"}))
    if streaming:
        chunks = await collect(provider, ask("again"))
        assert "".join(c.content for c in chunks) == "echo: again"
    else:
        assert (await provider.complete(ask("again"))).content == "echo: again"
    assert len(chats(server)) == 2


@pytest.mark.parametrize(
    ("status", "expected"), [(500, UpstreamError), (503, UpstreamUnavailableError)]
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_server_errors_are_retried_then_normalised(
    server: OllamaServer,
    provider: OllamaProvider,
    status: int,
    expected: type[PACoreError],
    streaming: bool,
) -> None:
    server.queue(*[Reply.error(status, "server busy") for _ in range(3)])
    with pytest.raises(expected) as info:
        if streaming:
            await collect(provider, ask())
        else:
            await provider.complete(ask())
    assert info.value.retryable and info.value.provider == "local"
    assert "server busy" in info.value.message
    assert len(chats(server)) == 1 + provider.config.max_retries


@pytest.mark.parametrize("fault", ["malformed", "truncate", "drop", "error"])
async def test_a_broken_stream_ends_in_a_clean_upstream_error(
    server: OllamaServer, provider: OllamaProvider, fault: StreamFault
) -> None:
    server.queue(Reply(fault=fault, fault_after=2))
    received: list[CompletionChunk] = []
    with pytest.raises(UpstreamError):
        async for chunk in provider.stream(ask("one two three")):
            received.append(chunk)
    assert [c.content for c in received] == ["echo:", " one"]
    # Chunks had reached the caller: replaying the answer would repeat them.
    assert len(chats(server)) == 1


async def test_a_stream_failing_before_its_first_chunk_is_retried(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    server.queue(Reply(fault="malformed", fault_after=0))
    chunks = await collect(provider, ask("fine"))
    assert "".join(c.content for c in chunks) == "echo: fine"
    assert len(chats(server)) == 2


async def test_a_slow_upstream_is_a_timeout(server: OllamaServer) -> None:
    provider = make_provider(server.url, timeout_s=0.2, max_retries=0)
    server.queue(Reply(delay_s=3), Reply(chunk_delay_s=3))
    try:
        with pytest.raises(PACoreTimeoutError):
            await provider.complete(ask())
        with pytest.raises(PACoreTimeoutError):
            await collect(provider, ask())
    finally:
        await provider.aclose()
    assert await server.until_disconnected(count=2)


async def test_an_unreachable_ollama_is_unavailable() -> None:
    with OllamaServer() as server:
        url = server.url
    provider = make_provider(url, max_retries=0)
    try:
        with pytest.raises(UpstreamUnavailableError):
            await collect(provider, ask())
        health = await provider.health_check()
    finally:
        await provider.aclose()
    assert not health.healthy and health.detail


# --- cancellation -----------------------------------------------------------------------------


async def test_closing_a_stream_closes_the_upstream_connection(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    server.queue(Reply(chunk_delay_s=0.05, text=" ".join(["word"] * 200)))
    stream = provider.stream(ask())
    assert (await anext(stream)).content == "word"
    await stream.aclose()  # type: ignore[attr-defined]

    assert await server.until_disconnected()
    assert server.completed == 0


async def test_cancelling_the_consumer_closes_the_upstream_connection(
    server: OllamaServer, provider: OllamaProvider
) -> None:
    server.queue(Reply(chunk_delay_s=0.05, text=" ".join(["word"] * 200)))
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(ask()):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await server.until_disconnected()


# --- models and health ------------------------------------------------------------------------


async def test_list_models_and_health(server: OllamaServer, provider: OllamaProvider) -> None:
    models = await provider.list_models()
    health = await provider.health_check()

    assert [m.id for m in models] == ["llama3.2:latest", "qwen2.5-coder:7b"]
    assert all(m.provider == "local" for m in models)
    assert health.healthy and health.latency_ms is not None and health.detail == "ollama 0.12.6"
    assert server.requests_to("/api/tags") and server.requests_to("/api/version")
