"""The builder: binds every deployment of the graph into one Serve application.

`serve run`, `serve deploy cluster/serve/*.yaml`, a KubeRay RayService and `pacore up` all point
at :func:`build_app` with ``args``; the YAML holds no logic. This is the only place where
``serve.deployment`` is applied, so every deployment class stays a plain, testable class.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.deployment import Application

from pacore.config import PlatformArgs

__all__ = ["build_app"]


def _deploy(cls: type, name: str, pargs: PlatformArgs, defaults: dict[str, Any]) -> Any:
    return serve.deployment(cls, name=name, **pargs.options_for(name, defaults))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The PA Core graph for ``args`` (see :class:`pacore.config.PlatformArgs`)."""
    pargs = PlatformArgs.model_validate(args or {})
    settings = pargs.build_settings()
    raw = pargs.model_dump(mode="json")

    from deployments.gateway import GatewayDeployment
    from deployments.providers import ProviderDeployment
    from deployments.router import RouterDeployment

    embedder = memory = hub = None
    if pargs.memory:
        from deployments import embedder as embedder_mod
        from deployments import memory as memory_mod

        embedder = _deploy(
            embedder_mod.EmbedderDeployment, "Embedder", pargs, embedder_mod.options_for(settings)
        ).bind(pargs.settings)
        memory = _deploy(
            memory_mod.MemoryDeployment, "Memory", pargs, memory_mod.options_for(settings)
        ).bind(pargs.settings, embedder)
    if pargs.agents:
        from deployments.agent_hub import AgentHubDeployment

        hub = _deploy(
            AgentHubDeployment, "AgentHub", pargs, AgentHubDeployment.options_for(settings)
        ).bind(pargs.settings)

    providers = {
        kind: _deploy(
            ProviderDeployment, f"Provider-{kind}", pargs, ProviderDeployment.DEFAULT_OPTIONS
        ).bind(kind, settings.stream_linger_ms / 1000)
        for kind in pargs.provider_kinds
    }
    self_hosted: dict[str, Any] = {}
    if pargs.self_hosted:
        from deployments.selfhosted import bind_self_hosted

        self_hosted = bind_self_hosted(pargs.self_hosted, pargs.options_for, settings)

    router = _deploy(RouterDeployment, "Router", pargs, RouterDeployment.DEFAULT_OPTIONS).bind(
        raw, providers, memory, embedder, hub, self_hosted
    )
    gateway_cls = serve.ingress()(GatewayDeployment)
    return _deploy(gateway_cls, "Gateway", pargs, GatewayDeployment.DEFAULT_OPTIONS).bind(
        raw, router, memory, embedder, hub
    )
