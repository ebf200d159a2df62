"""The OpenAI Chat Completions adapter: translation between :mod:`pacore.types` and the ``openai`` SDK.

The translation functions are module-level so that every OpenAI-compatible adapter (``custom``)
shares them; :class:`OpenAIProvider` adds the I/O, with retries and error mapping left to
:mod:`pacore.providers._http`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import openai
from openai import AsyncOpenAI, AsyncStream, Omit, omit
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionStreamOptionsParam,
)

from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    ContextLengthError,
    PACoreError,
    TimeoutError,
    UpstreamError,
)
from pacore.providers._http import (
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

__all__ = [
    "OpenAIProvider",
    "chat_params",
    "chunk_from_openai",
    "result_from_openai",
    "to_openai_messages",
    "to_openai_tool_choice",
    "to_openai_tools",
    "translate_openai_error",
]

# Keys of ``request.extra`` that would override what the adapter itself decides (one choice, n=1).
_RESERVED = frozenset({"model", "messages", "stream", "stream_options", "n"})

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


# --------------------------------------------------------------------------- requests


def to_openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    return [_message(m) for m in messages]


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    if message.name:
        out["name"] = message.name
    if message.role == "tool":
        if not message.tool_call_id:
            raise BadRequestError("a tool message needs tool_call_id", param="messages")
        out["tool_call_id"] = message.tool_call_id
        out["content"] = message.text()
    elif message.role == "assistant":
        out["content"] = message.text() or None
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
    elif isinstance(message.content, str):
        out["content"] = message.content
    else:
        out["content"] = [_content_part(p) for p in message.content]
    return out


def _content_part(part: TextPart | ImagePart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if part.url:
        url = part.url
    elif part.data and part.media_type:
        url = f"data:{part.media_type};base64,{part.data}"
    else:
        raise BadRequestError(
            "an image part needs a url, or data with a media_type", param="messages"
        )
    return {"type": "image_url", "image_url": {"url": url}}


def to_openai_tools(tools: list[ToolDefinition]) -> list[dict[str, Any]]:
    return [
        {"type": "function",
         "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]


def to_openai_tool_choice(choice: str) -> str | dict[str, Any]:
    """``auto``/``none``/``required`` as they are; any other value names the tool to call."""
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def chat_params(request: CompletionRequest, model: str) -> dict[str, Any]:
    """Keyword arguments of ``chat.completions.create`` (without ``stream``)."""
    params: dict[str, Any] = {"model": model, "messages": to_openai_messages(request.messages)}
    for key in ("temperature", "top_p", "max_tokens", "stop"):
        value = getattr(request, key)
        if value is not None:
            params[key] = value
    if request.tools:
        params["tools"] = to_openai_tools(request.tools)
    if request.tool_choice is not None:
        params["tool_choice"] = to_openai_tool_choice(request.tool_choice)
    extra = {k: v for k, v in request.extra.items() if k not in _RESERVED}
    if extra:
        params["extra_body"] = extra
    return params


# --------------------------------------------------------------------------- responses


def _finish(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    # Compatible servers invent their own reasons ("eos", "abort"...): they still ended the answer.
    return _FINISH.get(reason, "stop")


def _usage(usage: Any) -> Usage | None:
    if usage is None:
        return None
    return Usage.of(getattr(usage, "prompt_tokens", 0), getattr(usage, "completion_tokens", 0))


def result_from_openai(completion: ChatCompletion, provider: str) -> CompletionResult:
    if not completion.choices:
        raise UpstreamError(f"{provider}: upstream answered without a choice", provider=provider)
    choice = completion.choices[0]
    calls = [
        ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments or "{}")
        for c in choice.message.tool_calls or []
        if c.type == "function"
    ]
    return CompletionResult(
        content=choice.message.content or "",
        tool_calls=calls or None,
        finish_reason=_finish(choice.finish_reason) or "stop",
        usage=_usage(completion.usage) or Usage(),
        model=completion.model or "",
        provider=provider,
    )


def chunk_from_openai(chunk: ChatCompletionChunk) -> CompletionChunk | None:
    """One SDK chunk as a domain chunk; None when it carries nothing (a role-only delta)."""
    usage = _usage(chunk.usage)
    if not chunk.choices:
        return CompletionChunk(usage=usage, model=chunk.model) if usage else None
    choice = chunk.choices[0]
    deltas = [
        ToolCallDelta(
            index=d.index if d.index is not None else i,
            id=d.id,
            name=d.function.name if d.function else None,
            arguments=(d.function.arguments if d.function else None) or "",
        )
        for i, d in enumerate(choice.delta.tool_calls or [])
    ]
    content = choice.delta.content or ""
    finish = _finish(choice.finish_reason)
    if not content and not deltas and finish is None and usage is None:
        return None
    return CompletionChunk(
        content=content, tool_calls=deltas or None, finish_reason=finish, usage=usage,
        model=chunk.model,
    )


# --------------------------------------------------------------------------- errors


def translate_openai_error(exc: BaseException, provider: str) -> PACoreError:
    """Map anything the SDK raises to the platform's error hierarchy."""
    if isinstance(exc, PACoreError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        error = error_from_response(exc.status_code, exc.body, exc.response.headers, provider)
        if _error_code(exc.body) == "context_length_exceeded":
            return ContextLengthError(error.message, provider=provider)
        return error
    if isinstance(exc, openai.APIConnectionError):  # a timeout is one
        if exc.__cause__ is None and isinstance(exc, openai.APITimeoutError):
            return TimeoutError(f"{provider}: upstream timed out", provider=provider)
        return translate_transport_error(exc.__cause__ or exc, provider)
    if isinstance(exc, openai.APIError):
        # An error event inside a stream: the upstream failed after answering 200.
        message = exc.message or "upstream reported an error"
        return UpstreamError(f"{provider}: {message[:500]}", provider=provider)
    if isinstance(exc, ValueError):
        # Undecodable JSON in a response or in a stream event.
        return UpstreamError(f"{provider}: malformed response from upstream", provider=provider)
    return translate_transport_error(exc, provider)


def _error_code(body: object) -> str | None:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return str(err["code"])
    return None


# --------------------------------------------------------------------------- the adapter


@register("openai")
class OpenAIProvider(Provider):
    """OpenAI's Chat Completions API through the official SDK (its own retries off)."""

    capabilities = ProviderCapabilities(tools=True, vision=True)
    default_base_url: ClassVar[str | None] = "https://api.openai.com/v1"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._http = new_sdk_http_client(
            openai.DefaultAioHttpClient,
            timeout_s=config.timeout_s, connect_timeout_s=config.connect_timeout_s
        )
        self._client = AsyncOpenAI(
            api_key=self._api_key(), base_url=self.base_url, max_retries=0, http_client=self._http
        )
        # The SDK fills these from OPENAI_ORG_ID / OPENAI_PROJECT_ID when they are None; only
        # this configuration may say which organization its requests bill.
        self._client.organization = config.options.get("organization")
        self._client.project = config.options.get("project")

    def _api_key(self) -> str:
        """The key sent upstream. Always explicit: the SDK would otherwise read the process
        environment and send a key this configuration does not own."""
        key = self.config.key()
        if not key:
            raise AuthenticationError(
                f"provider '{self.name}' has no API key configured", provider=self.name,
                param="api_key",
            )
        return key

    def _error(self, exc: BaseException) -> PACoreError:
        return translate_openai_error(exc, self.name)

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        params = chat_params(request, self.model_for(request))

        async def once() -> CompletionResult:
            try:
                completion = await self._client.chat.completions.create(**params)
            except Exception as exc:
                raise self._error(exc) from exc
            return result_from_openai(completion, self.name)

        return await call_with_retries(once, self.retry_policy())

    def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        params = chat_params(request, self.model_for(request))
        return stream_with_retries(lambda: self._stream_once(params), self.retry_policy())

    async def _open_stream(self, params: dict[str, Any]) -> AsyncStream[ChatCompletionChunk]:
        return await self._create_stream(params, include_usage=True)

    async def _create_stream(
        self, params: dict[str, Any], *, include_usage: bool
    ) -> AsyncStream[ChatCompletionChunk]:
        options: ChatCompletionStreamOptionsParam | Omit = (
            {"include_usage": True} if include_usage else omit
        )
        try:
            return await self._client.chat.completions.create(
                stream=True, stream_options=options, **params
            )
        except Exception as exc:
            raise self._error(exc) from exc

    async def _stream_once(self, params: dict[str, Any]) -> AsyncIterator[CompletionChunk]:
        """One upstream stream. The finishing chunk is held back until the usage-only chunk
        that follows it arrives, so that the last chunk carries both."""
        upstream = await self._open_stream(params)
        final: CompletionChunk | None = None
        usage: Usage | None = None
        try:
            async for raw in upstream:
                chunk = chunk_from_openai(raw)
                if chunk is None:
                    continue
                # Some servers report running usage on every chunk: only the last one keeps it.
                usage, chunk.usage = chunk.usage or usage, None
                if final is not None or chunk.finish_reason is not None:
                    final = _merge(final, chunk)
                elif chunk.content or chunk.tool_calls:
                    yield chunk
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            await upstream.close()
        if final is None:
            raise UpstreamError(f"{self.name}: the stream ended before the answer finished",
                                provider=self.name)
        final.usage = usage or Usage()
        yield final

    async def health_check(self) -> ProviderHealth:
        """One live call, without retries: how it went and how long it took."""
        started = time.perf_counter()
        try:
            await self._health_probe()
        except PACoreError as exc:
            return ProviderHealth(healthy=False, detail=exc.message)
        return ProviderHealth(healthy=True, latency_ms=(time.perf_counter() - started) * 1000)

    async def _health_probe(self) -> None:
        await self._list_models_once()

    async def list_models(self) -> list[ModelInfo]:
        return await call_with_retries(self._list_models_once, self.retry_policy())

    async def _list_models_once(self) -> list[ModelInfo]:
        try:
            return [
                ModelInfo(id=m.id, provider=self.name, owned_by=getattr(m, "owned_by", None))
                async for m in self._client.models.list()
            ]
        except Exception as exc:
            raise self._error(exc) from exc

    async def aclose(self) -> None:
        await self._client.close()


def _merge(final: CompletionChunk | None, chunk: CompletionChunk) -> CompletionChunk:
    """Fold chunks that arrive at or after the finish into one last chunk."""
    if final is None:
        return chunk.model_copy()
    final.content += chunk.content
    if chunk.tool_calls:
        final.tool_calls = [*(final.tool_calls or []), *chunk.tool_calls]
    final.finish_reason = chunk.finish_reason or final.finish_reason
    final.model = final.model or chunk.model
    return final
