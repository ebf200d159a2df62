"""`pacore up`: a local Ray instance running the whole graph on the embedded defaults."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]

APP_NAME = "pacore"
READY_TIMEOUT_S = 300.0


def register(app: typer.Typer) -> None:
    app.command("up")(up)


def up(
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = "",
    port: Annotated[int, typer.Option(help="HTTP port")] = 0,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="embedded database, vectors and secrets")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="a YAML settings file (PACORE_* names)")
    ] = None,
    num_cpus: Annotated[
        float | None, typer.Option(help="CPUs Ray may use (default: all of them)")
    ] = None,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="run without memory")] = False,
    no_agents: Annotated[
        bool, typer.Option("--no-agents", help="run without the hub for on-prem agents")
    ] = False,
) -> None:
    """Start PA Core locally: migrate the database, deploy the graph, print URL and a token."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if config is not None:
        os.environ["PACORE_CONFIG_FILE"] = str(config.resolve())
    overrides: dict[str, Any] = {}
    if host:
        overrides["host"] = host
    if port:
        overrides["port"] = port
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir.expanduser().resolve())

    from pacore.config import PlatformArgs
    from pacore.errors import PACoreError

    args = PlatformArgs(settings=overrides, memory=not no_memory, agents=not no_agents)
    try:
        settings = args.build_settings()
    except Exception as exc:  # noqa: BLE001 - a settings error is the user's to fix, say so
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Every replica must see the same settings as this process: pass the resolved ones on.
    args = args.model_copy(
        update={"settings": {**overrides, "data_dir": str(settings.data_dir)}}
    )

    try:
        url, token = _start(console, settings, args, num_cpus)
    except PACoreError as exc:
        console.print(f"[red]could not start:[/red] {exc.message}")
        _shutdown()
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _shutdown()
        raise typer.Exit(130) from None
    console.print(f"[green]PA Core is up[/green] at [bold]{url}[/bold]")
    console.print(f"admin API token (keep it secret): [bold]{token}[/bold]")
    console.print("export the two lines below, then try:")
    console.print('  curl -H "Authorization: Bearer $PACORE_TOKEN" $PACORE_URL/v1/models')
    console.print("Ctrl-C stops everything.")
    print(f"PACORE_URL={url}", flush=True)
    print(f"PACORE_TOKEN={token}", flush=True)
    _wait_for_signal()
    console.print("stopping …")
    _shutdown()


def _start(console: Any, settings: Any, args: Any, num_cpus: float | None) -> tuple[str, str]:
    from pacore.db.migrate import upgrade
    from pacore.serving import fast_mode_env, is_loopback

    with console.status("migrating the database …"):
        upgrade(settings.resolved_database_url)
    os.environ.update(fast_mode_env(settings.host, settings.data_dir))

    import ray
    from ray import serve

    from deployments.app import build_app

    with console.status("starting Ray …"):
        init: dict[str, Any] = {
            # Always a Ray instance of its own, never one a `ray start` left on this machine.
            "address": "local",
            "include_dashboard": False,
            "namespace": "pacore",
            "logging_level": "WARNING",
            "log_to_driver": False,
            "configure_logging": True,
        }
        if num_cpus is not None:
            init["num_cpus"] = num_cpus
        if is_loopback(settings.host):
            init["_node_ip_address"] = "127.0.0.1"
        ray.init(**init)
        serve.start(http_options={"host": settings.host, "port": settings.port})
    with console.status("deploying the graph (loading the embedding model) …"):
        serve.run(build_app(args.model_dump(mode="json")), name=APP_NAME, route_prefix="/",
                  blocking=False)
    url = f"http://{_display_host(settings.host)}:{settings.port}"
    with console.status(f"waiting for {url}/health …"):
        _wait_healthy(url)
    return url, _bootstrap_token(settings)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _wait_healthy(url: str) -> None:
    import httpx

    from pacore.errors import UpstreamUnavailableError

    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return
            last = str(r.json().get("components"))
        except (httpx.HTTPError, ValueError) as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise UpstreamUnavailableError(f"the platform did not become healthy in time ({last})")


def _bootstrap_token(settings: Any) -> str:
    """An API token for the local admin account (created on first start)."""
    import asyncio

    return asyncio.run(_issue_admin_token(settings))


async def _issue_admin_token(settings: Any) -> str:
    import secrets

    from pacore.errors import ConflictError
    from pacore.services import Services

    services = Services.for_settings(settings)
    try:
        stores = services.stores
        email = "admin@localhost.localdomain"
        try:
            user = await stores.users.create(email, secrets.token_urlsafe(24))
        except ConflictError:
            user = await stores.users.get_by_email(email)
        issued = services.tokens.issue(user.id, "api", None, name="bootstrap")
        await stores.tokens.record(issued.jti, user.id, "bootstrap", "api", None)
        return issued.token
    finally:
        await services.aclose()


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop["now"]:
        time.sleep(0.2)


def _shutdown() -> None:
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        print(f"shutdown: {type(exc).__name__}", file=sys.stderr)
