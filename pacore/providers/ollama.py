"""The Ollama adapter: pacore types to and from Ollama's native API (``/api/chat``) over httpx."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx

from pacore.errors import BadRequestError, NotFoundError, PACoreError, UpstreamError
from pacore.providers._http import (
    aclose_quietly,
    call_with_retries,
    error_from_response,
    new_http_client,
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
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
    Usage,
)

__all__ = ["OllamaProvider", "to_ollama_messages"]

# /api/chat fields that sit beside `options`; any other extra is a model option (num_ctx, seed…).
_TOP_LEVEL_EXTRAS = frozenset({"format", "keep_alive", "think"})


@register("ollama")
class OllamaProvider(Provider):
    capabilities = ProviderCapabilities(tools=True, vision=True, on_prem=True)
    default_base_url = "http://127.0.0.1:11434"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        key = config.key()
        # Ollama has no keys of its own; one configured is for a proxy in front of it.
        self._http = new_http_client(
            timeout_s=config.timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            base_url=self.base_url,
            headers={"authorization": f"Bearer {key}"} if key else None,
        )

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        body = self.payload(request, stream=False)

        async def once() -> CompletionResult:
            return self._result(await self._call("POST", "/api/chat", body))

        return await call_with_retries(once, self.retry_policy())

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        body = self.payload(request, stream=True)
        chunks = stream_with_retries(lambda: self._stream_once(body), self.retry_policy())
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await aclose_quietly(chunks)

    async def _stream_once(self, body: dict[str, Any]) -> AsyncIterator[CompletionChunk]:
        http_request = self._http.build_request("POST", "/api/chat", json=body)
        try:
            response = await self._http.send(http_request, stream=True)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, self.name) from exc
        try:
            if response.status_code >= 400:
                await response.aread()
                raise self._status_error(response)
            state = _StreamState(body["model"], self.name)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                chunk = state.on_line(self._parse_line(line))
                if chunk is not None:
                    yield chunk
                if state.done:
                    break
            yield state.final()
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, self.name) from exc
        finally:
            # Closing the response closes its connection, so a consumer that stops early (or
            # is cancelled) also ends the generation upstream.
            await response.aclose()

    async def health_check(self) -> ProviderHealth:
        started = time.perf_counter()
        try:
            data = await self._call("GET", "/api/version")
        except PACoreError as exc:
            return ProviderHealth(healthy=False, latency_ms=_ms_since(started), detail=exc.message)
        version = data.get("version") if isinstance(data, dict) else None
        return ProviderHealth(
            healthy=True,
            latency_ms=_ms_since(started),
            detail=f"ollama {version}" if version else None,
        )

    async def list_models(self) -> list[ModelInfo]:
        try:
            data = await call_with_retries(
                lambda: self._call("GET", "/api/tags"), self.retry_policy()
            )
        except NotFoundError:
            default = self.config.default_model
            return [ModelInfo(id=default, provider=self.name, owned_by="ollama")] if default else []
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise UpstreamError(
                f"{self.name}: /api/tags answered without models", provider=self.name
            )
        return [
            ModelInfo(
                id=str(m.get("name") or m.get("model")), provider=self.name, owned_by="ollama"
            )
            for m in models
            if isinstance(m, dict) and (m.get("name") or m.get("model"))
        ]

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport --------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, self.name) from exc
        if response.status_code >= 400:
            raise self._status_error(response)
        try:
            return response.json()
        except ValueError:
            raise UpstreamError(
                f"{self.name}: {path} answered with malformed JSON", provider=self.name
            ) from None

    def _status_error(self, response: httpx.Response) -> PACoreError:
        try:
            body: object = response.json()
        except ValueError:
            body = response.text
        return error_from_response(response.status_code, body, response.headers, self.name)

    def _parse_line(self, line: str) -> dict[str, Any]:
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise UpstreamError(f"{self.name}: malformed line in the stream", provider=self.name)
        if "error" in data:
            # Ollama reports a failure during generation as a line of its own, status long sent.
            raise error_from_response(502, data, None, self.name)
        return data

    def _result(self, data: Any) -> CompletionResult:
        if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
            raise UpstreamError(
                f"{self.name}: /api/chat answered without a message", provider=self.name
            )
        message = data["message"]
        calls = [
            ToolCall(id=d.id or _call_id(), name=d.name or "", arguments=d.arguments)
            for d in _tool_deltas(message.get("tool_calls"), start=0)
        ]
        return CompletionResult(
            content=str(message.get("content") or ""),
            tool_calls=calls or None,
            finish_reason=_finish(data.get("done_reason"), bool(calls)),
            usage=Usage.of(data.get("prompt_eval_count"), data.get("eval_count")),
            model=str(data.get("model") or ""),
            provider=self.name,
        )

    # --- request translation ----------------------------------------------------------------

    def payload(self, request: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        """The ``/api/chat`` body for ``request``."""
        try:
            return self._payload(request, stream)
        except PACoreError as exc:
            exc.provider = exc.provider or self.name
            raise

    def _payload(self, request: CompletionRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": to_ollama_messages(request.messages),
            "stream": stream,
        }
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.top_p is not None:
            options["top_p"] = request.top_p
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        if request.stop:
            options["stop"] = list(request.stop)
        for key, value in request.extra.items():
            (body if key in _TOP_LEVEL_EXTRAS else options)[key] = value
        if options:
            body["options"] = options
        if tools := _tools(request.tools, request.tool_choice, self.name):
            body["tools"] = tools
        return body


class _StreamState:
    """Turns NDJSON lines into chunks, keeping what the final chunk needs."""

    def __init__(self, model: str, provider: str) -> None:
        self.model = model
        self.provider = provider
        self.tool_calls = 0
        self.done = False
        self.done_reason: str | None = None
        self.usage = Usage()

    def on_line(self, data: dict[str, Any]) -> CompletionChunk | None:
        self.model = str(data.get("model") or self.model)
        message = data.get("message") or {}
        content = str(message.get("content") or "")
        deltas = _tool_deltas(message.get("tool_calls"), start=self.tool_calls)
        self.tool_calls += len(deltas)
        if data.get("done"):
            self.done = True
            self.done_reason = data.get("done_reason")
            self.usage = Usage.of(data.get("prompt_eval_count"), data.get("eval_count"))
        if not content and not deltas:
            return None
        return CompletionChunk(content=content, tool_calls=deltas or None, model=self.model)

    def final(self) -> CompletionChunk:
        if not self.done:
            raise UpstreamError(
                f"{self.provider}: the stream ended before the answer was done",
                provider=self.provider,
            )
        return CompletionChunk(
            finish_reason=_finish(self.done_reason, self.tool_calls > 0),
            usage=self.usage,
            model=self.model,
        )


def to_ollama_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama's chat messages: text content, base64 ``images``, object tool-call arguments."""
    tool_names = {c.id: c.name for m in messages for c in (m.tool_calls or [])}
    wire: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if not isinstance(message.content, str):
            images = [_image_data(p) for p in message.content if isinstance(p, ImagePart)]
            if images:
                item["images"] = images
        if message.tool_calls:
            item["tool_calls"] = [
                {"function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            name = message.name or tool_names.get(message.tool_call_id or "")
            if name:
                item["tool_name"] = name
        wire.append(item)
    return wire


def _image_data(part: ImagePart) -> str:
    if part.data:
        return part.data
    if part.url and part.url.startswith("data:"):
        header, _, data = part.url[len("data:") :].partition(",")
        if header.endswith(";base64") and data:
            return data
    # Fetching a URL on the caller's behalf would let a request make the platform reach
    # arbitrary hosts; Ollama takes the bytes, so the caller sends the bytes.
    raise BadRequestError("ollama accepts images as base64 data only", param="messages")


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BadRequestError("tool call arguments must be a JSON object", param="messages")
    return value


def _tools(
    tools: list[ToolDefinition] | None, choice: str | None, provider: str
) -> list[dict[str, Any]]:
    if choice not in (None, "auto", "none"):
        # Ollama has no way to force a tool call; pretending it did would mislead the caller.
        raise BadRequestError(
            "ollama cannot force a tool call: use tool_choice auto or none",
            provider=provider,
            param="tool_choice",
        )
    if not tools or choice == "none":
        return []
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def _tool_deltas(calls: Any, *, start: int) -> list[ToolCallDelta]:
    deltas: list[ToolCallDelta] = []
    for call in calls or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            continue
        arguments = function.get("arguments")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
        deltas.append(
            ToolCallDelta(
                index=start + len(deltas),
                id=call.get("id") or _call_id(),
                name=str(function["name"]),
                arguments=text,
            )
        )
    return deltas


def _call_id() -> str:
    # Older Ollama versions send tool calls without ids; the platform's callers need one.
    return f"call_{uuid.uuid4().hex[:24]}"


def _finish(done_reason: Any, tool_calls: bool) -> FinishReason:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
