"""The seam between a provider and a self-hosted engine: in the same process, or over Serve.

A :class:`EngineClient` is what :class:`~pacore.providers.cpu.CPUProvider` talks to. The
on-prem agent and unit tests hold the engine itself (:class:`LocalEngineClient`); the Serve graph
holds a ``DeploymentHandle`` to the model's own deployment (:class:`HandleEngineClient`), so the
model gets resources and replicas of its own while the provider stays where the router is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from pacore.errors import PACoreError, UpstreamError, UpstreamUnavailableError
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    ModelInfo,
    ProviderHealth,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

    from pacore.engines.cpu import CPUEngine

__all__ = ["EngineClient", "HandleEngineClient", "LocalEngineClient", "remote_error"]


@runtime_checkable
class EngineClient(Protocol):
    """What a provider needs from one self-hosted model."""

    def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """Chunks as they are generated; the last carries ``finish_reason`` and ``usage``."""
        ...

    async def complete(self, request: CompletionRequest) -> CompletionResult: ...

    async def health(self) -> ProviderHealth: ...

    async def models(self) -> list[ModelInfo]: ...


class LocalEngineClient:
    """An engine in this process."""

    def __init__(self, engine: CPUEngine) -> None:
        self.engine = engine

    def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        return self.engine.stream(request)

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        return await self.engine.complete(request)

    async def health(self) -> ProviderHealth:
        return self.engine.health()

    async def models(self) -> list[ModelInfo]:
        return [self.engine.model_info()]


class HandleEngineClient:
    """A model deployment (``deployments.selfhosted.CPUModelDeployment``) behind a handle."""

    def __init__(self, handle: DeploymentHandle, name: str, provider: str | None = None) -> None:
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self.name = name
        self.provider = provider

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        responses = cast(
            "DeploymentResponseGenerator[CompletionChunk]",
            self._stream_handle.stream.remote(request),
        )
        done = False
        try:
            async for chunk in responses:
                yield chunk
            done = True
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            if not done:
                # Leaving early (a disconnected client) cancels the replica's generator, and
                # with it the generation.
                responses.cancel()

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        try:
            result: CompletionResult = await self._handle.complete.remote(request)
        except Exception as exc:
            raise self._error(exc) from exc
        return result

    async def health(self) -> ProviderHealth:
        try:
            health: ProviderHealth = await self._handle.health.remote()
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy, and says why
            return ProviderHealth(healthy=False, detail=self._error(exc).message)
        return health

    async def models(self) -> list[ModelInfo]:
        try:
            models: list[ModelInfo] = await self._handle.models.remote()
        except Exception as exc:
            raise self._error(exc) from exc
        return models

    def _error(self, exc: BaseException) -> PACoreError:
        return remote_error(exc, self.name, self.provider)


def remote_error(exc: BaseException, name: str, provider: str | None = None) -> PACoreError:
    """The platform error for a failure seen through a Serve handle.

    A :class:`PACoreError` raised in the replica arrives wrapped in Ray's ``RayTaskError``;
    the original is unwrapped (so it pickles cleanly on the next hop). Overload and dead
    replicas become retryable 503s; anything else from the model a 502.
    """
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = getattr(exc, "cause", None)
    if isinstance(cause, PACoreError):
        exc = cause
    if isinstance(exc, PACoreError):
        if exc.provider is None:
            exc.provider = provider
        return exc
    if isinstance(exc, BackPressureError | DeploymentUnavailableError):
        return UpstreamUnavailableError(f"model '{name}' is busy", provider=provider)
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):
        return UpstreamUnavailableError(f"model '{name}' is restarting", provider=provider)
    return UpstreamError(f"model '{name}' failed", provider=provider)
