"""Records the stores return: plain immutable pydantic models, never ORM objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pacore.protocol import SettingsBody
from pacore.types import Message, Role, ToolCall

__all__ = [
    "AgentRecord",
    "ConversationRecord",
    "EncryptedKey",
    "MessageRecord",
    "NewMessage",
    "ProviderRecord",
    "TokenAudience",
    "TokenRecord",
    "UsageBucket",
    "UsageRecord",
    "UsageSummary",
    "UserRecord",
    "UserSettings",
]

TokenAudience = Literal["api", "agent", "session"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True, extra="ignore")


class UserRecord(_Record):
    id: str
    email: str
    created_at: datetime


class TokenRecord(_Record):
    id: str = Field(description="the token's jti")
    user_id: str
    name: str
    aud: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (
            self.expires_at is None or self.expires_at > datetime.now(UTC)
        )


class ProviderRecord(_Record):
    """A provider configuration as any caller may see it: never the key."""

    name: str
    kind: str
    configured: bool = Field(description="has a key, or is a kind that needs none")
    has_key: bool
    base_url: str | None
    default_model: str | None
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class EncryptedKey(_Record):
    """A stored provider key as ciphertext, for rotation and audits."""

    id: str
    user_id: str
    name: str
    key_id: str | None
    ciphertext: bytes


class UserSettings(SettingsBody):
    """A user's routing settings; the defaults are what a user who never saved any gets."""

    data_residency: Literal["any", "on_prem"] | list[str] | None = "any"


class AgentRecord(_Record):
    id: str
    user_id: str
    name: str
    jti: str
    capabilities: dict[str, Any]
    last_seen: datetime | None
    revoked_at: datetime | None
    created_at: datetime


class NewMessage(BaseModel):
    """A message to store, with what is known about how it was produced."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    provider: str | None = None
    model: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    latency_ms: float | None = Field(default=None, ge=0)

    @classmethod
    def from_message(cls, message: Message, **meta: Any) -> NewMessage:
        """A domain message plus metadata (provider, model, tokens, latency)."""
        calls = [c.model_dump() for c in message.tool_calls] if message.tool_calls else None
        return cls(
            role=message.role,
            content=message.text(),
            tool_calls=calls,
            tool_call_id=message.tool_call_id,
            **meta,
        )


class MessageRecord(_Record):
    id: str
    user_id: str
    conversation_id: str
    seq: int = Field(description="position in the conversation")
    role: Role
    content: str
    provider: str | None
    model: str | None
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    tags: list[str]
    created_at: datetime

    def to_message(self) -> Message:
        calls = [ToolCall.model_validate(c) for c in self.tool_calls] if self.tool_calls else None
        return Message(
            role=self.role, content=self.content, tool_calls=calls, tool_call_id=self.tool_call_id
        )


class ConversationRecord(_Record):
    id: str
    user_id: str
    title: str | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    message_count: int = 0
    messages: list[MessageRecord] | None = Field(
        default=None, description="oldest first; None when not asked for"
    )


class UsageRecord(_Record):
    id: str
    user_id: str
    provider: str
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float | None
    status: str
    cost_usd: float | None = Field(description="None when the model's price is unknown")
    created_at: datetime


class UsageBucket(BaseModel):
    provider: str
    model: str | None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_requests: int = Field(default=0, description="calls whose price is unknown")


class UsageSummary(BaseModel):
    since: datetime | None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_requests: int = 0
    by_model: list[UsageBucket] = Field(default_factory=list)
