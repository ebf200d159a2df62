"""The ``vllm`` provider: self-hosted models served by Ray Serve LLM's ``LLMServer``.

Requests go to the model's ``LLMServer`` deployment over its handle (its OpenAI-style ``chat``
method), never over HTTP. A streamed answer arrives as batches of ``data: {json}`` strings; each
batch becomes one :class:`CompletionChunk`, so tokens that were ready together cross the next
hop together. A model named ``<model>:<adapter>`` is a LoRA adapter: one loaded with the model
goes straight to the engine, any other is loaded by Serve's model multiplexing (the model's
``lora_dynamic_path``).

The translation (:func:`chat_body`, :class:`ChunkAssembler`, :func:`result_from_response`) needs
nothing installed; building the request object imports vLLM, through Ray Serve LLM.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pacore.engines.client import remote_error
from pacore.engines.config import deployment_name
from pacore.errors import NotFoundError, PACoreError, UpstreamError, error_for_status
from pacore.providers._http import call_with_retries, stream_with_retries
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
    ToolCall,
    ToolCallDelta,
    Usage,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

__all__ = ["ChunkAssembler", "VLLMProvider", "chat_body", "result_from_response"]

T = TypeVar("T")
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "abort": "error",
    "error": "error",
}


@dataclass
class _Adapters:
    """What a model's server says about LoRA: adapters loaded at start, and dynamic loading."""

    static: frozenset[str]
    dynamic: bool


@register("vllm")
class VLLMProvider(Provider):
    # Tools and images pass through; the served model and its vLLM arguments decide, and
    # vLLM answers a 400 when they do not fit.
    capabilities = ProviderCapabilities(tools=True, vision=True, on_prem=True)

    def __init__(self, config: ProviderConfig, handle: DeploymentHandle | None = None) -> None:
        super().__init__(config)
        self._handle = handle
        self._handles: dict[str, DeploymentHandle] = {}
        self._adapters: dict[str, _Adapters] = {}

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        model = self.model_for(request)

        async def once() -> CompletionResult:
            handle = await self._chat_handle(model)
            body = _chat_request(chat_body(request, model, stream=False))
            try:
                async for item in handle.chat.remote(body):
                    for event in _events(item):
                        return result_from_response(event, self.name)
            except Exception as exc:
                raise self._error(exc, model) from exc
            raise UpstreamError(f"model '{model}' returned nothing", provider=self.name)

        return await self._call(once)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        model = self.model_for(request)
        try:
            async for chunk in stream_with_retries(
                lambda: self._stream_once(request, model), self.retry_policy()
            ):
                yield chunk
        except PACoreError as exc:
            self._own(exc)
            raise

    async def health_check(self) -> ProviderHealth:
        model = self.config.default_model
        if model is None:
            return ProviderHealth(healthy=False, detail="no default_model to check")
        try:
            await self._base_handle(model).check_health.remote()
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy, and says why
            return ProviderHealth(healthy=False, detail=self._error(exc, model).message)
        return ProviderHealth(healthy=True)

    async def list_models(self) -> list[ModelInfo]:
        model = self.config.default_model
        if model is None:
            return []
        base = model.partition(":")[0]
        adapters = await self._call(lambda: self._server_adapters(base))
        ids = [base, *sorted(adapters.static)]
        return [ModelInfo(id=i, provider=self.name, owned_by="self-hosted") for i in ids]

    async def _stream_once(
        self, request: CompletionRequest, model: str
    ) -> AsyncIterator[CompletionChunk]:
        handle = await self._chat_handle(model)
        body = _chat_request(chat_body(request, model, stream=True))
        responses = handle.chat.remote(body)
        assembler = ChunkAssembler(model, self.name)
        done = False
        try:
            async for item in responses:
                chunk = assembler.feed(_events(item))
                if chunk is not None:
                    yield chunk
            done = True
        except Exception as exc:
            raise self._error(exc, model) from exc
        finally:
            if not done:  # the caller left: stop the generation in the engine
                responses.cancel()
        yield assembler.final()

    async def _chat_handle(self, model: str) -> Any:
        """The streaming handle for ``model``, multiplexed when it is a dynamic adapter."""
        base, _, adapter = model.partition(":")
        handle = self._base_handle(base).options(stream=True)
        if not adapter:
            return handle
        known = await self._server_adapters(base)
        if model in known.static:
            return handle
        if known.dynamic:
            return handle.options(multiplexed_model_id=model)
        raise NotFoundError(f"model '{base}' has no adapter '{adapter}'", param="model")

    async def _server_adapters(self, base: str) -> _Adapters:
        found = self._adapters.get(base)
        if found is None:
            try:
                config = await self._base_handle(base).llm_config.remote()
            except Exception as exc:
                raise self._error(exc, base) from exc
            modules = config.engine_kwargs.get("lora_modules") or []
            static = frozenset(getattr(m, "name", None) or m["name"] for m in modules)
            found = _Adapters(static=static, dynamic=config.lora_config is not None)
            self._adapters[base] = found
        return found

    def _base_handle(self, base: str) -> DeploymentHandle:
        if self._handle is not None:
            return self._handle
        handle = self._handles.get(base)
        if handle is None:
            handle = self._lookup(base)
            self._handles[base] = handle
        return handle

    def _lookup(self, base: str) -> DeploymentHandle:
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            return serve.get_deployment_handle(
                deployment_name(base, "vllm"), app_name=self.config.options.get("app")
            )
        except (RayServeException, KeyError, ValueError) as exc:
            raise NotFoundError(
                f"no self-hosted model '{base}'", provider=self.name, param="model"
            ) from exc

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call_with_retries(fn, self.retry_policy())
        except PACoreError as exc:
            self._own(exc)
            raise

    def _error(self, exc: BaseException, model: str) -> PACoreError:
        return remote_error(exc, model, self.name)

    def _own(self, exc: PACoreError) -> None:
        if exc.provider is None:
            exc.provider = self.name


# -- translation -------------------------------------------------------------------------------


def chat_body(request: CompletionRequest, model: str, *, stream: bool) -> dict[str, Any]:
    """The OpenAI chat-completions body for ``request`` (vLLM's extensions ride in ``extra``)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in request.messages],
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    optional = {
        "max_completion_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": request.stop,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
            for t in request.tools
        ]
    if request.tool_choice is not None:
        body["tool_choice"] = _tool_choice(request.tool_choice)
    body.update(request.extra)
    return body


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    if isinstance(message.content, str):
        out["content"] = message.content
    else:
        out["content"] = [_part(p) for p in message.content]
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _part(part: Any) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        url = part.url or f"data:{part.media_type or 'image/png'};base64,{part.data}"
        return {"type": "image_url", "image_url": {"url": url}}
    return {"type": "text", "text": part.text}


def _tool_choice(choice: str) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _chat_request(body: dict[str, Any]) -> Any:
    """vLLM's request model, made safe to pickle across the handle.

    Pydantic keeps list-typed message fields validated through an ``Iterable`` as lazy
    iterators that cannot be pickled; Ray Serve LLM's own ingress materialises them the same way.
    """
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    request = ChatCompletionRequest(**body)
    for message in request.messages:
        for key in ("content", "tool_calls"):
            value = message.get(key) if isinstance(message, dict) else None
            if value is not None and not isinstance(value, str):
                message[key] = list(value)
    return request


def _events(item: Any) -> Iterator[dict[str, Any]]:
    """The JSON events in one item from ``LLMServer.chat``: a batch (list) of ``data:`` strings,
    one string, an error response, or a whole non-streamed response."""
    for part in item if isinstance(item, list) else [item]:
        if isinstance(part, str):
            for line in part.splitlines():
                data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                if data and data != "[DONE]":
                    yield json.loads(data)
        elif hasattr(part, "model_dump"):
            yield part.model_dump()
        elif isinstance(part, dict):
            yield part


def _raise_if_error(event: dict[str, Any], provider: str) -> None:
    error = event.get("error")
    if not error:
        return
    if isinstance(error, str):
        error = {"message": error}
    code = error.get("code")
    status = code if isinstance(code, int) else 500
    raise error_for_status(status, str(error.get("message") or "model error"), provider=provider)


class ChunkAssembler:
    """Turns streamed chat-completion events into chunks: one per batch, the finish last."""

    def __init__(self, model: str, provider: str) -> None:
        self._model = model
        self._provider = provider
        self._finish: FinishReason | None = None
        self._usage: Usage | None = None

    def feed(self, events: Iterator[dict[str, Any]]) -> CompletionChunk | None:
        text: list[str] = []
        tools: list[ToolCallDelta] = []
        for event in events:
            _raise_if_error(event, self._provider)
            self._model = event.get("model") or self._model
            if event.get("usage"):
                self._usage = _usage(event["usage"])
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                text.append(delta.get("content") or "")
                tools.extend(_tool_delta(t) for t in delta.get("tool_calls") or [])
                if choice.get("finish_reason"):
                    self._finish = _FINISH.get(choice["finish_reason"], "stop")
        content = "".join(text)
        if not content and not tools:
            return None
        return CompletionChunk(content=content, tool_calls=tools or None, model=self._model)

    def final(self) -> CompletionChunk:
        return CompletionChunk(
            finish_reason=self._finish or "stop", usage=self._usage, model=self._model
        )


def result_from_response(event: dict[str, Any], provider: str) -> CompletionResult:
    """A whole (non-streamed) chat-completion response as a result."""
    _raise_if_error(event, provider)
    choices = event.get("choices") or []
    if not choices:
        raise UpstreamError("the model returned no choices", provider=provider)
    message = choices[0].get("message") or {}
    calls = [
        ToolCall(
            id=c.get("id") or f"call_{i}",
            name=c["function"]["name"],
            arguments=c["function"].get("arguments") or "{}",
        )
        for i, c in enumerate(message.get("tool_calls") or [])
    ]
    return CompletionResult(
        content=message.get("content") or "",
        tool_calls=calls or None,
        finish_reason=_FINISH.get(choices[0].get("finish_reason") or "stop", "stop"),
        usage=_usage(event.get("usage") or {}),
        model=event.get("model") or "",
        provider=provider,
    )


def _usage(data: dict[str, Any]) -> Usage:
    return Usage.of(data.get("prompt_tokens"), data.get("completion_tokens"))


def _tool_delta(data: dict[str, Any]) -> ToolCallDelta:
    function = data.get("function") or {}
    return ToolCallDelta(
        index=int(data.get("index") or 0),
        id=data.get("id"),
        name=function.get("name"),
        arguments=function.get("arguments") or "",
    )
