"""Configuration of self-hosted models: one :class:`SelfHostedModel` per model the platform serves."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Autoscaling", "LoraAdapter", "SelfHostedModel", "deployment_name"]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# vLLM arguments that SelfHostedModel sets from fields of its own.
_OWNED_VLLM_ARGS = {
    "tensor_parallel_size": "tensor_parallel_size",
    "max_model_len": "context_length",
    "tokenizer": "tokenizer",
    "enable_lora": "lora_adapters",
    "lora_modules": "lora_adapters",
    "max_loras": "lora_adapters",
    "max_lora_rank": "max_lora_rank",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraAdapter(_Strict):
    """A LoRA adapter loaded with the base model when its replica starts."""

    name: str = Field(
        pattern=_NAME_PATTERN,
        description="requests reach the adapter as '<model name>:<adapter name>'",
    )
    path: str = Field(min_length=1, description="local directory or hub id of the adapter")


class Autoscaling(_Strict):
    """Ray Serve autoscaling bounds for one model's replicas."""

    min_replicas: int = Field(default=1, ge=0, description="0 lets an idle model scale to zero")
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="requests in flight per replica before scaling up"
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class SelfHostedModel(_Strict):
    """A model the platform runs on its own hardware, each in a Serve deployment of its own.

    ``engine="cpu"`` runs it with transformers (on CUDA when the replica has a GPU, else CPU);
    ``engine="vllm"`` runs it with vLLM through Ray Serve LLM and needs the ``gpu`` extra.
    """

    name: str = Field(
        pattern=_NAME_PATTERN,
        description="the model id clients use (e.g. 'llama3-8b'); also names the deployment",
    )
    engine: Literal["cpu", "vllm"] = Field(description="which engine serves it")
    model: str = Field(min_length=1, description="local directory or hub id of the weights")
    tokenizer: str | None = Field(
        default=None, description="local directory or hub id of the tokenizer; default: model"
    )
    max_tokens: int = Field(
        default=1024,
        ge=1,
        description="completion tokens when a request does not say, and the most it may ask for",
    )
    context_length: int | None = Field(
        default=None, ge=16, description="longest prompt plus completion; default: the model's"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="cpu engine only: auto picks CUDA when the replica has a GPU"
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm only: GPUs per replica")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: vLLM engine/frontend arguments (e.g. gpu_memory_utilization, "
        "load_format); cpu: extra from_pretrained arguments (e.g. dtype)",
    )
    lora_adapters: list[LoraAdapter] = Field(
        default_factory=list, description="vllm only: adapters loaded when a replica starts"
    )
    lora_dynamic_path: str | None = Field(
        default=None,
        description="vllm only: s3://, gs:// or azure:// folder with one subfolder per adapter, "
        "loaded on first request for '<model name>:<subfolder>'",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=16, description="vllm only: largest adapter rank (a rank vLLM supports)"
    )
    num_replicas: int | None = Field(
        default=None, ge=1, description="a fixed replica count (instead of autoscaling)"
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="autoscaling bounds; default: the engine's defaults"
    )
    max_ongoing_requests: int | None = Field(
        default=None, ge=1, description="requests one replica accepts before the handle queues"
    )
    num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per replica (cpu engine) or per tensor-parallel worker (vllm, "
        "fractions share a GPU); default: 0 for cpu, 1 for vllm",
    )
    num_cpus: float | None = Field(
        default=None, gt=0, description="CPUs reserved per replica; default: the engine's"
    )
    accelerator_type: str | None = Field(
        default=None, description="vllm only: Ray accelerator type, e.g. 'A10G', 'H100'"
    )

    @model_validator(mode="after")
    def _engine_fields(self) -> SelfHostedModel:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give num_replicas or autoscaling, not both")
        if self.engine == "cpu":
            vllm_only = {
                "tensor_parallel_size": self.tensor_parallel_size != 1,
                "lora_adapters": bool(self.lora_adapters),
                "lora_dynamic_path": self.lora_dynamic_path is not None,
                "accelerator_type": self.accelerator_type is not None,
            }
            given = [field for field, set_ in vllm_only.items() if set_]
            if given:
                raise ValueError(f"{', '.join(given)} apply to engine 'vllm' only")
        owned = [f"{k} (use {v})" for k, v in _OWNED_VLLM_ARGS.items() if k in self.engine_kwargs]
        if self.engine == "vllm" and owned:
            raise ValueError(f"engine_kwargs must not set {', '.join(owned)}")
        if self.accelerator_type is not None and self.num_gpus == 0:
            raise ValueError("accelerator_type needs num_gpus > 0")
        names = [a.name for a in self.lora_adapters]
        if len(names) != len(set(names)):
            raise ValueError("lora adapter names must be unique")
        return self


def deployment_name(model: SelfHostedModel | str, engine: str | None = None) -> str:
    """The Serve deployment name of a self-hosted model: ``selfhosted-<engine>-<name>``.

    Providers find a model's deployment by this name, so it is the one place it is spelled.
    """
    if isinstance(model, SelfHostedModel):
        return f"selfhosted-{model.engine}-{model.name}"
    if engine is None:
        raise ValueError("engine is required when the model is given by name")
    return f"selfhosted-{engine}-{model}"
