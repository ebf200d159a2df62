"""Domain types: message text, usage arithmetic, validation, and round trips across processes."""

from __future__ import annotations

import pickle
from typing import Any

import pydantic
import pytest

from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    ImagePart,
    Message,
    TextPart,
    ToolCall,
    ToolDefinition,
    Usage,
)


def test_text_of_plain_content() -> None:
    assert Message(role="user", content="hello").text() == "hello"
    assert Message(role="assistant").text() == ""


def test_text_of_multi_part_content_skips_images() -> None:
    message = Message(role="user", content=[
        TextPart(text="first"), ImagePart(url="https://example.com/a.png"), TextPart(text="second"),
    ])
    assert message.text() == "first\n\nsecond"
    assert Message(role="user", content=[ImagePart(url="data:image/png;base64,AA==")]).text() == ""


def test_content_parts_are_chosen_by_type() -> None:
    message = Message.model_validate({"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image", "data": "AA==", "media_type": "image/png"},
    ]})
    assert isinstance(message.content, list)
    text, image = message.content
    assert isinstance(text, TextPart) and isinstance(image, ImagePart)
    assert image.media_type == "image/png"
    with pytest.raises(pydantic.ValidationError):
        Message.model_validate({"role": "user", "content": [{"type": "video", "url": "x"}]})


def test_usage_of_and_add() -> None:
    assert Usage.of(None, None) == Usage()
    a = Usage.of(10, 5)
    assert (a.prompt_tokens, a.completion_tokens, a.total_tokens) == (10, 5, 15)
    total = a + Usage.of(1, 2)
    assert (total.prompt_tokens, total.completion_tokens, total.total_tokens) == (11, 7, 18)
    assert a + Usage() == a


def ask(**kw: Any) -> CompletionRequest:
    return CompletionRequest(messages=[Message(role="user", content="hi")], **kw)


@pytest.mark.parametrize("kw", [
    {"temperature": -0.1},
    {"temperature": 2.5},
    {"top_p": 0},
    {"top_p": 1.5},
    {"max_tokens": 0},
    {"unknown_option": True},
])
def test_request_validation(kw: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ask(**kw)


def test_request_needs_a_message_and_a_known_role() -> None:
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(messages=[])
    with pytest.raises(pydantic.ValidationError):
        Message.model_validate({"role": "wizard", "content": "hi"})


def test_request_bounds_are_inclusive_where_documented() -> None:
    request = ask(temperature=2, top_p=1, max_tokens=1, tool_choice="get_weather",
                  extra={"seed": 1})
    assert (request.temperature, request.top_p, request.extra) == (2, 1, {"seed": 1})


def test_tool_definition_defaults_and_name_bounds() -> None:
    tool = ToolDefinition(name="lookup")
    assert tool.parameters == {"type": "object", "properties": {}}
    assert tool.description == ""
    with pytest.raises(pydantic.ValidationError):
        ToolDefinition(name="")
    with pytest.raises(pydantic.ValidationError):
        ToolDefinition(name="x" * 65)


def test_chunk_and_result_defaults() -> None:
    chunk = CompletionChunk()
    assert (chunk.content, chunk.finish_reason, chunk.usage, chunk.tool_calls) == ("", None, None, None)
    result = CompletionResult()
    assert (result.finish_reason, result.usage) == ("stop", Usage())
    with pytest.raises(pydantic.ValidationError):
        CompletionChunk(finish_reason="exploded")  # type: ignore[arg-type]


def test_round_trips_keep_everything() -> None:
    request = CompletionRequest(
        messages=[
            Message(role="user", content=[TextPart(text="hi"), ImagePart(url="https://x/y.png")]),
            Message(role="assistant", tool_calls=[ToolCall(id="c", name="f", arguments="{}")]),
            Message(role="tool", tool_call_id="c", content="done"),
        ],
        tools=[ToolDefinition(name="f")],
        extra={"seed": 3},
    )
    assert pickle.loads(pickle.dumps(request)) == request
    assert CompletionRequest.model_validate_json(request.model_dump_json()) == request
