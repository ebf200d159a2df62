"""The Provider ABC every adapter implements, and the configuration it is built from."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pacore.providers._http import RetryPolicy
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    ModelInfo,
    ProviderHealth,
)

__all__ = ["Provider", "ProviderCapabilities", "ProviderConfig", "ProviderKind"]

ProviderKind = Literal["anthropic", "openai", "custom", "ollama", "vllm", "cpu", "agent"]


class ProviderCapabilities(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    streaming: bool = Field(default=True, description="always true: streaming is mandatory")
    tools: bool = Field(default=False, description="accepts tool definitions and emits tool calls")
    vision: bool = Field(default=False, description="accepts image content parts")
    on_prem: bool = Field(
        default=False,
        description="runs on hardware the user controls (self-hosted or behind an agent); "
        "satisfies data_residency=on_prem",
    )


class ProviderConfig(BaseModel):
    """One user's configuration of one provider, as stored (with the key decrypted in memory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ProviderKind = Field(description="which adapter serves it")
    name: str = Field(min_length=1, max_length=64, description="the user's label, e.g. my-groq")
    api_key: SecretStr | None = Field(default=None, description="decrypted only for the request")
    base_url: str | None = Field(default=None, description="override of the provider's endpoint")
    default_model: str | None = Field(default=None, description="used when a request names none")
    options: dict[str, Any] = Field(default_factory=dict, description="adapter-specific options")
    timeout_s: float = Field(default=60.0, gt=0, description="read timeout for one upstream call")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10, description="retries before the first token")

    def fingerprint(self) -> str:
        """A stable digest of every field (the key included), for caching built providers."""
        data = self.model_dump(mode="json")
        data["api_key"] = self.api_key.get_secret_value() if self.api_key else None
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None


class Provider(ABC):
    """An LLM backend. ``stream`` is mandatory; ``complete`` returns the whole answer at once.

    Adapters translate between :mod:`pacore.types` and one upstream API, and leave timeouts,
    retries and backoff to :mod:`pacore.providers._http`. Every error they raise is a
    :class:`pacore.errors.PACoreError` carrying ``provider=self.name``.
    """

    kind: ClassVar[str]
    capabilities: ClassVar[ProviderCapabilities] = ProviderCapabilities()
    default_base_url: ClassVar[str | None] = None

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def base_url(self) -> str | None:
        return self.config.base_url or self.default_base_url

    def retry_policy(self) -> RetryPolicy:
        """Retries before the first token: ``max_retries`` from the config, backoff from options
        (``retry_base_delay_s``, ``retry_max_delay_s``)."""
        opts = self.config.options
        return RetryPolicy(
            max_retries=self.config.max_retries,
            base_delay_s=float(opts.get("retry_base_delay_s", 0.25)),
            max_delay_s=float(opts.get("retry_max_delay_s", 8.0)),
        )

    def model_for(self, request: CompletionRequest) -> str:
        from pacore.errors import BadRequestError

        model = request.model or self.config.default_model
        if not model:
            raise BadRequestError(
                f"no model named and provider '{self.name}' has no default_model",
                provider=self.name,
                param="model",
            )
        return model

    @abstractmethod
    async def complete(self, request: CompletionRequest) -> CompletionResult:
        """The whole answer."""

    @abstractmethod
    def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """The answer as it is produced; the last chunk carries finish_reason (and usage)."""

    @abstractmethod
    async def health_check(self) -> ProviderHealth:
        """A cheap live call that proves the endpoint and the key work."""

    @abstractmethod
    async def list_models(self) -> list[ModelInfo]:
        """The models this endpoint serves (the default model alone when it cannot say)."""

    async def aclose(self) -> None:  # noqa: B027 - optional lifecycle hook, a no-op by default
        """Release connections; called when the provider leaves the cache."""
