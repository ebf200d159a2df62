"""The AgentHub deployment class without Ray: its options, its bus, and the agents table as its
directory (SQLite, migrated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.exceptions

from deployments.agent_hub import AgentHubDeployment
from pacore.agents.bus import InMemoryBus, RedisBus
from pacore.config import Settings
from pacore.db.engine import Database
from pacore.db.migrate import upgrade
from pacore.db.stores import AgentStore, UserStore
from pacore.errors import NotFoundError, UpstreamUnavailableError
from pacore.types import CompletionRequest, Message

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_one_replica_in_memory_and_autoscaled_over_redis(tmp_path: Path) -> None:
    alone = AgentHubDeployment.options_for(Settings(data_dir=tmp_path))
    assert alone["num_replicas"] == 1
    assert "autoscaling_config" not in alone
    assert alone["ray_actor_options"]["num_cpus"] < 1
    shared = AgentHubDeployment.options_for(Settings(data_dir=tmp_path, redis_url=REDIS_URL))
    assert "num_replicas" not in shared
    assert shared["autoscaling_config"]["max_replicas"] > 1
    assert alone["max_ongoing_requests"] >= 1000  # one stream per connected agent


async def test_the_bus_follows_the_settings(tmp_path: Path) -> None:
    alone = AgentHubDeployment({"data_dir": str(tmp_path)}, directory=False)
    assert isinstance(alone.bus, InMemoryBus)
    assert alone.directory is None
    await alone.ping()
    shared = AgentHubDeployment(
        {"data_dir": str(tmp_path), "redis_url": REDIS_URL}, {"ping_interval_s": 1.5},
        directory=False,
    )
    assert isinstance(shared.bus, RedisBus)
    assert shared.config.ping_interval_s == 1.5
    unreachable = AgentHubDeployment(
        {"data_dir": str(tmp_path), "redis_url": "redis://127.0.0.1:9/0"}, directory=False
    )
    with pytest.raises(redis.exceptions.ConnectionError):
        await unreachable.ping()
    await unreachable.aclose()
    await shared.aclose()
    await alone.aclose()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'pacore.db'}"
    upgrade(url)
    return url


async def test_the_agents_table_is_the_directory(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    owner = await UserStore(db).create("owner@example.com", "a long password")
    other = await UserStore(db).create("other@example.com", "a long password")
    store = AgentStore(db)
    paired = await store.create(owner.id, "office", jti="jti-office")
    hub = AgentHubDeployment({"data_dir": str(tmp_path), "database_url": database_url})
    try:
        assert hub.directory is not None
        assert await hub.directory.owner_of(paired.id) == owner.id
        assert await hub.directory.owner_of("no-such-agent") is None
        ask = CompletionRequest(messages=[Message(role="user", content="hi")])
        # Paired but never connected: its owner learns it is offline, anyone else that it
        # does not exist.
        with pytest.raises(UpstreamUnavailableError):
            await hub.complete(owner.id, paired.id, ask)
        with pytest.raises(NotFoundError):
            await hub.complete(other.id, paired.id, ask)
        caps = {"models": [{"id": "llama3", "kind": "ollama", "context_length": None}]}
        await hub.directory.record(paired.id, caps)
        seen = await store.get(owner.id, paired.id)
        assert seen.capabilities == caps
        assert seen.last_seen is not None
        await hub.directory.record("no-such-agent", None)  # logged, not raised
    finally:
        await hub.aclose()
        await db.dispose()

