"""Typed answers of the API (pydantic models); unknown fields a newer server adds are ignored."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Agent",
    "AgentPaired",
    "Completion",
    "CompletionChunk",
    "CompletionDone",
    "ContextRef",
    "Conversation",
    "ConversationMessage",
    "ConversationPage",
    "ConversationSummary",
    "Health",
    "Login",
    "MemoryResult",
    "Message",
    "MessageUsage",
    "Provider",
    "ProviderTest",
    "Registration",
    "Route",
    "Routing",
    "Token",
    "TokenCreated",
    "Usage",
    "User",
    "UserSettings",
]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(BaseModel):
    """One message of a conversation sent to ``complete``/``stream``."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


# --------------------------------------------------------------------------- completions


class Usage(_Answer):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ContextRef(_Answer):
    """A remembered message the server put into the prompt, with its similarity score."""

    message_id: str
    score: float


class Route(_Answer):
    """Which provider answered and why the router chose it."""

    provider: str
    reason: str


class CompletionDone(_Answer):
    """Everything about a finished answer except its text: the stream's closing ``done`` event."""

    id: str
    conversation_id: str
    provider: str
    model: str
    usage: Usage = Field(default_factory=Usage)
    context: list[ContextRef] = Field(default_factory=list)
    route: Route | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Completion(CompletionDone):
    """A whole answer of ``complete``."""

    content: str = ""

    def __str__(self) -> str:
        return self.content


class CompletionChunk(_Answer):
    """A piece of a streamed answer, as it arrived."""

    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------- conversations, memory


class ConversationSummary(_Answer):
    id: str
    title: str | None = None
    tags: list[str] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    message_count: int = 0


class MessageUsage(_Answer):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ConversationMessage(_Answer):
    id: str
    role: str
    content: str
    provider: str | None = None
    model: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    created_at: datetime
    usage: MessageUsage = Field(default_factory=MessageUsage)


class Conversation(ConversationSummary):
    """A conversation with its messages, oldest first."""

    messages: list[ConversationMessage] = Field(default_factory=list)


class ConversationPage(_Answer):
    """One page of ``conversations.list``; pass ``next_cursor`` back for the next one."""

    data: list[ConversationSummary]
    next_cursor: str | None = None


class MemoryResult(_Answer):
    """A remembered message that matches a search, most similar first."""

    message_id: str
    conversation_id: str
    role: str
    content: str
    score: float
    provider: str | None = None
    created_at: datetime


# --------------------------------------------------------------------------- providers, settings


class Provider(_Answer):
    """A provider configuration of the user's (its API key is never returned)."""

    name: str
    kind: str
    configured: bool
    base_url: str | None = None
    default_model: str | None = None
    healthy: bool | None = None


class ProviderTest(_Answer):
    """The result of a live check of a provider configuration."""

    name: str
    healthy: bool
    latency_ms: float | None = None
    detail: str | None = None


class Routing(BaseModel):
    """The provider preferred for each kind of query."""

    code: str | None = None
    analytical: str | None = None
    general: str | None = None


class UserSettings(BaseModel):
    """The user's routing settings, as read and written whole."""

    default_provider: str | None = None
    data_residency: Literal["any", "on_prem"] | list[str] | None = None
    routing: Routing = Field(default_factory=Routing)
    fallbacks: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------ accounts, tokens, agents


class Registration(_Answer):
    user_id: str
    token: str


class Login(_Answer):
    token: str
    expires_at: datetime


class User(_Answer):
    user_id: str
    email: str


class TokenCreated(_Answer):
    """A new API token; ``token`` is shown this once and never again."""

    id: str
    token: str
    name: str
    expires_at: datetime | None = None


class Token(_Answer):
    id: str
    name: str
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class AgentPaired(_Answer):
    """A newly paired on-prem agent; ``token`` is shown this once and never again."""

    id: str
    token: str
    name: str


class Agent(_Answer):
    id: str
    name: str
    connected: bool
    last_seen: datetime | None = None
    capabilities: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class Health(_Answer):
    """``status`` is ``ok`` or ``degraded``; ``components`` says which part is unavailable."""

    status: str
    components: dict[str, str] = Field(default_factory=dict)
