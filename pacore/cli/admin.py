"""`pacore db` (schema migrations) and `pacore keys` (master-key rotation) commands."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer
from alembic.util import CommandError
from sqlalchemy.engine import make_url

from pacore.config import get_settings
from pacore.errors import PACoreError

__all__ = ["register"]

db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="Encryption of stored provider API keys.", no_args_is_help=True)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="database URL; default: the settings' (PACORE_DATABASE_URL)"),
]


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.add_typer(keys_app, name="keys")


def _fail(exc: Exception) -> typer.Exit:
    message = exc.message if isinstance(exc, PACoreError) else str(exc)
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(1)


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _target(url: str | None) -> str:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return url or settings.resolved_database_url


@db_app.command("upgrade")
def db_upgrade(
    url: UrlOption = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
) -> None:
    """Create or migrate the schema up to REVISION (default: the newest)."""
    from pacore.db.migrate import current_revision, upgrade

    target = _target(url)
    try:
        upgrade(target, revision)
    except (PACoreError, CommandError) as exc:
        raise _fail(exc) from None
    typer.echo(f"{_shown(target)}: at revision {current_revision(target)}")


@db_app.command("downgrade")
def db_downgrade(
    url: UrlOption = None,
    revision: Annotated[
        str, typer.Option(help="target revision: -1 for one step back, base to drop everything")
    ] = "-1",
) -> None:
    """Migrate the schema down to REVISION (default: one step back)."""
    from pacore.db.migrate import current_revision, downgrade

    target = _target(url)
    try:
        downgrade(target, revision)
    except (PACoreError, CommandError) as exc:
        raise _fail(exc) from None
    typer.echo(f"{_shown(target)}: at revision {current_revision(target) or 'base (empty)'}")


@db_app.command("current")
def db_current(url: UrlOption = None) -> None:
    """Show the schema revision of the database and the newest one available."""
    from pacore.db.migrate import current_revision, head_revision

    target = _target(url)
    typer.echo(
        f"{_shown(target)}: at {current_revision(target) or 'base (empty)'}, newest {head_revision()}"
    )


@keys_app.command("rotate")
def keys_rotate(
    new_key: Annotated[
        str | None, typer.Option("--new-key", help="the new master key, base64 of 32 bytes")
    ] = None,
    generate: Annotated[bool, typer.Option("--generate", help="generate a new master key")] = False,
    url: UrlOption = None,
) -> None:
    """Re-encrypt every stored provider key under a new master key, in one transaction."""
    from pacore.security.crypto import decode_master_key
    from pacore.security.rotation import rotate_master_key

    if (new_key is None) == (not generate):
        typer.secho("error: give exactly one of --new-key or --generate", err=True, fg="red")
        raise typer.Exit(2)
    settings = get_settings()
    try:
        key = os.urandom(32) if generate else decode_master_key(new_key or "")
        result = asyncio.run(rotate_master_key(settings, key, url))
    except PACoreError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"re-encrypted {result.rotated} provider key(s): master key {result.old_key_id} -> "
        f"{result.new_key_id}"
    )
    if result.written_to is not None:
        typer.echo(f"the new master key is in {result.written_to} (mode 0600)")
        return
    typer.echo(
        "Set PACORE_MASTER_KEY to the key below on every replica and restart them; "
        "it is shown only this once:"
    )
    typer.echo(result.new_key.get_secret_value())
