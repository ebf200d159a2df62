"""LLM provider adapters: one module per upstream API, all behind :class:`Provider`."""

from pacore.providers.base import Provider, ProviderCapabilities, ProviderConfig
from pacore.providers.registry import ProviderCache, kinds, provider_class, register

__all__ = [
    "Provider",
    "ProviderCache",
    "ProviderCapabilities",
    "ProviderConfig",
    "kinds",
    "provider_class",
    "register",
]
