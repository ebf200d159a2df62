"""Domain types shared by every layer: messages, completion requests, chunks, results, usage.

These are what providers consume and yield and what crosses Ray Serve handles; the wire formats
of the public APIs live in :mod:`pacore.protocol` and are translated to and from these.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResult",
    "ContentPart",
    "FinishReason",
    "ImagePart",
    "Message",
    "ModelInfo",
    "ProviderHealth",
    "Role",
    "TextPart",
    "ToolCall",
    "ToolCallDelta",
    "ToolDefinition",
    "Usage",
]

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TextPart(_Model):
    type: Literal["text"] = "text"
    text: str


class ImagePart(_Model):
    """An image given by URL (``http(s)://`` or ``data:``) or by base64 data and media type."""

    type: Literal["image"] = "image"
    url: str | None = None
    data: str | None = None
    media_type: str | None = None


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ToolCall(_Model):
    """A finished tool call: ``arguments`` is the JSON text the model produced."""

    id: str
    name: str
    arguments: str = "{}"


class ToolCallDelta(_Model):
    """A piece of a streamed tool call; pieces with the same ``index`` belong together."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ToolDefinition(_Model):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Message(_Model):
    role: Role
    content: str | list[ContentPart] = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text, multi-part content joined with blank lines."""
        if isinstance(self.content, str):
            return self.content
        return "\n\n".join(p.text for p in self.content if isinstance(p, TextPart))


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int | None, completion: int | None) -> Usage:
        p, c = prompt or 0, completion or 0
        return cls(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def __add__(self, other: Usage) -> Usage:
        return Usage.of(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


class CompletionRequest(_Model):
    """What a provider is asked to do. ``model`` None means the provider's default model."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["auto", "none", "required"] | str | None = None
    extra: dict[str, Any] = Field(
        default_factory=dict, description="provider-specific options passed through as they are"
    )


class CompletionChunk(_Model):
    """One piece of a streamed answer. The last chunk of a stream carries ``finish_reason`` and,
    when the provider reports it, ``usage``."""

    content: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    model: str | None = None


class CompletionResult(_Model):
    content: str = ""
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason = "stop"
    usage: Usage = Field(default_factory=Usage)
    model: str = ""
    provider: str = ""


class ModelInfo(_Model):
    id: str
    provider: str = ""
    context_length: int | None = None
    owned_by: str | None = None


class ProviderHealth(_Model):
    healthy: bool
    latency_ms: float | None = None
    detail: str | None = None
