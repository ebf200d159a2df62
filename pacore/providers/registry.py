"""Provider kinds by name, and per-user configurations turned into cached provider instances."""

from __future__ import annotations

import asyncio
import importlib
from collections import OrderedDict
from collections.abc import Callable

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
    """

    def __init__(self, max_size: int = 1024) -> None:
        self._max_size = max_size
        self._items: OrderedDict[tuple[str, str], Provider] = OrderedDict()
        self._latest: dict[tuple[str, str], str] = {}

    def get(self, user_id: str, config: ProviderConfig) -> Provider:
        key = (user_id, config.fingerprint())
        provider = self._items.get(key)
        if provider is not None:
            self._items.move_to_end(key)
            return provider
        provider = provider_class(config.kind)(config)
        self._items[key] = provider
        label = (user_id, config.name)
        stale = self._latest.get(label)
        self._latest[label] = key[1]
        if stale is not None and stale != key[1]:
            self._close((user_id, stale))
        while len(self._items) > self._max_size:
            old_key, _ = next(iter(self._items.items()))
            self._close(old_key)
        return provider

    def forget(self, user_id: str, name: str) -> None:
        """Drop the instance for a configuration the user removed or changed."""
        digest = self._latest.pop((user_id, name), None)
        if digest is not None:
            self._close((user_id, digest))

    def __len__(self) -> int:
        return len(self._items)

    def _close(self, key: tuple[str, str]) -> None:
        provider = self._items.pop(key, None)
        if provider is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(provider.aclose())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def aclose(self) -> None:
        providers = list(self._items.values())
        self._items.clear()
        self._latest.clear()
        await asyncio.gather(*(p.aclose() for p in providers), return_exceptions=True)


_background: set[asyncio.Task[None]] = set()
