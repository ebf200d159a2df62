"""The Memory deployment: conversations, their vectors and semantic search, for Router and Gateway."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

from pacore.config import Settings
from pacore.db.stores.records import ConversationRecord
from pacore.errors import ConflictError
from pacore.logs import to_replica_log
from pacore.memory.manager import (
    EmbedFn,
    MemoryContext,
    MemoryManager,
    TextEmbedder,
    as_text_embedder,
)
from pacore.metrics import record_memory_search
from pacore.protocol import MemorySearchFilters, MemorySearchResult
from pacore.types import Message, Usage

__all__ = ["DEFAULT_OPTIONS", "HandleEmbedder", "MemoryDeployment", "options_for"]

logger = logging.getLogger("pacore.memory")

# The embedded index is a directory one process owns (its write-ahead log is locked), so the
# embedded deployment runs exactly one replica. Its work is I/O (SQL, the index, the embedder's
# replicas): a fraction of a CPU and many requests in flight.
DEFAULT_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0.25},
    "max_ongoing_requests": 128,
}

# With a Qdrant server the replicas share nothing but the server and SQL: scale them.
_SERVER_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 8,
    "target_ongoing_requests": 32,
    "upscale_delay_s": 10,
    "downscale_delay_s": 120,
}

# A replica replacing another finds the index still locked until the old one has closed it.
_LOCK_WAIT_S = 60.0


def options_for(settings: Settings) -> dict[str, Any]:
    """One replica while the index is embedded; autoscaled when ``qdrant_url`` names a server."""
    options = copy.deepcopy(DEFAULT_OPTIONS)
    if settings.qdrant_url:
        del options["num_replicas"]
        options["autoscaling_config"] = dict(_SERVER_AUTOSCALING)
    return options


class HandleEmbedder:
    """The Embedder deployment, reached through its handle, as the manager's TextEmbedder."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def embed_chunks(self, texts: Sequence[str]) -> list[list[tuple[str, list[float]]]]:
        result: list[list[tuple[str, list[float]]]] = await self._handle.embed_chunks.remote(
            list(texts)
        )
        return result

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        result: list[list[float]] = await self._handle.embed.remote(list(texts))
        return result

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._handle.info.remote()
        return result


class MemoryDeployment:
    """Builds the database, the conversation store, the vector index and the manager on first
    use (the index's dimension comes from the embedder, which is another deployment), then
    serves the manager's operations. Every method takes the authenticated ``user_id`` first."""

    DEFAULT_OPTIONS = DEFAULT_OPTIONS
    options_for = staticmethod(options_for)

    def __init__(
        self,
        settings: Settings | dict[str, Any] | None = None,
        embedder: Any = None,
    ) -> None:
        if not isinstance(settings, Settings):
            settings = Settings(**(settings or {}))
        self.settings = settings
        to_replica_log(settings.log_level)
        self._embedder = _text_embedder(embedder, settings)
        self._manager: MemoryManager | None = None
        self._db: Any = None
        self._lock = asyncio.Lock()
        # Serve awaits `replica.__del__` on graceful shutdown. Set on the instance (not the
        # class), it is what Serve calls, while the garbage collector, which only looks at the
        # class, never creates an un-awaited coroutine for an object dropped outside Serve.
        self.__del__ = self.aclose

    async def _get(self) -> MemoryManager:
        if self._manager is None:
            async with self._lock:
                if self._manager is None:
                    self._manager = await self._build()
        return self._manager

    async def _build(self) -> MemoryManager:
        from pacore.db.engine import Database
        from pacore.db.stores.conversations import ConversationStore

        dimension, window = await self._embedder_shape()
        index = await _open_index(self.settings, dimension)
        self._db = Database.from_settings(self.settings)
        return MemoryManager(
            ConversationStore(self._db), index, self._embedder, self.settings, window_chars=window
        )

    async def _embedder_shape(self) -> tuple[int, int | None]:
        """The vectors' dimension and the model's window in tokens: the Embedder deployment
        says both in one call; another embedder is probed for the dimension (window None: the
        manager asks the embedder object itself)."""
        if isinstance(self._embedder, HandleEmbedder):
            info = await self._embedder.info()
            return int(info["dimension"]), int(info.get("max_tokens") or 0)
        [probe] = await self._embedder.embed_queries(["dimension probe"])
        return len(probe), None

    # ------------------------------------------------------------------ turns and search

    async def store_turn(
        self,
        user_id: str,
        conversation_id: str | None,
        messages: list[Message],
        *,
        provider: str | None = None,
        model: str | None = None,
        usage: Usage | None = None,
        latency_ms: float | None = None,
        tags: list[str] | None = None,
        new: bool = False,
        known_vector: tuple[str, list[float]] | None = None,
    ) -> tuple[str, list[str]]:
        manager = await self._get()
        return await manager.store_turn(
            user_id,
            conversation_id,
            messages,
            provider=provider,
            model=model,
            usage=usage,
            latency_ms=latency_ms,
            tags=tags,
            new=new,
            known_vector=known_vector,
        )

    async def search(
        self,
        user_id: str,
        query: str,
        limit: int = 10,
        filters: MemorySearchFilters | None = None,
    ) -> list[MemorySearchResult]:
        manager = await self._get()
        started = time.perf_counter()
        try:
            return await manager.search(user_id, query, limit, filters)
        finally:
            record_memory_search("search", time.perf_counter() - started)

    async def context_for(
        self,
        user_id: str,
        messages: list[Message],
        conversation_id: str | None = None,
        vector: list[float] | None = None,
    ) -> MemoryContext:
        manager = await self._get()
        started = time.perf_counter()
        try:
            return await manager.context_for(user_id, messages, conversation_id, vector=vector)
        finally:
            record_memory_search("context", time.perf_counter() - started)

    async def context_for_vector(
        self,
        user_id: str,
        vector: list[float],
        messages: list[Message],
        conversation_id: str | None = None,
    ) -> MemoryContext:
        """:meth:`context_for` for a caller that already embedded the query."""
        return await self.context_for(user_id, messages, conversation_id, vector)

    async def embed_query(self, text: str) -> list[float]:
        [vector] = await self._embedder.embed_queries([text])
        return vector

    # ------------------------------------------------------------------ conversations

    async def create_conversation(
        self, user_id: str, title: str | None = None, tags: list[str] | None = None
    ) -> ConversationRecord:
        return await (await self._get()).create_conversation(user_id, title, tags)

    async def check_conversation(self, user_id: str, conversation_id: str) -> None:
        await (await self._get()).check_conversation(user_id, conversation_id)

    async def list_conversations(
        self, user_id: str, limit: int = 20, cursor: str | None = None, tag: str | None = None
    ) -> tuple[list[ConversationRecord], str | None]:
        return await (await self._get()).list_conversations(user_id, limit, cursor, tag)

    async def get_conversation(
        self, user_id: str, conversation_id: str, with_messages: bool = True
    ) -> ConversationRecord:
        return await (await self._get()).get_conversation(user_id, conversation_id, with_messages)

    async def set_tags(
        self, user_id: str, conversation_id: str, tags: list[str]
    ) -> ConversationRecord:
        return await (await self._get()).set_tags(user_id, conversation_id, tags)

    async def delete_conversation(self, user_id: str, conversation_id: str) -> list[str]:
        return await (await self._get()).delete_conversation(user_id, conversation_id)

    # ------------------------------------------------------------------ maintenance

    async def ping(self) -> None:
        """Health probe: the database and the index are open."""
        await self._get()

    async def reindex(self, user_id: str | None = None) -> int:
        return await (await self._get()).reindex(user_id)

    async def flush(self) -> None:
        await (await self._get()).flush()

    async def aclose(self) -> None:
        """Finish indexing, release the index and the database (Serve's graceful shutdown)."""
        manager, self._manager = self._manager, None
        if manager is not None:
            await manager.close()
        if self._db is not None:
            await self._db.dispose()


def _text_embedder(embedder: TextEmbedder | EmbedFn | Any, settings: Settings) -> TextEmbedder:
    """A handle to the Embedder deployment, an embedder object or function, or None for a model
    loaded in this process."""
    from ray.serve.handle import DeploymentHandle

    if isinstance(embedder, DeploymentHandle):
        return HandleEmbedder(embedder)
    if embedder is None:
        from pacore.memory.embedder import Embedder

        return Embedder.from_settings(settings)
    return as_text_embedder(embedder)


async def _open_index(settings: Settings, dimension: int) -> Any:
    from pacore.memory.vector import open_index

    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            return await open_index(settings, dimension)
        except ConflictError as exc:
            if exc.code != "vector_index_locked" or time.monotonic() > deadline:
                raise
            logger.info("vector index still held by a stopping replica; waiting")
            await asyncio.sleep(0.5)
