"""Wire framing of streamed answers: native SSE events, OpenAI SSE chunks, WebSocket messages.

Only the gateway writes frames; everything behind it yields typed events.
"""

from __future__ import annotations

import json
from typing import Any

from pacore.errors import PACoreError
from pacore.orchestrator import TurnDone, TurnStarted
from pacore.types import CompletionChunk, ToolCallDelta

__all__ = [
    "done_payload",
    "openai_chunk",
    "sse",
    "tool_call_dicts",
]

_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {_DUMPS(data)}\n\n".encode()


def done_payload(started: TurnStarted, done: TurnDone, content: str | None = None) -> dict[str, Any]:
    """The native completion object (``content`` None for the streamed ``done`` event)."""
    body: dict[str, Any] = {
        "id": done.id,
        "conversation_id": done.conversation_id,
        "provider": done.provider,
        "model": done.model,
        "usage": done.usage.model_dump(),
        "context": [{"message_id": m, "score": s} for m, s in started.context],
        "route": {"provider": started.provider, "reason": started.route_reason},
        "finish_reason": done.finish_reason,
    }
    if content is not None:
        body["content"] = content
    if done.tool_calls:
        body["tool_calls"] = tool_call_dicts(done.tool_calls)
    return body


def tool_call_dicts(calls: Any) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def _delta_dicts(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    out = []
    for d in deltas:
        fn: dict[str, Any] = {"arguments": d.arguments}
        if d.name:
            fn["name"] = d.name
        item: dict[str, Any] = {"index": d.index, "function": fn}
        if d.id:
            item["id"] = d.id
            item["type"] = "function"
        out.append(item)
    return out


def openai_chunk(
    completion_id: str, created: int, model: str, *, chunk: CompletionChunk | None = None,
    role: bool = False, finish_reason: str | None = None, usage: dict[str, int] | None = None,
    empty_choices: bool = False,
) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = ""
    if chunk is not None:
        if chunk.content:
            delta["content"] = chunk.content
        if chunk.tool_calls:
            delta["tool_calls"] = _delta_dicts(chunk.tool_calls)
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if empty_choices else [
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {_DUMPS(body)}\n\n".encode()


def error_event(exc: PACoreError) -> dict[str, Any]:
    return exc.to_wire()
