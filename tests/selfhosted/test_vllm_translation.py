"""VLLMProvider's translation to and from Ray Serve LLM's chat method, without vLLM installed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from pacore.errors import BadRequestError, UpstreamError, UpstreamUnavailableError
from pacore.providers.registry import provider_class
from pacore.providers.vllm import (
    ChunkAssembler,
    VLLMProvider,
    _events,
    chat_body,
    result_from_response,
)
from pacore.types import (
    CompletionRequest,
    ImagePart,
    Message,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
    Usage,
)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _delta(content: str | None = None, finish: str | None = None, **delta: Any) -> str:
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _sse(
        {"id": "c1", "object": "chat.completion.chunk", "model": "llama3", "choices": [choice]}
    )


class _ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class _ErrorResponse(BaseModel):
    """The shape of Ray Serve LLM's ErrorResponse (vLLM's error model)."""

    error: _ErrorInfo


def test_registered_as_vllm() -> None:
    assert provider_class("vllm") is VLLMProvider
    assert VLLMProvider.capabilities.on_prem and VLLMProvider.capabilities.tools


def test_chat_body_minimal() -> None:
    request = CompletionRequest(messages=[Message(role="user", content="hi")])
    assert chat_body(request, "llama3", stream=False) == {
        "model": "llama3",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }


def test_chat_body_full() -> None:
    request = CompletionRequest(
        messages=[
            Message(role="system", content="be brief"),
            Message(
                role="user",
                content=[
                    TextPart(text="what is this?"),
                    ImagePart(data="AAAA", media_type="image/jpeg"),
                ],
            ),
            Message(
                role="assistant", tool_calls=[ToolCall(id="t1", name="look", arguments='{"x": 1}')]
            ),
            Message(role="tool", content="a cat", tool_call_id="t1"),
        ],
        temperature=0.2,
        top_p=0.9,
        max_tokens=64,
        stop=["\n\n"],
        tools=[ToolDefinition(name="look", description="look closer")],
        tool_choice="look",
        extra={"top_k": 40, "seed": 7},
    )
    body = chat_body(request, "llama3:sql", stream=True)
    assert body["model"] == "llama3:sql"
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 64
    assert (body["temperature"], body["top_p"], body["stop"]) == (0.2, 0.9, ["\n\n"])
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
    ]
    assert body["messages"][2]["tool_calls"] == [
        {"id": "t1", "type": "function", "function": {"name": "look", "arguments": '{"x": 1}'}}
    ]
    assert body["messages"][3] == {"role": "tool", "content": "a cat", "tool_call_id": "t1"}
    assert body["tools"][0]["function"]["name"] == "look"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "look"}}
    assert (body["top_k"], body["seed"]) == (40, 7)


def test_stream_batches_become_one_chunk_each() -> None:
    assembler = ChunkAssembler("llama3", "gpu")
    first = assembler.feed(_events([_delta("", role="assistant"), _delta("Hel"), _delta("lo")]))
    assert first is not None
    assert (first.content, first.finish_reason, first.model) == ("Hello", None, "llama3")
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    last_batch = [
        _delta("!", finish="length"),
        _sse({"id": "c1", "model": "llama3", "choices": [], "usage": usage}),
        "data: [DONE]\n\n",
    ]
    second = assembler.feed(_events(last_batch))
    assert second is not None and second.content == "!"
    final = assembler.final()
    assert final.finish_reason == "length"
    assert final.usage == Usage.of(7, 3)
    assert final.content == ""


def test_empty_batches_yield_nothing() -> None:
    assembler = ChunkAssembler("llama3", "gpu")
    assert assembler.feed(_events([_delta("", role="assistant")])) is None
    assert assembler.final().finish_reason == "stop"


def test_streamed_tool_calls() -> None:
    assembler = ChunkAssembler("llama3", "gpu")
    call = {
        "index": 0,
        "id": "t1",
        "type": "function",
        "function": {"name": "look", "arguments": '{"x"'},
    }
    more = {"index": 0, "function": {"arguments": ": 1}"}}
    chunk = assembler.feed(
        _events([_delta(tool_calls=[call]), _delta(tool_calls=[more], finish="tool_calls")])
    )
    assert chunk is not None
    assert chunk.tool_calls == [
        ToolCallDelta(index=0, id="t1", name="look", arguments='{"x"'),
        ToolCallDelta(index=0, arguments=": 1}"),
    ]
    assert assembler.final().finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("code", "error"),
    [(400, BadRequestError), (503, UpstreamUnavailableError), (500, UpstreamError)],
)
def test_error_responses_map_to_platform_errors(code: int, error: type[Exception]) -> None:
    response = _ErrorResponse(
        error=_ErrorInfo(message="bad things", type="BadRequestError", code=code)
    )
    with pytest.raises(error) as info:
        ChunkAssembler("llama3", "gpu").feed(_events([response]))
    assert getattr(info.value, "provider", None) == "gpu"
    with pytest.raises(error):
        for event in _events(response):
            result_from_response(event, "gpu")


def test_error_event_inside_a_stream() -> None:
    payload = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    with pytest.raises(UpstreamError):
        ChunkAssembler("llama3", "gpu").feed(_events([_delta("a"), _sse(payload)]))


def test_context_length_error_keeps_its_meaning() -> None:
    response = _ErrorResponse(
        error=_ErrorInfo(
            message="This model's maximum context length is 4096 tokens",
            type="BadRequestError",
            code=400,
        )
    )
    with pytest.raises(BadRequestError) as info:
        ChunkAssembler("llama3", "gpu").feed(_events(response))
    assert info.value.code == "context_length_exceeded"


def test_whole_response() -> None:
    response = {
        "id": "c2",
        "object": "chat.completion",
        "model": "llama3",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "t9",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
    }
    result = result_from_response(response, "gpu")
    assert result.content == ""
    assert result.tool_calls == [ToolCall(id="t9", name="f", arguments="{}")]
    assert (result.finish_reason, result.usage, result.model, result.provider) == (
        "tool_calls",
        Usage.of(11, 5),
        "llama3",
        "gpu",
    )
    with pytest.raises(UpstreamError):
        result_from_response({"choices": []}, "gpu")
