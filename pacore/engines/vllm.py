"""A :class:`SelfHostedModel` with ``engine="vllm"`` as a Ray Serve LLM ``LLMConfig``.

:func:`llm_config_kwargs` is the whole translation and needs nothing installed;
:func:`llm_config_for` validates it into Ray's ``LLMConfig``, which imports vLLM (the ``gpu``
extra), so nothing reaches this import unless a vLLM model is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pacore.engines.config import SelfHostedModel

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

__all__ = ["adapter_id", "llm_config_for", "llm_config_kwargs"]


def adapter_id(model: str, adapter: str) -> str:
    """The model id of a LoRA adapter: Ray Serve LLM's ``<base model>:<adapter>`` form."""
    return f"{model}:{adapter}"


def llm_config_kwargs(model: SelfHostedModel) -> dict[str, Any]:
    """The keyword arguments of ``ray.serve.llm.LLMConfig`` for ``model``.

    Static adapters are listed as ``{"name", "path"}`` dicts under ``lora_modules``;
    :func:`llm_config_for` turns them into vLLM's ``LoRAModulePath``.
    """
    if model.engine != "vllm":
        raise ValueError(f"model '{model.name}' runs on engine '{model.engine}', not vllm")
    loading: dict[str, Any] = {"model_id": model.name, "model_source": model.model}
    if model.tokenizer:
        loading["tokenizer_source"] = model.tokenizer
    kwargs: dict[str, Any] = {
        "model_loading_config": loading,
        "engine_kwargs": _engine_kwargs(model),
        "deployment_config": _deployment_config(model),
    }
    if model.accelerator_type:
        kwargs["accelerator_type"] = model.accelerator_type
    if model.num_gpus is not None and model.num_gpus != 1:
        # Fractions share a GPU between models (lower gpu_memory_utilization to match);
        # 0 runs vLLM's CPU backend.
        worker = {"GPU": model.num_gpus} if model.num_gpus > 0 else {"CPU": 1}
        kwargs["placement_group_config"] = {"bundle_per_worker": worker}
    if model.lora_dynamic_path:
        kwargs["lora_config"] = {"dynamic_lora_loading_path": model.lora_dynamic_path}
    return kwargs


def llm_config_for(
    model: SelfHostedModel, *, deployment_config: dict[str, Any] | None = None
) -> LLMConfig:
    """Ray Serve LLM's validated config for ``model`` (imports vLLM).

    ``deployment_config`` replaces the one derived from ``model`` (the builder's overrides).
    """
    from ray.serve.llm import LLMConfig
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    kwargs = llm_config_kwargs(model)
    if deployment_config is not None:
        kwargs["deployment_config"] = deployment_config
    engine = kwargs["engine_kwargs"]
    if "lora_modules" in engine:
        engine["lora_modules"] = [
            LoRAModulePath(name=m["name"], path=m["path"], base_model_name=model.name)
            for m in engine["lora_modules"]
        ]
    return LLMConfig(**kwargs)


def _engine_kwargs(model: SelfHostedModel) -> dict[str, Any]:
    engine: dict[str, Any] = dict(model.engine_kwargs)
    engine["tensor_parallel_size"] = model.tensor_parallel_size
    # vLLM takes max_new_tokens here as the default and the cap of a request's completion.
    overrides = dict(engine.get("override_generation_config") or {})
    overrides["max_new_tokens"] = model.max_tokens
    engine["override_generation_config"] = overrides
    if model.context_length is not None:
        engine["max_model_len"] = model.context_length
    if model.lora_adapters or model.lora_dynamic_path:
        engine["enable_lora"] = True
        engine["max_lora_rank"] = model.max_lora_rank
        engine["max_loras"] = max(1, len(model.lora_adapters))
    if model.lora_adapters:
        engine["lora_modules"] = [
            {"name": adapter_id(model.name, a.name), "path": a.path} for a in model.lora_adapters
        ]
    return engine


def _deployment_config(model: SelfHostedModel) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if model.num_replicas is not None:
        config["num_replicas"] = model.num_replicas
    elif model.autoscaling is not None:
        config["autoscaling_config"] = model.autoscaling.model_dump()
    if model.max_ongoing_requests is not None:
        config["max_ongoing_requests"] = model.max_ongoing_requests
    if model.num_cpus is not None:
        config["ray_actor_options"] = {"num_cpus": model.num_cpus}
    return config
