"""The per-user stores on SQLite and PostgreSQL: behaviour, isolation between users, secrets at
rest, key rotation, concurrency, pagination and usage accounting."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from sqlalchemy import select, text, update
from typer.testing import CliRunner

from pacore.cli.admin import register
from pacore.config import Settings
from pacore.db.engine import Database
from pacore.db.migrate import upgrade
from pacore.db.models import Conversation, ProviderConfigRow
from pacore.db.stores import NewMessage, Stores, UserSettings
from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from pacore.protocol import RoutingPrefs, SettingsBody
from pacore.security.crypto import (
    AesGcmCipher,
    KeyDecryptionError,
    generate_master_key,
    key_id_of,
)
from pacore.security.rotation import rotate_master_key
from pacore.security.secrets import load_secrets, master_key_file
from pacore.security.tokens import TokenService
from pacore.types import Message, ToolCall
from pacore.usage import PriceTable

PLAINTEXT_KEY = "sk-live-PLAINTEXT-9f3c2a7e5b1d4c6f8a0e"


async def two_users(stores: Stores) -> tuple[str, str]:
    a = await stores.users.create("alice@example.com", "password-a")
    b = await stores.users.create("bob@example.com", "password-b")
    return a.id, b.id


def turn(question: str, answer: str = "an answer") -> list[NewMessage]:
    return [
        NewMessage(role="user", content=question),
        NewMessage(role="assistant", content=answer, provider="openai", model="gpt-4o",
                   prompt_tokens=10, completion_tokens=5, latency_ms=12.5),
    ]


# ---------------------------------------------------------------------------------- users


async def test_user_register_and_login(stores: Stores) -> None:
    user = await stores.users.create("  Alice@Example.COM ", "correct horse")
    assert user.email == "alice@example.com"
    assert (await stores.users.authenticate("ALICE@example.com", "correct horse")).id == user.id
    assert (await stores.users.get(user.id)).email == "alice@example.com"
    with pytest.raises(ConflictError):
        await stores.users.create("alice@EXAMPLE.com", "another one")
    with pytest.raises(AuthenticationError) as wrong:
        await stores.users.authenticate("alice@example.com", "wrong horse")
    with pytest.raises(AuthenticationError) as unknown:
        await stores.users.authenticate("nobody@example.com", "correct horse")
    assert wrong.value.message == unknown.value.message  # nothing tells the two apart
    with pytest.raises(NotFoundError):
        await stores.users.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(ValidationError):
        await stores.users.create("not-an-email", "password")


async def test_timestamps_round_trip_exactly_in_utc(stores: Stores) -> None:
    a, _ = await two_users(stores)
    created = await stores.conversations.create(a, title="t")
    read = await stores.conversations.get(a, created.id, with_messages=False)
    assert read.created_at == created.created_at
    assert read.created_at.tzinfo is not None and read.created_at.utcoffset() == timedelta(0)
    seen = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    agent = await stores.agents.create(a, "box", "jti-ts")
    await stores.agents.update_seen(agent.id, {"models": ["m"]}, seen.astimezone())
    assert (await stores.agents.get(a, agent.id)).last_seen == seen


# ---------------------------------------------------------------------------------- isolation


async def test_another_users_rows_are_not_found(stores: Stores) -> None:
    a, b = await two_users(stores)
    conv = await stores.conversations.create(a, tags=["x"])
    [msg, _] = await stores.conversations.add_messages(a, conv.id, turn("secret question"))
    await stores.providers.put(a, "openai", "openai", PLAINTEXT_KEY)
    agent = await stores.agents.create(a, "laptop", "jti-agent-a")
    await stores.tokens.record("jti-api-a", a, "ci", "api", None)

    attempts = [
        stores.conversations.get(b, conv.id),
        stores.conversations.set_tags(b, conv.id, ["mine"]),
        stores.conversations.delete(b, conv.id),
        stores.conversations.add_messages(b, conv.id, turn("intrusion")),
        stores.conversations.recent_messages(b, conv.id, 5),
        stores.conversations.ensure(b, conv.id, None),
        stores.providers.get_config(b, "openai"),
        stores.providers.get(b, "openai"),
        stores.providers.delete(b, "openai"),
        stores.agents.get(b, agent.id),
        stores.agents.revoke(b, agent.id),
        stores.tokens.revoke(b, "jti-api-a"),
        stores.tokens.get(b, "jti-api-a"),
    ]
    for attempt in attempts:
        with pytest.raises(NotFoundError):
            await attempt

    assert await stores.conversations.messages_by_ids(b, [msg.id]) == {}
    assert (await stores.conversations.list(b))[0] == []
    assert await stores.providers.list(b) == []
    assert await stores.agents.list(b) == []
    assert await stores.tokens.list(b) == []
    # And A's rows are untouched by B's attempts.
    after = await stores.conversations.get(a, conv.id)
    assert after.tags == ["x"] and after.message_count == 2
    assert await stores.tokens.is_active("jti-api-a")
    assert (await stores.agents.get(a, agent.id)).revoked_at is None
    assert (await stores.providers.get_config(a, "openai")).key() == PLAINTEXT_KEY


# ---------------------------------------------------------------------------------- tokens


async def test_token_revocation_takes_effect_at_once(stores: Stores) -> None:
    a, _ = await two_users(stores)
    service = TokenService("s" * 48)
    issued = service.issue(a, "api", timedelta(hours=1), name="ci")
    await stores.tokens.record(issued.jti, a, "ci", "api", issued.expires_at)
    await stores.tokens.record(issued.jti, a, "ci", "api", issued.expires_at)  # idempotent
    claims = await service.verify_active(issued.token, "api", stores.tokens.is_active)
    assert claims.sub == a
    [listed] = await stores.tokens.list(a)
    assert listed.id == issued.jti and listed.active and listed.last_used_at is None

    await stores.tokens.touch(issued.jti)
    assert (await stores.tokens.get(a, issued.jti)).last_used_at is not None

    await stores.tokens.revoke(a, issued.jti)
    assert not await stores.tokens.is_active(issued.jti)
    with pytest.raises(AuthenticationError, match="revoked"):
        await service.verify_active(issued.token, "api", stores.tokens.is_active)
    assert await stores.tokens.list(a) == []
    await stores.tokens.revoke(a, issued.jti)  # revoking twice is harmless


async def test_expired_and_unknown_tokens_are_not_active(stores: Stores) -> None:
    a, _ = await two_users(stores)
    await stores.tokens.record("old", a, "old", "api", datetime.now(UTC) - timedelta(seconds=1))
    await stores.tokens.record("forever", a, "forever", "api", None)
    assert not await stores.tokens.is_active("old")
    assert await stores.tokens.is_active("forever")
    assert not await stores.tokens.is_active("never-recorded")
    with pytest.raises(ValidationError):
        await stores.tokens.record("x", a, "x", "admin", None)


# ---------------------------------------------------------------------------------- providers


async def test_provider_configs_keep_keys_secret(stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a, _ = await two_users(stores)
    record = await stores.providers.put(
        a, "openai", "openai", PLAINTEXT_KEY, None, "gpt-4o", {"timeout_s": 9, "organization": "o"}
    )
    assert record.configured and record.has_key
    assert PLAINTEXT_KEY not in repr(record) + record.model_dump_json()
    await stores.providers.put(a, "local", "ollama", None, "http://127.0.0.1:11434", "llama3", {})
    await stores.providers.put(a, "keyless-openai", "openai")
    listed = {p.name: p for p in await stores.providers.list(a)}
    assert list(listed) == ["keyless-openai", "local", "openai"]
    assert listed["local"].configured and not listed["local"].has_key
    assert not listed["keyless-openai"].configured
    assert PLAINTEXT_KEY not in repr(listed)

    config = await stores.providers.get_config(a, "openai")
    assert config.key() == PLAINTEXT_KEY
    assert PLAINTEXT_KEY not in repr(config) + str(config)
    assert config.timeout_s == 9 and config.options == {"organization": "o"}

    # An update without a key keeps the stored key.
    await stores.providers.put(a, "openai", "openai", None, None, "gpt-4o-mini", {})
    config = await stores.providers.get_config(a, "openai")
    assert config.key() == PLAINTEXT_KEY and config.default_model == "gpt-4o-mini"

    await stores.providers.delete(a, "local")
    with pytest.raises(NotFoundError):
        await stores.providers.get_config(a, "local")
    for bad_name in ("agent:x", "a/b", "", "x" * 65):
        with pytest.raises(ValidationError):
            await stores.providers.put(a, bad_name, "openai", "k")
    with pytest.raises(ValidationError):
        await stores.providers.put(a, "weird", "telepathy", "k")
    assert PLAINTEXT_KEY not in caplog.text


async def test_concurrent_puts_of_one_provider_leave_one_row(stores: Stores) -> None:
    a, _ = await two_users(stores)
    keys = {f"sk-{i}" for i in range(8)}
    await asyncio.gather(*(stores.providers.put(a, "openai", "openai", k) for k in keys))
    [only] = await stores.providers.list(a)
    assert only.name == "openai"
    assert (await stores.providers.get_config(a, "openai")).key() in keys


async def test_rows_need_an_existing_user(stores: Stores) -> None:
    ghost = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(NotFoundError, match="user"):
        await stores.conversations.create(ghost)
    with pytest.raises(NotFoundError, match="user"):
        await stores.providers.put(ghost, "openai", "openai", "sk-x")


async def _raw_key_column(db: Database) -> list[bytes]:
    async with db.session() as session:
        rows = await session.execute(text("SELECT encrypted_key FROM provider_configs"))
        return [bytes(r[0]) for r in rows if r[0] is not None]


async def test_plaintext_key_never_reaches_the_database(stores: Stores, db: Database) -> None:
    a, b = await two_users(stores)
    await stores.providers.put(a, "openai", "openai", PLAINTEXT_KEY)
    await stores.providers.put(b, "anthropic", "anthropic", PLAINTEXT_KEY)
    needle = PLAINTEXT_KEY.encode()
    raw = await _raw_key_column(db)
    assert len(raw) == 2 and all(needle not in blob for blob in raw)
    if db.dialect == "sqlite":
        async with db.session() as session:
            await session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        path = Path(db.engine.url.database or "")
        for file in path.parent.glob(path.name + "*"):  # the database, its WAL and SHM
            assert needle not in file.read_bytes(), file
    else:
        async with db.session() as session:
            dump = await session.execute(text("SELECT t::text FROM provider_configs AS t"))
            assert all(PLAINTEXT_KEY not in row[0] for row in dump)


async def test_ciphertext_cannot_move_between_users(stores: Stores, db: Database) -> None:
    a, b = await two_users(stores)
    await stores.providers.put(a, "openai", "openai", PLAINTEXT_KEY)
    await stores.providers.put(b, "openai", "openai", "sk-bob")
    async with db.transaction() as session:
        stolen = await session.scalar(
            select(ProviderConfigRow.encrypted_key).where(ProviderConfigRow.user_id == a)
        )
        await session.execute(
            update(ProviderConfigRow)
            .where(ProviderConfigRow.user_id == b)
            .values(encrypted_key=stolen)
        )
    with pytest.raises(KeyDecryptionError) as caught:
        await stores.providers.get_config(b, "openai")
    assert PLAINTEXT_KEY not in str(caught.value) + repr(caught.value)


async def test_rotation_moves_every_key_to_the_new_master_key(
    stores: Stores, db: Database, master_key: bytes
) -> None:
    a, b = await two_users(stores)
    keys = {(a, "openai"): "sk-a-1", (a, "anthropic"): "sk-a-2", (b, "openai"): "sk-b-1"}
    for (user, name), key in keys.items():
        await stores.providers.put(user, name, name, key)
    await stores.providers.put(b, "local", "ollama")  # no key: nothing to rotate

    new_key = os.urandom(32)
    assert await stores.providers.rotate(AesGcmCipher(new_key, [master_key])) == 3

    only_new = Stores(db, AesGcmCipher(new_key))
    only_old = Stores(db, AesGcmCipher(master_key))
    for (user, name), key in keys.items():
        assert (await only_new.providers.get_config(user, name)).key() == key
        with pytest.raises(KeyDecryptionError):
            await only_old.providers.get_config(user, name)
    assert {k.key_id for k in await stores.providers.all_encrypted()} == {key_id_of(new_key)}


async def test_rotate_master_key_in_embedded_data_dir(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("PACORE_")]:
        monkeypatch.delenv(name)
    settings = Settings(data_dir=tmp_path / "data", database_url=db.url)
    store = Stores.from_settings(settings)
    old = load_secrets(settings)
    a, _ = await two_users(store)
    await store.providers.put(a, "openai", "openai", PLAINTEXT_KEY)
    await store.aclose()

    new_key = os.urandom(32)
    result = await rotate_master_key(settings, new_key)
    assert result.rotated == 1 and result.written_to == master_key_file(settings)
    assert master_key_file(settings).stat().st_mode & 0o777 == 0o600
    assert PLAINTEXT_KEY not in repr(result)

    reloaded = load_secrets(settings)
    assert reloaded.master_key.get_secret_value() == new_key
    assert reloaded.previous_master_keys == ()
    fresh = Stores(db, reloaded.cipher())
    assert (await fresh.providers.get_config(a, "openai")).key() == PLAINTEXT_KEY
    with pytest.raises(KeyDecryptionError):
        await Stores(db, old.cipher()).providers.get_config(a, "openai")


# ---------------------------------------------------------------------------------- settings


async def test_settings_defaults_and_round_trip(stores: Stores) -> None:
    a, b = await two_users(stores)
    defaults = await stores.settings.get(a)
    assert defaults == UserSettings(
        default_provider=None, data_residency="any", routing=RoutingPrefs(), fallbacks=[]
    )
    body = SettingsBody(
        default_provider="openai",
        data_residency=["eu-west-1"],
        routing=RoutingPrefs(code="anthropic", general="openai"),
        fallbacks=["anthropic", "local"],
    )
    saved = await stores.settings.put(a, body)
    assert await stores.settings.get(a) == saved
    assert saved.routing.code == "anthropic" and saved.data_residency == ["eu-west-1"]
    await stores.settings.put(a, SettingsBody(default_provider="local"))
    assert (await stores.settings.get(a)).data_residency == "any"
    assert (await stores.settings.get(b)).default_provider is None


# ---------------------------------------------------------------------------------- agents


async def test_agent_lifecycle_and_revocation(stores: Stores) -> None:
    a, _ = await two_users(stores)
    agent = await stores.agents.create(a, "office-gpu", "jti-office", agent_id="agent-1")
    assert agent.id == "agent-1"
    assert await stores.tokens.is_active("jti-office")
    assert [t.id for t in await stores.tokens.list(a, aud="agent")] == ["jti-office"]
    await stores.agents.update_seen(agent.id, {"models": ["llama3"], "tools": []})
    seen = await stores.agents.get_by_id(agent.id)
    assert seen.capabilities == {"models": ["llama3"], "tools": []} and seen.last_seen
    assert [x.id for x in await stores.agents.list(a)] == [agent.id]

    await stores.agents.revoke(a, agent.id)
    assert not await stores.tokens.is_active("jti-office")
    assert await stores.agents.list(a) == []
    for gone in (stores.agents.get_by_id(agent.id), stores.agents.get(a, agent.id),
                 stores.agents.update_seen(agent.id)):
        with pytest.raises(NotFoundError):
            await gone


# ---------------------------------------------------------------------------------- conversations


async def test_a_conversation_starts_with_its_first_messages(stores: Stores) -> None:
    a, b = await two_users(stores)
    conv, messages = await stores.conversations.start(
        a, turn("  Where is   Paris? "), ["geo", "geo"], conversation_id="conv-chosen"
    )
    assert conv.id == "conv-chosen" and conv.tags == ["geo"] and conv.message_count == 2
    assert conv.title == "Where is Paris?"
    assert [(m.seq, m.role, m.tags) for m in messages] == [(1, "user", ["geo"]),
                                                           (2, "assistant", ["geo"])]
    full = await stores.conversations.get(a, "conv-chosen")
    assert [m.id for m in full.messages or []] == [m.id for m in messages]
    # The id is taken (by anyone): nothing of the second attempt is kept.
    with pytest.raises(ConflictError):
        await stores.conversations.start(b, turn("again?"), conversation_id="conv-chosen")
    with pytest.raises(NotFoundError):
        await stores.conversations.start("no-such-user", turn("who?"))
    assert (await stores.conversations.get(a, "conv-chosen")).message_count == 2
    assert (await stores.conversations.list(b))[0] == []


async def test_messages_are_ordered_titled_and_tagged(stores: Stores) -> None:
    a, _ = await two_users(stores)
    conv = await stores.conversations.create(a, tags=["work", "work", " eu "])
    assert conv.tags == ["work", "eu"] and conv.title is None
    first = await stores.conversations.add_messages(
        a, conv.id,
        [NewMessage(role="system", content="be brief"), *turn("  How do I   sort a list?  ")],
    )
    call = ToolCall(id="c1", name="search", arguments='{"q": "x"}')
    second = await stores.conversations.add_messages(
        a, conv.id,
        [NewMessage.from_message(Message(role="assistant", tool_calls=[call]), provider="openai"),
         NewMessage(role="tool", content="result", tool_call_id="c1")],
    )
    assert [m.seq for m in first + second] == [1, 2, 3, 4, 5]
    assert all(m.tags == ["work", "eu"] for m in first + second)

    full = await stores.conversations.get(a, conv.id)
    assert full.title == "How do I sort a list?"
    assert full.message_count == 5 and full.updated_at >= conv.updated_at
    assert [m.role for m in full.messages or []] == ["system", "user", "assistant", "assistant", "tool"]
    assert (full.messages or [])[3].to_message().tool_calls == [call]
    assert (full.messages or [])[2].prompt_tokens == 10

    recent = await stores.conversations.recent_messages(a, conv.id, 2)
    assert [m.seq for m in recent] == [4, 5]

    tagged = await stores.conversations.set_tags(a, conv.id, ["personal"])
    assert tagged.tags == ["personal"] and tagged.message_count == 5
    hydrated = await stores.conversations.messages_by_ids(a, [m.id for m in first] + ["nope"])
    assert set(hydrated) == {m.id for m in first}
    assert all(m.tags == ["personal"] for m in hydrated.values())

    deleted = await stores.conversations.delete(a, conv.id)
    assert sorted(deleted) == sorted(m.id for m in first + second)
    assert await stores.conversations.messages_by_ids(a, deleted) == {}
    with pytest.raises(NotFoundError):
        await stores.conversations.get(a, conv.id)


async def test_ensure_creates_or_extends(stores: Stores) -> None:
    a, _ = await two_users(stores)
    made = await stores.conversations.ensure(a, None, ["t1"])
    assert made.tags == ["t1"]
    again = await stores.conversations.ensure(a, made.id, ["t2", "t1"])
    assert again.id == made.id and again.tags == ["t1", "t2"]
    with pytest.raises(NotFoundError):
        await stores.conversations.ensure(a, "no-such-conversation", None)


async def test_iter_messages_covers_every_user(stores: Stores) -> None:
    a, b = await two_users(stores)
    ids = set()
    for user in (a, b):
        for i in range(3):
            conv = await stores.conversations.create(user)
            ids |= {m.id for m in await stores.conversations.add_messages(user, conv.id, turn(f"q{i}"))}
    seen = [m.id async for m in stores.conversations.iter_messages(batch=4)]
    assert len(seen) == len(ids) == 12 and set(seen) == ids
    only_b = {m.user_id async for m in stores.conversations.iter_messages(batch=5, user_id=b)}
    assert only_b == {b}


async def test_cursor_pagination_returns_each_conversation_once(stores: Stores, db: Database) -> None:
    a, b = await two_users(stores)
    made = [await stores.conversations.create(a, tags=["even" if i % 2 == 0 else "odd"]) for i in range(23)]
    await stores.conversations.create(b)
    # Ties on updated_at are the hard case for a cursor: make a block of them.
    tie = datetime(2030, 1, 1, tzinfo=UTC)
    async with db.transaction() as session:
        await session.execute(
            update(Conversation)
            .where(Conversation.id.in_([c.id for c in made[5:15]]))
            .values(updated_at=tie)
        )

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        items, cursor = await stores.conversations.list(a, limit=4, cursor=cursor)
        pages.append([c.id for c in items])
        if cursor is None:
            break
    seen = [cid for page in pages for cid in page]
    assert sorted(seen) == sorted(c.id for c in made) and len(seen) == len(set(seen))
    assert set(pages[0]) <= {c.id for c in made[5:15]}  # the newest updated_at comes first

    even: list[str] = []
    cursor = None
    while True:
        items, cursor = await stores.conversations.list(a, limit=5, cursor=cursor, tag="even")
        even += [c.id for c in items]
        if cursor is None:
            break
    assert sorted(even) == sorted(c.id for i, c in enumerate(made) if i % 2 == 0)

    with pytest.raises(BadRequestError):
        await stores.conversations.list(a, cursor="not a cursor")


async def test_concurrent_writers_lose_nothing(stores: Stores) -> None:
    a, _ = await two_users(stores)
    conv = await stores.conversations.create(a)
    others = [await stores.conversations.create(a) for _ in range(3)]

    async def write(i: int) -> None:
        await stores.conversations.add_messages(a, conv.id, turn(f"question {i}", f"answer {i}"))
        await stores.conversations.add_messages(a, others[i % 3].id, turn(f"side {i}"))

    await asyncio.gather(*(write(i) for i in range(20)))
    full = await stores.conversations.get(a, conv.id)
    messages = full.messages or []
    assert len(messages) == 40 and [m.seq for m in messages] == list(range(1, 41))
    assert {m.content for m in messages if m.role == "user"} == {f"question {i}" for i in range(20)}
    # Each question is followed by its own answer: a turn is never interleaved with another.
    for q, ans in zip(messages[::2], messages[1::2], strict=True):
        assert ans.content == q.content.replace("question", "answer")
    counts = [(await stores.conversations.get(a, c.id)).message_count for c in others]
    assert sum(counts) == 40


# ---------------------------------------------------------------------------------- usage


async def test_usage_cost_and_summary(stores: Stores, db: Database, tmp_path: Path) -> None:
    a, b = await two_users(stores)
    table_file = tmp_path / "prices.yaml"
    table_file.write_text("my-finetune: {input: 4.0, output: 16.0}\ngpt-4o: {input: 1.0, output: 2.0}\n")
    usage = Stores(db, AesGcmCipher(os.urandom(32)), PriceTable.load(table_file)).usage

    mini = await usage.record(a, "openai", "gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000, 50.0, "ok")
    assert mini.cost_usd == pytest.approx(0.15 + 0.60)  # built-in, longest prefix wins
    tuned = await usage.record(a, "my-groq", "my-finetune-v2", 500_000, 250_000, 80.0, "ok")
    assert tuned.cost_usd == pytest.approx(2.0 + 4.0)  # the user's own price
    overridden = await usage.record(a, "openai", "gpt-4o", 1_000_000, 0, None, "ok")
    assert overridden.cost_usd == pytest.approx(1.0)  # the user's file overrides the built-in
    local = await usage.record(a, "local", "llama3", 1000, 1000, 10.0, "ok", kind="ollama")
    agent = await usage.record(a, "agent:123", "llama3", 1000, 1000, 10.0, "ok")
    assert local.cost_usd == 0.0 and agent.cost_usd == 0.0
    unknown = await usage.record(a, "custom", "mystery-model", 10, 10, 5.0, "error")
    assert unknown.cost_usd is None
    await usage.record(b, "openai", "gpt-4o", 1_000_000, 0, None, "ok")

    summary = await usage.summary(a)
    assert summary.requests == 6 and summary.errors == 1 and summary.unpriced_requests == 1
    assert summary.cost_usd == pytest.approx(0.75 + 6.0 + 1.0)
    assert summary.prompt_tokens == 1_000_000 + 500_000 + 1_000_000 + 2000 + 10
    assert {(x.provider, x.model) for x in summary.by_model} >= {("openai", "gpt-4o")}
    later = await usage.summary(a, since=datetime.now(UTC) + timedelta(minutes=1))
    assert later.requests == 0 and later.cost_usd == 0


def test_keys_rotate_command_shows_the_new_key_once_in_production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'prod.db'}"
    upgrade(url)
    old = generate_master_key()

    async def seed() -> str:
        db = Database(url)
        stores = Stores(db, AesGcmCipher.from_base64(old))
        user = await stores.users.create("ops@example.com", "password")
        await stores.providers.put(user.id, "openai", "openai", PLAINTEXT_KEY)
        await db.dispose()
        return user.id

    async def read(user_id: str, master: str) -> str | None:
        db = Database(url)
        try:
            return (await Stores(db, AesGcmCipher.from_base64(master)).providers.get_config(user_id, "openai")).key()
        finally:
            await db.dispose()

    user_id = asyncio.run(seed())
    monkeypatch.delenv("PACORE_CONFIG_FILE", raising=False)
    for name, value in {
        "PACORE_MODE": "production",
        "PACORE_DATA_DIR": str(tmp_path / "data"),
        "PACORE_DATABASE_URL": url,
        "PACORE_SECRET_KEY": "p" * 48,
        "PACORE_MASTER_KEY": old,
    }.items():
        monkeypatch.setenv(name, value)
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    assert runner.invoke(app, ["keys", "rotate"]).exit_code == 2
    assert runner.invoke(app, ["keys", "rotate", "--generate", "--new-key", old]).exit_code == 2
    same = runner.invoke(app, ["keys", "rotate", "--new-key", old])
    assert same.exit_code == 1 and "current one" in same.output

    result = runner.invoke(app, ["keys", "rotate", "--generate"])
    assert result.exit_code == 0, result.output
    assert "re-encrypted 1 provider key(s)" in result.output
    assert PLAINTEXT_KEY not in result.output
    new = result.output.strip().splitlines()[-1]
    assert asyncio.run(read(user_id, new)) == PLAINTEXT_KEY
    with pytest.raises(KeyDecryptionError):
        asyncio.run(read(user_id, old))
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
