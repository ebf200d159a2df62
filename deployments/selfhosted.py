"""Serve deployments of self-hosted models: one deployment per model, with resources of its own.

``engine="cpu"`` models run in :class:`CPUModelDeployment` (a thin wrapper over
:class:`pacore.engines.cpu.CPUEngine`); ``engine="vllm"`` models run in Ray Serve LLM's
``LLMServer``, bound through ``ray.serve.llm.build_llm_deployment``. Either way the deployment
is named by :func:`pacore.engines.config.deployment_name`, which is how the ``cpu`` and ``vllm``
providers find it. The application builder calls :func:`bind_self_hosted` and passes the bound
deployments on to the deployment that serves requests, which puts them in the graph.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pacore.config import Settings
from pacore.engines.config import SelfHostedModel, deployment_name
from pacore.engines.cpu import CPUEngine
from pacore.errors import BadRequestError
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    ModelInfo,
    ProviderHealth,
)

if TYPE_CHECKING:
    from ray.serve.deployment import Application

__all__ = [
    "DEFAULT_OPTIONS",
    "CPUModelDeployment",
    "OptionsFor",
    "bind_cpu_model",
    "bind_self_hosted",
    "bind_vllm_model",
]

# One replica generates one answer at a time (see pacore.engines.cpu), so a replica takes a few
# requests to queue in order and autoscaling adds replicas as soon as requests wait. Half a CPU
# lets a whole graph schedule on a 2-core laptop; torch still uses every core it is given.
DEFAULT_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.5},
    "max_ongoing_requests": 4,
    "autoscaling_config": {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1.0,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 300.0,
    },
    "health_check_period_s": 10.0,
    "graceful_shutdown_timeout_s": 30.0,
}


class CPUModelDeployment:
    """One self-hosted model on a transformers engine.

    ``stream`` yields one chunk per batch of tokens that were ready together (the engine drains
    everything generated since the last chunk), so a fast model does not pay a handle hop per
    token. Closing the stream (the caller went away) cancels the generation.
    """

    def __init__(self, model: SelfHostedModel, *, offline: bool = False) -> None:
        self._engine = CPUEngine.load(model, offline=offline)

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        return await self._engine.complete(request)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        async for chunk in self._engine.stream(request):
            yield chunk

    async def health(self) -> ProviderHealth:
        return self._engine.health()

    async def models(self) -> list[ModelInfo]:
        return [self._engine.model_info()]

    async def stats(self) -> dict[str, Any]:
        """The engine's counters, and whether it is generating now."""
        return {**dataclasses.asdict(self._engine.stats), "busy": self._engine.busy}

    async def check_health(self) -> None:
        """Serve's liveness hook: a replica whose engine cannot answer is restarted."""
        health = self._engine.health()
        if not health.healthy:
            raise RuntimeError(health.detail or "engine unhealthy")

    @staticmethod
    def deployment_options(model: SelfHostedModel) -> dict[str, Any]:
        """``serve.deployment`` options for ``model``: the defaults above, with its overrides."""
        options = copy.deepcopy(DEFAULT_OPTIONS)
        options["name"] = deployment_name(model)
        actor = options["ray_actor_options"]
        if model.num_cpus is not None:
            actor["num_cpus"] = model.num_cpus
        if model.num_gpus:
            actor["num_gpus"] = model.num_gpus
        if model.num_replicas is not None:
            del options["autoscaling_config"]
            options["num_replicas"] = model.num_replicas
        elif model.autoscaling is not None:
            options["autoscaling_config"].update(model.autoscaling.model_dump())
        if model.max_ongoing_requests is not None:
            options["max_ongoing_requests"] = model.max_ongoing_requests
        return options


OptionsFor = Callable[[str, dict[str, Any]], dict[str, Any]]


def _no_overrides(name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    return dict(defaults)


def bind_cpu_model(
    model: SelfHostedModel, options_for: OptionsFor | None = None, settings: Settings | None = None
) -> Application:
    """``model`` in a :class:`CPUModelDeployment`; ``options_for(name, defaults)`` applies the
    platform's per-deployment overrides, keyed by the model's name."""
    from ray import serve

    options = (options_for or _no_overrides)(
        model.name, CPUModelDeployment.deployment_options(model)
    )
    options["name"] = deployment_name(model)
    offline = (settings or Settings()).hf_offline
    deployment: Any = serve.deployment(CPUModelDeployment, **options)
    return deployment.bind(model, offline=offline)


def bind_vllm_model(model: SelfHostedModel, options_for: OptionsFor | None = None) -> Application:
    """``model`` in Ray Serve LLM's ``LLMServer`` (imports vLLM: the ``gpu`` extra).

    Overrides go into the ``LLMConfig``'s ``deployment_config``, where Ray Serve LLM merges them
    with the placement group and runtime environment it computes for the engine.
    """
    from ray.serve.llm import build_llm_deployment

    from pacore.engines.vllm import llm_config_for, llm_config_kwargs

    defaults = llm_config_kwargs(model)["deployment_config"]
    deployment_config = (options_for or _no_overrides)(model.name, defaults)
    return build_llm_deployment(
        llm_config_for(model, deployment_config=deployment_config),
        override_serve_options={"name": deployment_name(model)},
    )


def bind_self_hosted(
    models: Sequence[SelfHostedModel | Mapping[str, Any]],
    options_for: OptionsFor | None = None,
    settings: Settings | None = None,
) -> dict[str, Application]:
    """A bound deployment per model, keyed by model name, for the builder to pass on."""
    apps: dict[str, Application] = {}
    for entry in models:
        model = SelfHostedModel.model_validate(entry)
        if model.name in apps:
            raise BadRequestError(f"self-hosted model '{model.name}' is configured twice")
        if model.engine == "cpu":
            apps[model.name] = bind_cpu_model(model, options_for, settings)
        else:
            apps[model.name] = bind_vllm_model(model, options_for)
    return apps
