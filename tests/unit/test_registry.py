"""Provider kinds by name, and the per-user cache of built providers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr

from pacore.errors import BadRequestError
from pacore.providers import registry
from pacore.providers.base import Provider, ProviderConfig
from pacore.providers.registry import ProviderCache, kinds, provider_class, register
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    Message,
    ModelInfo,
    ProviderHealth,
)


class FakeProvider(Provider):
    """Implements the ABC; remembers whether it was closed."""

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.closed = False

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        return CompletionResult(content=self.config.key() or "", provider=self.name)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        yield CompletionChunk(content="x", finish_reason="stop")

    async def health_check(self) -> ProviderHealth:
        return ProviderHealth(healthy=not self.closed)

    async def list_models(self) -> list[ModelInfo]:
        return []

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve kind "openai" with the fake for these tests only."""
    monkeypatch.setitem(registry._KINDS, "openai", FakeProvider)


ASK = CompletionRequest(messages=[Message(role="user", content="hi")])


def config(name: str = "openai", key: str | None = "sk-a", **kw: Any) -> ProviderConfig:
    return ProviderConfig(kind="openai", name=name, api_key=SecretStr(key) if key else None, **kw)


async def settle() -> None:
    """Let the background close tasks the cache starts run."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_unknown_kind_is_a_bad_request() -> None:
    with pytest.raises(BadRequestError) as err:
        provider_class("carrier-pigeon")
    assert (err.value.param, err.value.status) == ("kind", 400)


def test_builtin_kinds_are_listed() -> None:
    assert {"anthropic", "openai", "custom", "ollama", "vllm"} <= set(kinds())


def test_register_names_the_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))

    @register("test-kind")
    class Other(FakeProvider):
        pass

    assert Other.kind == "test-kind"
    assert provider_class("test-kind") is Other
    assert "test-kind" in kinds()


def test_fingerprint_covers_the_key_without_showing_it() -> None:
    a, b = config(key="sk-a"), config(key="sk-b")
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == config(key="sk-a").fingerprint()
    assert "sk-a" not in a.fingerprint()
    assert "sk-a" not in repr(a)


async def test_same_label_different_users_and_keys_never_share() -> None:
    cache = ProviderCache()
    alice = cache.get("alice", config(key="sk-alice"))
    bob = cache.get("bob", config(key="sk-bob"))
    assert alice is not bob
    assert (alice.config.key(), bob.config.key()) == ("sk-alice", "sk-bob")
    assert (await bob.complete(ASK)).content == "sk-bob"
    # The same key under two users is still two instances.
    assert cache.get("carol", config(key="sk-alice")) is not alice
    await settle()
    assert not alice.closed and not bob.closed
    assert len(cache) == 3


async def test_same_config_same_instance() -> None:
    cache = ProviderCache()
    first = cache.get("alice", config())
    assert cache.get("alice", config()) is first
    assert len(cache) == 1


async def test_changed_config_builds_anew_and_closes_the_old() -> None:
    cache = ProviderCache()
    old = cache.get("alice", config(key="sk-old"))
    other_label = cache.get("alice", config(name="backup", key="sk-old"))
    new = cache.get("alice", config(key="sk-new"))
    assert new is not old and new.config.key() == "sk-new"
    await settle()
    assert isinstance(old, FakeProvider) and old.closed
    assert isinstance(other_label, FakeProvider) and not other_label.closed
    assert len(cache) == 2
    changed = cache.get("alice", config(key="sk-new", default_model="gpt-x"))
    await settle()
    assert isinstance(new, FakeProvider) and new.closed and changed is not new


async def test_least_recently_used_is_evicted_and_closed() -> None:
    cache = ProviderCache(max_size=2)
    a = cache.get("u1", config())
    b = cache.get("u2", config())
    assert cache.get("u1", config()) is a  # touching a makes b the oldest
    c = cache.get("u3", config())
    await settle()
    assert isinstance(b, FakeProvider) and b.closed
    assert isinstance(a, FakeProvider) and not a.closed
    assert isinstance(c, FakeProvider) and not c.closed
    assert len(cache) == 2
    assert cache.get("u2", config()) is not b


async def test_forget_and_aclose() -> None:
    cache = ProviderCache()
    a = cache.get("alice", config())
    b = cache.get("bob", config())
    cache.forget("alice", "openai")
    cache.forget("alice", "never-configured")
    await settle()
    assert isinstance(a, FakeProvider) and a.closed
    assert cache.get("alice", config()) is not a
    await cache.aclose()
    assert isinstance(b, FakeProvider) and b.closed
    assert len(cache) == 0


def test_a_config_that_cannot_build_is_not_cached() -> None:
    cache = ProviderCache()
    with pytest.raises(BadRequestError):
        cache.get("alice", ProviderConfig(kind="custom", name="mine"))  # no base_url
    assert len(cache) == 0


# --------------------------------------------------------------------------- calls in flight


async def test_an_instance_in_use_is_closed_when_its_last_call_ends() -> None:
    cache = ProviderCache()
    async with cache.use("alice", config(key="sk-old")) as old:
        async with cache.use("alice", config(key="sk-old")) as same:
            assert same is old
            # The configuration changes (a rolling upgrade sends both side by side).
            async with cache.use("alice", config(key="sk-new")) as new:
                assert new is not old
            await settle()
            assert isinstance(old, FakeProvider) and not old.closed
            assert len(cache) == 1
        await settle()
        assert not old.closed  # one call still holds it
        assert (await old.complete(ASK)).content == "sk-old"
    await settle()
    assert old.closed
    assert isinstance(new, FakeProvider) and not new.closed


async def test_a_configuration_that_comes_back_gets_its_open_instance_again() -> None:
    """A rolling upgrade alternates two configurations: no client is built per request."""
    cache = ProviderCache()
    async with cache.use("alice", config(key="sk-old")) as old:
        async with cache.use("alice", config(key="sk-new")) as new:
            assert cache.get("alice", config(key="sk-old")) is old
        await settle()
        assert isinstance(new, FakeProvider) and new.closed  # its last call ended
    await settle()
    assert isinstance(old, FakeProvider) and not old.closed  # current again
    assert cache.get("alice", config(key="sk-old")) is old
    assert len(cache) == 1


async def test_eviction_and_forget_wait_for_calls_in_flight() -> None:
    cache = ProviderCache(max_size=1)
    async with cache.use("u1", config()) as evicted:
        cache.get("u2", config())
        async with cache.use("u2", config()) as forgotten:
            cache.forget("u2", "openai")
            await settle()
            assert isinstance(evicted, FakeProvider) and not evicted.closed
            assert isinstance(forgotten, FakeProvider) and not forgotten.closed
        await settle()
        assert forgotten.closed and not evicted.closed
    await settle()
    assert evicted.closed
    assert len(cache) == 0


async def test_a_failing_call_releases_its_instance() -> None:
    cache = ProviderCache()
    with pytest.raises(RuntimeError):
        async with cache.use("alice", config(key="sk-old")):
            raise RuntimeError("upstream")
    old = cache.get("alice", config(key="sk-old"))
    cache.get("alice", config(key="sk-new"))
    await settle()
    assert isinstance(old, FakeProvider) and old.closed


async def test_aclose_closes_instances_still_in_use() -> None:
    cache = ProviderCache()
    async with cache.use("alice", config(key="sk-old")) as old:
        current = cache.get("alice", config(key="sk-new"))
        await cache.aclose()
        assert isinstance(old, FakeProvider) and old.closed
        assert isinstance(current, FakeProvider) and current.closed
