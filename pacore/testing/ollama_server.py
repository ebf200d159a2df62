"""A loopback Ollama server: ``/api/chat`` (NDJSON or one JSON), ``/api/tags``, ``/api/version``.

Answers are deterministic: ``echo: <last user text>`` unless a
:class:`~pacore.testing.loopback.Reply` scripts otherwise, streamed a word per line, with tokens
counted as words. ``options.num_predict`` and ``options.stop`` cut the answer as Ollama would.
"""

from __future__ import annotations

import base64
import binascii
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

__all__ = ["OllamaServer"]

DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5-coder:7b")
VERSION = "0.12.6"
_CREATED_AT = "2025-01-01T00:00:00.000000Z"


class InvalidRequest(Exception):
    """A request Ollama would answer with 400."""


def _error(status: int, message: str, **kw: Any) -> Answer:
    return Answer.json({"error": message}, status=status, **kw)


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


class OllamaServer(LoopbackServer):
    """With ``api_key`` set it demands ``Authorization: Bearer <key>``, as a proxy would."""

    def __init__(
        self, *, models: Sequence[str] = DEFAULT_MODELS, api_key: str | None = None
    ) -> None:
        super().__init__()
        self.models = list(models)
        self.api_key = api_key

    async def handle(self, request: RecordedRequest) -> Answer:
        if (
            self.api_key is not None
            and request.headers.get("authorization") != f"Bearer {self.api_key}"
        ):
            return _error(401, "unauthorized")
        route = (request.method, request.path)
        if route == ("GET", "/api/version"):
            return Answer.json({"version": VERSION})
        if route == ("GET", "/api/tags"):
            return Answer.json({"models": [_tag(m) for m in self.models]})
        if route == ("POST", "/api/chat"):
            return self._chat(request.body)
        return _error(404, "404 page not found")

    def resolve(self, model: str) -> str | None:
        for name in (model, f"{model}:latest"):
            if name in self.models:
                return name
        return None

    def _chat(self, body: Any) -> Answer:
        try:
            _validate(body)
        except InvalidRequest as exc:
            return _error(400, str(exc))
        if self.resolve(body["model"]) is None:
            return _error(404, f"model '{body['model']}' not found")
        reply = self.next_reply()
        if reply.is_error:
            return _error(
                reply.status,
                reply.message or f"upstream error {reply.status}",
                headers=reply.headers,
                delay_s=reply.delay_s,
            )
        turn = _Turn.of(body, reply)
        if body.get("stream", True):
            stream = play(
                turn.frames(),
                reply,
                malformed=b'{"model": "'
                + body["model"].encode()
                + b'", "message": {"role": "assist\n',
                error=_line({"error": reply.message or "model runner has unexpectedly stopped"}),
            )
            return Answer(
                stream=stream,
                content_type="application/x-ndjson",
                headers=reply.headers,
                delay_s=reply.delay_s,
            )
        return Answer.json(turn.whole(), headers=reply.headers, delay_s=reply.delay_s)


def _tag(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _CREATED_AT,
        "size": 2019393189,
        "digest": "a80c4f17acd5" + "0" * 52,
        "details": {
            "format": "gguf",
            "family": name.split(":")[0],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
    }


class _Turn:
    """One answer, rendered as the whole JSON object or as NDJSON lines."""

    def __init__(
        self,
        model: str,
        pieces: list[str],
        tool_calls: Sequence[ScriptedToolCall],
        done_reason: str,
        prompt_tokens: int,
    ) -> None:
        self.model, self.pieces, self.tool_calls = model, pieces, tool_calls
        self.done_reason, self.prompt_tokens = done_reason, prompt_tokens

    @classmethod
    def of(cls, body: dict[str, Any], reply: Reply) -> _Turn:
        text = (
            reply.text if reply.text is not None else "echo: " + _last_user_text(body["messages"])
        )
        pieces, done_reason = split_words(text), "stop"
        options = body.get("options") or {}
        for stop in options.get("stop") or []:
            if stop in text:
                pieces = split_words(text[: text.index(stop)])
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(pieces):
            pieces, done_reason = pieces[:limit], "length"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        return cls(body["model"], pieces, reply.tool_calls, done_reason, prompt_tokens)

    def _message(self, content: str, with_tools: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if with_tools and self.tool_calls:
            message["tool_calls"] = [_wire_call(i, c) for i, c in enumerate(self.tool_calls)]
        return message

    def _stats(self) -> dict[str, Any]:
        return {
            "done": True,
            "done_reason": self.done_reason,
            "total_duration": 1_000_000,
            "load_duration": 1000,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": 1000,
            "eval_count": len(self.pieces) + len(self.tool_calls),
            "eval_duration": 1000,
        }

    def whole(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": _CREATED_AT,
            "message": self._message("".join(self.pieces), with_tools=True),
            **self._stats(),
        }

    def frames(self) -> list[tuple[FrameKind, bytes]]:
        def line(message: dict[str, Any], **more: Any) -> bytes:
            return _line(
                {"model": self.model, "created_at": _CREATED_AT, "message": message, **more}
            )

        frames: list[tuple[FrameKind, bytes]] = [
            ("content", line(self._message(piece, with_tools=False), done=False))
            for piece in self.pieces
        ]
        if self.tool_calls:
            # Ollama sends all of an answer's tool calls together, in one line.
            frames.append(("content", line(self._message("", with_tools=True), done=False)))
        frames.append(("tail", line(self._message("", with_tools=False), **self._stats())))
        return frames


def _wire_call(index: int, call: ScriptedToolCall) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "function": {"index": index, "name": call.name, "arguments": call.arguments}
    }
    if call.id:
        wire["id"] = call.id
    return wire


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def _validate(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("invalid request body")
    if not body.get("model"):
        raise InvalidRequest("model is required")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list")
    for message in messages:
        _validate_message(message)
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            tool.get("type") != "function"
            or not isinstance(function, dict)
            or not function.get("name")
        ):
            raise InvalidRequest("tools must be {type: function, function: {name, parameters}}")
    if not isinstance(body.get("options", {}), dict):
        raise InvalidRequest("options must be an object")


def _validate_message(message: Any) -> None:
    if not isinstance(message, dict) or message.get("role") not in (
        "system",
        "user",
        "assistant",
        "tool",
    ):
        raise InvalidRequest("each message needs a role of system, user, assistant or tool")
    if not isinstance(message.get("content", ""), str):
        raise InvalidRequest("message content must be a string")
    for image in message.get("images") or []:
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidRequest("illegal base64 data in images") from None
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), dict):
            raise InvalidRequest("tool_calls need a function with object arguments")
