"""`pacore memory reindex`: rebuild the vector index from the SQL store, with a progress bar."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from pacore.config import Settings, get_settings
from pacore.errors import PACoreError

if TYPE_CHECKING:
    from pacore.db.engine import Database

__all__ = ["register"]

memory_app = typer.Typer(
    help="Conversation memory: search it, rebuild its vector index.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(memory_app, name="memory")


@memory_app.command("reindex")
def reindex(
    user: Annotated[
        str | None, typer.Option("--user", help="rebuild only this user's vectors (a user id)")
    ] = None,
    recreate: Annotated[
        bool,
        typer.Option(
            "--recreate", help="drop the index first (needed after changing the embedding model)"
        ),
    ] = False,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize/--no-optimize", help="build the embedded index's HNSW graph afterwards"
        ),
    ] = True,
) -> None:
    """Embed every stored message again and rebuild the vector index from SQL.

    With the embedded index, stop the server first: the index belongs to one process.
    """
    if recreate and user is not None:
        typer.secho("error: --recreate rebuilds every user's vectors; drop --user", err=True)
        raise typer.Exit(2)
    try:
        asyncio.run(_reindex(get_settings(), user, recreate=recreate, optimize=optimize))
    except PACoreError as exc:
        typer.secho(f"error: {exc.message}", err=True, fg="red")
        raise typer.Exit(1) from None


async def _count_messages(db: Database, user_id: str | None) -> int:
    from sqlalchemy import func, select

    from pacore.db.models import Message

    query = select(func.count()).select_from(Message)
    if user_id is not None:
        query = query.where(Message.user_id == user_id)
    async with db.session() as session:
        return int(await session.scalar(query) or 0)


async def _reindex(
    settings: Settings, user_id: str | None, *, recreate: bool, optimize: bool
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from pacore.db.engine import Database
    from pacore.db.stores.conversations import ConversationStore
    from pacore.memory.embedder import Embedder
    from pacore.memory.manager import MemoryManager
    from pacore.memory.vector import open_index

    console = Console(stderr=True)
    with console.status("loading the embedding model"):
        embedder = await asyncio.to_thread(Embedder.from_settings, settings)
    index = await open_index(settings, embedder.dimension, reset=recreate)
    db = Database.from_settings(settings)
    try:
        manager = MemoryManager(ConversationStore(db), index, embedder, settings)
        total = await _count_messages(db, user_id)
        columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("embedding messages", total=total)
            done = await manager.reindex(user_id, progress=lambda n: bar.update(task, completed=n))
        points = await index.count(user_id)
        if optimize:
            with console.status("building the search graph"):
                await index.optimize()
        console.print(f"reindexed {done} messages into {points} vectors")
    finally:
        await index.close()
        await db.dispose()
