"""CPUProvider in-process: the provider contract over a real engine on a tiny local Llama."""

from __future__ import annotations

import pytest

from pacore.engines.client import EngineClient, LocalEngineClient
from pacore.engines.cpu import CPUEngine
from pacore.errors import BadRequestError, NotFoundError
from pacore.providers.base import ProviderConfig
from pacore.providers.cpu import CPUProvider
from pacore.providers.registry import provider_class
from pacore.types import CompletionRequest, Message


def _config(**kw: object) -> ProviderConfig:
    return ProviderConfig(kind="cpu", name="local", **kw)  # type: ignore[arg-type]


def _request(**kw: object) -> CompletionRequest:
    return CompletionRequest(
        messages=[Message(role="user", content="hello there")],
        temperature=0,
        **kw,  # type: ignore[arg-type]
    )


def test_registered_as_cpu() -> None:
    assert provider_class("cpu") is CPUProvider
    assert CPUProvider.capabilities.on_prem
    assert isinstance(LocalEngineClient.__new__(LocalEngineClient), EngineClient)


async def test_complete_in_process(engine: CPUEngine) -> None:
    provider = CPUProvider.in_process(_config(), engine)
    result = await provider.complete(_request(max_tokens=12))
    assert result.provider == "local"
    assert result.model == "tiny"
    assert result.usage.completion_tokens == 12
    assert result.content


async def test_stream_in_process(engine: CPUEngine) -> None:
    provider = CPUProvider.in_process(_config(default_model="tiny"), engine)
    whole = await provider.complete(_request(max_tokens=16))
    chunks = [c async for c in provider.stream(_request(max_tokens=16))]
    assert len(chunks) > 1
    assert "".join(c.content for c in chunks) == whole.content
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == whole.usage


async def test_errors_carry_the_provider_name(engine: CPUEngine) -> None:
    provider = CPUProvider.in_process(_config(), engine)
    with pytest.raises(NotFoundError) as info:
        await provider.complete(_request(model="missing"))
    assert info.value.provider == "local"
    with pytest.raises(NotFoundError) as info:
        async for _ in provider.stream(_request(model="missing")):
            pass
    assert info.value.provider == "local"


async def test_models_and_health(engine: CPUEngine) -> None:
    provider = CPUProvider.in_process(_config(), engine)
    models = await provider.list_models()
    assert [(m.id, m.provider) for m in models] == [("tiny", "local")]
    assert (await provider.health_check()).healthy


async def test_without_engine_a_model_must_be_named() -> None:
    provider = CPUProvider(_config())
    with pytest.raises(BadRequestError):
        await provider.complete(_request())
    assert not (await provider.health_check()).healthy
    assert await provider.list_models() == []
