"""Self-hosted models under a real local Ray Serve: the CPU model deployment over its handle,
CPUProvider over that handle, and VLLMProvider over a stand-in that speaks LLMServer's interface."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import fake_llm_server
import pytest

from deployments.selfhosted import bind_cpu_model
from pacore.config import Settings
from pacore.engines.config import SelfHostedModel, deployment_name
from pacore.errors import BadRequestError, NotFoundError
from pacore.providers import vllm as vllm_provider
from pacore.providers.base import ProviderConfig
from pacore.providers.cpu import CPUProvider
from pacore.providers.vllm import VLLMProvider
from pacore.types import CompletionRequest, Message

pytestmark = pytest.mark.serve

CPU_APP = "selfhosted-cpu"
VLLM_APP = "selfhosted-vllm"


def _request(content: str = "hello there", **kw: Any) -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content=content)], temperature=0, **kw)


@pytest.fixture(scope="module")
def cpu_handle(serve_instance: None, tiny_spec: SelfHostedModel) -> Iterator[Any]:
    from ray import serve

    spec = tiny_spec.model_copy(update={"num_replicas": 1, "num_cpus": 0.25})
    app = bind_cpu_model(spec, settings=Settings(hf_offline=True))
    handle = serve.run(app, name=CPU_APP, route_prefix=None)
    yield handle
    serve.delete(CPU_APP)


@pytest.fixture(scope="module")
def fake_vllm_handle(serve_instance: None) -> Iterator[Any]:
    import ray.cloudpickle
    from ray import serve

    # The stand-in lives beside the tests, where Ray's workers cannot import it: ship it whole.
    ray.cloudpickle.register_pickle_by_value(fake_llm_server)
    deployment = serve.deployment(
        fake_llm_server.FakeLLMServer,
        name=deployment_name("llama3", "vllm"),
        ray_actor_options={"num_cpus": 0.1},
    )
    handle = serve.run(deployment.bind(["llama3:sql"], True), name=VLLM_APP, route_prefix=None)
    yield handle
    serve.delete(VLLM_APP)


# -- the CPU model deployment -----------------------------------------------------------------


async def test_deployment_streams_over_its_handle(cpu_handle: Any) -> None:
    chunks = [
        c async for c in cpu_handle.options(stream=True).stream.remote(_request(max_tokens=20))
    ]
    assert len(chunks) > 1
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20
    whole = await cpu_handle.complete.remote(_request(max_tokens=20))
    assert "".join(c.content for c in chunks) == whole.content
    assert (await cpu_handle.health.remote()).healthy
    assert [m.id for m in await cpu_handle.models.remote()] == ["tiny"]


async def test_cpu_provider_over_the_handle(cpu_handle: Any) -> None:
    provider = CPUProvider.over_handle(ProviderConfig(kind="cpu", name="local"), cpu_handle, "tiny")
    result = await provider.complete(_request(max_tokens=10))
    assert (result.provider, result.model, result.usage.completion_tokens) == ("local", "tiny", 10)
    chunks = [c async for c in provider.stream(_request(max_tokens=10))]
    assert "".join(c.content for c in chunks) == result.content
    assert chunks[-1].usage == result.usage
    assert (await provider.health_check()).healthy


async def test_cpu_provider_finds_the_deployment_by_name(cpu_handle: Any) -> None:
    config = ProviderConfig(
        kind="cpu", name="local", default_model="tiny", options={"app": CPU_APP}
    )
    provider = CPUProvider(config)
    result = await provider.complete(_request(max_tokens=5))
    assert result.usage.completion_tokens == 5
    assert [m.id for m in await provider.list_models()] == ["tiny"]
    with pytest.raises(NotFoundError) as info:
        await provider.complete(_request(model="absent", max_tokens=5))
    assert info.value.provider == "local"


async def test_errors_cross_the_handle_as_platform_errors(cpu_handle: Any) -> None:
    provider = CPUProvider.over_handle(ProviderConfig(kind="cpu", name="local"), cpu_handle, "tiny")
    with pytest.raises(NotFoundError) as info:
        await provider.complete(_request(model="other"))
    assert type(info.value) is NotFoundError
    assert info.value.provider == "local"
    with pytest.raises(NotFoundError):
        async for _ in provider.stream(_request(model="other")):
            pass


async def test_leaving_a_stream_stops_generation_in_the_replica(cpu_handle: Any) -> None:
    provider = CPUProvider.over_handle(ProviderConfig(kind="cpu", name="local"), cpu_handle, "tiny")
    before = await cpu_handle.stats.remote()
    stream = provider.stream(_request(max_tokens=3000))
    await anext(stream)
    await stream.aclose()
    stats = before
    for _ in range(300):  # the replica notices the cancellation within a few steps
        stats = await cpu_handle.stats.remote()
        if stats["cancelled"] > before["cancelled"] and not stats["busy"]:
            break
        await asyncio.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1
    assert not stats["busy"]
    assert stats["last_generated_tokens"] < 3000
    assert (await provider.complete(_request(max_tokens=3))).usage.completion_tokens == 3


# -- the vLLM provider over LLMServer's interface ---------------------------------------------


@pytest.fixture
def no_vllm_request_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM's request model needs vLLM; the stand-in takes the body as a plain dict.
    monkeypatch.setattr(vllm_provider, "_chat_request", lambda body: body)


def _vllm(**kw: Any) -> VLLMProvider:
    kw.setdefault("default_model", "llama3")
    return VLLMProvider(ProviderConfig(kind="vllm", name="gpu", options={"app": VLLM_APP}, **kw))


@pytest.mark.usefixtures("no_vllm_request_model")
async def test_vllm_provider_streams_batches_as_chunks(fake_vllm_handle: Any) -> None:
    chunks = [c async for c in _vllm().stream(_request())]
    assert [c.content for c in chunks] == ["model=llama3 ", "mux=- ", "done", ""]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    result = await _vllm().complete(_request())
    assert (result.content, result.provider, result.usage.total_tokens) == (
        "model=llama3 mux=- done",
        "gpu",
        12,
    )


@pytest.mark.usefixtures("no_vllm_request_model")
async def test_vllm_adapters_static_and_dynamic(fake_vllm_handle: Any) -> None:
    provider = _vllm()
    static = await provider.complete(_request(model="llama3:sql"))
    assert static.content == "model=llama3:sql mux=- done"
    dynamic = await provider.complete(_request(model="llama3:finance"))
    assert dynamic.content == "model=llama3:finance mux=llama3:finance done"
    assert [m.id for m in await provider.list_models()] == ["llama3", "llama3:sql"]
    assert (await provider.health_check()).healthy


@pytest.mark.usefixtures("no_vllm_request_model")
async def test_vllm_errors(fake_vllm_handle: Any) -> None:
    with pytest.raises(BadRequestError) as info:
        await _vllm().complete(_request("fail"))
    assert info.value.provider == "gpu"
    with pytest.raises(BadRequestError):
        async for _ in _vllm().stream(_request("fail")):
            pass
    with pytest.raises(NotFoundError):
        await _vllm().complete(_request(model="missing"))
    assert not (await _vllm(default_model=None).health_check()).healthy
