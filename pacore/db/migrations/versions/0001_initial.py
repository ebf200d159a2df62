"""initial schema: users, settings, providers, conversations, messages, agents, tokens, usage

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Self-contained on purpose: a migration describes the schema as it was, so it does not import
the models. ``timestamptz`` on PostgreSQL and naive-UTC text on SQLite, as
pacore.db.types.UTCDateTime expects; JSONB on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id(name: str = "id", **kw: object) -> sa.Column:
    return sa.Column(name, sa.String(36), nullable=False, **kw)  # type: ignore[arg-type]


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=nullable)


def _owner(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["user_id"], ["users.id"], name=f"fk_{table}_user_id_users", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "users",
        _id(),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )
    op.create_table(
        "user_settings",
        _id("user_id"),
        _json("data"),
        _ts("updated_at"),
        _owner("user_settings"),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_settings"),
    )
    op.create_table(
        "provider_configs",
        _id(),
        _id("user_id"),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("encrypted_key", sa.LargeBinary(), nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("base_url", sa.String(2048), nullable=True),
        sa.Column("default_model", sa.String(256), nullable=True),
        _json("options"),
        _ts("created_at"),
        _ts("updated_at"),
        _owner("provider_configs"),
        sa.PrimaryKeyConstraint("id", name="pk_provider_configs"),
        sa.UniqueConstraint("user_id", "name", name="uq_provider_configs_user_id_name"),
    )
    op.create_table(
        "conversations",
        _id(),
        _id("user_id"),
        sa.Column("title", sa.String(200), nullable=True),
        _json("tags"),
        _ts("created_at"),
        _ts("updated_at"),
        _owner("conversations"),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
    )
    op.create_index("ix_conversations_user_updated", "conversations", ["user_id", "updated_at", "id"])
    op.create_index("ix_conversations_user_created", "conversations", ["user_id", "created_at"])
    op.create_table(
        "messages",
        _id(),
        _id("user_id"),
        _id("conversation_id"),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("provider", sa.String(128), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        _json("tool_calls", nullable=True),
        sa.Column("tool_call_id", sa.String(128), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        _json("tags"),
        _ts("created_at"),
        _owner("messages"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_messages_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        # Also the index behind every "messages of this conversation" query.
        sa.UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_id_seq"),
    )
    op.create_index("ix_messages_user_created", "messages", ["user_id", "created_at"])
    op.create_index("ix_messages_provider", "messages", ["provider"])
    op.create_table(
        "agents",
        _id(),
        _id("user_id"),
        sa.Column("name", sa.String(100), nullable=False),
        _id("jti"),
        _json("capabilities"),
        _ts("last_seen", nullable=True),
        _ts("revoked_at", nullable=True),
        _ts("created_at"),
        _owner("agents"),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
        sa.UniqueConstraint("jti", name="uq_agents_jti"),
    )
    op.create_index("ix_agents_user_created", "agents", ["user_id", "created_at"])
    op.create_table(
        "api_tokens",
        _id(),
        _id("user_id"),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("aud", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _ts("revoked_at", nullable=True),
        _ts("last_used_at", nullable=True),
        _owner("api_tokens"),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
    )
    op.create_index("ix_api_tokens_user_created", "api_tokens", ["user_id", "created_at"])
    op.create_table(
        "usage_logs",
        _id(),
        _id("user_id"),
        sa.Column("provider", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        _ts("created_at"),
        _owner("usage_logs"),
        sa.PrimaryKeyConstraint("id", name="pk_usage_logs"),
    )
    op.create_index("ix_usage_logs_user_created", "usage_logs", ["user_id", "created_at"])
    op.create_index("ix_usage_logs_provider", "usage_logs", ["provider"])


def downgrade() -> None:
    # Children first; dropping a table drops its indexes with it.
    for table in (
        "usage_logs",
        "api_tokens",
        "agents",
        "messages",
        "conversations",
        "provider_configs",
        "user_settings",
        "users",
    ):
        op.drop_table(table)
