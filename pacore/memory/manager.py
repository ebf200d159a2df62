"""MemoryManager: conversations in SQL (the truth) and their vectors (derived), kept in step.

A turn is written to SQL on the caller's path; embedding and indexing it happens in a background
task, retried with backoff, so a slow or failing embedder never holds a response back (and a
lost vector is restored by :meth:`MemoryManager.reindex`). Turns stored within
``memory_index_wait_s`` of each other are embedded and indexed together. Searches go to the vector index and
are then hydrated from SQL, so a deleted message or another user's message can never surface.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from pacore.errors import NotFoundError
from pacore.memory.coalesce import Coalescer
from pacore.memory.vector import IndexFilter, VectorHit, VectorIndex, VectorPoint
from pacore.protocol import MemorySearchFilters, MemorySearchResult
from pacore.types import Message, Usage

if TYPE_CHECKING:
    from pacore.config import Settings
    from pacore.db.stores.conversations import ConversationStore
    from pacore.db.stores.records import ConversationRecord, MessageRecord

__all__ = [
    "EmbedFn",
    "MemoryContext",
    "MemoryManager",
    "TextEmbedder",
    "as_text_embedder",
]

logger = logging.getLogger("pacore.memory")

Vector = list[float]
EmbedFn = Callable[[list[str]], Awaitable[list[list[Vector]]]]

_INDEX_RETRIES = 5
_INDEX_BACKOFF_S = 0.5
_INDEX_BACKOFF_MAX_S = 30.0
ANNOUNCED_GRACE_S = 1.0  # how long an unknown conversation id is looked for again
_REINDEX_BATCH = 128
_MIN_SNIPPET_TOKENS = 16
_SEPARATOR = "\n\n"
_CONTEXT_HEADER = (
    "Relevant excerpts from the user's earlier conversations, most relevant first. "
    "Use them only where they help answer the current request."
)


@runtime_checkable
class TextEmbedder(Protocol):
    """What the manager needs from an embedder (:class:`~pacore.memory.embedder.Embedder` and
    the Embedder deployment are ones; a Serve handle is wrapped into one)."""

    async def embed_chunks(self, texts: Sequence[str]) -> list[list[tuple[str, Vector]]]:
        """Each text's windows with their vectors."""
        ...

    async def embed_queries(self, texts: Sequence[str]) -> list[Vector]: ...


class _CallableEmbedder:
    """An async ``texts -> vectors per chunk of each text`` function as a TextEmbedder. It does
    not say where its windows fall, so each window's text is taken as the same share of the
    message; a query is its first window, which is what the model reads of a long query."""

    def __init__(self, fn: EmbedFn) -> None:
        self._fn = fn

    async def embed_chunks(self, texts: Sequence[str]) -> list[list[tuple[str, Vector]]]:
        vectors = await self._fn(list(texts))
        return [
            [(_share(text, i, len(vs)), v) for i, v in enumerate(vs)]
            for text, vs in zip(texts, vectors, strict=True)
        ]

    async def embed_queries(self, texts: Sequence[str]) -> list[Vector]:
        return [chunks[0] for chunks in await self._fn(list(texts))]


def _share(text: str, i: int, n: int) -> str:
    return text if n <= 1 else text[len(text) * i // n : len(text) * (i + 1) // n]


def as_text_embedder(embed: TextEmbedder | EmbedFn) -> TextEmbedder:
    if isinstance(embed, TextEmbedder):
        return embed
    return _CallableEmbedder(embed)


class MemoryContext(NamedTuple):
    """What :meth:`MemoryManager.context_for` found: the system message to inject (None when
    nothing relevant) and the ``(message_id, score)`` it was built from."""

    system_text: str | None
    refs: list[tuple[str, float]]


@dataclass(frozen=True, slots=True)
class _Candidate:
    hit: VectorHit
    record: MessageRecord


class MemoryManager:
    def __init__(
        self,
        store: ConversationStore,
        index: VectorIndex,
        embed: TextEmbedder | EmbedFn,
        settings: Settings,
        *,
        window_chars: int | None = None,
    ) -> None:
        self._store = store
        self._index = index
        self._embedder = as_text_embedder(embed)
        self._settings = settings
        counter = getattr(embed, "count_tokens", None)
        self._count_tokens: Callable[[str], int] = (
            counter
            if callable(counter) and not asyncio.iscoroutinefunction(counter)
            else _estimate_tokens
        )
        # A text of at most this many characters is one window of the model (a token covers at
        # least one character), so a vector the caller already has for it is what indexing
        # would compute: it is reused instead of encoding the text again.
        self._window_chars = int(
            window_chars if window_chars is not None else getattr(embed, "max_tokens", 0) or 0
        )
        # Conversations whose first turn is being written, by the id the Router announced: a
        # client may continue one before its first turn has landed.
        self._starting: dict[str, asyncio.Event] = {}
        # Background indexing tasks, by conversation, so deletes and tag edits can wait for
        # the vectors they must change to exist first.
        self._pending: dict[asyncio.Task[None], str] = {}
        # Turns stored close together are embedded in one call and written in one upsert.
        self._window: Coalescer[tuple[list[MessageRecord], dict[str, Vector]]] | None = (
            Coalescer(
                self._index_together, wait_s=settings.memory_index_wait_s,
                max_weight=settings.embedding_batch_size,
            )
            if settings.memory_index_wait_s > 0
            else None
        )

    @property
    def index(self) -> VectorIndex:
        return self._index

    # ------------------------------------------------------------------ writing turns

    async def store_turn(
        self,
        user_id: str,
        conversation_id: str | None,
        messages: Sequence[Message],
        *,
        provider: str | None = None,
        model: str | None = None,
        usage: Usage | None = None,
        latency_ms: float | None = None,
        tags: Sequence[str] | None = None,
        new: bool = False,
        known_vector: tuple[str, Sequence[float]] | None = None,
    ) -> tuple[str, list[str]]:
        """Append a turn to its conversation and return ``(conversation_id, ids of the stored
        messages)``. The conversation is a new one when ``conversation_id`` is None, or when
        ``new`` says the caller chose its id (the Router announces it before the turn is stored);
        a new conversation and its first messages are written in one transaction.
        ``known_vector`` is ``(text, its embedding)`` the caller already computed (the query's),
        reused for a message with that text instead of encoding it again.

        Messages a client sends again (OpenAI-style clients resend the whole history) are
        recognised as the stored tail of the conversation and not stored twice. The provider is
        recorded on every message of the turn; model, tokens and latency on the answer.
        """
        if new and conversation_id is not None:  # the id the Router announced: a first turn
            starting = self._starting.setdefault(conversation_id, asyncio.Event())
            try:
                return await self._store_turn(
                    user_id, conversation_id, messages, provider=provider, model=model,
                    usage=usage, latency_ms=latency_ms, tags=tags, new=True,
                    known_vector=known_vector,
                )
            finally:
                starting.set()
                self._starting.pop(conversation_id, None)
        return await self._store_turn(
            user_id, conversation_id, messages, provider=provider, model=model, usage=usage,
            latency_ms=latency_ms, tags=tags, new=new, known_vector=known_vector,
        )

    async def _store_turn(
        self,
        user_id: str,
        conversation_id: str | None,
        messages: Sequence[Message],
        *,
        provider: str | None,
        model: str | None,
        usage: Usage | None,
        latency_ms: float | None,
        tags: Sequence[str] | None,
        new: bool,
        known_vector: tuple[str, Sequence[float]] | None,
    ) -> tuple[str, list[str]]:
        from pacore.db.stores.records import NewMessage

        fresh_conversation = new or conversation_id is None
        if fresh_conversation:
            fresh = list(messages)
        else:
            assert conversation_id is not None
            conversation = await self._conversation_for(user_id, conversation_id, tags)
            fresh = await self._unstored(user_id, conversation.id, messages)
            if not fresh:
                return conversation.id, []
        usage = usage or Usage()
        answer = max((i for i, m in enumerate(fresh) if m.role == "assistant"), default=None)
        rows = []
        for i, message in enumerate(fresh):
            meta: dict[str, Any] = {"provider": provider}
            if i == answer:
                meta.update(
                    model=model,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    latency_ms=latency_ms,
                )
            rows.append(NewMessage.from_message(message, **meta))
        if fresh_conversation:
            conversation, records = await self._store.start(
                user_id, rows, tags, conversation_id=conversation_id
            )
        else:
            records = await self._store.add_messages(user_id, conversation.id, rows)
        known = {}
        if known_vector is not None and 0 < len(known_vector[0]) <= self._window_chars:
            known[known_vector[0]] = list(known_vector[1])
        self._index_later(conversation.id, records, known)
        return conversation.id, [r.id for r in records]

    async def _conversation_for(
        self, user_id: str, conversation_id: str, tags: Sequence[str] | None
    ) -> ConversationRecord:
        """The user's existing conversation, with the turn's tags added to it."""
        if not tags:
            return await self._store.ensure(user_id, conversation_id, tags)
        before = await self._store.get(user_id, conversation_id, with_messages=False)
        after = await self._store.ensure(user_id, conversation_id, tags)
        if after.tags != before.tags:  # the turn added tags: its vectors carry them too
            await self._settle(conversation_id)
            await self._index.set_conversation_tags(user_id, conversation_id, after.tags)
        return after

    async def _unstored(
        self, user_id: str, conversation_id: str, messages: Sequence[Message]
    ) -> list[Message]:
        """``messages`` without the leading ones that repeat the conversation's stored tail."""
        if len(messages) < 2:
            return list(messages)
        stored = await self._store.recent_messages(user_id, conversation_id, len(messages) - 1)
        keys = [(m.role, m.content) for m in stored]
        incoming = [(m.role, m.text()) for m in messages]
        for k in range(min(len(keys), len(messages) - 1), 0, -1):
            if keys[-k:] == incoming[:k]:
                return list(messages[k:])
        return list(messages)

    def _index_later(
        self, conversation_id: str, records: Sequence[MessageRecord],
        known: dict[str, Vector] | None = None,
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._index_with_retry(list(records), known or {})
        )
        self._pending[task] = conversation_id
        task.add_done_callback(self._pending.pop)

    async def _index_with_retry(
        self, records: list[MessageRecord], known: dict[str, Vector]
    ) -> None:
        delay = _INDEX_BACKOFF_S
        for attempt in range(1, _INDEX_RETRIES + 1):
            try:
                # A retry goes alone: a batch that failed is not tried again as a whole.
                if attempt == 1 and self._window is not None:
                    await self._window.submit((records, known), weight=len(records))
                else:
                    await self._index_records(records, known)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if attempt == _INDEX_RETRIES:
                    logger.exception(
                        "indexing %d messages failed %d times; `pacore memory reindex` restores "
                        "them",
                        len(records),
                        attempt,
                    )
                    return
                logger.warning("indexing failed (attempt %d), retrying in %.1fs", attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _INDEX_BACKOFF_MAX_S)

    async def _index_together(
        self, turns: list[tuple[list[MessageRecord], dict[str, Vector]]]
    ) -> None:
        records = [r for rs, _ in turns for r in rs]
        known = {text: vector for _, k in turns for text, vector in k.items()}
        await self._index_records(records, known)

    async def _index_records(
        self, records: Sequence[MessageRecord], known: dict[str, Vector] | None = None
    ) -> int:
        """Embed and upsert ``records`` (those with text); returns the points written. A record
        whose text is in ``known`` (one window, already embedded) is not encoded again."""
        todo = [r for r in records if r.content.strip()]
        if not todo:
            return 0
        known = known or {}
        encode = [r.content for r in todo if r.content not in known]
        encoded = iter(await self._embedder.embed_chunks(encode) if encode else [])
        chunked = [
            [(r.content, known[r.content])] if r.content in known else next(encoded)
            for r in todo
        ]
        points = [
            VectorPoint(
                message_id=r.id,
                chunk=i,
                vector=vector,
                user_id=r.user_id,
                conversation_id=r.conversation_id,
                role=r.role,
                provider=r.provider,
                created_at=r.created_at.timestamp(),
                tags=r.tags,
                content=text,
            )
            for r, chunks in zip(todo, chunked, strict=True)
            for i, (text, vector) in enumerate(chunks)
        ]
        await self._index.upsert(points)
        return len(points)

    async def flush(self) -> None:
        """Wait until every turn stored so far is indexed (or has given up retrying)."""
        while self._pending:
            self._index_now()
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _index_now(self) -> None:
        if self._window is not None:
            self._window.start_now()

    async def _settle(self, conversation_id: str) -> None:
        tasks = [t for t, c in self._pending.items() if c == conversation_id]
        if tasks:
            self._index_now()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ reading

    async def search(
        self,
        user_id: str,
        query: str,
        limit: int = 10,
        filters: MemorySearchFilters | None = None,
    ) -> list[MemorySearchResult]:
        """The user's messages nearest in meaning to ``query``, best first."""
        [vector] = await self._embedder.embed_queries([query])
        found = await self._hydrated(user_id, vector, limit, _index_filter(filters))
        return [_result(c) for c in found[:limit]]

    async def _hydrated(
        self,
        user_id: str,
        vector: Sequence[float],
        limit: int,
        flt: IndexFilter | None,
        min_score: float | None = None,
    ) -> list[_Candidate]:
        hits = await self._index.search(vector, user_id=user_id, limit=limit, filters=flt)
        if min_score is not None:
            # Only what can be chosen is read from SQL: a turn that memory has nothing close
            # to (the common case for a new topic) costs no read at all.
            hits = [h for h in hits if h.score >= min_score]
        if not hits:
            return []
        records = await self._store.messages_by_ids(user_id, [h.message_id for h in hits])
        orphans = [h.message_id for h in hits if h.message_id not in records]
        if orphans:  # vectors of messages deleted while they were being indexed
            await self._index.delete_messages(user_id, orphans)
        return [_Candidate(h, records[h.message_id]) for h in hits if h.message_id in records]

    async def context_for(
        self,
        user_id: str,
        query_messages: Sequence[Message],
        conversation_id: str | None = None,
        *,
        vector: Sequence[float] | None = None,
    ) -> MemoryContext:
        """The memory to put before the prompt: up to ``memory_top_k`` messages scoring at least
        ``memory_min_score``, within ``memory_token_budget`` tokens, leaving out what the prompt
        already holds. ``vector`` is the query's embedding when the caller already has it."""
        s = self._settings
        query = _query_text(query_messages)
        if s.memory_top_k == 0 or s.memory_token_budget == 0 or not query.strip():
            return MemoryContext(None, [])
        if vector is None:
            [vector] = await self._embedder.embed_queries([query])
        in_prompt = {_norm(m.text()) for m in query_messages if m.text().strip()}
        exclude = await self._in_prompt_ids(user_id, conversation_id, query_messages, in_prompt)
        flt = IndexFilter(exclude_message_ids=frozenset(exclude))
        found = await self._hydrated(
            user_id, vector, s.memory_top_k * 2, flt, min_score=s.memory_min_score
        )
        chosen = [c for c in found if _norm(c.record.content) not in in_prompt][: s.memory_top_k]
        return self._render(chosen)

    async def _in_prompt_ids(
        self,
        user_id: str,
        conversation_id: str | None,
        query_messages: Sequence[Message],
        in_prompt: set[str],
    ) -> list[str]:
        if conversation_id is None:
            return []
        recent = await self._store.recent_messages(
            user_id, conversation_id, len(query_messages) + 2
        )
        return [m.id for m in recent if _norm(m.content) in in_prompt]

    def _render(self, chosen: list[_Candidate]) -> MemoryContext:
        budget = self._settings.memory_token_budget - self._count_tokens(_CONTEXT_HEADER)
        lines: list[str] = []
        refs: list[tuple[str, float]] = []
        for c in chosen:
            head = _snippet_head(c.record)
            room = budget - self._count_tokens(head)
            if room < _MIN_SNIPPET_TOKENS:
                break
            text = c.record.content
            if self._count_tokens(text) > room:
                text = self._fit(c.hit.content or text, room)
            line = head + text
            lines.append(line)
            refs.append((c.record.id, c.hit.score))
            budget -= self._count_tokens(line + _SEPARATOR)
        if not lines:
            return MemoryContext(None, [])
        return MemoryContext(_SEPARATOR.join([_CONTEXT_HEADER, *lines]), refs)

    def _fit(self, text: str, tokens: int) -> str:
        """``text`` cut (at a word where possible) to at most ``tokens`` tokens."""
        cut = text[: tokens * 4]
        while cut and self._count_tokens(cut + " …") > tokens:
            cut = cut[: int(len(cut) * 0.85)]
        if cut != text:
            cut = cut.rsplit(" ", 1)[0] if " " in cut[len(cut) // 2 :] else cut
            cut += " …"
        return cut

    # ------------------------------------------------------------------ conversations

    async def create_conversation(
        self, user_id: str, title: str | None = None, tags: Sequence[str] | None = None
    ) -> ConversationRecord:
        return await self._store.create(user_id, title=title, tags=tags)

    async def check_conversation(self, user_id: str, conversation_id: str) -> None:
        """NotFoundError unless the conversation exists and is the user's.

        A conversation's first turn is written after its answer, so a client that continues
        at once can ask before it has landed: a first turn being written here is waited for,
        and an id not found is looked for again for a moment (its turn may still be on its
        way, or being written by another replica) before the answer is 404."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ANNOUNCED_GRACE_S
        while True:
            starting = self._starting.get(conversation_id)
            if starting is not None:
                await starting.wait()
            try:
                await self._store.get(user_id, conversation_id, with_messages=False)
                return
            except NotFoundError:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.025)

    async def list_conversations(
        self, user_id: str, limit: int = 20, cursor: str | None = None, tag: str | None = None
    ) -> tuple[list[ConversationRecord], str | None]:
        return await self._store.list(user_id, limit=limit, cursor=cursor, tag=tag)

    async def get_conversation(
        self, user_id: str, conversation_id: str, with_messages: bool = True
    ) -> ConversationRecord:
        return await self._store.get(user_id, conversation_id, with_messages=with_messages)

    async def set_tags(
        self, user_id: str, conversation_id: str, tags: Sequence[str]
    ) -> ConversationRecord:
        """Replace the conversation's tags, in SQL and on its vectors."""
        record = await self._store.set_tags(user_id, conversation_id, tags)
        await self._settle(conversation_id)
        await self._index.set_conversation_tags(user_id, conversation_id, record.tags)
        return record

    async def delete_conversation(self, user_id: str, conversation_id: str) -> list[str]:
        """Delete the conversation, its messages and their vectors; returns the message ids."""
        ids = await self._store.delete(user_id, conversation_id)
        await self._settle(conversation_id)
        await self._index.delete_conversation(user_id, conversation_id)
        await self._index.delete_messages(user_id, ids)
        return ids

    # ------------------------------------------------------------------ rebuilding

    async def reindex(
        self,
        user_id: str | None = None,
        *,
        progress: Callable[[int], None] | None = None,
        batch: int = _REINDEX_BATCH,
    ) -> int:
        """Rebuild the index from SQL (everyone's, or one user's); returns the messages read.
        ``progress`` is called with the number of messages done after each batch."""
        await self.flush()
        if user_id is None:
            await self._index.reset()
        else:
            await self._index.delete_user(user_id)
        done = 0
        pending: list[MessageRecord] = []
        async for record in self._store.iter_messages(batch, user_id=user_id):
            pending.append(record)
            if len(pending) >= batch:
                done += await self._reindex_batch(pending, progress, done)
                pending = []
        if pending:
            done += await self._reindex_batch(pending, progress, done)
        return done

    async def _reindex_batch(
        self, records: list[MessageRecord], progress: Callable[[int], None] | None, done: int
    ) -> int:
        await self._index_records(records)
        if progress is not None:
            progress(done + len(records))
        return len(records)

    async def close(self) -> None:
        await self.flush()
        await self._index.close()


# ---------------------------------------------------------------------- helpers




def _estimate_tokens(text: str) -> int:
    # About four characters per token for English under WordPiece/BPE vocabularies.
    return len(text) // 4 + 1


def _norm(text: str) -> str:
    return " ".join(text.split())


def _query_text(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.role == "user" and m.text().strip():
            return m.text()
    return messages[-1].text() if messages else ""


def _index_filter(f: MemorySearchFilters | None) -> IndexFilter | None:
    if f is None:
        return None
    return IndexFilter(
        conversation_id=f.conversation_id,
        provider=f.provider,
        role=f.role,
        tags=f.tags or None,
        since=_epoch(f.since),
        until=_epoch(f.until),
    )


def _epoch(when: datetime | None) -> float | None:
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _result(c: _Candidate) -> MemorySearchResult:
    r = c.record
    return MemorySearchResult(
        message_id=r.id,
        conversation_id=r.conversation_id,
        role=r.role,
        content=r.content,
        score=c.hit.score,
        provider=r.provider,
        created_at=r.created_at,
    )


def _snippet_head(r: MessageRecord) -> str:
    via = f" via {r.provider}" if r.provider and r.role == "assistant" else ""
    return f"[{r.created_at:%Y-%m-%d}, {r.role}{via}] "
