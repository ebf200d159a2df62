"""A loopback Anthropic Messages API (``/v1/messages`` as JSON and SSE, ``/v1/models``).

It validates requests the way the real API does where adapters tend to go wrong (alternating
roles, a ``system`` parameter instead of system messages, tool results answering the previous
turn's tool uses) and answers deterministically: the text is ``echo: <last user text>`` unless a
:class:`~pacore.testing.loopback.Reply` scripts otherwise, and tokens are counted as words.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pacore.testing.loopback import (
    Answer,
    FrameKind,
    LoopbackServer,
    RecordedRequest,
    Reply,
    ScriptedToolCall,
    play,
    split_words,
)

__all__ = ["ERROR_TYPES", "AnthropicServer"]

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

DEFAULT_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")

# An event whose JSON breaks off, as a proxy that cut a frame would leave it.
_MALFORMED = b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {\n\n'


class InvalidRequest(Exception):
    """A request the real API would reject with 400 invalid_request_error."""


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    kind = error_type or ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _error(status: int, message: str, error_type: str | None = None, **kw: Any) -> Answer:
    return Answer.json(error_body(status, message, error_type), status=status, **kw)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class AnthropicServer(LoopbackServer):
    """``api_key`` None accepts any caller; ``models`` None makes ``/v1/models`` answer 404."""

    def __init__(
        self, *, api_key: str | None = "test-key", models: Sequence[str] | None = DEFAULT_MODELS
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.models = list(models) if models is not None else None
        self._ids = 0

    async def handle(self, request: RecordedRequest) -> Answer:
        if not self._authorized(request):
            return _error(401, "invalid x-api-key")
        route = (request.method, request.path)
        if route == ("GET", "/v1/models"):
            return self._list_models()
        if route == ("POST", "/v1/messages"):
            return self._messages(request)
        return _error(404, f"Not found: {request.method} {request.path}")

    def _authorized(self, request: RecordedRequest) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "")
        return given in (self.api_key, f"Bearer {self.api_key}")

    def _list_models(self) -> Answer:
        if self.models is None:
            return _error(404, "Not found")
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in self.models
        ]
        return Answer.json(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def _messages(self, request: RecordedRequest) -> Answer:
        body = request.body
        try:
            _validate(body)
        except InvalidRequest as exc:
            return _error(400, str(exc))
        if self.models is not None and body["model"] not in self.models:
            return _error(404, f"model: {body['model']}")
        reply = self.next_reply()
        if reply.is_error:
            message = reply.message or ERROR_TYPES.get(reply.status, "error")
            return _error(
                reply.status,
                message,
                reply.error_type,
                headers=reply.headers,
                delay_s=reply.delay_s,
            )
        turn = _Turn.of(body, reply, self._next_id())
        if body.get("stream"):
            return Answer(
                stream=play(
                    turn.frames(),
                    reply,
                    malformed=_MALFORMED,
                    error=_sse(
                        "error", error_body(529, reply.message or "Overloaded", reply.error_type)
                    ),
                ),
                content_type="text/event-stream",
                headers=reply.headers,
                delay_s=reply.delay_s,
            )
        return Answer.json(turn.message(), headers=reply.headers, delay_s=reply.delay_s)

    def _next_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"msg_{self._ids:024d}"


class _Turn:
    """One assistant answer, rendered as a whole message or as the SSE event sequence."""

    def __init__(
        self,
        *,
        id: str,
        model: str,
        pieces: list[str],
        tool_calls: Sequence[ScriptedToolCall],
        stop_reason: str,
        stop_sequence: str | None,
        input_tokens: int,
    ) -> None:
        self.id, self.model, self.pieces, self.tool_calls = id, model, pieces, tool_calls
        self.stop_reason, self.stop_sequence = stop_reason, stop_sequence
        self.input_tokens = input_tokens
        self.output_tokens = max(
            1, len(pieces) + sum(len(json.dumps(c.arguments).split()) for c in tool_calls)
        )

    @classmethod
    def of(cls, body: dict[str, Any], reply: Reply, id: str) -> _Turn:
        text = (
            reply.text if reply.text is not None else "echo: " + _last_user_text(body["messages"])
        )
        pieces = split_words(text)
        stop_reason = "tool_use" if reply.tool_calls else "end_turn"
        stop_sequence = None
        for stop in body.get("stop_sequences") or []:
            if stop in text:
                pieces, stop_reason, stop_sequence = (
                    split_words(text[: text.index(stop)]),
                    "stop_sequence",
                    stop,
                )
                break
        if len(pieces) > body["max_tokens"]:
            pieces, stop_reason = pieces[: body["max_tokens"]], "max_tokens"
        tool_calls = reply.tool_calls if stop_reason == "tool_use" else ()
        return cls(
            id=id,
            model=body["model"],
            pieces=pieces,
            tool_calls=tool_calls,
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            input_tokens=_count_input_tokens(body),
        )

    def content(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if self.pieces:
            blocks.append({"type": "text", "text": "".join(self.pieces)})
        for call in self.tool_calls:
            blocks.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
            )
        return blocks

    def message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.content(),
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }

    def frames(self) -> list[tuple[FrameKind, bytes]]:
        start = {**self.message(), "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {"input_tokens": self.input_tokens, "output_tokens": 1}
        frames: list[tuple[FrameKind, bytes]] = [
            ("head", _sse("message_start", {"type": "message_start", "message": start})),
            ("head", _sse("ping", {"type": "ping"})),
        ]
        index = 0
        if self.pieces:
            frames += self._block(
                index,
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": p} for p in self.pieces],
            )
            index += 1
        for call in self.tool_calls:
            args = json.dumps(call.arguments)
            cut = len(args) // 2
            frames += self._block(
                index,
                {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
                [
                    {"type": "input_json_delta", "partial_json": part}
                    for part in (args[:cut], args[cut:])
                ],
            )
            index += 1
        frames.append(
            (
                "tail",
                _sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": self.stop_reason,
                            "stop_sequence": self.stop_sequence,
                        },
                        "usage": {"output_tokens": self.output_tokens},
                    },
                ),
            )
        )
        frames.append(("tail", _sse("message_stop", {"type": "message_stop"})))
        return frames

    @staticmethod
    def _block(
        index: int, block: dict[str, Any], deltas: list[dict[str, Any]]
    ) -> list[tuple[FrameKind, bytes]]:
        frames: list[tuple[FrameKind, bytes]] = [
            (
                "head",
                _sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": block,
                    },
                ),
            )
        ]
        for delta in deltas:
            frames.append(
                (
                    "content",
                    _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": delta,
                        },
                    ),
                )
            )
        frames.append(
            ("head", _sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        )
        return frames


def _block_text(block: dict[str, Any]) -> str:
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return " ".join(_block_text(b) for b in content)
        return str(content)
    return ""


def _message_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return " ".join(t for t in (_block_text(b) for b in content) if t)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return _message_text(message["content"])
    return ""


def _count_input_tokens(body: dict[str, Any]) -> int:
    system = body.get("system") or ""
    words = len(_message_text(system).split())
    return words + sum(len(_message_text(m["content"]).split()) for m in body["messages"])


def _validate(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise InvalidRequest(f"{name}: Field required")
    if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
        raise InvalidRequest("max_tokens: must be a positive integer")
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        raise InvalidRequest("temperature: range: 0 <= temperature <= 1")
    _validate_system(body.get("system"))
    _validate_messages(body["messages"])
    _validate_tools(body.get("tools"), body.get("tool_choice"))


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list) or any(b.get("type") != "text" for b in system):
        raise InvalidRequest("system: Input should be a string or a list of text blocks")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required")
    previous: dict[str, Any] | None = None
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequest(
                f"messages.{i}.role: Input should be 'user' or 'assistant'"
                + (
                    "; use the top-level `system` parameter for system prompts"
                    if role == "system"
                    else ""
                )
            )
        if previous is not None and previous["role"] == role:
            raise InvalidRequest(
                f'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        _validate_content(i, message, previous)
        previous = message


def _validate_content(i: int, message: dict[str, Any], previous: dict[str, Any] | None) -> None:
    content = message.get("content")
    if isinstance(content, str):
        if not content:
            raise InvalidRequest(f"messages.{i}: all messages must have non-empty content")
        return
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"messages.{i}: all messages must have non-empty content")
    tool_use_ids = {
        b["id"]
        for b in (previous or {}).get("content", [])
        if isinstance(b, dict) and b.get("type") == "tool_use"
    }
    for j, block in enumerate(content):
        _validate_block(f"messages.{i}.content.{j}", message["role"], block, tool_use_ids)


def _validate_block(where: str, role: str, block: Any, tool_use_ids: set[str]) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        if not block.get("text"):
            raise InvalidRequest(f"{where}: text content blocks must be non-empty")
    elif kind == "image" and role == "user":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            if not source.get("media_type") or not source.get("data"):
                raise InvalidRequest(f"{where}.source: media_type and data are required")
        elif source.get("type") != "url" or not source.get("url"):
            raise InvalidRequest(f"{where}.source: expected a base64 or url source")
    elif kind == "tool_use" and role == "assistant":
        if not block.get("id") or not block.get("name") or not isinstance(block.get("input"), dict):
            raise InvalidRequest(f"{where}: tool_use needs id, name and an input object")
    elif kind == "tool_result" and role == "user":
        if block.get("tool_use_id") not in tool_use_ids:
            raise InvalidRequest(
                f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message."
            )
    else:
        raise InvalidRequest(f"{where}: unexpected content block {kind!r} in a {role} message")


def _validate_tools(tools: Any, tool_choice: Any) -> None:
    names: set[str] = set()
    for i, tool in enumerate(tools or []):
        if not tool.get("name") or not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequest(f"tools.{i}: name and input_schema are required")
        names.add(tool["name"])
    if tool_choice is None:
        return
    kind = tool_choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest(f"tool_choice.type: unexpected value {kind!r}")
    if kind == "tool" and tool_choice.get("name") not in names:
        raise InvalidRequest(f"tool_choice: tool {tool_choice.get('name')!r} not found in tools")
