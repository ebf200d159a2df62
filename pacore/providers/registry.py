"""Provider kinds by name, and per-user configurations turned into cached provider instances."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pacore.errors import BadRequestError
from pacore.providers.base import Provider, ProviderConfig

__all__ = ["ProviderCache", "kinds", "provider_class", "register"]

_KINDS: dict[str, type[Provider]] = {}

# Modules that define the built-in kinds; imported on first lookup so that importing the
# registry never pulls an SDK (or vllm) the caller does not use.
_BUILTIN_MODULES: dict[str, str] = {
    "anthropic": "pacore.providers.anthropic",
    "openai": "pacore.providers.openai",
    "custom": "pacore.providers.custom",
    "ollama": "pacore.providers.ollama",
    "vllm": "pacore.providers.vllm",
    "cpu": "pacore.providers.cpu",
}


def register(kind: str) -> Callable[[type[Provider]], type[Provider]]:
    """Class decorator: make ``cls`` the adapter for provider kind ``kind``."""

    def wrap(cls: type[Provider]) -> type[Provider]:
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return wrap


def provider_class(kind: str) -> type[Provider]:
    if kind not in _KINDS and kind in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[kind])
    try:
        return _KINDS[kind]
    except KeyError:
        raise BadRequestError(f"unknown provider kind '{kind}'", param="kind") from None


def kinds() -> list[str]:
    return sorted(set(_KINDS) | set(_BUILTIN_MODULES))


class ProviderCache:
    """Built providers keyed by (user, configuration fingerprint), least recently used evicted.

    The key holds the user id and a digest of the whole configuration, the API key included, so
    two users with the same label never share an instance, and an edited configuration gets a
    fresh one while the old one is closed.

    Calls hold their provider through :meth:`use`. An instance that leaves the cache (its
    configuration edited or forgotten, evicted) while calls still hold it is closed when the
    last of them ends, never under an answer that is streaming: during a rolling upgrade, old
    and new Router replicas send the same label with two configurations side by side. A
    configuration that comes back while its instance is still open gets that instance again.
    """

    def __init__(self, max_size: int = 1024) -> None:
        self._max_size = max_size
        self._items: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._latest: dict[tuple[str, str], str] = {}
        # Out of the cache, each closed when its last call ends.
        self._retiring: dict[tuple[str, str], _Entry] = {}

    def get(self, user_id: str, config: ProviderConfig) -> Provider:
        """The instance for ``config``, built on first use. Calls that outlive the next change
        of the cache hold it through :meth:`use` instead."""
        return self._entry(user_id, config).provider

    @contextlib.asynccontextmanager
    async def use(self, user_id: str, config: ProviderConfig) -> AsyncIterator[Provider]:
        """The instance for ``config``, kept open until the block ends."""
        entry = self._entry(user_id, config)
        entry.calls += 1
        try:
            yield entry.provider
        finally:
            entry.calls -= 1
            if entry.calls == 0 and self._retiring.get(entry.key) is entry:
                del self._retiring[entry.key]
                _close_soon(entry.provider)

    def forget(self, user_id: str, name: str) -> None:
        """Drop the instance for a configuration the user removed or changed."""
        digest = self._latest.pop((user_id, name), None)
        if digest is not None:
            self._retire((user_id, digest))

    def __len__(self) -> int:
        return len(self._items)

    def _entry(self, user_id: str, config: ProviderConfig) -> _Entry:
        key = (user_id, config.fingerprint())
        entry = self._items.get(key)
        if entry is not None:
            self._items.move_to_end(key)
            return entry
        entry = self._retiring.pop(key, None) or _Entry(key, provider_class(config.kind)(config))
        self._items[key] = entry
        label = (user_id, config.name)
        stale = self._latest.get(label)
        self._latest[label] = key[1]
        if stale is not None and stale != key[1]:
            self._retire((user_id, stale))
        while len(self._items) > self._max_size:
            self._retire(next(iter(self._items)))
        return entry

    def _retire(self, key: tuple[str, str]) -> None:
        entry = self._items.pop(key, None)
        if entry is None:
            return
        if entry.calls:
            self._retiring[key] = entry
        else:
            _close_soon(entry.provider)

    async def aclose(self) -> None:
        providers = [e.provider for e in (*self._items.values(), *self._retiring.values())]
        self._items.clear()
        self._latest.clear()
        self._retiring.clear()
        await asyncio.gather(*(p.aclose() for p in providers), return_exceptions=True)


@dataclass(eq=False)
class _Entry:
    key: tuple[str, str]  # (user id, configuration fingerprint)
    provider: Provider
    calls: int = 0  # calls holding the instance through ProviderCache.use


def _close_soon(provider: Provider) -> None:
    """Close ``provider`` in the background (on the running loop; none means nothing to do)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    task = loop.create_task(provider.aclose())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()
