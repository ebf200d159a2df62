"""The `pacore` command tree. Each command group lives in its own module and registers here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="pacore",
    help="PA Core: provider-agnostic LLM orchestration on Ray Serve.",
    no_args_is_help=True,
    add_completion=False,
)

# Command modules, imported lazily-by-name so that a missing optional stack only breaks its own
# commands. Each module defines `register(app)`.
_COMMAND_MODULES = [
    "pacore.cli.server",
    "pacore.cli.admin",
    "pacore.cli.client",
    "pacore.cli.memory",
]


def _load() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


def main() -> None:
    _load()
    app()
