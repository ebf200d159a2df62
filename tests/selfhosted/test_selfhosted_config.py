"""SelfHostedModel validation, deployment options, and the translation to Ray Serve LLM's config."""

from __future__ import annotations

import pydantic
import pytest

from deployments.selfhosted import DEFAULT_OPTIONS, CPUModelDeployment, bind_self_hosted
from pacore.engines.config import Autoscaling, LoraAdapter, SelfHostedModel, deployment_name
from pacore.engines.vllm import adapter_id, llm_config_kwargs
from pacore.errors import BadRequestError


def _vllm(**kw: object) -> SelfHostedModel:
    kw.setdefault("name", "llama3")
    return SelfHostedModel(engine="vllm", model="meta-llama/Llama-3.1-8B-Instruct", **kw)  # type: ignore[arg-type]


def test_minimal_vllm_translation() -> None:
    kwargs = llm_config_kwargs(_vllm(max_tokens=256))
    assert kwargs == {
        "model_loading_config": {
            "model_id": "llama3",
            "model_source": "meta-llama/Llama-3.1-8B-Instruct",
        },
        "engine_kwargs": {
            "tensor_parallel_size": 1,
            "override_generation_config": {"max_new_tokens": 256},
        },
        "deployment_config": {},
    }


def test_full_vllm_translation() -> None:
    model = _vllm(
        tokenizer="/models/tok",
        context_length=8192,
        tensor_parallel_size=2,
        engine_kwargs={"gpu_memory_utilization": 0.8, "load_format": "dummy"},
        lora_adapters=[LoraAdapter(name="sql", path="/adapters/sql")],
        lora_dynamic_path="s3://bucket/adapters",
        max_lora_rank=32,
        autoscaling=Autoscaling(min_replicas=0, max_replicas=4, target_ongoing_requests=16),
        max_ongoing_requests=64,
        num_gpus=0.5,
        num_cpus=2,
        accelerator_type="A10G",
    )
    kwargs = llm_config_kwargs(model)
    assert kwargs["model_loading_config"]["tokenizer_source"] == "/models/tok"
    assert kwargs["engine_kwargs"] == {
        "gpu_memory_utilization": 0.8,
        "load_format": "dummy",
        "tensor_parallel_size": 2,
        "override_generation_config": {"max_new_tokens": 1024},
        "max_model_len": 8192,
        "enable_lora": True,
        "max_lora_rank": 32,
        "max_loras": 1,
        "lora_modules": [{"name": "llama3:sql", "path": "/adapters/sql"}],
    }
    assert kwargs["deployment_config"] == {
        "autoscaling_config": {
            "min_replicas": 0,
            "max_replicas": 4,
            "target_ongoing_requests": 16.0,
        },
        "max_ongoing_requests": 64,
        "ray_actor_options": {"num_cpus": 2.0},
    }
    assert kwargs["accelerator_type"] == "A10G"
    assert kwargs["placement_group_config"] == {"bundle_per_worker": {"GPU": 0.5}}
    assert kwargs["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/adapters"}
    assert adapter_id("llama3", "sql") == "llama3:sql"


def test_user_generation_overrides_are_kept() -> None:
    model = _vllm(
        engine_kwargs={"override_generation_config": {"temperature": 0.2}}, num_replicas=2
    )
    kwargs = llm_config_kwargs(model)
    assert kwargs["engine_kwargs"]["override_generation_config"] == {
        "temperature": 0.2,
        "max_new_tokens": 1024,
    }
    assert kwargs["deployment_config"] == {"num_replicas": 2}


def test_cpu_model_is_not_translated() -> None:
    with pytest.raises(ValueError, match="not vllm"):
        llm_config_kwargs(SelfHostedModel(name="m", engine="cpu", model="/m"))


@pytest.mark.parametrize(
    "kw",
    [
        {"name": "bad name"},
        {"name": "a:b"},
        {"engine_kwargs": {"tensor_parallel_size": 2}},
        {"engine_kwargs": {"max_model_len": 4096}},
        {"num_replicas": 2, "autoscaling": Autoscaling()},
        {"lora_adapters": [LoraAdapter(name="x", path="/a"), LoraAdapter(name="x", path="/b")]},
        {"accelerator_type": "A10G", "num_gpus": 0},
        {"unknown_field": 1},
    ],
)
def test_invalid_vllm_models(kw: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        _vllm(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"tensor_parallel_size": 2},
        {"lora_adapters": [LoraAdapter(name="x", path="/a")]},
        {"lora_dynamic_path": "s3://b/a"},
        {"accelerator_type": "A10G"},
    ],
)
def test_vllm_only_fields_are_refused_for_cpu(kw: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError, match="vllm"):
        SelfHostedModel(name="m", engine="cpu", model="/m", **kw)  # type: ignore[arg-type]


def test_autoscaling_bounds() -> None:
    with pytest.raises(pydantic.ValidationError):
        Autoscaling(min_replicas=3, max_replicas=2)


def test_deployment_names() -> None:
    model = SelfHostedModel(name="m1", engine="cpu", model="/m")
    assert deployment_name(model) == "selfhosted-cpu-m1" == deployment_name("m1", "cpu")
    with pytest.raises(ValueError):
        deployment_name("m1")


def test_cpu_deployment_defaults_fit_a_laptop() -> None:
    options = CPUModelDeployment.deployment_options(
        SelfHostedModel(name="m", engine="cpu", model="/m")
    )
    assert options["name"] == "selfhosted-cpu-m"
    assert 0 < options["ray_actor_options"]["num_cpus"] < 1
    assert options["autoscaling_config"]["min_replicas"] == 1
    assert "num_gpus" not in options["ray_actor_options"]
    assert DEFAULT_OPTIONS["ray_actor_options"] == {"num_cpus": 0.5}  # not mutated


def test_cpu_deployment_overrides() -> None:
    model = SelfHostedModel(
        name="m",
        engine="cpu",
        model="/m",
        num_cpus=2,
        num_gpus=1,
        num_replicas=3,
        max_ongoing_requests=1,
    )
    options = CPUModelDeployment.deployment_options(model)
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 1
    scaled = CPUModelDeployment.deployment_options(
        model.model_copy(update={"num_replicas": None, "autoscaling": Autoscaling(max_replicas=5)})
    )
    assert scaled["autoscaling_config"]["max_replicas"] == 5
    assert (
        scaled["autoscaling_config"]["upscale_delay_s"]
        == DEFAULT_OPTIONS["autoscaling_config"]["upscale_delay_s"]
    )


def test_bind_self_hosted_binds_cpu_models_with_overrides() -> None:
    from ray.serve import Application

    from pacore.config import PlatformArgs

    overrides = PlatformArgs.model_validate({"deployments": {"b": {"num_replicas": 2}}})
    models = [{"name": n, "engine": "cpu", "model": "/m"} for n in ("a", "b")]
    apps = bind_self_hosted(models, overrides.options_for)
    assert sorted(apps) == ["a", "b"]
    assert all(isinstance(app, Application) for app in apps.values())
    bound = {name: app._bound_deployment for name, app in apps.items()}
    assert bound["a"].name == "selfhosted-cpu-a"
    assert bound["b"].num_replicas == 2
    assert bound["a"].ray_actor_options["num_cpus"] == 0.5
    with pytest.raises(BadRequestError):
        bind_self_hosted(models + models[:1])
    with pytest.raises(pydantic.ValidationError):
        bind_self_hosted([{"name": "c", "engine": "tgi", "model": "/m"}])
