"""Token prices and cost estimates: a built-in table a user extends with a YAML/JSON file.

Prices are USD per million tokens, looked up by the longest model-name prefix
(``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``). Models served by the user's own hardware
(Ollama, vLLM, the CPU engine, on-prem agents) cost nothing unless the user's file prices them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from pacore.config import Settings, get_settings
from pacore.errors import ValidationError

__all__ = ["BUILTIN_PRICES", "FREE_KINDS", "Price", "PriceTable", "default_price_table"]

FREE_KINDS = frozenset({"ollama", "vllm", "cpu", "agent"})


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, description="USD per 1M prompt tokens")
    output: float = Field(ge=0, description="USD per 1M completion tokens")


def _p(input_: float, output: float) -> Price:
    return Price(input=input_, output=output)


BUILTIN_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5": _p(1.25, 10.0),
    "gpt-5-mini": _p(0.25, 2.0),
    "gpt-5-nano": _p(0.05, 0.40),
    "gpt-4.1": _p(2.0, 8.0),
    "gpt-4.1-mini": _p(0.40, 1.60),
    "gpt-4.1-nano": _p(0.10, 0.40),
    "gpt-4o": _p(2.50, 10.0),
    "gpt-4o-mini": _p(0.15, 0.60),
    "chatgpt-4o": _p(5.0, 15.0),
    "gpt-4-turbo": _p(10.0, 30.0),
    "gpt-4": _p(30.0, 60.0),
    "gpt-3.5-turbo": _p(0.50, 1.50),
    "o1": _p(15.0, 60.0),
    "o1-mini": _p(1.10, 4.40),
    "o3": _p(2.0, 8.0),
    "o3-mini": _p(1.10, 4.40),
    "o4-mini": _p(1.10, 4.40),
    "text-embedding-3-small": _p(0.02, 0.0),
    "text-embedding-3-large": _p(0.13, 0.0),
    # Anthropic
    "claude-opus-4-5": _p(5.0, 25.0),
    "claude-opus-4-1": _p(15.0, 75.0),
    "claude-opus-4": _p(15.0, 75.0),
    "claude-sonnet-4-5": _p(3.0, 15.0),
    "claude-sonnet-4": _p(3.0, 15.0),
    "claude-haiku-4-5": _p(1.0, 5.0),
    "claude-3-7-sonnet": _p(3.0, 15.0),
    "claude-3-5-sonnet": _p(3.0, 15.0),
    "claude-3-5-haiku": _p(0.80, 4.0),
    "claude-3-opus": _p(15.0, 75.0),
    "claude-3-haiku": _p(0.25, 1.25),
}

_FILE_SCHEMA = TypeAdapter(dict[str, Price])


def _longest_prefix(prices: Mapping[str, Price], model: str) -> Price | None:
    best: str | None = None
    for prefix in prices:
        if model.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return prices[best] if best is not None else None


class PriceTable:
    """Built-in prices overlaid with the user's; ``cost`` estimates one call."""

    def __init__(self, user_prices: Mapping[str, Price] | None = None) -> None:
        self._user = {k.lower(): v for k, v in (user_prices or {}).items()}
        self._all = {**BUILTIN_PRICES, **self._user}

    @classmethod
    def load(cls, path: Path | str) -> PriceTable:
        """The built-in table extended by the YAML or JSON file at ``path``: a mapping of model
        prefix to ``{input, output}``, USD per 1M tokens."""
        path = Path(path)
        try:
            text = path.read_text()
            raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
            prices = _FILE_SCHEMA.validate_python(raw or {})
        except OSError as exc:
            raise ValidationError(f"cannot read the price table {path}: {exc.strerror}") from None
        except (ValueError, yaml.YAMLError, PydanticValidationError) as exc:
            detail = exc.errors()[0]["msg"] if isinstance(exc, PydanticValidationError) else exc
            raise ValidationError(
                f"the price table {path} is not a mapping of model -> {{input, output}}: {detail}"
            ) from None
        return cls(prices)

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceTable:
        return cls.load(settings.price_table_file) if settings.price_table_file else cls()

    def lookup(self, model: str, *, user_only: bool = False) -> Price | None:
        """The price of ``model`` (``provider/model`` names are tried without the provider)."""
        table = self._user if user_only else self._all
        name = model.lower()
        found = _longest_prefix(table, name)
        if found is None and "/" in name:
            found = _longest_prefix(table, name.rsplit("/", 1)[1])
        return found

    def cost(
        self,
        provider: str,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        kind: str | None = None,
    ) -> float | None:
        """USD for one call, or None when the model's price is unknown."""
        free = kind in FREE_KINDS or provider in FREE_KINDS or provider.startswith("agent:")
        price = self.lookup(model, user_only=free) if model else None
        if price is None:
            return 0.0 if free else None
        return (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000


@cache
def default_price_table() -> PriceTable:
    """The price table the process's settings name (built once)."""
    return PriceTable.from_settings(get_settings())
