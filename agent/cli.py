"""The ``pacore-agent`` command: ``pair`` with the cloud once, then ``run``."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.status import Status

from agent import __version__
from agent.config import AgentConfig, ConfigError, load_config, write_credentials

if TYPE_CHECKING:
    from agent.app import LocalApp

app = typer.Typer(
    name="pacore-agent",
    help="The PA Core on-prem agent: serves local models to the PA Core cloud.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="the agent's YAML configuration file")
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@app.command()
def pair(
    url: Annotated[str, typer.Option("--url", help="the cloud's URL, e.g. https://pacore.example")],
    name: Annotated[str, typer.Option("--name", help="a name for this agent")],
    token: Annotated[
        str | None, typer.Option("--token", help="your API token (asked for when left out)")
    ] = None,
    config: ConfigOption = Path("agent.yaml"),
) -> None:
    """Register this agent with the cloud and write its token into the configuration file."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise _fail("--url must start with http:// or https://", 2)
    if token is None:
        token = typer.prompt("API token", hide_input=True)
    try:
        response = httpx.post(
            f"{url}/v1/agents", json={"name": name},
            headers={"Authorization": f"Bearer {token}"}, timeout=30.0,
        )
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {type(exc).__name__}") from None
    if response.status_code in (401, 403):
        raise _fail("the cloud refused the API token")
    if response.status_code >= 400:
        raise _fail(f"pairing failed (HTTP {response.status_code}): {_error_message(response)}")
    created = response.json()
    try:
        write_credentials(config, url, created["token"], name)
    except (ConfigError, OSError) as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"[green]paired[/] agent [bold]{created.get('name', name)}[/] ({created['id']}); "
        f"token written to {config}"
    )


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


@app.command()
def run(
    config: ConfigOption = Path("agent.yaml"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log every link event")] = False,
) -> None:
    """Start the local models and serve the cloud until interrupted."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(exc.message, 2) from None
    if cfg.agent_token is None:
        raise _fail(f"{config} has no agent_token: run `pacore-agent pair` first", 2)
    if not cfg.models:
        console.print("[yellow]warning:[/] no models configured; only tools will be served")

    from agent.app import LocalApp  # Ray is slow to import: not for `pair` or `--help`

    with console.status("starting the local models…"):
        try:
            local = LocalApp.start(cfg)
        except Exception as exc:
            raise _fail(f"the local models did not start: {exc}") from exc
    if local.local_api_url:
        console.print(f"local OpenAI-compatible API at {local.local_api_url}")
    code = 0
    try:
        code = asyncio.run(_serve(cfg, local))
    except KeyboardInterrupt:
        console.print("agent stopped")
    finally:
        with console.status("stopping the local models…"):
            local.stop()
    raise typer.Exit(code)


async def _serve(cfg: AgentConfig, local: LocalApp) -> int:
    from agent.app import detect_hardware
    from agent.link import AgentLink, AgentRefused, LinkState
    from agent.tools import ToolBox

    tools = ToolBox.from_config(cfg.tools)
    summary = f"{len(cfg.models)} model(s), {len(tools.definitions())} tool(s)"
    status = Status("connecting…", console=console)

    def on_state(state: LinkState, detail: str) -> None:
        if state == "connected":
            status.update(f"[green]●[/] connected to {cfg.cloud_url} · {summary}")
        elif state == "disconnected":
            status.update(f"[yellow]●[/] disconnected: {detail}")
        elif state == "connecting":
            status.update(f"connecting to {cfg.cloud_url}…")

    link = AgentLink(
        cfg, local.models, tools, version=__version__, hardware=detect_hardware(),
        on_state=on_state,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(link.stop()))
    with status:
        try:
            await link.run()
        except AgentRefused as exc:
            console.print(f"[bold red]refused:[/] {exc}")
            return 3
        except asyncio.CancelledError:
            await link.stop()
            raise
    console.print("agent stopped")
    return 0


def main() -> None:
    app()
