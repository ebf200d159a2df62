"""Wire models of the public APIs: the native API, the OpenAI-compatible API, and errors.

Request bodies reject unknown fields (a typo is a 422, not a silently ignored option), except the
OpenAI-compatible ones, which must accept whatever current OpenAI clients send. OpenAI models
follow the order OpenAI documents its fields in; PA Core's extensions come after.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pacore.types import ContentPart, Message, ToolDefinition, Usage

__all__ = [
    "AgentCreate",
    "AgentCreated",
    "AgentInfo",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamResponse",
    "CompleteBody",
    "CompleteResponse",
    "ContextRef",
    "ConversationSummary",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorResponse",
    "LoginBody",
    "LoginResponse",
    "MemorySearchBody",
    "MemorySearchFilters",
    "MemorySearchResponse",
    "MemorySearchResult",
    "ModelCard",
    "ModelList",
    "ProviderInfo",
    "ProviderPut",
    "RegisterBody",
    "RegisterResponse",
    "RouteInfo",
    "RoutingPrefs",
    "SettingsBody",
    "TagsBody",
    "TokenCreate",
    "TokenCreated",
    "TokenInfo",
    "UserInfo",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --------------------------------------------------------------------------- auth


class RegisterBody(_Strict):
    email: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    password: str = Field(min_length=8, max_length=256)


class RegisterResponse(BaseModel):
    user_id: str
    token: str


class LoginBody(_Strict):
    email: str = Field(min_length=3, max_length=254)
    password: str = Field(min_length=1, max_length=256)


class LoginResponse(BaseModel):
    token: str
    expires_at: datetime


class UserInfo(BaseModel):
    user_id: str
    email: str


class TokenCreate(_Strict):
    name: str = Field(min_length=1, max_length=100)
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class TokenCreated(BaseModel):
    id: str
    token: str
    name: str
    expires_at: datetime | None


class TokenInfo(BaseModel):
    id: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = None


# --------------------------------------------------------------------------- providers, settings


class ProviderPut(_Strict):
    kind: Literal["anthropic", "openai", "custom", "ollama", "vllm", "cpu"]
    api_key: str | None = Field(default=None, min_length=1, max_length=4096)
    base_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://")
    default_model: str | None = Field(default=None, max_length=256)
    options: dict[str, Any] = Field(default_factory=dict)


class ProviderInfo(BaseModel):
    name: str
    kind: str
    configured: bool
    base_url: str | None
    default_model: str | None
    healthy: bool | None = None


class RoutingPrefs(_Strict):
    code: str | None = None
    analytical: str | None = None
    general: str | None = None


class SettingsBody(_Strict):
    default_provider: str | None = None
    data_residency: Literal["any", "on_prem"] | list[str] | None = None
    routing: RoutingPrefs = Field(default_factory=RoutingPrefs)
    fallbacks: list[str] = Field(default_factory=list, max_length=10)


# --------------------------------------------------------------------------- native completion


class CompleteBody(_Strict):
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)
    provider: str | None = None
    model: str | None = None
    conversation_id: str | None = None
    use_memory: bool = True
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    data_residency: Literal["any", "on_prem"] | list[str] | None = None
    tags: list[str] | None = Field(default=None, max_length=32)
    agent_tools: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="the id of one of the user's agents whose declared tools the model may call",
    )

    @model_validator(mode="after")
    def _one_input(self) -> CompleteBody:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        for m in self.messages or []:
            if not m.text().strip() and not m.tool_calls:
                raise ValueError("messages must not be empty")
        return self

    def to_messages(self) -> list[Message]:
        if self.messages is not None:
            return self.messages
        return [Message(role="user", content=self.prompt or "")]


class ContextRef(BaseModel):
    message_id: str
    score: float


class RouteInfo(BaseModel):
    provider: str
    reason: str


class CompleteResponse(BaseModel):
    id: str
    conversation_id: str
    provider: str
    model: str
    content: str | None = None
    usage: Usage
    context: list[ContextRef] = Field(default_factory=list)
    route: RouteInfo | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None


# --------------------------------------------------------------------------- memory, conversations


class MemorySearchFilters(_Strict):
    conversation_id: str | None = None
    provider: str | None = None
    tags: list[str] | None = None
    role: Literal["system", "user", "assistant", "tool"] | None = None
    since: datetime | None = None
    until: datetime | None = None


class MemorySearchBody(_Strict):
    query: str = Field(min_length=1, max_length=8192)
    limit: int = Field(default=10, ge=1, le=100)
    filters: MemorySearchFilters = Field(default_factory=MemorySearchFilters)


class MemorySearchResult(BaseModel):
    message_id: str
    conversation_id: str
    role: str
    content: str
    score: float
    provider: str | None
    created_at: datetime


class MemorySearchResponse(BaseModel):
    results: list[MemorySearchResult]


class ConversationSummary(BaseModel):
    id: str
    title: str | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    message_count: int = 0


class TagsBody(_Strict):
    tags: list[str] = Field(max_length=32)


# --------------------------------------------------------------------------- agents


class AgentCreate(_Strict):
    name: str = Field(min_length=1, max_length=100)


class AgentCreated(BaseModel):
    id: str
    token: str
    name: str


class AgentInfo(BaseModel):
    id: str
    name: str
    connected: bool
    last_seen: datetime | None
    capabilities: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class OpenAITool(_Open):
    type: Literal["function"] = "function"
    function: dict[str, Any]


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    messages: list[OpenAIMessage] = Field(min_length=1)
    model: str = Field(min_length=1)
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1)
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[OpenAITool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None
    # PA Core extensions (the openai client sends them through extra_body)
    conversation_id: str | None = None
    use_memory: bool = True
    tags: list[str] | None = None
    agent_tools: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="the id of one of the user's agents whose declared tools the model may call",
    )

    def tool_definitions(self) -> list[ToolDefinition] | None:
        if not self.tools:
            return None
        return [
            ToolDefinition(
                name=t.function.get("name", ""),
                description=t.function.get("description") or "",
                parameters=t.function.get("parameters") or {"type": "object", "properties": {}},
            )
            for t in self.tools
        ]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(_Open):
    input: str | list[str] = Field(min_length=1)
    model: str = "default"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def content_parts_from_openai(content: str | list[dict[str, Any]] | None) -> str | list[ContentPart]:
    """OpenAI message content (string or parts) as domain content."""
    from pacore.types import ImagePart, TextPart

    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[ContentPart] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(TextPart(text=str(part.get("text", ""))))
        elif kind == "image_url":
            url = part.get("image_url")
            parts.append(ImagePart(url=url.get("url") if isinstance(url, dict) else str(url)))
    return parts
