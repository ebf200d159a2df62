"""The Anthropic Messages API adapter: pacore types to and from the official ``anthropic`` SDK.

Translation only: the SDK is built with its retries off and the platform's httpx2 client, and
:mod:`pacore.providers._http` decides when to try again.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
from anthropic import types as at

from pacore.errors import (
    BadRequestError,
    ContextLengthError,
    NotFoundError,
    PACoreError,
    UpstreamError,
)
from pacore.errors import TimeoutError as PACoreTimeoutError
from pacore.providers._http import (
    aclose_quietly,
    call_with_retries,
    error_from_response,
    new_sdk_http_client,
    stream_with_retries,
    translate_transport_error,
)
from pacore.providers.base import Provider, ProviderCapabilities, ProviderConfig
from pacore.providers.registry import register
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    FinishReason,
    ImagePart,
    Message,
    ModelInfo,
    ProviderHealth,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
    Usage,
)

__all__ = ["DEFAULT_MAX_TOKENS", "AnthropicProvider", "to_anthropic_messages"]

DEFAULT_MAX_TOKENS = 4096

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# An `error` event inside a 200 stream has no status of its own; its type says what it means.
_STATUS_BY_ERROR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# What the SDK raises: its own errors, raw httpx2 errors from a stream being read, and
# JSONDecodeError for a stream event that is not valid JSON.
_SDK_ERRORS = (anthropic.AnthropicError, httpx2.HTTPError, json.JSONDecodeError)


@register("anthropic")
class AnthropicProvider(Provider):
    capabilities = ProviderCapabilities(tools=True, vision=True)
    default_base_url = "https://api.anthropic.com"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._http = new_sdk_http_client(
            anthropic.DefaultAioHttpClient,
            timeout_s=config.timeout_s, connect_timeout_s=config.connect_timeout_s
        )
        # Given on every call, so that the SDK never swaps in a timeout of its own choosing.
        self._timeout = self._http.timeout
        # An explicit key (even an empty one) keeps the SDK from reading credentials from the
        # environment or the disk; the upstream answers 401 when it is missing.
        self._client = anthropic.AsyncAnthropic(
            api_key=config.key() or "",
            base_url=self.base_url,
            max_retries=0,
            http_client=self._http,
        )

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        params = self.params(request)

        async def once() -> at.Message:
            try:
                return await self._client.messages.create(**params, timeout=self._timeout)
            except _SDK_ERRORS as exc:
                raise self._error(exc) from exc

        message = await call_with_retries(once, self.retry_policy())
        return _result(message, self.name)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        params = self.params(request)
        chunks = stream_with_retries(lambda: self._stream_once(params), self.retry_policy())
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await aclose_quietly(chunks)

    async def _stream_once(self, params: dict[str, Any]) -> AsyncIterator[CompletionChunk]:
        try:
            events = await self._client.messages.create(
                **params, stream=True, timeout=self._timeout
            )
        except _SDK_ERRORS as exc:
            raise self._error(exc) from exc
        state = _StreamState(params["model"], self.name)
        try:
            async for event in events:
                chunk = state.on_event(event)
                if chunk is not None:
                    yield chunk
            yield state.final()
        except _SDK_ERRORS as exc:
            raise self._error(exc) from exc
        finally:
            # Closing the SDK stream closes the HTTP response, so a consumer that stops early
            # (or is cancelled) also ends the upstream request.
            await events.close()

    async def health_check(self) -> ProviderHealth:
        started = time.perf_counter()
        try:
            await self._client.models.list(limit=1)
        except _SDK_ERRORS as exc:
            error = self._error(exc)
            return ProviderHealth(
                healthy=False, latency_ms=_ms_since(started), detail=error.message
            )
        return ProviderHealth(healthy=True, latency_ms=_ms_since(started))

    async def list_models(self) -> list[ModelInfo]:
        try:
            return await call_with_retries(self._list_models_once, self.retry_policy())
        except NotFoundError:
            # An Anthropic-compatible endpoint without /v1/models: it can only vouch for the
            # model it was configured with.
            default = self.config.default_model
            return (
                [ModelInfo(id=default, provider=self.name, owned_by="anthropic")] if default else []
            )

    async def _list_models_once(self) -> list[ModelInfo]:
        try:
            return [
                ModelInfo(
                    id=m.id,
                    provider=self.name,
                    owned_by="anthropic",
                    context_length=getattr(m, "max_input_tokens", None),
                )
                async for m in self._client.models.list(limit=100)
            ]
        except _SDK_ERRORS as exc:
            raise self._error(exc) from exc

    async def aclose(self) -> None:
        await self._client.close()
        await self._http.aclose()

    # --- translation --------------------------------------------------------------------------

    def params(self, request: CompletionRequest) -> dict[str, Any]:
        """The ``messages.create`` keyword arguments for ``request``."""
        try:
            return self._params(request)
        except PACoreError as exc:
            exc.provider = exc.provider or self.name
            raise

    def _params(self, request: CompletionRequest) -> dict[str, Any]:
        system, messages = to_anthropic_messages(request.messages)
        max_tokens = request.max_tokens or int(
            self.config.options.get("max_tokens", DEFAULT_MAX_TOKENS)
        )
        params: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": messages,
            "max_tokens": max_tokens,
        }
        if system:
            params["system"] = system
        if request.stop:
            params["stop_sequences"] = list(request.stop)
        params.update(_tool_params(request.tools, request.tool_choice, self.name))
        if body := {**self._sampling(request), **request.extra}:
            params["extra_body"] = body
        return params

    def _sampling(self, request: CompletionRequest) -> dict[str, float]:
        # The SDK's typed signature no longer lists the sampling fields, so they travel as
        # extra body fields under their Messages API names.
        sampling: dict[str, float] = {}
        if request.temperature is not None:
            if request.temperature > 1:
                raise BadRequestError(
                    "anthropic accepts a temperature between 0 and 1",
                    provider=self.name,
                    param="temperature",
                )
            sampling["temperature"] = request.temperature
        if request.top_p is not None:
            sampling["top_p"] = request.top_p
        return sampling

    def _error(self, exc: BaseException) -> PACoreError:
        if isinstance(exc, PACoreError):
            return exc
        if isinstance(exc, anthropic.APIStatusError):
            return self._status_error(exc)
        if isinstance(exc, anthropic.APIConnectionError):
            if exc.__cause__ is None and isinstance(exc, anthropic.APITimeoutError):
                return PACoreTimeoutError(f"{self.name}: upstream timed out", provider=self.name)
            return translate_transport_error(exc.__cause__ or exc, self.name)
        if isinstance(exc, json.JSONDecodeError):
            return UpstreamError(
                f"{self.name}: malformed response from upstream", provider=self.name
            )
        return translate_transport_error(exc, self.name)

    def _status_error(self, exc: anthropic.APIStatusError) -> PACoreError:
        status = exc.status_code
        if status < 400:
            status = _STATUS_BY_ERROR_TYPE.get(str(exc.type), 502)
        error = error_from_response(status, exc.body, exc.response.headers, self.name)
        if status in (400, 413) and "prompt is too long" in error.message.lower():
            return ContextLengthError(error.message, provider=self.name)
        return error


class _StreamState:
    """Turns the Messages stream's events into chunks, keeping what the final chunk needs."""

    def __init__(self, model: str, provider: str) -> None:
        self.model = model
        self.provider = provider
        self.usage = Usage()
        self.stop_reason: str | None = None
        self.tool_index: dict[int, int] = {}

    def on_event(self, event: at.RawMessageStreamEvent) -> CompletionChunk | None:
        if isinstance(event, at.RawMessageStartEvent):
            self.model = event.message.model or self.model
            self.usage = _usage(event.message.usage)
        elif isinstance(event, at.RawContentBlockStartEvent):
            return self._block_start(event)
        elif isinstance(event, at.RawContentBlockDeltaEvent):
            return self._block_delta(event)
        elif isinstance(event, at.RawMessageDeltaEvent):
            self.stop_reason = event.delta.stop_reason or self.stop_reason or "end_turn"
            prompt = self.usage.prompt_tokens
            if event.usage.input_tokens is not None:
                prompt = _prompt_tokens(
                    event.usage.input_tokens,
                    event.usage.cache_creation_input_tokens,
                    event.usage.cache_read_input_tokens,
                )
            self.usage = Usage.of(prompt, event.usage.output_tokens)
        return None

    def _block_start(self, event: at.RawContentBlockStartEvent) -> CompletionChunk | None:
        block = event.content_block
        if isinstance(block, at.ToolUseBlock):
            index = self.tool_index[event.index] = len(self.tool_index)
            arguments = json.dumps(block.input) if block.input else ""
            delta = ToolCallDelta(index=index, id=block.id, name=block.name, arguments=arguments)
            return CompletionChunk(tool_calls=[delta], model=self.model)
        if isinstance(block, at.TextBlock) and block.text:
            return CompletionChunk(content=block.text, model=self.model)
        return None

    def _block_delta(self, event: at.RawContentBlockDeltaEvent) -> CompletionChunk | None:
        delta = event.delta
        if isinstance(delta, at.TextDelta):
            return CompletionChunk(content=delta.text, model=self.model) if delta.text else None
        if isinstance(delta, at.InputJSONDelta):
            index = self.tool_index.get(event.index)
            if index is None:
                raise UpstreamError(
                    f"{self.provider}: tool input for a block that is not a tool call",
                    provider=self.provider,
                )
            if not delta.partial_json:
                return None
            piece = ToolCallDelta(index=index, arguments=delta.partial_json)
            return CompletionChunk(tool_calls=[piece], model=self.model)
        return None

    def final(self) -> CompletionChunk:
        if self.stop_reason is None:
            raise UpstreamError(
                f"{self.provider}: the stream ended before the message was complete",
                provider=self.provider,
            )
        return CompletionChunk(
            finish_reason=_finish(self.stop_reason), usage=self.usage, model=self.model
        )


# --- request translation ----------------------------------------------------------------------


def to_anthropic_messages(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """System text (all system messages joined) and the turns, merged so that roles alternate."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            if text := message.text():
                system.append(text)
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise BadRequestError(
            "at least one user or assistant message is required", param="messages"
        )
    for turn in turns:
        # Anthropic wants a user turn's tool results before anything else in it.
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return "\n\n".join(system) or None, turns


def _blocks(message: Message) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [_tool_result(message)]
    blocks = _content_blocks(message.content, allow_images=message.role == "user")
    for call in message.tool_calls or []:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.name,
                "input": _arguments(call.arguments),
            }
        )
    return blocks


def _content_blocks(
    content: str | list[TextPart | ImagePart], *, allow_images: bool
) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, TextPart):
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif allow_images:
            blocks.append(_image_block(part))
        else:
            raise BadRequestError(
                "anthropic accepts images only in user and tool messages", param="messages"
            )
    return blocks


def _tool_result(message: Message) -> dict[str, Any]:
    if not message.tool_call_id:
        raise BadRequestError("a tool message needs tool_call_id", param="messages")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    if isinstance(message.content, str):
        if message.content:
            block["content"] = message.content
    elif content := _content_blocks(message.content, allow_images=True):
        block["content"] = content
    return block


def _image_block(part: ImagePart) -> dict[str, Any]:
    if part.data:
        if not part.media_type:
            raise BadRequestError("an image given as data needs a media_type", param="messages")
        source = {"type": "base64", "media_type": part.media_type, "data": part.data}
    elif part.url and part.url.startswith("data:"):
        header, _, data = part.url[len("data:") :].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64" or not media_type or not data:
            raise BadRequestError(
                "an image data URL must be data:<media type>;base64,<data>", param="messages"
            )
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif part.url:
        source = {"type": "url", "url": part.url}
    else:
        raise BadRequestError("an image part needs a url or data", param="messages")
    return {"type": "image", "source": source}


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BadRequestError("tool call arguments must be a JSON object", param="messages")
    return value


def _tool_params(
    tools: list[ToolDefinition] | None, choice: str | None, provider: str
) -> dict[str, Any]:
    if not tools:
        if choice not in (None, "auto", "none"):
            raise BadRequestError(
                "tool_choice names a tool but no tools were given",
                provider=provider,
                param="tool_choice",
            )
        return {}
    params: dict[str, Any] = {
        "tools": [
            {"name": t.name, "description": t.description, "input_schema": t.parameters}
            if t.description
            else {"name": t.name, "input_schema": t.parameters}
            for t in tools
        ]
    }
    if choice is None:
        return params
    if choice in ("auto", "none"):
        params["tool_choice"] = {"type": choice}
    elif choice == "required":
        params["tool_choice"] = {"type": "any"}
    elif choice in {t.name for t in tools}:
        params["tool_choice"] = {"type": "tool", "name": choice}
    else:
        raise BadRequestError(
            f"tool_choice names '{choice}', which is not among the tools",
            provider=provider,
            param="tool_choice",
        )
    return params


# --- response translation ---------------------------------------------------------------------


def _result(message: at.Message, provider: str) -> CompletionResult:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in message.content:
        if isinstance(block, at.TextBlock):
            texts.append(block.text)
        elif isinstance(block, at.ToolUseBlock):
            calls.append(ToolCall(id=block.id, name=block.name, arguments=json.dumps(block.input)))
    return CompletionResult(
        content="".join(texts),
        tool_calls=calls or None,
        finish_reason=_finish(message.stop_reason),
        usage=_usage(message.usage),
        model=message.model,
        provider=provider,
    )


def _finish(stop_reason: str | None) -> FinishReason:
    return _FINISH.get(stop_reason or "end_turn", "stop")


def _prompt_tokens(input_tokens: int | None, created: int | None, read: int | None) -> int:
    # Anthropic counts cached prompt tokens apart; the prompt is all three together.
    return (input_tokens or 0) + (created or 0) + (read or 0)


def _usage(usage: at.Usage) -> Usage:
    prompt = _prompt_tokens(
        usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens
    )
    return Usage.of(prompt, usage.output_tokens)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
