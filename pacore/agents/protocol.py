"""The agent wire protocol: typed, versioned frames exchanged over the agent's WebSocket.

Every frame is one JSON text message with ``v`` (protocol version), ``type`` (the frame kind)
and ``id`` (the request it belongs to; heartbeats and announcements carry their own id)::

    agent → cloud   hello, capabilities, llm_response, llm_stream, llm_stream_end,
                    tool_response, health_response, error, pong (ping too)
    cloud → agent   llm_request, tool_request, health_check, cancel, ping, error (pong too)

A streamed answer is ``llm_stream`` frames (each a few chunks that were ready together, carrying
content and tool-call pieces only) ended by one ``llm_stream_end`` that carries the finish
reason and usage, or by an ``error``. This module is imported by the agent, so it depends on
nothing beyond :mod:`pacore.types` and :mod:`pacore.errors`.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from pacore import errors
from pacore.errors import BadRequestError, PACoreError
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    FinishReason,
    ProviderHealth,
    ToolDefinition,
    Usage,
)

__all__ = [
    "CLOSE_HEARTBEAT_TIMEOUT",
    "CLOSE_REPLACED",
    "CLOSE_REVOKED",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_UNAVAILABLE",
    "CLOSE_UNSUPPORTED_PROTOCOL",
    "FATAL_CLOSE_CODES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Cancel",
    "Capabilities",
    "ErrorFrame",
    "ErrorInfo",
    "Frame",
    "FrameError",
    "Hardware",
    "HealthCheck",
    "HealthResponse",
    "Hello",
    "LlmRequest",
    "LlmResponse",
    "LlmStream",
    "LlmStreamEnd",
    "ModelCapability",
    "Ping",
    "Pong",
    "ToolRequest",
    "ToolResponse",
    "encode",
    "new_id",
    "parse_message",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
MAX_FRAME_BYTES = 16 * 1024 * 1024

# WebSocket close codes the cloud uses when it ends an agent's connection. The agent gives up on
# the fatal ones (retrying cannot help) and reconnects with backoff after any other.
CLOSE_UNAUTHORIZED = 4401  # missing, invalid or expired agent token
CLOSE_REVOKED = 4403  # the agent was revoked (or the token does not match its owner)
CLOSE_HEARTBEAT_TIMEOUT = 4408  # the agent stopped answering pings
CLOSE_REPLACED = 4409  # another connection with the same agent token took over
CLOSE_UNSUPPORTED_PROTOCOL = 4426  # no protocol version in common
CLOSE_UNAVAILABLE = 1013  # the cloud cannot serve the link right now ("try again later")
FATAL_CLOSE_CODES = frozenset(
    {CLOSE_UNAUTHORIZED, CLOSE_REVOKED, CLOSE_REPLACED, CLOSE_UNSUPPORTED_PROTOCOL}
)

UNKNOWN_ID = "-"


def new_id() -> str:
    return uuid.uuid4().hex


class FrameError(BadRequestError):
    """A frame that cannot be accepted; ``frame_id`` is its id when it could be read."""

    def __init__(self, message: str, *, frame_id: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.frame_id = frame_id

    def _fields(self) -> dict[str, Any]:
        return {**super()._fields(), "frame_id": self.frame_id}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Wire):
    """A :class:`PACoreError` as it crosses the link."""

    status: int = Field(ge=400, le=599)
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    retryable: bool = False
    retry_after: float | None = None

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        """The wire form of ``exc``; anything but a PACoreError is reported without detail."""
        if not isinstance(exc, PACoreError):
            exc = errors.UpstreamError("the agent failed to serve the request")
        return cls(
            status=exc.status,
            type=exc.type,
            message=exc.message,
            code=exc.code,
            param=exc.param,
            retryable=exc.retryable,
            retry_after=exc.retry_after,
        )

    def to_exception(self, provider: str | None = None) -> PACoreError:
        if self.status == 400 and self.code == "context_length_exceeded":
            cls: type[PACoreError] = errors.ContextLengthError
        else:
            cls = _ERRORS_BY_STATUS.get(self.status) or type(
                errors.error_for_status(self.status, self.message)
            )
        return cls(
            self.message,
            provider=provider,
            code=self.code,
            param=self.param,
            retryable=self.retryable,
            retry_after=self.retry_after,
        )


_ERRORS_BY_STATUS: dict[int, type[PACoreError]] = {
    cls.status: cls
    for cls in (
        errors.PACoreError,
        errors.BadRequestError,
        errors.AuthenticationError,
        errors.PermissionDeniedError,
        errors.NotFoundError,
        errors.ConflictError,
        errors.PayloadTooLargeError,
        errors.ValidationError,
        errors.RateLimitError,
        errors.UpstreamError,
        errors.UpstreamUnavailableError,
        errors.TimeoutError,
    )
}


class _Frame(_Wire):
    v: int = Field(default=PROTOCOL_VERSION, description="protocol version of this frame")
    id: str = Field(default_factory=new_id, min_length=1, max_length=128)


# --------------------------------------------------------------------------- announcements


class Hello(_Frame):
    """First frame after connecting: who is speaking and which protocol versions it speaks."""

    type: Literal["hello"] = "hello"
    agent_version: str = Field(max_length=64)
    protocol_versions: list[int] = Field(min_length=1, max_length=32)
    name: str | None = Field(default=None, max_length=100)


class ModelCapability(_Wire):
    id: str = Field(min_length=1, max_length=256, description="the name requests use")
    kind: str = Field(max_length=64, description="openai-compatible, ollama, cpu, vllm, …")
    context_length: int | None = Field(default=None, ge=1)


class Hardware(_Wire):
    cpus: int = Field(ge=0)
    memory_bytes: int = Field(ge=0)
    gpus: int = Field(default=0, ge=0)


class Capabilities(_Frame):
    """What the agent can serve; sent after ``hello`` and whenever it changes."""

    type: Literal["capabilities"] = "capabilities"
    models: list[ModelCapability] = Field(default_factory=list, max_length=256)
    tools: list[ToolDefinition] = Field(default_factory=list, max_length=256)
    hardware: Hardware | None = None


# --------------------------------------------------------------------------- completions


class LlmRequest(_Frame):
    type: Literal["llm_request"] = "llm_request"
    model: str | None = Field(default=None, description="the agent's model; None: its default")
    request: CompletionRequest
    stream: bool = False


class LlmResponse(_Frame):
    type: Literal["llm_response"] = "llm_response"
    result: CompletionResult


class LlmStream(_Frame):
    type: Literal["llm_stream"] = "llm_stream"
    chunks: list[CompletionChunk] = Field(min_length=1)


class LlmStreamEnd(_Frame):
    type: Literal["llm_stream_end"] = "llm_stream_end"
    finish_reason: FinishReason = "stop"
    usage: Usage | None = None
    model: str | None = None


# --------------------------------------------------------------------------- tools, health


class ToolRequest(_Frame):
    type: Literal["tool_request"] = "tool_request"
    name: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolResponse(_Frame):
    type: Literal["tool_response"] = "tool_response"
    result: Any = None
    error: ErrorInfo | None = None


class HealthCheck(_Frame):
    type: Literal["health_check"] = "health_check"


class HealthResponse(_Frame):
    type: Literal["health_response"] = "health_response"
    healthy: bool
    models: dict[str, ProviderHealth] = Field(default_factory=dict)


# --------------------------------------------------------------------------- control


class ErrorFrame(_Frame):
    """A request failed, or a frame could not be accepted (``id`` names it when known)."""

    type: Literal["error"] = "error"
    error: ErrorInfo


class Cancel(_Frame):
    """Cloud → agent: stop working on request ``id``; nothing more is expected for it."""

    type: Literal["cancel"] = "cancel"


class Ping(_Frame):
    type: Literal["ping"] = "ping"


class Pong(_Frame):
    type: Literal["pong"] = "pong"


Frame = Annotated[
    Hello
    | Capabilities
    | LlmRequest
    | LlmResponse
    | LlmStream
    | LlmStreamEnd
    | ToolRequest
    | ToolResponse
    | HealthCheck
    | HealthResponse
    | ErrorFrame
    | Cancel
    | Ping
    | Pong,
    Field(discriminator="type"),
]

_FRAME: pydantic.TypeAdapter[Frame] = pydantic.TypeAdapter(Frame)
_TYPES = frozenset(
    {
        "hello", "capabilities", "llm_request", "llm_response", "llm_stream", "llm_stream_end",
        "tool_request", "tool_response", "health_check", "health_response", "error", "cancel",
        "ping", "pong",
    }
)


def encode(frame: _Frame) -> str:
    return frame.model_dump_json()


def parse_message(data: str | bytes) -> Frame:
    """One frame from its JSON text; anything unacceptable raises :class:`FrameError`."""
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(f"frame larger than {MAX_FRAME_BYTES} bytes", code="frame_too_large")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FrameError("frame is not valid JSON", code="invalid_frame") from None
    if not isinstance(raw, dict):
        raise FrameError("frame is not a JSON object", code="invalid_frame")
    frame_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    version, kind = raw.get("v"), raw.get("type")
    if version not in SUPPORTED_VERSIONS:
        raise FrameError(
            f"unsupported protocol version {version!r}; supported: {list(SUPPORTED_VERSIONS)}",
            code="unsupported_version",
            frame_id=frame_id,
        )
    if kind not in _TYPES:
        raise FrameError(f"unknown frame type {kind!r}", code="unknown_type", frame_id=frame_id)
    try:
        return _FRAME.validate_python(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "frame"
        raise FrameError(
            f"invalid {kind} frame: {where}: {first['msg']}", code="invalid_frame", frame_id=frame_id
        ) from None
