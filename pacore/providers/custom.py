"""The adapter for any OpenAI-compatible endpoint (vLLM's server, LM Studio, llama.cpp, Groq...).

It speaks OpenAI's wire format through :class:`OpenAIProvider` and tolerates what such servers
leave out: usage (reported as zeros), ``stream_options`` (retried once without it, then no longer
sent), a ``/models`` endpoint (the default model stands in, and health is probed another way) and
an API key (a placeholder satisfies the SDK).
"""

from __future__ import annotations

from typing import Any

from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk

from pacore.errors import BadRequestError, NotFoundError
from pacore.providers._http import error_from_response, translate_transport_error
from pacore.providers.base import ProviderConfig
from pacore.providers.openai import OpenAIProvider
from pacore.providers.registry import register
from pacore.types import ModelInfo

__all__ = ["NO_KEY", "CustomEndpointProvider"]

NO_KEY = "no-key"
"""Sent as the bearer token when the endpoint needs none: the SDK insists on one, and leaving it
unset would make the SDK send whatever OPENAI_API_KEY the process happens to have."""

# What a server without a /models endpoint answers there: 404, or 405 and the like (4xx).
_NO_MODELS_ENDPOINT = (NotFoundError, BadRequestError)


@register("custom")
class CustomEndpointProvider(OpenAIProvider):
    """An OpenAI-compatible server at the configured ``base_url``."""

    default_base_url = None

    def __init__(self, config: ProviderConfig) -> None:
        if not config.base_url:
            raise BadRequestError(
                f"provider '{config.name}' of kind 'custom' needs a base_url",
                provider=config.name, param="base_url",
            )
        # Cleared for good once the server rejects stream_options.
        self._send_stream_options = True
        super().__init__(config)

    def _api_key(self) -> str:
        return self.config.key() or NO_KEY

    async def _open_stream(self, params: dict[str, Any]) -> AsyncStream[ChatCompletionChunk]:
        if self._send_stream_options:
            try:
                return await self._create_stream(params, include_usage=True)
            except BadRequestError as exc:
                if "stream_options" not in exc.message:
                    raise
                self._send_stream_options = False
        return await self._create_stream(params, include_usage=False)

    async def list_models(self) -> list[ModelInfo]:
        try:
            return await super().list_models()
        except _NO_MODELS_ENDPOINT:
            return self._configured_models()

    def _configured_models(self) -> list[ModelInfo]:
        model = self.config.default_model
        return [ModelInfo(id=model, provider=self.name)] if model else []

    async def _health_probe(self) -> None:
        try:
            await self._list_models_once()
        except _NO_MODELS_ENDPOINT:
            await (self._ping_model() if self.config.default_model else self._ping_base_url())

    async def _ping_model(self) -> None:
        """A one-token completion of the default model."""
        try:
            await self._client.chat.completions.create(
                model=self.config.default_model or "", max_tokens=1,
                messages=[{"role": "user", "content": "ping"}],
            )
        except Exception as exc:
            raise self._error(exc) from exc

    async def _ping_base_url(self) -> None:
        """A plain GET of the base URL: any answer but a server error or a refused key will do."""
        headers = {"authorization": f"Bearer {self._api_key()}"}
        try:
            response = await self._http.get(self.config.base_url or "", headers=headers)
        except Exception as exc:
            raise translate_transport_error(exc, self.name) from exc
        if response.status_code >= 500 or response.status_code in (401, 403):
            raise error_from_response(response.status_code, None, response.headers, self.name)

