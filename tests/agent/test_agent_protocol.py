"""The agent wire protocol: every frame round-trips; unknown, invalid or foreign frames are refused
with a clear error that names the frame when it can."""

from __future__ import annotations

import json
import pickle

import pytest

from pacore.agents.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Capabilities,
    ErrorFrame,
    ErrorInfo,
    FrameError,
    Hardware,
    HealthCheck,
    HealthResponse,
    Hello,
    LlmRequest,
    LlmResponse,
    LlmStream,
    LlmStreamEnd,
    ModelCapability,
    Ping,
    Pong,
    ToolRequest,
    ToolResponse,
    encode,
    parse_message,
)
from pacore.errors import (
    ContextLengthError,
    NotFoundError,
    PACoreError,
    RateLimitError,
    UpstreamError,
    UpstreamUnavailableError,
)
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    Message,
    ProviderHealth,
    ToolCallDelta,
    ToolDefinition,
    Usage,
)

REQUEST = CompletionRequest(messages=[Message(role="user", content="hello")], max_tokens=5)

FRAMES = [
    Hello(agent_version="1.2.3", protocol_versions=[1], name="office"),
    Capabilities(
        models=[ModelCapability(id="llama3", kind="ollama", context_length=8192)],
        tools=[ToolDefinition(name="file_read", description="read", parameters={"type": "object"})],
        hardware=Hardware(cpus=8, memory_bytes=2**34, gpus=1),
    ),
    LlmRequest(model="llama3", request=REQUEST, stream=True),
    LlmResponse(result=CompletionResult(content="hi", usage=Usage.of(3, 1), model="llama3")),
    LlmStream(chunks=[
        CompletionChunk(content="a"),
        CompletionChunk(tool_calls=[ToolCallDelta(index=0, id="c1", name="f", arguments="{")]),
    ]),
    LlmStreamEnd(finish_reason="length", usage=Usage.of(3, 5), model="llama3"),
    ToolRequest(name="file_read", arguments={"path": "a.txt"}),
    ToolResponse(result={"content": "x", "nested": [1, None, {"k": True}]}),
    ToolResponse(error=ErrorInfo.of(NotFoundError("no file"))),
    HealthCheck(),
    HealthResponse(healthy=True, models={"llama3": ProviderHealth(healthy=True, latency_ms=3.0)}),
    ErrorFrame(error=ErrorInfo.of(RateLimitError("busy", retry_after=2.0))),
    Cancel(),
    Ping(),
    Pong(),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.type)
def test_every_frame_round_trips(frame: object) -> None:
    text = encode(frame)  # type: ignore[arg-type]
    raw = json.loads(text)
    assert raw["v"] == PROTOCOL_VERSION
    assert raw["id"]
    assert parse_message(text) == frame
    assert parse_message(text.encode()) == frame


def _error(data: str | bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_message(data)
    assert info.value.status == 400
    return info.value


def test_garbage_is_refused_without_an_id() -> None:
    for data in ("{", "[]", '"ping"', b"\xff\xfe"):
        err = _error(data)
        assert err.code == "invalid_frame"
        assert err.frame_id is None


def test_unknown_type_is_named() -> None:
    err = _error(json.dumps({"v": 1, "type": "teleport", "id": "r1"}))
    assert err.code == "unknown_type"
    assert err.frame_id == "r1"
    assert "teleport" in err.message


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unsupported_version_is_refused(version: object) -> None:
    err = _error(json.dumps({"v": version, "type": "ping", "id": "r2"}))
    assert err.code == "unsupported_version"
    assert err.frame_id == "r2"
    assert "supported: [1]" in err.message


def test_invalid_fields_are_named() -> None:
    bad_request = {"v": 1, "type": "llm_request", "id": "r3", "request": {"messages": []}}
    err = _error(json.dumps(bad_request))
    assert err.code == "invalid_frame"
    assert err.frame_id == "r3"
    assert "request.messages" in err.message
    extra = {"v": 1, "type": "ping", "id": "r4", "surprise": 1}
    assert "surprise" in _error(json.dumps(extra)).message
    empty_stream = {"v": 1, "type": "llm_stream", "id": "r5", "chunks": []}
    assert _error(json.dumps(empty_stream)).frame_id == "r5"


def test_frame_error_pickles_with_its_id() -> None:
    err = FrameError("bad", frame_id="r9", code="invalid_frame")
    back = pickle.loads(pickle.dumps(err))
    assert (back.frame_id, back.code, back.message) == ("r9", "invalid_frame", "bad")


@pytest.mark.parametrize(
    "error",
    [
        NotFoundError("no model", param="model"),
        RateLimitError("slow down", retry_after=3.0),
        UpstreamUnavailableError("ollama down"),
        ContextLengthError(),
        UpstreamError("broke", retryable=False),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_cross_the_link_as_themselves(error: PACoreError) -> None:
    info = parse_message(encode(ErrorFrame(error=ErrorInfo.of(error)))).error  # type: ignore[union-attr]
    back = info.to_exception(provider="agent:a1")
    assert type(back) is type(error)
    assert (back.status, back.message, back.code, back.param) == (
        error.status, error.message, error.code, error.param
    )
    assert back.retryable == error.retryable
    assert back.retry_after == error.retry_after
    assert back.provider == "agent:a1"


def test_foreign_exceptions_cross_without_detail() -> None:
    info = ErrorInfo.of(RuntimeError("/etc/secret path leaked"))
    assert info.status == 502
    assert "secret" not in info.message
