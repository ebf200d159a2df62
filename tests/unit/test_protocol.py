"""Wire models: the strict native API, the permissive OpenAI-compatible API, the error shape."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from pacore.errors import RateLimitError
from pacore.protocol import (
    ChatCompletionRequest,
    CompleteBody,
    ErrorResponse,
    MemorySearchBody,
    ProviderPut,
    RegisterBody,
    content_parts_from_openai,
)
from pacore.types import ImagePart, Message, TextPart, ToolCall

USER = {"role": "user", "content": "hello"}


def test_complete_body_with_messages() -> None:
    body = CompleteBody.model_validate({"messages": [USER], "stream": True, "tags": ["a"]})
    assert body.to_messages() == [Message(role="user", content="hello")]
    assert (body.use_memory, body.stream) == (True, True)


def test_complete_body_with_a_prompt() -> None:
    body = CompleteBody(prompt="what is 2+2")
    assert body.to_messages() == [Message(role="user", content="what is 2+2")]


@pytest.mark.parametrize("data", [
    {},
    {"messages": [USER], "prompt": "both"},
    {"messages": []},
    {"prompt": ""},
    {"messages": [{"role": "user", "content": "   "}]},
    {"messages": [USER], "temprature": 0.5},
    {"messages": [USER], "temperature": 3},
    {"messages": [USER], "max_tokens": 0},
    {"messages": [USER], "data_residency": "mars"},
])
def test_complete_body_rejects(data: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        CompleteBody.model_validate(data)


def test_complete_body_accepts_a_tool_call_without_text() -> None:
    call = ToolCall(id="c1", name="f")
    body = CompleteBody(messages=[
        Message(role="user", content="go"), Message(role="assistant", tool_calls=[call]),
        Message(role="tool", tool_call_id="c1", content="done"),
    ])
    assert len(body.to_messages()) == 3


def test_complete_body_residency_forms() -> None:
    assert CompleteBody(prompt="x", data_residency="on_prem").data_residency == "on_prem"
    assert CompleteBody(prompt="x", data_residency=["eu"]).data_residency == ["eu"]


def test_chat_completion_request_accepts_unknown_fields() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "openai/gpt-4o",
        "messages": [{"role": "developer", "content": "be terse"}, USER],
        "logprobs": True,
        "parallel_tool_calls": False,
        "stream_options": {"include_usage": True, "some_future_flag": 1},
        "conversation_id": "conv-1",
        "use_memory": False,
    })
    assert request.model_extra == {"logprobs": True, "parallel_tool_calls": False}
    assert request.stream_options is not None and request.stream_options.include_usage
    assert (request.conversation_id, request.use_memory) == ("conv-1", False)


@pytest.mark.parametrize("data", [
    {"model": "m", "messages": []},
    {"model": "", "messages": [USER]},
    {"messages": [USER]},
    {"model": "m", "messages": [USER], "n": 2},
    {"model": "m", "messages": [{"role": "narrator", "content": "x"}]},
])
def test_chat_completion_request_rejects(data: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate(data)


def test_chat_completion_tool_definitions() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [USER],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": {"type": "object"}}}],
    })
    [tool] = request.tool_definitions() or []
    assert (tool.name, tool.description, tool.parameters) == ("get_weather", "", {"type": "object"})
    bare = ChatCompletionRequest.model_validate({"model": "m", "messages": [USER]})
    assert bare.tool_definitions() is None


def test_openai_content_parts() -> None:
    assert content_parts_from_openai(None) == ""
    assert content_parts_from_openai("plain") == "plain"
    parts = content_parts_from_openai([
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "input_audio", "input_audio": {}},
    ])
    assert parts == [TextPart(text="look"), ImagePart(url="https://x/y.png")]


def test_error_response_matches_platform_errors() -> None:
    wire = RateLimitError("slow down", code="rate_limited").to_wire()
    parsed = ErrorResponse.model_validate(wire)
    assert parsed.error.type == "rate_limit_error"
    assert parsed.model_dump() == wire


@pytest.mark.parametrize(("model", "data"), [
    (RegisterBody, {"email": "not-an-email", "password": "long enough"}),
    (RegisterBody, {"email": "a@b.co", "password": "short"}),
    (ProviderPut, {"kind": "openai", "base_url": "ftp://x"}),
    (ProviderPut, {"kind": "telepathy"}),
    (MemorySearchBody, {"query": "x", "limit": 0}),
    (MemorySearchBody, {"query": "x", "filters": {"colour": "red"}}),
])
def test_native_bodies_are_strict(model: type[pydantic.BaseModel], data: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        model.model_validate(data)
