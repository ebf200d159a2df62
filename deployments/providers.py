"""The provider deployment: one per provider kind, holding the built providers of every user."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pacore.logs import to_replica_log
from pacore.providers.base import ProviderConfig
from pacore.providers.registry import ProviderCache
from pacore.streaming import coalesce
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    ModelInfo,
    ProviderHealth,
)

__all__ = ["ProviderDeployment"]


class ProviderDeployment:
    """Serves one provider kind. The Router sends each request with the user's configuration
    (the key decrypted in memory for this request only); built SDK clients are cached per
    (user, configuration) so connections are reused, and each call holds its client open until
    it ends, even when the configuration changes meanwhile."""

    DEFAULT_OPTIONS: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": 256,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 64,
        },
        "graceful_shutdown_timeout_s": 120,
        "health_check_period_s": 10,
    }

    def __init__(self, kind: str, linger_s: float = 0.0) -> None:
        to_replica_log()
        self.kind = kind
        self.linger_s = linger_s
        self._cache = ProviderCache()

    async def stream(
        self, user_id: str, config: ProviderConfig, request: CompletionRequest
    ) -> AsyncIterator[CompletionChunk]:
        async with self._cache.use(user_id, config) as provider:
            async for chunk in coalesce(provider.stream(request), linger_s=self.linger_s):
                yield chunk

    async def complete(
        self, user_id: str, config: ProviderConfig, request: CompletionRequest
    ) -> CompletionResult:
        async with self._cache.use(user_id, config) as provider:
            return await provider.complete(request)

    async def health(self, user_id: str, config: ProviderConfig) -> ProviderHealth:
        async with self._cache.use(user_id, config) as provider:
            return await provider.health_check()

    async def models(self, user_id: str, config: ProviderConfig) -> list[ModelInfo]:
        async with self._cache.use(user_id, config) as provider:
            return await provider.list_models()

    async def forget(self, user_id: str, name: str) -> None:
        self._cache.forget(user_id, name)

    async def __del__(self) -> None:
        await self._cache.aclose()
