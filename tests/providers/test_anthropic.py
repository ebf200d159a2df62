"""AnthropicProvider (the official SDK inside) against the loopback Anthropic Messages API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    ContextLengthError,
    PACoreError,
    RateLimitError,
    UpstreamError,
    UpstreamUnavailableError,
)
from pacore.errors import TimeoutError as PACoreTimeoutError
from pacore.providers.anthropic import AnthropicProvider
from pacore.providers.base import ProviderConfig
from pacore.providers.registry import provider_class
from pacore.testing.anthropic_server import AnthropicServer
from pacore.testing.loopback import Reply, StreamFault
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    ImagePart,
    Message,
    TextPart,
    ToolCall,
    ToolDefinition,
)

MODEL = "claude-sonnet-4-5"


@pytest.fixture(scope="module")
def running_server() -> Iterator[AnthropicServer]:
    with AnthropicServer(api_key="test-key") as s:
        yield s


@pytest.fixture
def server(running_server: AnthropicServer) -> AnthropicServer:
    running_server.reset()
    return running_server


def make_provider(base_url: str, **overrides: object) -> AnthropicProvider:
    fields: dict[str, object] = {
        "kind": "anthropic",
        "name": "claude",
        "api_key": "test-key",
        "base_url": base_url,
        "default_model": MODEL,
        "max_retries": 2,
        "timeout_s": 10.0,
        "options": {"retry_base_delay_s": 0.01},
    }
    fields.update(overrides)
    provider = provider_class("anthropic")(ProviderConfig.model_validate(fields))
    assert isinstance(provider, AnthropicProvider)
    return provider


@pytest.fixture
async def provider(server: AnthropicServer) -> AsyncIterator[AnthropicProvider]:
    p = make_provider(server.url)
    yield p
    await p.aclose()


def ask(text: str = "hello there world", **kw: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"messages": [{"role": "user", "content": text}], **kw})


async def collect(provider: AnthropicProvider, request: CompletionRequest) -> list[CompletionChunk]:
    return [chunk async for chunk in provider.stream(request)]


def sent(server: AnthropicServer) -> list[dict[str, object]]:
    return [r.body for r in server.requests_to("/v1/messages")]


# --- answers ----------------------------------------------------------------------------------


async def test_complete_returns_the_answer_with_usage(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    result = await provider.complete(ask("hello there world"))

    assert result.content == "echo: hello there world"
    assert result.finish_reason == "stop"
    assert result.model == MODEL and result.provider == "claude"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 4)
    assert result.usage.total_tokens == 7
    (body,) = sent(server)
    assert body["model"] == MODEL and body["max_tokens"] == 4096
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hello there world"}]}
    ]
    assert "stream" not in body


async def test_the_key_is_sent_and_the_api_version_named(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    await provider.complete(ask())

    headers = server.requests_to("/v1/messages")[0].headers
    assert "test-key" in (headers.get("x-api-key") or headers.get("authorization", ""))
    assert headers["anthropic-version"]


async def test_stream_yields_chunks_in_order_and_usage_last(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    chunks = await collect(provider, ask("one two three four"))

    contents = [c.content for c in chunks if c.content]
    assert contents == ["echo:", " one", " two", " three", " four"]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 5)
    assert sent(server)[0]["stream"] is True


async def test_max_tokens_from_options_and_finish_length(server: AnthropicServer) -> None:
    provider = make_provider(server.url, options={"max_tokens": 2, "retry_base_delay_s": 0.01})
    try:
        result = await provider.complete(ask("a b c d"))
        chunks = await collect(provider, ask("a b c d"))
    finally:
        await provider.aclose()

    assert result.content == "echo: a" and result.finish_reason == "length"
    assert chunks[-1].finish_reason == "length"
    assert [b["max_tokens"] for b in sent(server)] == [2, 2]


async def test_sampling_options_are_mapped(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    request = ask(
        "say stop here",
        temperature=0.5,
        top_p=0.9,
        stop=["here"],
        max_tokens=50,
        extra={"top_k": 5},
    )
    result = await provider.complete(request)

    body = sent(server)[0]
    assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.5, 0.9, ["here"])
    assert (body["max_tokens"], body["top_k"]) == (50, 5)
    assert result.content == "echo: say stop " and result.finish_reason == "stop"


async def test_temperature_above_one_is_refused_before_any_call(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    with pytest.raises(BadRequestError) as info:
        await provider.complete(ask(temperature=1.5))
    assert (info.value.param, info.value.provider) == ("temperature", "claude")
    assert server.requests == []


# --- request translation ----------------------------------------------------------------------


async def test_system_messages_become_the_system_parameter_and_turns_merge(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(role="system", content="Be brief."),
            Message(role="user", content="first"),
            Message(role="user", content="second"),
            Message(role="system", content="Relevant memory: the user likes tea."),
            Message(role="assistant", content="noted"),
            Message(role="assistant", content="anything else?"),
            Message(role="user", content="last"),
        ]
    )
    result = await provider.complete(request)

    body = sent(server)[0]
    assert body["system"] == "Be brief.\n\nRelevant memory: the user likes tea."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert [b["text"] for b in body["messages"][0]["content"]] == ["first", "second"]
    assert [b["text"] for b in body["messages"][1]["content"]] == ["noted", "anything else?"]
    assert result.content == "echo: last"


async def test_images_become_base64_and_url_sources(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(
                role="user",
                content=[
                    TextPart(text="what is in these?"),
                    ImagePart(data="iVBORw0KGgo=", media_type="image/png"),
                    ImagePart(url="data:image/jpeg;base64,/9j/4AAQ"),
                    ImagePart(url="https://example.com/cat.png"),
                ],
            )
        ]
    )
    await provider.complete(request)

    blocks = sent(server)[0]["messages"][0]["content"]
    assert blocks[0] == {"type": "text", "text": "what is in these?"}
    assert [b["source"] for b in blocks[1:]] == [
        {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"},
        {"type": "url", "url": "https://example.com/cat.png"},
    ]


async def test_image_data_without_media_type_is_a_bad_request(
    provider: AnthropicProvider,
) -> None:
    request = CompletionRequest(messages=[Message(role="user", content=[ImagePart(data="abc")])])
    with pytest.raises(BadRequestError):
        await provider.complete(request)


WEATHER = ToolDefinition(
    name="get_weather",
    description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


async def test_tools_a_prior_tool_call_and_its_result_are_translated(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(role="user", content="weather in Paris?"),
            Message(
                role="assistant",
                content="Let me look.",
                tool_calls=[
                    ToolCall(id="toolu_01", name="get_weather", arguments='{"city": "Paris"}'),
                ],
            ),
            Message(role="tool", tool_call_id="toolu_01", content="18C and sunny"),
            Message(role="user", content="and tomorrow?"),
        ],
        tools=[WEATHER],
        tool_choice="get_weather",
    )
    await provider.complete(request)

    body = sent(server)[0]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER.parameters,
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assistant, user = body["messages"][1], body["messages"][2]
    assert assistant["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    assert user["role"] == "user"
    assert user["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C and sunny"},
        {"type": "text", "text": "and tomorrow?"},
    ]


@pytest.mark.parametrize(
    ("choice", "wire"),
    [("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"})],
)
async def test_tool_choice_is_mapped(
    server: AnthropicServer, provider: AnthropicProvider, choice: str, wire: dict[str, str]
) -> None:
    await provider.complete(ask(tools=[WEATHER.model_dump()], tool_choice=choice))
    assert sent(server)[0]["tool_choice"] == wire


async def test_tool_choice_naming_an_unknown_tool_is_a_bad_request(
    provider: AnthropicProvider,
) -> None:
    with pytest.raises(BadRequestError):
        await provider.complete(ask(tools=[WEATHER.model_dump()], tool_choice="send_email"))
    with pytest.raises(BadRequestError):
        await provider.complete(ask(tool_choice="required"))


async def test_tool_call_arguments_that_are_not_a_json_object_are_a_bad_request(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    request = CompletionRequest(
        messages=[
            Message(role="user", content="hi"),
            Message(
                role="assistant",
                tool_calls=[ToolCall(id="toolu_1", name="get_weather", arguments="[1, 2")],
            ),
            Message(role="tool", tool_call_id="toolu_1", content="ok"),
        ]
    )
    with pytest.raises(BadRequestError):
        await provider.complete(request)
    assert server.requests == []


async def test_a_tool_use_answer_becomes_a_tool_call(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    server.queue(Reply.tool_call("get_weather", {"city": "Paris"}, id="toolu_9"))
    result = await provider.complete(ask("weather?", tools=[WEATHER.model_dump()]))

    assert result.finish_reason == "tool_calls"
    assert result.tool_calls is not None
    (call,) = result.tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "toolu_9",
        "get_weather",
        {"city": "Paris"},
    )


async def test_a_streamed_tool_use_becomes_tool_call_deltas(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    server.queue(Reply.tool_call("get_weather", {"city": "Paris"}, id="toolu_9", text="Checking."))
    chunks = await collect(provider, ask("weather?", tools=[WEATHER.model_dump()]))

    assert "".join(c.content for c in chunks) == "Checking."
    deltas = [d for c in chunks for d in (c.tool_calls or [])]
    assert (deltas[0].index, deltas[0].id, deltas[0].name) == (0, "toolu_9", "get_weather")
    assert len(deltas) > 2 and all(d.index == 0 for d in deltas)
    assert json.loads("".join(d.arguments for d in deltas)) == {"city": "Paris"}
    assert chunks[-1].finish_reason == "tool_calls"


# --- errors and retries -----------------------------------------------------------------------


async def test_a_bad_key_is_an_authentication_error_and_not_retried(
    server: AnthropicServer,
) -> None:
    provider = make_provider(server.url, api_key="wrong")
    try:
        with pytest.raises(AuthenticationError) as info:
            await provider.complete(ask())
        with pytest.raises(AuthenticationError):
            await collect(provider, ask())
    finally:
        await provider.aclose()
    assert info.value.provider == "claude" and not info.value.retryable
    assert len(server.requests_to("/v1/messages")) == 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_429_with_retry_after_is_retried_then_succeeds(
    server: AnthropicServer, provider: AnthropicProvider, streaming: bool
) -> None:
    server.queue(Reply.error(429, "rate limited", headers={"retry-after": "0"}))
    if streaming:
        chunks = await collect(provider, ask("again"))
        assert "".join(c.content for c in chunks) == "echo: again"
    else:
        assert (await provider.complete(ask("again"))).content == "echo: again"
    assert len(server.requests_to("/v1/messages")) == 2


@pytest.mark.parametrize(
    ("status", "expected"), [(500, UpstreamError), (529, UpstreamUnavailableError)]
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_server_errors_are_retried_then_normalised(
    server: AnthropicServer,
    provider: AnthropicProvider,
    status: int,
    expected: type[PACoreError],
    streaming: bool,
) -> None:
    server.queue(*[Reply.error(status) for _ in range(3)])
    with pytest.raises(expected) as info:
        if streaming:
            await collect(provider, ask())
        else:
            await provider.complete(ask())
    assert info.value.retryable and info.value.provider == "claude"
    assert len(server.requests_to("/v1/messages")) == 1 + provider.config.max_retries


async def test_rate_limit_exhausting_the_budget_keeps_its_type(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    server.queue(*[Reply.error(429, headers={"retry-after": "0"}) for _ in range(3)])
    with pytest.raises(RateLimitError):
        await provider.complete(ask())
    assert len(server.requests_to("/v1/messages")) == 3


async def test_a_prompt_too_long_is_a_context_length_error(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    server.queue(Reply.error(400, "prompt is too long: 210000 tokens > 200000 maximum"))
    with pytest.raises(ContextLengthError):
        await provider.complete(ask())
    assert len(server.requests_to("/v1/messages")) == 1


@pytest.mark.parametrize("fault", ["malformed", "truncate", "drop"])
async def test_a_broken_stream_ends_in_a_clean_upstream_error(
    server: AnthropicServer, provider: AnthropicProvider, fault: StreamFault
) -> None:
    server.queue(Reply(fault=fault, fault_after=2))
    received: list[CompletionChunk] = []
    with pytest.raises(UpstreamError):
        async for chunk in provider.stream(ask("one two three four")):
            received.append(chunk)
    assert [c.content for c in received] == ["echo:", " one"]
    # Two chunks had reached the caller: replaying the answer would repeat them.
    assert len(server.requests_to("/v1/messages")) == 1


async def test_an_error_event_mid_stream_is_normalised_and_not_retried(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    server.queue(Reply(fault="error", fault_after=1, error_type="overloaded_error"))
    received: list[CompletionChunk] = []
    with pytest.raises(UpstreamUnavailableError) as info:
        async for chunk in provider.stream(ask()):
            received.append(chunk)
    assert len(received) == 1 and info.value.retryable
    assert len(server.requests_to("/v1/messages")) == 1


async def test_a_stream_failing_before_its_first_chunk_is_retried(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    server.queue(Reply(fault="error", fault_after=0, error_type="overloaded_error"))
    chunks = await collect(provider, ask("fine"))
    assert "".join(c.content for c in chunks) == "echo: fine"
    assert len(server.requests_to("/v1/messages")) == 2


async def test_a_slow_upstream_is_a_timeout(server: AnthropicServer) -> None:
    provider = make_provider(server.url, timeout_s=0.2, max_retries=0)
    server.queue(Reply(delay_s=3), Reply(chunk_delay_s=3))
    try:
        with pytest.raises(PACoreTimeoutError):
            await provider.complete(ask())
        received: list[CompletionChunk] = []
        with pytest.raises(PACoreTimeoutError):
            async for chunk in provider.stream(ask()):
                received.append(chunk)
    finally:
        await provider.aclose()
    assert received == []
    assert await server.until_disconnected(count=2)


# --- cancellation -----------------------------------------------------------------------------


async def test_closing_a_stream_closes_the_upstream_connection(
    server: AnthropicServer, provider: AnthropicProvider
) -> None:
    server.queue(Reply(chunk_delay_s=0.05, text=" ".join(["word"] * 200)))
    stream = provider.stream(ask())
    first = await anext(stream)
    assert first.content == "word"
    await stream.aclose()  # type: ignore[attr-defined]

    assert await server.until_disconnected()
    assert server.completed == 0


async def test_cancelling_the_consumer_closes_the_upstream_connection(
    server: AnthropicServer, provider: AnthropicProvider
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


async def test_list_models_and_health(server: AnthropicServer, provider: AnthropicProvider) -> None:
    models = await provider.list_models()
    health = await provider.health_check()

    assert [m.id for m in models] == ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]
    assert all(m.provider == "claude" for m in models)
    assert health.healthy and health.latency_ms is not None
    assert server.requests_to("/v1/models")


async def test_list_models_falls_back_to_the_default_model_on_404_only() -> None:
    with AnthropicServer(models=None) as server:
        provider = make_provider(server.url, default_model="claude-proxy")
        try:
            assert [m.id for m in await provider.list_models()] == ["claude-proxy"]
        finally:
            await provider.aclose()
    with AnthropicServer(api_key="test-key") as server:
        provider = make_provider(server.url, api_key="wrong")
        try:
            with pytest.raises(AuthenticationError):
                await provider.list_models()
            health = await provider.health_check()
        finally:
            await provider.aclose()
    assert not health.healthy and health.detail


async def test_an_unreachable_upstream_is_unavailable() -> None:
    with AnthropicServer() as server:
        url = server.url
    provider = make_provider(url, max_retries=0)
    try:
        with pytest.raises(UpstreamUnavailableError):
            await provider.complete(ask())
        assert not (await provider.health_check()).healthy
    finally:
        await provider.aclose()
