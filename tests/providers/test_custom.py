"""CustomEndpointProvider against loopback OpenAI-compatible servers that leave things out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    UpstreamUnavailableError,
)
from pacore.providers.base import ProviderConfig
from pacore.providers.custom import NO_KEY, CustomEndpointProvider
from pacore.providers.openai import OpenAIProvider
from pacore.providers.registry import ProviderCache, provider_class
from pacore.testing.openai_server import OpenAIServer, Scripted
from pacore.types import CompletionRequest, Message, Usage


@pytest.fixture(scope="module")
def bare() -> Iterator[OpenAIServer]:
    """A server with no usage, no /v1/models, no key, and no patience for stream_options."""
    with OpenAIServer(tokens=4, include_usage=False, models_endpoint=False,
                      reject_stream_options=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def full() -> Iterator[OpenAIServer]:
    """A complete OpenAI-compatible server that wants a key."""
    with OpenAIServer(tokens=4, api_key="gsk-user-key", models=("llama-3-8b", "mixtral")) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh(bare: OpenAIServer, full: OpenAIServer) -> None:
    bare.reset()
    full.reset()


def make(server: OpenAIServer, **overrides: Any) -> CustomEndpointProvider:
    fields: dict[str, Any] = {
        "kind": "custom", "name": "my-llm", "base_url": server.base_url,
        "default_model": "local-model", "options": {"retry_base_delay_s": 0.01},
    }
    fields.update(overrides)
    return CustomEndpointProvider(ProviderConfig(**fields))


@pytest.fixture
async def provider(bare: OpenAIServer) -> AsyncIterator[CustomEndpointProvider]:
    p = make(bare)
    yield p
    await p.aclose()


def ask(text: str = "red green blue") -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content=text)])


def test_registered_under_custom_sharing_the_openai_translation() -> None:
    assert provider_class("custom") is CustomEndpointProvider
    assert issubclass(CustomEndpointProvider, OpenAIProvider)


def test_base_url_is_required() -> None:
    with pytest.raises(BadRequestError) as err:
        CustomEndpointProvider(ProviderConfig(kind="custom", name="my-llm"))
    assert err.value.param == "base_url"
    with pytest.raises(BadRequestError):
        ProviderCache().get("u1", ProviderConfig(kind="custom", name="my-llm"))


async def test_complete_without_usage_reports_zeros(provider: CustomEndpointProvider) -> None:
    result = await provider.complete(ask())
    assert result.content == "red green blue red"
    assert result.usage == Usage()
    assert result.provider == "my-llm"


async def test_stream_without_stream_options_support(provider: CustomEndpointProvider,
                                                     bare: OpenAIServer) -> None:
    chunks = [c async for c in provider.stream(ask())]
    assert "".join(c.content for c in chunks) == "red green blue red"
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage == Usage()
    first, second = bare.chat_requests
    assert first.body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in second.body

    # Once refused, stream_options is no longer sent.
    bare.reset()
    chunks = [c async for c in provider.stream(ask())]
    assert chunks[-1].finish_reason == "stop"
    [only] = bare.chat_requests
    assert "stream_options" not in only.body


async def test_other_bad_requests_are_not_retried(provider: CustomEndpointProvider,
                                                  bare: OpenAIServer) -> None:
    bare.script(Scripted(status=400, message="unknown model 'x'"))
    with pytest.raises(BadRequestError, match="unknown model"):
        [c async for c in provider.stream(ask())]
    assert len(bare.chat_requests) == 1


async def test_no_key_sends_a_placeholder_never_another_key(
    provider: CustomEndpointProvider, bare: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-platform-secret")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-platform")
    p = make(bare)
    await p.complete(ask())
    headers = bare.chat_requests[0].headers
    assert headers["authorization"] == f"Bearer {NO_KEY}"
    assert "openai-organization" not in headers
    await p.aclose()


async def test_key_is_sent_when_configured(full: OpenAIServer) -> None:
    p = make(full, api_key="gsk-user-key")
    result = await p.complete(ask())
    assert result.usage.completion_tokens == 4
    assert full.chat_requests[0].headers["authorization"] == "Bearer gsk-user-key"
    assert [m.id for m in await p.list_models()] == ["llama-3-8b", "mixtral"]
    assert (await p.health_check()).healthy
    await p.aclose()

    keyless = make(full)
    with pytest.raises(AuthenticationError):
        await keyless.complete(ask())
    health = await keyless.health_check()
    assert not health.healthy
    await keyless.aclose()


async def test_without_models_endpoint_the_default_model_stands_in(
    provider: CustomEndpointProvider, bare: OpenAIServer
) -> None:
    models = await provider.list_models()
    assert [(m.id, m.provider) for m in models] == [("local-model", "my-llm")]

    health = await provider.health_check()
    assert health.healthy and health.latency_ms is not None
    [ping] = bare.chat_requests
    assert ping.body["model"] == "local-model" and ping.body["max_tokens"] == 1


async def test_without_models_endpoint_or_default_model(bare: OpenAIServer) -> None:
    p = make(bare, default_model=None)
    assert await p.list_models() == []
    health = await p.health_check()
    assert health.healthy
    assert bare.chat_requests == []
    assert [r.path for r in bare.requests] == ["/v1/models", "/v1/models", "/v1"]
    await p.aclose()


async def test_unreachable_endpoint() -> None:
    srv = OpenAIServer()
    url = srv.base_url
    srv.stop()
    p = CustomEndpointProvider(ProviderConfig(kind="custom", name="gone", base_url=url,
                                              default_model="m", max_retries=0))
    health = await p.health_check()
    assert not health.healthy
    with pytest.raises(UpstreamUnavailableError):
        await p.complete(ask())
    await p.aclose()
