"""Both vector indexes (qdrant-edge, and qdrant-client in its local mode) through one protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient

from pacore.errors import BadRequestError, ConflictError, PACoreError
from pacore.memory.vector import (
    CONTENT_CHARS,
    IndexFilter,
    QdrantEdgeIndex,
    QdrantServerIndex,
    VectorIndex,
    VectorPoint,
    point_id,
)

# qdrant-client's local mode says payload indexes and search params do nothing there.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*local Qdrant:UserWarning", "ignore:Local mode:UserWarning"
)

DIM = 16


def unit(*hot: int, noise: int = 0) -> list[float]:
    """A unit vector pointing mostly along the given axes."""
    v = np.zeros(DIM, dtype=np.float32)
    v[list(hot)] = 1.0
    if noise:
        v += np.random.default_rng(noise).normal(0, 0.05, DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def point(
    message_id: str,
    vector: list[float],
    *,
    user: str = "alice",
    conversation: str = "c1",
    chunk: int = 0,
    role: str = "user",
    provider: str | None = "openai",
    created_at: float = 1000.0,
    tags: tuple[str, ...] = (),
    content: str = "",
) -> VectorPoint:
    return VectorPoint(
        message_id=message_id,
        chunk=chunk,
        vector=vector,
        user_id=user,
        conversation_id=conversation,
        role=role,
        provider=provider,
        created_at=created_at,
        tags=tags,
        content=content or f"text of {message_id}",
    )


@pytest.fixture(params=["edge", "qdrant-client-local"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorIndex]:
    if request.param == "edge":
        idx: VectorIndex = QdrantEdgeIndex.open(tmp_path / "vectors", DIM)
    else:
        idx = await QdrantServerIndex.create(AsyncQdrantClient(location=":memory:"), "t", DIM)
    yield idx
    await idx.close()


async def test_nearest_first_with_scores(index: VectorIndex) -> None:
    await index.upsert([point("a", unit(0)), point("b", unit(1)), point("c", unit(0, 1))])
    hits = await index.search(unit(0), user_id="alice", limit=3)
    assert [h.message_id for h in hits] == ["a", "c", "b"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score > hits[1].score > hits[2].score
    assert hits[0].conversation_id == "c1" and hits[0].provider == "openai"
    assert hits[0].content == "text of a"


async def test_one_hit_per_message_from_its_best_chunk(index: VectorIndex) -> None:
    await index.upsert(
        [
            point("long", unit(2), chunk=0, content="start"),
            point("long", unit(0), chunk=1, content="middle"),
            point("long", unit(0, 3), chunk=2, content="end"),
            point("other", unit(0, 5)),
        ]
    )
    hits = await index.search(unit(0), user_id="alice", limit=5)
    assert [h.message_id for h in hits] == ["long", "other"]
    assert hits[0].chunk == 1 and hits[0].content == "middle"
    assert await index.count("alice") == 4


async def test_limit_counts_messages_not_chunks(index: VectorIndex) -> None:
    many_chunks = [point("big", unit(0, noise=i), chunk=i) for i in range(30)]
    await index.upsert([*many_chunks, point("x", unit(0, 1)), point("y", unit(0, 2))])
    hits = await index.search(unit(0), user_id="alice", limit=3)
    assert hits[0].message_id == "big"
    assert {h.message_id for h in hits} == {"big", "x", "y"}


async def test_reindexing_is_idempotent(index: VectorIndex) -> None:
    pts = [point("a", unit(0)), point("a", unit(1), chunk=1), point("b", unit(2))]
    await index.upsert(pts)
    await index.upsert(pts)
    assert await index.count() == 3
    assert point_id("a", 0) == point_id("a", 0) != point_id("a", 1)


async def test_search_needs_a_user(index: VectorIndex) -> None:
    await index.upsert([point("a", unit(0))])
    for bad in ("", None):
        with pytest.raises(BadRequestError):
            await index.search(unit(0), user_id=bad, limit=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await index.search(unit(0), limit=1)  # type: ignore[call-arg]


async def test_users_never_see_each_other(index: VectorIndex) -> None:
    await index.upsert([point("a1", unit(0), user="alice"), point("b1", unit(0), user="bob")])
    assert [h.message_id for h in await index.search(unit(0), user_id="alice")] == ["a1"]
    assert [h.message_id for h in await index.search(unit(0), user_id="bob")] == ["b1"]
    assert await index.search(unit(0), user_id="carol") == []
    await index.delete_user("bob")
    assert await index.count("bob") == 0 and await index.count("alice") == 1


async def test_filters(index: VectorIndex) -> None:
    await index.upsert(
        [
            point(
                "m1",
                unit(0),
                conversation="c1",
                role="user",
                provider="openai",
                created_at=100,
                tags=("work",),
            ),
            point(
                "m2",
                unit(0, noise=1),
                conversation="c1",
                role="assistant",
                provider="openai",
                created_at=200,
            ),
            point(
                "m3",
                unit(0, noise=2),
                conversation="c2",
                role="assistant",
                provider="anthropic",
                created_at=300,
                tags=("home", "work"),
            ),
            point(
                "m4",
                unit(0, noise=3),
                conversation="c3",
                role="user",
                provider=None,
                created_at=400,
                tags=("home",),
            ),
        ]
    )

    async def ids(**kw: object) -> set[str]:
        hits = await index.search(unit(0), user_id="alice", limit=10, filters=IndexFilter(**kw))  # type: ignore[arg-type]
        return {h.message_id for h in hits}

    assert await ids() == {"m1", "m2", "m3", "m4"}
    assert await ids(conversation_id="c1") == {"m1", "m2"}
    assert await ids(provider="anthropic") == {"m3"}
    assert await ids(role="assistant") == {"m2", "m3"}
    assert await ids(tags=["work"]) == {"m1", "m3"}
    assert await ids(tags=["home", "nothing"]) == {"m3", "m4"}
    assert await ids(since=200) == {"m2", "m3", "m4"}
    assert await ids(until=200) == {"m1", "m2"}
    assert await ids(since=150, until=350) == {"m2", "m3"}
    assert await ids(role="assistant", provider="openai", since=150) == {"m2"}
    assert await ids(exclude_message_ids=frozenset({"m1", "m4"})) == {"m2", "m3"}


async def test_deletes_are_scoped(index: VectorIndex) -> None:
    await index.upsert(
        [
            point("a", unit(0), conversation="c1"),
            point("a", unit(1), conversation="c1", chunk=1),
            point("b", unit(0), conversation="c2"),
            point("c", unit(0), conversation="c2"),
            point("z", unit(0), conversation="c2", user="bob"),
        ]
    )
    await index.delete_messages("alice", ["a", "z"])  # bob's "z" is not alice's to delete
    assert await index.count("alice") == 2 and await index.count("bob") == 1
    await index.delete_conversation("bob", "c2")
    assert await index.count("alice") == 2 and await index.count("bob") == 0
    await index.delete_conversation("alice", "c2")
    assert await index.count("alice") == 0


async def test_conversation_tags_can_change(index: VectorIndex) -> None:
    await index.upsert([point("a", unit(0), tags=("old",)), point("b", unit(0), conversation="c2")])
    await index.set_conversation_tags("alice", "c1", ["new", "shiny"])
    found = await index.search(unit(0), user_id="alice", filters=IndexFilter(tags=["new"]))
    assert [h.message_id for h in found] == ["a"]
    assert await index.search(unit(0), user_id="alice", filters=IndexFilter(tags=["old"])) == []


async def test_reset_empties_the_index(index: VectorIndex) -> None:
    await index.upsert([point("a", unit(0)), point("b", unit(1), user="bob")])
    await index.reset()
    assert await index.count() == 0
    await index.upsert([point("c", unit(2))])
    assert [h.message_id for h in await index.search(unit(2), user_id="alice")] == ["c"]


async def test_content_is_truncated_and_dimension_checked(index: VectorIndex) -> None:
    await index.upsert([point("a", unit(0), content="x" * 5000)])
    [hit] = await index.search(unit(0), user_id="alice")
    assert len(hit.content) == CONTENT_CHARS
    with pytest.raises(BadRequestError):
        await index.upsert([point("b", [1.0, 0.0])])
    with pytest.raises(BadRequestError):
        await index.search([1.0, 0.0], user_id="alice")


async def test_optimize_keeps_the_answers(index: VectorIndex) -> None:
    await index.upsert([point(f"m{i}", unit(i % DIM, noise=i + 1)) for i in range(64)])
    before = [h.message_id for h in await index.search(unit(3), user_id="alice", limit=5)]
    await index.optimize()
    after = [h.message_id for h in await index.search(unit(3), user_id="alice", limit=5)]
    assert before == after


# ---------------------------------------------------------------------- edge specifics


async def test_edge_index_persists_across_reopen(tmp_path: Path) -> None:
    idx = QdrantEdgeIndex.open(tmp_path / "v", DIM)
    await idx.upsert([point("a", unit(0)), point("b", unit(1))])
    await idx.close()
    again = QdrantEdgeIndex.open(tmp_path / "v", DIM)
    assert await again.count() == 2
    assert [h.message_id for h in await again.search(unit(1), user_id="alice", limit=1)] == ["b"]
    await again.close()


async def test_edge_index_belongs_to_one_owner(tmp_path: Path) -> None:
    idx = QdrantEdgeIndex.open(tmp_path / "v", DIM)
    with pytest.raises(ConflictError) as err:
        QdrantEdgeIndex.open(tmp_path / "v", DIM)
    assert err.value.code == "vector_index_locked"
    await idx.close()


async def test_edge_index_of_another_dimension_says_to_rebuild(tmp_path: Path) -> None:
    idx = QdrantEdgeIndex.open(tmp_path / "v", DIM)
    await idx.close()
    with pytest.raises(PACoreError) as err:
        QdrantEdgeIndex.open(tmp_path / "v", DIM * 2)
    assert err.value.code == "vector_index_incompatible"
    rebuilt = QdrantEdgeIndex.open(tmp_path / "v", DIM * 2, reset=True)
    assert await rebuilt.count() == 0
    await rebuilt.close()


async def test_server_collection_of_another_dimension_says_to_rebuild() -> None:
    client = AsyncQdrantClient(location=":memory:")
    await QdrantServerIndex.create(client, "t", DIM)
    with pytest.raises(PACoreError) as err:
        await QdrantServerIndex.create(client, "t", DIM * 2)
    assert err.value.code == "vector_index_incompatible"
    rebuilt = await QdrantServerIndex.create(client, "t", DIM * 2, reset=True)
    assert rebuilt.dimension == DIM * 2
    await client.close()
