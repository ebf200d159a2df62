"""The vector index: the ``VectorIndex`` protocol and its two Qdrant implementations.

One point per message chunk: the chunk's vector and a payload of ``user_id``,
``conversation_id``, ``message_id``, ``chunk``, ``role``, ``provider``, ``created_at`` (epoch
seconds), ``tags`` and the chunk's text cut to :data:`CONTENT_CHARS`. Point ids are derived from
``(message_id, chunk)``, so indexing a message twice overwrites it instead of duplicating it.
Every search is filtered on ``user_id``; it is a required keyword argument, checked at runtime.

Implementations:

* :class:`QdrantEdgeIndex` (embedded default): Qdrant's in-process engine ``qdrant-edge-py``,
  persisted under the data directory and owned by one process (its write-ahead log is locked).
* :class:`QdrantServerIndex` (production): a Qdrant server through ``qdrant-client``. The same
  class runs against qdrant-client's local mode (``location=":memory:"`` or ``path=...``), which
  speaks the same API but evaluates filters in Python.

Why edge for the embedded mode, measured by ``python -m benchmarks.memory`` on a busy 2-core
machine (384-d random unit vectors with realistic payloads, filtered top-10, p50):

======  =============  ===========  ===========  ===========  ===================
points  filter         numpy exact  edge (scan)  edge (HNSW)  qdrant-client local
======  =============  ===========  ===========  ===========  ===================
10k     user           0.33 ms      0.61 ms      1.3 ms       108 ms
10k     user+3 fields  0.04 ms      0.52 ms      0.52 ms      117 ms
100k    user           6.0 ms       6.1 ms       7.4 ms       not run
100k    user+3 fields  0.62 ms      9.6 ms       2.3 ms
======  =============  ===========  ===========  ===========  ===================

recall@10 against numpy was 1.0 for every edge row. Local mode evaluates filters in Python
(about 1.8 s a query at 100k points, DESIGN.md), so it only stands in for a server in tests.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pacore.errors import BadRequestError, ConflictError, PACoreError

if TYPE_CHECKING:
    from qdrant_client import AsyncQdrantClient

    from pacore.config import Settings

__all__ = [
    "CONTENT_CHARS",
    "IndexFilter",
    "QdrantEdgeIndex",
    "QdrantServerIndex",
    "VectorHit",
    "VectorIndex",
    "VectorPoint",
    "open_index",
    "point_id",
]

CONTENT_CHARS = 1000
_POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "pacore:message-chunk")
# A message may have several chunks among the nearest points; ask for more points than messages.
_OVERSAMPLE = 2
_MAX_FETCH = 1024
_UPSERT_BATCH = 256
_KEYWORD_FIELDS = ("conversation_id", "message_id", "role", "provider", "tags")
# Every search is scoped to one user, so the graph is built per user (Qdrant's multitenancy
# layout: no global graph, m=0; per-tenant links, payload_m) and the other fields are filters
# only. A search whose filter leaves fewer vectors than the full-scan threshold (in KB: 50 MB
# is ~33k 384-d vectors) scans them exactly through the payload index: measured at 100k points,
# that is as fast as the graph for a 28k-point user (~5 ms) and exact, where the graph's
# recall@10 was 0.74 even at hnsw_ef=256 (benchmarks/memory.py, whose index points are
# Gaussian unit vectors spread evenly over the sphere, the hardest case for a graph). Users
# beyond it get the graph.
_HNSW_M = 16
_HNSW_EF_CONSTRUCT = 100
_HNSW_EF = 256
_FULL_SCAN_KB = 50_000


def point_id(message_id: str, chunk: int) -> str:
    """The point id of a message's chunk: stable, so re-indexing overwrites."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{message_id}:{chunk}"))


@dataclass(frozen=True, slots=True)
class VectorPoint:
    """One chunk of one message, ready to be indexed."""

    message_id: str
    chunk: int
    vector: Sequence[float]
    user_id: str
    conversation_id: str
    role: str
    provider: str | None
    created_at: float
    tags: Sequence[str] = ()
    content: str = ""

    @property
    def id(self) -> str:
        return point_id(self.message_id, self.chunk)

    def payload(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            "chunk": self.chunk,
            "role": self.role,
            "provider": self.provider or "",
            "created_at": float(self.created_at),
            "tags": list(self.tags),
            "content": self.content[:CONTENT_CHARS],
        }


@dataclass(frozen=True, slots=True)
class IndexFilter:
    """Conditions beyond the user: all given ones must hold. ``tags`` matches a point carrying
    any of them; ``since``/``until`` bound ``created_at`` (epoch seconds, inclusive)."""

    conversation_id: str | None = None
    provider: str | None = None
    role: str | None = None
    tags: Sequence[str] | None = None
    since: float | None = None
    until: float | None = None
    exclude_message_ids: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class VectorHit:
    """A message's best-scoring chunk."""

    message_id: str
    conversation_id: str
    score: float
    chunk: int
    role: str
    provider: str | None
    created_at: float
    content: str

    @classmethod
    def from_payload(cls, score: float, p: dict[str, Any]) -> VectorHit:
        return cls(
            message_id=p["message_id"],
            conversation_id=p["conversation_id"],
            score=float(score),
            chunk=int(p.get("chunk", 0)),
            role=p.get("role", ""),
            provider=p.get("provider") or None,
            created_at=float(p.get("created_at", 0.0)),
            content=p.get("content", ""),
        )


@runtime_checkable
class VectorIndex(Protocol):
    """Where message vectors live. Every read and delete is scoped by ``user_id``."""

    dimension: int

    async def upsert(self, points: Sequence[VectorPoint]) -> None: ...

    async def search(
        self,
        vector: Sequence[float],
        *,
        user_id: str,
        limit: int = 10,
        filters: IndexFilter | None = None,
    ) -> list[VectorHit]:
        """The ``limit`` best messages (best chunk each), best first."""
        ...

    async def delete_messages(self, user_id: str, message_ids: Sequence[str]) -> None: ...

    async def delete_conversation(self, user_id: str, conversation_id: str) -> None: ...

    async def delete_user(self, user_id: str) -> None: ...

    async def set_conversation_tags(
        self, user_id: str, conversation_id: str, tags: Sequence[str]
    ) -> None: ...

    async def count(self, user_id: str | None = None) -> int: ...

    async def reset(self) -> None:
        """Remove every point (the index is rebuilt from SQL afterwards)."""
        ...

    async def optimize(self) -> None:
        """Build search structures for what was written; may take long, call it offline."""
        ...

    async def close(self) -> None: ...


def _require_user(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise BadRequestError("a vector search must be scoped to a user", param="user_id")
    return user_id


def _best_per_message(hits: list[VectorHit], limit: int) -> list[VectorHit]:
    best: dict[str, VectorHit] = {}
    for h in hits:  # hits arrive best first, so the first seen is the best chunk
        best.setdefault(h.message_id, h)
    return list(best.values())[:limit]


async def _search_messages(fetch_points: Any, limit: int) -> list[VectorHit]:
    """Ask for more points until ``limit`` distinct messages are found or the index runs out."""
    if limit <= 0:
        return []
    n = min(limit * _OVERSAMPLE, _MAX_FETCH)
    while True:
        hits: list[VectorHit] = await fetch_points(n)
        messages = _best_per_message(hits, limit)
        if len(messages) >= limit or len(hits) < n or n >= _MAX_FETCH:
            return messages
        n = min(n * 2, _MAX_FETCH)


# ---------------------------------------------------------------------------- qdrant-edge


class QdrantEdgeIndex:
    """The embedded index: a ``qdrant_edge.EdgeShard`` in a directory, owned by this process.

    The engine is synchronous; calls run in a worker thread so the event loop keeps serving.
    Fresh points sit in appendable segments that are searched exactly (a SIMD scan narrowed by
    the payload indexes); :meth:`optimize` builds the per-user graphs and the segment layout
    that make multi-field filters faster. It holds the GIL while it runs (4 s for 100k points
    with this configuration, a minute with a global graph), so only offline work (``pacore
    memory reindex``) calls it.
    """

    def __init__(self, shard: Any, path: Path, dimension: int) -> None:
        self._shard = shard
        self.path = path
        self.dimension = dimension

    @classmethod
    def open(cls, path: Path, dimension: int, *, reset: bool = False) -> QdrantEdgeIndex:
        """Load the shard at ``path``, creating it when absent (or wiping it with ``reset``)."""
        if reset and path.exists():
            shutil.rmtree(path)
        return cls(_open_shard(path, dimension), path, dimension)

    @classmethod
    def from_settings(cls, settings: Settings, dimension: int) -> QdrantEdgeIndex:
        return cls.open(settings.data_dir / "vectors" / settings.qdrant_collection, dimension)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def upsert(self, points: Sequence[VectorPoint]) -> None:
        import qdrant_edge as q

        for i in range(0, len(points), _UPSERT_BATCH):
            batch = [
                q.Point(p.id, _as_list(p.vector, self.dimension), p.payload())
                for p in points[i : i + _UPSERT_BATCH]
            ]
            await self._run(self._shard.update, q.UpdateOperation.upsert_points(batch))

    async def search(
        self,
        vector: Sequence[float],
        *,
        user_id: str,
        limit: int = 10,
        filters: IndexFilter | None = None,
    ) -> list[VectorHit]:
        import qdrant_edge as q

        flt = _edge_filter(_require_user(user_id), filters)
        query = q.Query.Nearest(_as_list(vector, self.dimension))

        async def fetch(n: int) -> list[VectorHit]:
            req = q.QueryRequest(
                limit=n,
                query=query,
                filter=flt,
                with_payload=True,
                params=q.SearchParams(hnsw_ef=_HNSW_EF),
            )
            found = await self._run(self._shard.query, req)
            return [VectorHit.from_payload(p.score, p.payload or {}) for p in found]

        return await _search_messages(fetch, limit)

    async def _delete_where(self, flt: Any) -> None:
        import qdrant_edge as q

        await self._run(self._shard.update, q.UpdateOperation.delete_points_by_filter(flt))

    async def delete_messages(self, user_id: str, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._delete_where(
                _edge_filter(_require_user(user_id), None, message_ids=message_ids)
            )

    async def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        await self._delete_where(
            _edge_filter(_require_user(user_id), IndexFilter(conversation_id=conversation_id))
        )

    async def delete_user(self, user_id: str) -> None:
        await self._delete_where(_edge_filter(_require_user(user_id), None))

    async def set_conversation_tags(
        self, user_id: str, conversation_id: str, tags: Sequence[str]
    ) -> None:
        import qdrant_edge as q

        flt = _edge_filter(_require_user(user_id), IndexFilter(conversation_id=conversation_id))
        op = q.UpdateOperation.set_payload_by_filter(flt, {"tags": list(tags)})
        await self._run(self._shard.update, op)

    async def count(self, user_id: str | None = None) -> int:
        import qdrant_edge as q

        flt = None if user_id is None else _edge_filter(_require_user(user_id), None)
        return int(await self._run(self._shard.count, q.CountRequest(exact=True, filter=flt)))

    async def reset(self) -> None:
        await self._run(self._shard.close)
        shutil.rmtree(self.path, ignore_errors=True)
        self._shard = await self._run(_open_shard, self.path, self.dimension)

    async def optimize(self) -> None:
        await self._run(self._shard.optimize)

    async def flush(self) -> None:
        await self._run(self._shard.flush)

    async def close(self) -> None:
        await self._run(self._shard.close)


def _open_shard(path: Path, dimension: int) -> Any:
    import qdrant_edge as q

    config = q.EdgeConfig(
        vectors=q.EdgeVectorParams(size=dimension, distance=q.Distance.Cosine),
        hnsw_config=q.HnswIndexConfig(
            m=0,
            payload_m=_HNSW_M,
            ef_construct=_HNSW_EF_CONSTRUCT,
            full_scan_threshold=_FULL_SCAN_KB,
        ),
    )
    try:
        if (path / "edge_config.json").exists():
            return q.EdgeShard.load(str(path), config)
        path.mkdir(parents=True, exist_ok=True)
        shard = q.EdgeShard.create(str(path), config)
    except Exception as exc:
        raise _edge_open_error(path, exc) from exc
    tenant = q.KeywordIndexParams(is_tenant=True)
    shard.update(q.UpdateOperation.create_field_index("user_id", tenant))
    for name in _KEYWORD_FIELDS:
        no_graph = q.KeywordIndexParams(enable_hnsw=False)
        shard.update(q.UpdateOperation.create_field_index(name, no_graph))
    no_graph_f = q.FloatIndexParams(enable_hnsw=False)
    shard.update(q.UpdateOperation.create_field_index("created_at", no_graph_f))
    return shard


def _edge_open_error(path: Path, exc: Exception) -> PACoreError:
    text = str(exc)
    if "WouldBlock" in text:
        return ConflictError(
            f"the embedded vector index at {path} is open in another process; stop it, or "
            "use a Qdrant server (qdrant_url)",
            code="vector_index_locked",
        )
    if "ncompatible" in text:
        return PACoreError(
            f"the embedded vector index at {path} was built for another embedding model; "
            "rebuild it with `pacore memory reindex --recreate`",
            code="vector_index_incompatible",
        )
    return PACoreError(f"cannot open the embedded vector index at {path}: {text}")


def _edge_filter(
    user_id: str, f: IndexFilter | None, *, message_ids: Sequence[str] | None = None
) -> Any:
    import qdrant_edge as q

    must: list[Any] = [q.FieldCondition("user_id", match=q.MatchValue(user_id))]
    must_not: list[Any] = []
    if message_ids is not None:
        must.append(q.FieldCondition("message_id", match=q.MatchAny(list(message_ids))))
    if f is not None:
        for key, value in _equalities(f):
            must.append(q.FieldCondition(key, match=q.MatchValue(value)))
        if f.tags:
            must.append(q.FieldCondition("tags", match=q.MatchAny(list(f.tags))))
        if f.since is not None or f.until is not None:
            must.append(
                q.FieldCondition("created_at", range=q.RangeFloat(gte=f.since, lte=f.until))
            )
        if f.exclude_message_ids:
            ids = sorted(f.exclude_message_ids)
            must_not.append(q.FieldCondition("message_id", match=q.MatchAny(ids)))
    return q.Filter(must=must, must_not=must_not or None)


def _equalities(f: IndexFilter) -> list[tuple[str, str]]:
    pairs = (("conversation_id", f.conversation_id), ("provider", f.provider), ("role", f.role))
    return [(k, v) for k, v in pairs if v is not None]


def _as_list(vector: Sequence[float], dimension: int) -> list[float]:
    values = vector.tolist() if hasattr(vector, "tolist") else list(vector)
    if len(values) != dimension:
        raise BadRequestError(
            f"vector has {len(values)} dimensions, the index has {dimension}", param="vector"
        )
    return values


# ---------------------------------------------------------------------------- qdrant server


class QdrantServerIndex:
    """A collection on a Qdrant server (or in qdrant-client's local mode, for tests)."""

    def __init__(self, client: AsyncQdrantClient, collection: str, dimension: int) -> None:
        self._client = client
        self.collection = collection
        self.dimension = dimension

    @classmethod
    async def create(
        cls, client: AsyncQdrantClient, collection: str, dimension: int, *, reset: bool = False
    ) -> QdrantServerIndex:
        """The index over ``collection``, creating it and its payload indexes when missing
        (dropping it first with ``reset``)."""
        index = cls(client, collection, dimension)
        if reset:
            await client.delete_collection(collection)
        await index._ensure()
        return index

    @classmethod
    async def from_settings(
        cls, settings: Settings, dimension: int, *, reset: bool = False
    ) -> QdrantServerIndex:
        from qdrant_client import AsyncQdrantClient

        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        client = AsyncQdrantClient(url=settings.qdrant_url, api_key=key)
        return await cls.create(client, settings.qdrant_collection, dimension, reset=reset)

    async def _ensure(self) -> None:
        from qdrant_client import models as m

        if await self._client.collection_exists(self.collection):
            info = await self._client.get_collection(self.collection)
            vectors = info.config.params.vectors
            size = getattr(vectors, "size", None)
            if size is not None and size != self.dimension:
                raise PACoreError(
                    f"Qdrant collection '{self.collection}' holds {size}-d vectors, the "
                    f"embedder makes {self.dimension}-d; run `pacore memory reindex --recreate`",
                    code="vector_index_incompatible",
                )
            return
        await self._client.create_collection(
            self.collection,
            vectors_config=m.VectorParams(size=self.dimension, distance=m.Distance.COSINE),
            hnsw_config=m.HnswConfigDiff(
                m=0,
                payload_m=_HNSW_M,
                ef_construct=_HNSW_EF_CONSTRUCT,
                full_scan_threshold=_FULL_SCAN_KB,
            ),
        )
        keyword, number = m.KeywordIndexType.KEYWORD, m.FloatIndexType.FLOAT
        indexes: list[tuple[str, Any]] = [
            ("user_id", m.KeywordIndexParams(type=keyword, is_tenant=True)),
            *((f, m.KeywordIndexParams(type=keyword, enable_hnsw=False)) for f in _KEYWORD_FIELDS),
            ("created_at", m.FloatIndexParams(type=number, enable_hnsw=False)),
        ]
        for name, schema in indexes:
            await self._client.create_payload_index(self.collection, name, schema)

    async def upsert(self, points: Sequence[VectorPoint]) -> None:
        from qdrant_client import models as m

        for i in range(0, len(points), _UPSERT_BATCH):
            batch = [
                m.PointStruct(
                    id=p.id, vector=_as_list(p.vector, self.dimension), payload=p.payload()
                )
                for p in points[i : i + _UPSERT_BATCH]
            ]
            await self._client.upsert(self.collection, points=batch, wait=True)

    async def search(
        self,
        vector: Sequence[float],
        *,
        user_id: str,
        limit: int = 10,
        filters: IndexFilter | None = None,
    ) -> list[VectorHit]:
        from qdrant_client import models as m

        flt = _client_filter(_require_user(user_id), filters)
        query = _as_list(vector, self.dimension)
        search_params = m.SearchParams(hnsw_ef=_HNSW_EF)

        async def fetch(n: int) -> list[VectorHit]:
            res = await self._client.query_points(
                self.collection,
                query=query,
                query_filter=flt,
                limit=n,
                with_payload=True,
                search_params=search_params,
            )
            return [VectorHit.from_payload(p.score, p.payload or {}) for p in res.points]

        return await _search_messages(fetch, limit)

    async def _delete_where(self, flt: Any) -> None:
        from qdrant_client import models as m

        await self._client.delete(self.collection, m.FilterSelector(filter=flt), wait=True)

    async def delete_messages(self, user_id: str, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._delete_where(
                _client_filter(_require_user(user_id), None, message_ids=message_ids)
            )

    async def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        await self._delete_where(
            _client_filter(_require_user(user_id), IndexFilter(conversation_id=conversation_id))
        )

    async def delete_user(self, user_id: str) -> None:
        await self._delete_where(_client_filter(_require_user(user_id), None))

    async def set_conversation_tags(
        self, user_id: str, conversation_id: str, tags: Sequence[str]
    ) -> None:
        from qdrant_client import models as m

        flt = _client_filter(_require_user(user_id), IndexFilter(conversation_id=conversation_id))
        await self._client.set_payload(
            self.collection, {"tags": list(tags)}, points=m.FilterSelector(filter=flt), wait=True
        )

    async def count(self, user_id: str | None = None) -> int:
        flt = None if user_id is None else _client_filter(_require_user(user_id), None)
        res = await self._client.count(self.collection, count_filter=flt, exact=True)
        return int(res.count)

    async def reset(self) -> None:
        await self._client.delete_collection(self.collection)
        await self._ensure()

    async def optimize(self) -> None:
        """Nothing to do: a Qdrant server runs its optimisers itself."""

    async def close(self) -> None:
        await self._client.close()


def _client_filter(
    user_id: str, f: IndexFilter | None, *, message_ids: Sequence[str] | None = None
) -> Any:
    from qdrant_client import models as m

    must: list[Any] = [m.FieldCondition(key="user_id", match=m.MatchValue(value=user_id))]
    must_not: list[Any] = []
    if message_ids is not None:
        must.append(m.FieldCondition(key="message_id", match=m.MatchAny(any=list(message_ids))))
    if f is not None:
        for key, value in _equalities(f):
            must.append(m.FieldCondition(key=key, match=m.MatchValue(value=value)))
        if f.tags:
            must.append(m.FieldCondition(key="tags", match=m.MatchAny(any=list(f.tags))))
        if f.since is not None or f.until is not None:
            must.append(m.FieldCondition(key="created_at", range=m.Range(gte=f.since, lte=f.until)))
        if f.exclude_message_ids:
            ids = sorted(f.exclude_message_ids)
            must_not.append(m.FieldCondition(key="message_id", match=m.MatchAny(any=ids)))
    return m.Filter(must=must, must_not=must_not or None)


# ---------------------------------------------------------------------------- choice


async def open_index(settings: Settings, dimension: int, *, reset: bool = False) -> VectorIndex:
    """The index the settings name: a Qdrant server when ``qdrant_url`` is set, else embedded."""
    if settings.qdrant_url:
        return await QdrantServerIndex.from_settings(settings, dimension, reset=reset)
    if not settings.embedded:
        from pacore.errors import ConfigurationError

        raise ConfigurationError(
            "production mode needs PACORE_QDRANT_URL (a Qdrant server): the embedded vector "
            "index belongs to one process on one machine"
        )
    path = settings.data_dir / "vectors" / settings.qdrant_collection
    return await asyncio.to_thread(QdrantEdgeIndex.open, path, dimension, reset=reset)
