"""MemoryManager end to end: the real model, real indexes (both), SQLite through the migrations."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import AsyncQdrantClient

from deployments.memory import MemoryDeployment
from pacore.config import Settings
from pacore.db.engine import Database
from pacore.db.migrate import upgrade
from pacore.db.stores.conversations import ConversationStore
from pacore.db.stores.records import MessageRecord
from pacore.db.stores.users import UserStore
from pacore.errors import BadRequestError, ConflictError, NotFoundError
from pacore.memory import manager as manager_module
from pacore.memory.embedder import Embedder
from pacore.memory.manager import MemoryManager
from pacore.memory.vector import QdrantEdgeIndex, QdrantServerIndex, VectorIndex
from pacore.protocol import MemorySearchFilters
from pacore.types import Message, Usage

# qdrant-client's local mode says payload indexes and search params do nothing there.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*local Qdrant:UserWarning", "ignore:Local mode:UserWarning"
)

SORTED_ANSWER = (
    "Use the built-in sorted() function: sorted(items) returns a new list in ascending order, "
    "and items.sort() orders the list in place. Pass reverse=True for descending order."
)
DISTRACTORS = [
    # Shares "python", "list" and "sort" with the question, but not its meaning.
    "My pet python escaped again; here is a list of the sort of places it likes to hide: "
    "behind the fridge, under the sofa, inside warm cupboards.",
    "The best way to brew coffee is a pour-over with freshly ground beans at 94 degrees.",
    "Our quarterly sales numbers rose by twelve percent compared to last year.",
    "Remember to water the tomato plants every morning during the summer heat.",
]


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(device="cpu")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'pacore.db'}"
    upgrade(url)
    database = Database(url)
    yield database
    await database.dispose()


@dataclass
class Users:
    alice: str
    bob: str


@pytest.fixture
async def users(db: Database) -> Users:
    store = UserStore(db)
    alice = await store.create("alice@example.com", "correct horse battery")
    bob = await store.create("bob@example.com", "staple battery horse")
    return Users(alice.id, bob.id)


@pytest.fixture(params=["edge", "qdrant-client-local"])
async def index(
    request: pytest.FixtureRequest, tmp_path: Path, embedder: Embedder
) -> AsyncIterator[VectorIndex]:
    if request.param == "edge":
        idx: VectorIndex = QdrantEdgeIndex.open(tmp_path / "vectors", embedder.dimension)
    else:
        client = AsyncQdrantClient(location=":memory:")
        idx = await QdrantServerIndex.create(client, "messages", embedder.dimension)
    yield idx
    await idx.close()


def settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def memory(
    db: Database, index: VectorIndex, embedder: Embedder, tmp_path: Path
) -> AsyncIterator[MemoryManager]:
    manager = MemoryManager(ConversationStore(db), index, embedder, settings(tmp_path))
    yield manager
    await manager.flush()


def turn(question: str, answer: str) -> list[Message]:
    return [Message(role="user", content=question), Message(role="assistant", content=answer)]


async def seed(memory: MemoryManager, user_id: str) -> str:
    """The sorted() answer among distractors; returns the answer's message id."""
    _, ids = await memory.store_turn(
        user_id, None, turn("What's the way to order items?", SORTED_ANSWER), provider="openai"
    )
    for text in DISTRACTORS:
        await memory.store_turn(user_id, None, turn("Tell me something.", text), provider="ollama")
    await memory.flush()
    return ids[1]


# ---------------------------------------------------------------------- search


async def test_search_finds_meaning_not_shared_words(memory: MemoryManager, users: Users) -> None:
    answer_id = await seed(memory, users.alice)
    results = await memory.search(
        users.alice,
        "how do I sort a list in python",
        limit=3,
        filters=MemorySearchFilters(role="assistant"),
    )
    assert results[0].message_id == answer_id
    assert results[0].content == SORTED_ANSWER
    assert results[0].provider == "openai" and results[0].role == "assistant"
    python_pet = next(r for r in results if r.content.startswith("My pet python"))
    assert results[0].score > python_pet.score


async def test_users_are_isolated(memory: MemoryManager, users: Users) -> None:
    await seed(memory, users.alice)
    assert await memory.search(users.bob, "how do I sort a list in python") == []
    await memory.store_turn(users.bob, None, turn("sorting?", "Bob's own note on sorting lists."))
    await memory.flush()
    found = await memory.search(users.bob, "how do I sort a list in python", limit=10)
    assert {r.content for r in found} <= {"sorting?", "Bob's own note on sorting lists."}
    context = await memory.context_for(users.bob, [Message(role="user", content="sort a list")])
    assert SORTED_ANSWER not in (context.system_text or "")
    with pytest.raises(BadRequestError):
        await memory.search("", "anything")


async def test_filters(memory: MemoryManager, users: Users) -> None:
    u = users.alice
    c1, _ = await memory.store_turn(
        u, None, turn("python sorting question", "use sorted()"), provider="openai", tags=["code"]
    )
    await memory.flush()
    boundary = datetime.now(UTC)
    await asyncio.sleep(0.05)
    c2, _ = await memory.store_turn(
        u,
        None,
        turn("python sorting again", "list.sort() works"),
        provider="anthropic",
        tags=["work"],
    )
    await memory.flush()

    async def contents(**kw: object) -> set[str]:
        flt = MemorySearchFilters(**kw)  # type: ignore[arg-type]
        return {r.content for r in await memory.search(u, "sorting in python", 10, flt)}

    assert await contents(conversation_id=c1) == {"python sorting question", "use sorted()"}
    assert await contents(provider="anthropic") == {"python sorting again", "list.sort() works"}
    assert await contents(tags=["code"]) == {"python sorting question", "use sorted()"}
    assert await contents(role="assistant") == {"use sorted()", "list.sort() works"}
    assert await contents(since=boundary) == {"python sorting again", "list.sort() works"}
    assert await contents(until=boundary) == {"python sorting question", "use sorted()"}
    assert await contents(role="user", provider="anthropic", since=boundary) == {
        "python sorting again"
    }
    assert await contents(conversation_id=c2, provider="openai") == set()


async def test_tag_changes_reach_the_index(memory: MemoryManager, users: Users) -> None:
    cid, _ = await memory.store_turn(users.alice, None, turn("trip to Lisbon", "pack sunscreen"))
    record = await memory.set_tags(users.alice, cid, ["travel"])  # before indexing finished
    assert record.tags == ["travel"]
    found = await memory.search(
        users.alice, "holiday packing", 10, MemorySearchFilters(tags=["travel"])
    )
    assert {r.content for r in found} == {"trip to Lisbon", "pack sunscreen"}
    listed, _ = await memory.list_conversations(users.alice, tag="travel")
    assert [c.id for c in listed] == [cid]


async def test_long_text_is_chunked_and_still_found(
    memory: MemoryManager, users: Users, index: VectorIndex, embedder: Embedder
) -> None:
    filler = " ".join(
        f"Section {i} of the handbook describes office procedures, desk booking and printers."
        for i in range(120)
    )
    secret = "The launch code for project Bluebird is tangerine-42, kept by the night shift."
    long_text = f"{filler} {secret} {filler}"
    assert len(embedder.chunk(long_text)) > 3
    _, [mid] = await memory.store_turn(users.alice, None, [Message(role="user", content=long_text)])
    await memory.flush()
    assert await index.count(users.alice) == len(embedder.chunk(long_text))
    [hit] = await memory.search(users.alice, "what is the launch code of project Bluebird", 1)
    assert hit.message_id == mid and hit.content == long_text


# ---------------------------------------------------------------------- writing


async def test_store_turn_returns_ids_and_records_usage(
    memory: MemoryManager, users: Users
) -> None:
    cid, ids = await memory.store_turn(
        users.alice,
        None,
        turn("hello", "hi there"),
        provider="anthropic",
        model="claude-x",
        usage=Usage.of(12, 3),
        latency_ms=42.0,
        tags=["greeting"],
    )
    conv = await memory.get_conversation(users.alice, cid)
    assert [m.id for m in conv.messages or []] == ids
    user_msg, answer = conv.messages or []
    assert answer.model == "claude-x" and answer.completion_tokens == 3 and answer.latency_ms == 42
    assert user_msg.provider == answer.provider == "anthropic"
    assert conv.tags == ["greeting"]
    with pytest.raises(NotFoundError):
        await memory.store_turn(users.bob, cid, turn("sneaky", "no"))


async def test_resent_history_is_not_stored_twice(memory: MemoryManager, users: Users) -> None:
    first = turn("what is 2+2?", "4")
    cid, _ = await memory.store_turn(users.alice, None, first)
    again = [*first, *turn("and 3+3?", "6")]
    _, ids = await memory.store_turn(users.alice, cid, again)
    conv = await memory.get_conversation(users.alice, cid)
    assert [m.content for m in conv.messages or []] == ["what is 2+2?", "4", "and 3+3?", "6"]
    assert len(ids) == 2


async def test_concurrent_turns_lose_nothing(
    memory: MemoryManager, users: Users, index: VectorIndex
) -> None:
    shared, _ = await memory.store_turn(users.alice, None, turn("start", "ok"))
    jobs = [
        memory.store_turn(
            users.alice, shared if i % 2 else None, turn(f"question {i}", f"answer {i}")
        )
        for i in range(16)
    ]
    results = await asyncio.gather(*jobs)
    await memory.flush()
    ids = [mid for _, mids in results for mid in mids]
    assert len(ids) == len(set(ids)) == 32
    conv = await memory.get_conversation(users.alice, shared)
    assert conv.message_count == 2 + 16
    assert await index.count(users.alice) == 34
    hits = await memory.search(users.alice, "answer 7", 34)
    assert {h.message_id for h in hits} >= set(ids)


async def test_indexing_is_off_the_callers_path_and_retried(
    db: Database,
    index: VectorIndex,
    embedder: Embedder,
    users: Users,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manager_module, "_INDEX_BACKOFF_S", 0.01)
    failures = 2

    async def flaky(texts: list[str]) -> list[list[list[float]]]:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("embedder replica restarting")
        return await embedder.embed_documents(texts)

    memory = MemoryManager(ConversationStore(db), index, flaky, settings(tmp_path))
    cid, ids = await memory.store_turn(
        users.alice, None, turn("How do I sort a list in python?", SORTED_ANSWER)
    )
    # Stored and readable at once; the vectors follow.
    assert [m.id for m in (await memory.get_conversation(users.alice, cid)).messages or []] == ids
    await memory.flush()
    assert failures == 0 and await index.count(users.alice) == 2
    [top] = await memory.search(
        users.alice, "sorting python lists", 1, MemorySearchFilters(role="assistant")
    )
    assert top.message_id == ids[1]


async def test_an_embedder_that_stays_down_loses_no_turn(
    db: Database,
    index: VectorIndex,
    embedder: Embedder,
    users: Users,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manager_module, "_INDEX_BACKOFF_S", 0.01)

    async def down(texts: list[str]) -> list[list[list[float]]]:
        raise ConnectionError("no embedder")

    broken = MemoryManager(ConversationStore(db), index, down, settings(tmp_path))
    _, ids = await broken.store_turn(users.alice, None, turn("remember the milk", "noted"))
    await broken.flush()
    assert await index.count(users.alice) == 0
    healed = MemoryManager(ConversationStore(db), index, embedder, settings(tmp_path))
    assert await healed.reindex(users.alice) == 2
    found = await healed.search(users.alice, "groceries to buy", 2)
    assert {r.message_id for r in found} == set(ids)


# ---------------------------------------------------------------------- lifecycle


async def test_deleting_a_conversation_removes_its_vectors(
    memory: MemoryManager, users: Users, index: VectorIndex
) -> None:
    keep, _ = await memory.store_turn(users.alice, None, turn("keep me", "kept"))
    gone, gone_ids = await memory.store_turn(users.alice, None, turn("delete me", "deleted"))
    await memory.flush()
    assert await index.count(users.alice) == 4
    with pytest.raises(NotFoundError):
        await memory.delete_conversation(users.bob, gone)
    assert sorted(await memory.delete_conversation(users.alice, gone)) == sorted(gone_ids)
    assert await index.count(users.alice) == 2
    found = await memory.search(users.alice, "delete me", 10)
    assert {r.conversation_id for r in found} == {keep}
    with pytest.raises(NotFoundError):
        await memory.get_conversation(users.alice, gone)


async def test_reindex_after_wiping_restores_search(
    memory: MemoryManager, users: Users, index: VectorIndex
) -> None:
    answer_id = await seed(memory, users.alice)
    await memory.store_turn(users.bob, None, turn("bob", "bob's answer"))
    await memory.flush()
    before = await index.count()
    await index.reset()
    assert await memory.search(users.alice, "how do I sort a list in python") == []
    seen: list[int] = []
    done = await memory.reindex(progress=seen.append, batch=4)
    assert done == 12 and seen[-1] == 12 and seen == sorted(seen)
    assert await index.count() == before
    [top] = await memory.search(
        users.alice, "how do I sort a list in python", 1, MemorySearchFilters(role="assistant")
    )
    assert top.message_id == answer_id
    assert await memory.reindex(users.bob) == 2
    assert await index.count() == before


# ---------------------------------------------------------------------- context


async def test_context_respects_top_k_score_and_budget(
    db: Database, index: VectorIndex, embedder: Embedder, users: Users, tmp_path: Path
) -> None:
    def manager(**kw: object) -> MemoryManager:
        return MemoryManager(ConversationStore(db), index, embedder, settings(tmp_path, **kw))

    writer = manager()
    for i in range(6):
        await writer.store_turn(
            users.alice,
            None,
            turn(f"python sorting tip {i}?", f"Tip {i}: sorted(xs, key=len) " * 4),
        )
    await writer.store_turn(users.alice, None, turn("weather?", "It will rain in Oslo tomorrow."))
    await writer.flush()
    query = [Message(role="user", content="how do I sort a list in python")]

    ctx = await manager(memory_top_k=3, memory_min_score=0.3).context_for(users.alice, query)
    assert ctx.system_text is not None and len(ctx.refs) == 3
    assert all(score >= 0.3 for _, score in ctx.refs)
    assert "Oslo" not in ctx.system_text
    assert [s for _, s in ctx.refs] == sorted((s for _, s in ctx.refs), reverse=True)

    tight = await manager(memory_top_k=6, memory_token_budget=60).context_for(users.alice, query)
    assert tight.system_text is not None and 1 <= len(tight.refs) < 6
    assert embedder.count_tokens(tight.system_text) <= 60

    store = ConversationStore(db)
    read: list[list[str]] = []
    read_messages = store.messages_by_ids

    async def recording(user_id: str, ids: Sequence[str]) -> dict[str, MessageRecord]:
        read.append(list(ids))
        return await read_messages(user_id, ids)

    store.messages_by_ids = recording  # type: ignore[method-assign]
    strict = MemoryManager(store, index, embedder, settings(tmp_path, memory_min_score=0.99))
    none = await strict.context_for(users.alice, query)
    assert none == (None, [])
    assert read == []  # nothing scored high enough: no message is read from SQL
    picky = MemoryManager(store, index, embedder, settings(tmp_path, memory_min_score=0.3,
                                                           memory_top_k=3))
    assert len((await picky.context_for(users.alice, query)).refs) == 3
    assert 3 <= len(read[-1]) <= 6  # at most the top_k * 2 hits, and only those scoring 0.3+
    off = await manager(memory_top_k=0).context_for(users.alice, query)
    assert off == (None, [])


async def test_context_leaves_out_what_the_prompt_already_holds(
    memory: MemoryManager, users: Users
) -> None:
    cid, [q_id, a_id] = await memory.store_turn(
        users.alice, None, turn("How do I sort a list in python?", SORTED_ANSWER)
    )
    _, [_, other_id] = await memory.store_turn(
        users.alice, None, turn("Ordering lists?", "In Python, list.sort(key=...) sorts in place.")
    )
    await memory.flush()
    prompt = [
        Message(role="user", content="How do I sort a list in python?"),
        Message(role="assistant", content=SORTED_ANSWER),
        Message(role="user", content="And how do I sort a list in python by length?"),
    ]
    ctx = await memory.context_for(users.alice, prompt, cid)
    ids = [mid for mid, _ in ctx.refs]
    assert q_id not in ids and a_id not in ids
    assert other_id in ids
    # Given the query's vector, the manager does not embed the query again and agrees.
    [vector] = await memory._embedder.embed_queries([prompt[-1].text()])
    again = await memory.context_for(users.alice, prompt, cid, vector=vector)
    assert [m for m, _ in again.refs] == ids


async def test_a_conversation_can_start_under_the_callers_id(
    memory: MemoryManager, users: Users
) -> None:
    chosen = str(uuid.uuid4())
    cid, ids = await memory.store_turn(
        users.alice, chosen, turn("first words", "hello"), tags=["new"], new=True
    )
    assert cid == chosen and len(ids) == 2
    conv = await memory.get_conversation(users.alice, chosen)
    assert conv.tags == ["new"] and conv.title == "first words"
    with pytest.raises(ConflictError):
        await memory.store_turn(users.bob, chosen, turn("taking it", "no"), new=True)
    again, _ = await memory.store_turn(users.alice, chosen, turn("again", "yes"), tags=["more"])
    assert again == chosen
    await memory.flush()
    found = await memory.search(users.alice, "again", 10, MemorySearchFilters(tags=["more"]))
    assert {r.content for r in found} == {"first words", "hello", "again", "yes"}


# ---------------------------------------------------------------------- the deployment


async def test_memory_deployment_serves_the_manager(
    tmp_path: Path, embedder: Embedder, users: Users, db: Database
) -> None:
    raw = {"data_dir": str(tmp_path), "database_url": db.url}
    dep = MemoryDeployment(raw, embedder=embedder)
    await dep.ping()
    cid = str(uuid.uuid4())
    await dep.store_turn(
        users.alice,
        cid,
        turn("How do I sort a list in python?", SORTED_ANSWER),
        provider="openai",
        model="m",
        usage=Usage.of(1, 2),
        latency_ms=3.0,
        tags=None,
        new=True,
    )
    await dep.flush()
    [hit] = await dep.search(
        users.alice, "sorting lists in python", 1, MemorySearchFilters(role="assistant")
    )
    assert hit.content == SORTED_ANSWER
    vector = await dep.embed_query("ordering a python list")
    text, refs = await dep.context_for_vector(
        users.alice, vector, [Message(role="user", content="ordering a python list")], None
    )
    assert text is not None and hit.message_id in [m for m, _ in refs]
    listed, _ = await dep.list_conversations(users.alice)
    assert [c.id for c in listed] == [cid]
    assert await dep.reindex(users.alice) == 2
    await dep.delete_conversation(users.alice, cid)
    assert await dep.search(users.alice, "sorting lists in python") == []
    await dep.__del__()  # what Serve awaits on shutdown: the embedded index is released
    again = QdrantEdgeIndex.open(tmp_path / "vectors" / Settings().qdrant_collection, 384)
    assert await again.count() == 0
    await again.close()


def test_memory_deployment_options() -> None:
    embedded = MemoryDeployment.options_for(Settings())
    assert embedded["num_replicas"] == 1 and "autoscaling_config" not in embedded
    assert 0 < embedded["ray_actor_options"]["num_cpus"] < 1
    served = MemoryDeployment.options_for(Settings(qdrant_url="http://qdrant:6333"))
    assert "num_replicas" not in served and served["autoscaling_config"]["max_replicas"] > 1


async def test_the_query_vector_is_reused_for_the_stored_question(
    db: Database, index: VectorIndex, embedder: Embedder, users: Users, tmp_path: Path
) -> None:
    encoded: list[str] = []

    class Counting:
        max_tokens = embedder.max_tokens

        async def embed_chunks(self, texts: Sequence[str]) -> Any:
            encoded.extend(texts)
            return await embedder.embed_chunks(texts)

        async def embed_queries(self, texts: Sequence[str]) -> Any:
            return await embedder.embed_queries(texts)

    manager = MemoryManager(ConversationStore(db), index, Counting(), settings(tmp_path))
    question = "how do I sort a list in python"
    [vector] = await embedder.embed_queries([question])
    await manager.store_turn(
        users.alice, None, turn(question, SORTED_ANSWER), known_vector=(question, vector)
    )
    long_question = "word " * (embedder.max_tokens + 10)  # more than one window: encoded
    await manager.store_turn(
        users.alice, None, turn(long_question, "ok"), known_vector=(long_question, vector)
    )
    await manager.flush()
    assert sorted(encoded) == sorted([SORTED_ANSWER, long_question, "ok"])
    [hit] = await manager.search(users.alice, question, limit=1)
    assert hit.content == question and hit.score > 0.99
    await manager.close()


async def test_a_conversation_can_be_continued_before_its_first_turn_lands(
    memory: MemoryManager, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = memory._store  # slowed down below, to hold the first turn in flight
    start = store.start

    async def slow_start(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await start(*args, **kwargs)

    monkeypatch.setattr(store, "start", slow_start)
    announced = str(uuid.uuid4())
    first = asyncio.create_task(memory.store_turn(
        users.alice, announced, turn("first question", "first answer"), new=True
    ))
    await asyncio.sleep(0.01)
    await memory.check_conversation(users.alice, announced)  # waits for the first turn
    assert first.done()
    with pytest.raises(NotFoundError):  # someone else's: never found, however long
        await memory.check_conversation(users.bob, announced)
    with pytest.raises(NotFoundError):
        await memory.check_conversation(users.alice, str(uuid.uuid4()))


# ---------------------------------------------------------------------- indexing window


class CountingEmbedder:
    """The real embedder, recording which texts each indexing call carried."""

    def __init__(self, embedder: Embedder, fail: int = 0) -> None:
        self.embedder = embedder
        self.calls: list[list[str]] = []
        self.fail = fail

    async def __call__(self, texts: list[str]) -> list[list[list[float]]]:
        self.calls.append(list(texts))
        if self.fail:
            self.fail -= 1
            raise ConnectionError("embedder replica restarting")
        return await self.embedder.embed_documents(texts)


def windowed(
    db: Database, index: VectorIndex, embed: Any, tmp_path: Path, wait_s: float
) -> MemoryManager:
    return MemoryManager(
        ConversationStore(db), index, embed, settings(tmp_path, memory_index_wait_s=wait_s)
    )


async def store_numbered_turns(manager: MemoryManager, user_id: str, n: int) -> None:
    """``n`` turns stored at once, each in a conversation of its own."""
    await asyncio.gather(*(
        manager.store_turn(user_id, None, turn(f"question {i}", f"answer {i}")) for i in range(n)
    ))


async def test_turns_stored_together_are_indexed_in_one_call(
    db: Database, index: VectorIndex, embedder: Embedder, users: Users, tmp_path: Path
) -> None:
    counting = CountingEmbedder(embedder)
    manager = windowed(db, index, counting, tmp_path, 0.2)
    await store_numbered_turns(manager, users.alice, 5)
    await manager.flush()
    assert len(counting.calls) == 1 and len(counting.calls[0]) == 10
    assert await index.count(users.alice) == 10
    [hit] = await manager.search(users.alice, "answer 3", 1)
    assert hit.content == "answer 3"
    # No flush: the window's end indexes a lone turn by itself.
    counting.calls.clear()
    await manager.store_turn(users.alice, None, turn("later question", "later answer"))
    for _ in range(100):
        if await index.count(users.alice) == 12:
            break
        await asyncio.sleep(0.05)
    assert await index.count(users.alice) == 12
    assert counting.calls == [["later question", "later answer"]]
    await manager.close()


async def test_without_a_window_every_turn_is_indexed_alone(
    db: Database, index: VectorIndex, embedder: Embedder, users: Users, tmp_path: Path
) -> None:
    counting = CountingEmbedder(embedder)
    manager = windowed(db, index, counting, tmp_path, 0)
    await store_numbered_turns(manager, users.alice, 3)
    await manager.flush()
    assert sorted(len(c) for c in counting.calls) == [2, 2, 2]
    assert await index.count(users.alice) == 6


async def test_a_failed_window_retries_each_turn_alone(
    db: Database, index: VectorIndex, embedder: Embedder, users: Users, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manager_module, "_INDEX_BACKOFF_S", 0.01)
    counting = CountingEmbedder(embedder, fail=1)
    manager = windowed(db, index, counting, tmp_path, 0.2)
    await store_numbered_turns(manager, users.alice, 3)
    await manager.flush()
    assert [len(c) for c in counting.calls] == [6, 2, 2, 2]
    assert await index.count(users.alice) == 6


async def test_deleting_ends_the_window_instead_of_waiting_it_out(
    db: Database, index: VectorIndex, embedder: Embedder, users: Users, tmp_path: Path
) -> None:
    manager = windowed(db, index, embedder, tmp_path, 5)
    cid, _ = await manager.store_turn(users.alice, None, turn("delete me", "deleted"))
    await asyncio.wait_for(manager.delete_conversation(users.alice, cid), timeout=2)
    assert await index.count(users.alice) == 0
