"""Conversations and their messages: history, cursor pagination, and hydration for memory."""

from __future__ import annotations

import base64
import binascii
import builtins
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, Select, delete, exists, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.expression import type_coerce

from pacore.db.models import Conversation, Message
from pacore.db.stores._base import StoreBase, chunked, clean_tags, integrity_error, utcnow
from pacore.db.stores.records import ConversationRecord, MessageRecord, NewMessage
from pacore.db.types import new_id
from pacore.errors import BadRequestError, NotFoundError, ValidationError

__all__ = ["ConversationStore"]

MAX_PAGE = 100
TITLE_LEN = 80
_NOT_FOUND = "conversation not found"


def _title_from(messages: Sequence[NewMessage]) -> str | None:
    for m in messages:
        if m.role == "user":
            text = " ".join(m.content.split())
            if text:
                return text if len(text) <= TITLE_LEN else text[: TITLE_LEN - 1] + "…"
    return None


def _encode_cursor(updated_at: datetime, conversation_id: str) -> str:
    raw = json.dumps([updated_at.isoformat(), conversation_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, conversation_id = json.loads(raw)
        return datetime.fromisoformat(stamp), str(conversation_id)
    except (binascii.Error, ValueError, TypeError):
        raise BadRequestError("invalid cursor", param="cursor") from None


def _conversation(
    row: Conversation, count: int, messages: list[Message] | None = None
) -> ConversationRecord:
    return ConversationRecord(
        id=row.id,
        user_id=row.user_id,
        title=row.title,
        tags=list(row.tags or []),
        created_at=row.created_at,
        updated_at=row.updated_at,
        message_count=count,
        messages=None if messages is None else [MessageRecord.model_validate(m) for m in messages],
    )


class ConversationStore(StoreBase):
    async def create(
        self,
        user_id: str,
        title: str | None = None,
        tags: Sequence[str] | None = None,
        *,
        conversation_id: str | None = None,
    ) -> ConversationRecord:
        """A new conversation; ``conversation_id`` when the caller announced the id before
        the first turn was stored (ConflictError if it is taken)."""
        now = utcnow()
        row = Conversation(
            id=conversation_id or new_id(),
            user_id=user_id,
            title=(title or "").strip()[:200] or None,
            tags=clean_tags(tags),
            created_at=now,
            updated_at=now,
        )
        try:
            async with self.db.transaction() as session:
                session.add(row)
        except IntegrityError as exc:
            raise integrity_error(exc, "conversation already exists") from None
        return _conversation(row, 0, None)

    async def start(
        self,
        user_id: str,
        messages: Sequence[NewMessage],
        tags: Sequence[str] | None = None,
        *,
        conversation_id: str | None = None,
    ) -> tuple[ConversationRecord, builtins.list[MessageRecord]]:
        """A new conversation holding its first ``messages``, in one transaction (a turn that
        starts a conversation costs one commit, not two); titled after its first user message."""
        now = utcnow()
        conv = Conversation(
            id=conversation_id or new_id(),
            user_id=user_id,
            title=_title_from(messages),
            tags=clean_tags(tags),
            created_at=now,
            updated_at=now,
        )
        rows = [
            Message(
                id=new_id(), user_id=user_id, conversation_id=conv.id, seq=i + 1,
                tags=list(conv.tags), created_at=now, **m.model_dump(),
            )
            for i, m in enumerate(messages)
        ]
        try:
            async with self.db.transaction() as session:
                session.add(conv)
                await session.flush()  # the conversation before its messages (foreign key)
                session.add_all(rows)
        except IntegrityError as exc:
            raise integrity_error(exc, "conversation already exists") from None
        return _conversation(conv, len(rows)), [MessageRecord.model_validate(r) for r in rows]

    async def get(
        self, user_id: str, conversation_id: str, with_messages: bool = True
    ) -> ConversationRecord:
        """The conversation (with its messages, oldest first, unless told otherwise)."""
        async with self.db.session() as session:
            row = await self._owned(session, user_id, conversation_id)
            if with_messages:
                query = (
                    select(Message)
                    .where(Message.conversation_id == row.id, Message.user_id == user_id)
                    .order_by(Message.seq)
                )
                messages = list((await session.execute(query)).scalars())
                return _conversation(row, len(messages), messages)
            counts = await self._counts(session, [row.id])
        return _conversation(row, counts.get(row.id, 0), None)

    async def list(
        self, user_id: str, limit: int = 20, cursor: str | None = None, tag: str | None = None
    ) -> tuple[builtins.list[ConversationRecord], str | None]:
        """A page of the user's conversations, most recently updated first, and the cursor of
        the next page (None after the last). Keyset pagination on (updated_at, id): stable and
        complete while conversations are added, and O(page) at any depth."""
        limit = max(1, min(limit, MAX_PAGE))
        query = select(Conversation).where(Conversation.user_id == user_id)
        if tag:
            query = query.where(self._has_tag(tag))
        if cursor:
            updated_at, last_id = _decode_cursor(cursor)
            query = query.where(
                or_(
                    Conversation.updated_at < updated_at,
                    (Conversation.updated_at == updated_at) & (Conversation.id < last_id),
                )
            )
        query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(
            limit + 1
        )
        async with self.db.session() as session:
            rows = list((await session.execute(query)).scalars())
            page = rows[:limit]
            counts = await self._counts(session, [r.id for r in page])
        next_cursor = None
        if len(rows) > limit:
            next_cursor = _encode_cursor(page[-1].updated_at, page[-1].id)
        return [_conversation(r, counts.get(r.id, 0)) for r in page], next_cursor

    async def set_tags(
        self, user_id: str, conversation_id: str, tags: Sequence[str]
    ) -> ConversationRecord:
        """Replace the conversation's tags (and the copies its messages carry)."""
        tags = clean_tags(tags)
        async with self.db.transaction() as session:
            row = await self._owned(session, user_id, conversation_id, lock=True)
            row.tags = tags
            await session.execute(
                update(Message)
                .where(Message.conversation_id == row.id, Message.user_id == user_id)
                .values(tags=tags)
            )
            counts = await self._counts(session, [row.id])
        return _conversation(row, counts.get(row.id, 0))

    async def delete(self, user_id: str, conversation_id: str) -> builtins.list[str]:
        """Delete the conversation and its messages; returns the deleted message ids."""
        async with self.db.transaction() as session:
            row = await self._owned(session, user_id, conversation_id, lock=True)
            ids = list(
                (
                    await session.execute(
                        select(Message.id).where(
                            Message.conversation_id == row.id, Message.user_id == user_id
                        )
                    )
                ).scalars()
            )
            await session.execute(delete(Message).where(Message.conversation_id == row.id))
            await session.delete(row)
        return ids

    async def add_messages(
        self, user_id: str, conversation_id: str, messages: Sequence[NewMessage]
    ) -> builtins.list[MessageRecord]:
        """Append messages in one transaction: they get the next positions and the
        conversation's tags, the conversation's updated_at moves on, and an untitled
        conversation is titled after its first user message."""
        now = utcnow()
        async with self.db.transaction() as session:
            # The UPDATE comes first: it locks the conversation row, so concurrent appends to
            # one conversation queue here and each sees the others' positions.
            bumped = await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
                .values(updated_at=now)
            )
            if bumped.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError(_NOT_FOUND)
            conv = await self._owned(session, user_id, conversation_id)
            last = await session.scalar(
                select(func.max(Message.seq)).where(Message.conversation_id == conversation_id)
            )
            rows = [
                Message(
                    id=new_id(),
                    user_id=user_id,
                    conversation_id=conversation_id,
                    seq=(last or 0) + i + 1,
                    tags=list(conv.tags or []),
                    created_at=now,
                    **m.model_dump(),
                )
                for i, m in enumerate(messages)
            ]
            session.add_all(rows)
            if not conv.title:
                conv.title = _title_from(messages)
        return [MessageRecord.model_validate(r) for r in rows]

    async def recent_messages(
        self, user_id: str, conversation_id: str, limit: int
    ) -> builtins.list[MessageRecord]:
        """The last ``limit`` messages, oldest first."""
        if limit < 1:
            return []
        async with self.db.session() as session:
            await self._owned(session, user_id, conversation_id)
            query = (
                select(Message)
                .where(Message.conversation_id == conversation_id, Message.user_id == user_id)
                .order_by(Message.seq.desc())
                .limit(limit)
            )
            rows = list((await session.execute(query)).scalars())
        return [MessageRecord.model_validate(r) for r in reversed(rows)]

    async def messages_by_ids(self, user_id: str, ids: Sequence[str]) -> dict[str, MessageRecord]:
        """The user's messages among ``ids``; others' ids and unknown ids are left out."""
        found: dict[str, MessageRecord] = {}
        unique = list(dict.fromkeys(ids))
        async with self.db.session() as session:
            for part in chunked(unique, 500):
                query = select(Message).where(Message.user_id == user_id, Message.id.in_(part))
                for row in (await session.execute(query)).scalars():
                    found[row.id] = MessageRecord.model_validate(row)
        return found

    async def iter_messages(
        self, batch: int = 500, *, user_id: str | None = None
    ) -> AsyncIterator[MessageRecord]:
        """Every message (of every user, or of ``user_id``), read ``batch`` rows per query in
        id order, each page in its own short session: for rebuilding the vector index."""
        if batch < 1:
            raise ValidationError("batch must be at least 1", param="batch")
        after: str | None = None
        while True:
            query: Select[Message] = select(Message).order_by(Message.id).limit(batch)
            if user_id is not None:
                query = query.where(Message.user_id == user_id)
            if after is not None:
                query = query.where(Message.id > after)
            async with self.db.session() as session:
                rows = list((await session.execute(query)).scalars())
            for row in rows:
                yield MessageRecord.model_validate(row)
            if len(rows) < batch:
                return
            after = rows[-1].id

    async def ensure(
        self, user_id: str, conversation_id: str | None, tags: Sequence[str] | None = None
    ) -> ConversationRecord:
        """The conversation a turn belongs to: a new one when ``conversation_id`` is None; the
        user's existing one otherwise, with ``tags`` added to its tags."""
        if conversation_id is None:
            return await self.create(user_id, tags=tags)
        current = await self.get(user_id, conversation_id, with_messages=False)
        merged = clean_tags([*current.tags, *(tags or [])])
        if merged == current.tags:
            return current
        return await self.set_tags(user_id, conversation_id, merged)

    # ------------------------------------------------------------------ helpers

    async def _owned(
        self, session: AsyncSession, user_id: str, conversation_id: str, *, lock: bool = False
    ) -> Conversation:
        query = select(Conversation).where(
            Conversation.id == conversation_id, Conversation.user_id == user_id
        )
        if lock:
            query = query.with_for_update()
        row = (await session.execute(query)).scalar_one_or_none()
        if row is None:
            raise NotFoundError(_NOT_FOUND)
        return row

    @staticmethod
    async def _counts(session: AsyncSession, ids: builtins.list[str]) -> dict[str, int]:
        if not ids:
            return {}
        query = (
            select(Message.conversation_id, func.count())
            .where(Message.conversation_id.in_(ids))
            .group_by(Message.conversation_id)
        )
        return {cid: n for cid, n in (await session.execute(query)).tuples()}

    def _has_tag(self, tag: str) -> ColumnElement[bool]:
        if self.db.dialect == "postgresql":
            return type_coerce(Conversation.tags, JSONB).contains([tag])
        each = func.json_each(Conversation.tags).table_valued("value")
        return exists(select(literal(1)).select_from(each).where(each.c.value == tag))
