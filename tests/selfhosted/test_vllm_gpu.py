"""vLLM through Ray Serve LLM on a real GPU: a tiny Llama with dummy weights answers a streaming
request through VLLMProvider. Skipped without a CUDA GPU or without the ``gpu`` extra."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacore.engines.config import LoraAdapter, SelfHostedModel
from pacore.providers.base import ProviderConfig
from pacore.providers.vllm import VLLMProvider
from pacore.types import CompletionRequest, Message


def _missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'pacore[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _no_vllm() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'pacore[gpu]')"
    return None


pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
needs_vllm = pytest.mark.skipif(_no_vllm() is not None, reason=_no_vllm() or "")

APP = "selfhosted-gpu"


def _model(path: Path, **kw: Any) -> SelfHostedModel:
    return SelfHostedModel(
        name="tiny-vllm",
        engine="vllm",
        model=str(path),
        context_length=1024,
        max_tokens=16,
        engine_kwargs={
            "load_format": "dummy",
            "gpu_memory_utilization": 0.2,
            "enforce_eager": True,
        },
        num_replicas=1,
        **kw,
    )


@needs_vllm
def test_llm_config_is_valid_for_ray_serve_llm(tiny_model_dir: Path) -> None:
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    from pacore.engines.vllm import llm_config_for

    model = _model(tiny_model_dir, lora_adapters=[LoraAdapter(name="sql", path="/adapters/sql")])
    config = llm_config_for(model)
    assert config.model_id == "tiny-vllm"
    modules = config.engine_kwargs["lora_modules"]
    assert modules == [
        LoRAModulePath(name="tiny-vllm:sql", path="/adapters/sql", base_model_name="tiny-vllm")
    ]
    # Every engine argument we set is one vLLM knows (Ray refuses unknown ones here).
    engine = config.get_engine_config()
    assert engine.engine_kwargs["max_model_len"] == 1024
    assert engine.frontend_kwargs["lora_modules"] == modules


@pytest.fixture(scope="module")
def vllm_app(serve_instance: None, tiny_model_dir: Path) -> Iterator[None]:
    from ray import serve

    from deployments.selfhosted import bind_vllm_model

    serve.run(bind_vllm_model(_model(tiny_model_dir)), name=APP, route_prefix=None)
    yield
    serve.delete(APP)


@needs_gpu
@pytest.mark.serve
async def test_vllm_model_streams_through_the_provider(vllm_app: None) -> None:
    config = ProviderConfig(
        kind="vllm", name="gpu", default_model="tiny-vllm", options={"app": APP}
    )
    provider = VLLMProvider(config)
    request = CompletionRequest(
        messages=[Message(role="user", content="hello")], temperature=0, max_tokens=8
    )
    chunks = [c async for c in provider.stream(request)]
    assert chunks[-1].finish_reason in ("length", "stop")
    assert chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 8
    assert chunks[-1].usage.prompt_tokens > 0
    assert any(c.content for c in chunks[:-1])
    result = await provider.complete(request)
    assert result.provider == "gpu"
    assert 0 < result.usage.completion_tokens <= 8
    assert [m.id for m in await provider.list_models()] == ["tiny-vllm"]
    assert (await provider.health_check()).healthy
