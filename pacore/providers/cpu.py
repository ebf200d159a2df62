"""The ``cpu`` provider: self-hosted transformers models, in this process or behind Serve handles.

Built with a :class:`~pacore.engines.client.EngineClient` it talks to that one engine (the
on-prem agent, tests). Built from its configuration alone, as the provider cache does, it finds
each model's own deployment by name (:func:`pacore.engines.config.deployment_name`) in the Serve
application it runs in, or in ``options["app"]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from pacore.engines.client import EngineClient, HandleEngineClient, LocalEngineClient
from pacore.engines.config import deployment_name
from pacore.errors import NotFoundError, PACoreError
from pacore.providers._http import call_with_retries, stream_with_retries
from pacore.providers.base import Provider, ProviderCapabilities, ProviderConfig
from pacore.providers.registry import register
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    ModelInfo,
    ProviderHealth,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from pacore.engines.cpu import CPUEngine

__all__ = ["CPUProvider"]

T = TypeVar("T")


@register("cpu")
class CPUProvider(Provider):
    capabilities = ProviderCapabilities(on_prem=True)

    def __init__(self, config: ProviderConfig, client: EngineClient | None = None) -> None:
        super().__init__(config)
        self._client = client
        self._clients: dict[str, EngineClient] = {}

    @classmethod
    def in_process(cls, config: ProviderConfig, engine: CPUEngine) -> CPUProvider:
        return cls(config, LocalEngineClient(engine))

    @classmethod
    def over_handle(
        cls, config: ProviderConfig, handle: DeploymentHandle, model: str
    ) -> CPUProvider:
        return cls(config, HandleEngineClient(handle, model, provider=config.name))

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        client, request = self._route(request)
        result = await self._call(lambda: client.complete(request))
        return result.model_copy(update={"provider": self.name})

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        client, request = self._route(request)
        try:
            async for chunk in stream_with_retries(
                lambda: client.stream(request), self.retry_policy()
            ):
                yield chunk
        except PACoreError as exc:
            raise self._own(exc) from None

    async def health_check(self) -> ProviderHealth:
        model = self.config.default_model
        if self._client is None and model is None:
            return ProviderHealth(healthy=False, detail="no default_model to check")
        try:
            client = self._client_for(model)
        except PACoreError as exc:
            return ProviderHealth(healthy=False, detail=exc.message)
        return await client.health()

    async def list_models(self) -> list[ModelInfo]:
        model = self.config.default_model
        if self._client is None and model is None:
            return []
        models = await self._call(lambda: self._client_for(model).models())
        return [m.model_copy(update={"provider": self.name}) for m in models]

    def _route(self, request: CompletionRequest) -> tuple[EngineClient, CompletionRequest]:
        """The client for the request's model, and the request naming that model."""
        model = request.model or self.config.default_model
        if model is None and self._client is None:
            model = self.model_for(request)  # raises the "no model" error
        if model != request.model:
            request = request.model_copy(update={"model": model})
        return self._client_for(model), request

    def _client_for(self, model: str | None) -> EngineClient:
        if self._client is not None:
            return self._client
        assert model is not None
        client = self._clients.get(model)
        if client is None:
            client = HandleEngineClient(self._lookup(model), model, provider=self.name)
            self._clients[model] = client
        return client

    def _lookup(self, model: str) -> DeploymentHandle:
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            return serve.get_deployment_handle(
                deployment_name(model, "cpu"), app_name=self.config.options.get("app")
            )
        except (RayServeException, KeyError, ValueError) as exc:
            raise NotFoundError(
                f"no self-hosted model '{model}'", provider=self.name, param="model"
            ) from exc

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call_with_retries(fn, self.retry_policy())
        except PACoreError as exc:
            raise self._own(exc) from None

    def _own(self, exc: PACoreError) -> PACoreError:
        if exc.provider is None:
            exc.provider = self.name
        return exc
