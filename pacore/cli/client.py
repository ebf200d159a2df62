"""Client commands of `pacore` over the Python SDK: chat, ask, tokens, providers, memory search,
conversations and agents.

Every command takes ``--url`` and ``--token`` (default: ``PACORE_URL`` and ``PACORE_TOKEN``).
Output is coloured on a terminal and plain (tab-separated) when piped; ``--json`` prints the API's
objects instead. Exit codes scripts can rely on:

    0  ok
    1  API error (the server refused or failed the request)
    2  usage error (bad arguments)
    3  authentication error (missing, invalid or revoked token; permission denied)
    4  not found
    5  connection error (the server could not be reached or did not answer in time)
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

import sdk

__all__ = ["EXIT_CODES", "exit_code_for", "register"]

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_CONNECTION = range(6)
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_API: "API error",
    EXIT_USAGE: "usage error",
    EXIT_AUTH: "authentication error",
    EXIT_NOT_FOUND: "not found",
    EXIT_CONNECTION: "connection error",
}
EPILOG = "Exit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."

P = ParamSpec("P")
R = TypeVar("R")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def _group(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, epilog=EPILOG, no_args_is_help=True)


token_app = _group("API tokens: long-lived credentials for scripts and the SDK.")
providers_app = _group("Model providers: your API keys and endpoints (keys are never shown).")
conversations_app = _group("Conversation history.")
agents_app = _group("On-prem agents paired to your account.")

UrlOption = Annotated[
    str | None, typer.Option("--url", help="API URL (default: $PACORE_URL, else http://127.0.0.1:8000)")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="bearer token (default: $PACORE_TOKEN)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON instead")]
ProviderOption = Annotated[
    str | None, typer.Option("--provider", "-p", help="provider name (default: routed)")
]
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="model name")]
ConversationOption = Annotated[
    str | None, typer.Option("--conversation", "-c", help="continue this conversation id")
]
NoMemoryOption = Annotated[
    bool, typer.Option("--no-memory", help="leave remembered context out of the prompt")
]


def register(app: typer.Typer) -> None:
    app.command("chat", epilog=EPILOG)(chat)
    app.command("ask", epilog=EPILOG)(ask)
    app.add_typer(token_app, name="token")
    app.add_typer(providers_app, name="providers")
    app.add_typer(conversations_app, name="conversations")
    app.add_typer(agents_app, name="agents")
    _memory_group(app).command("search", epilog=EPILOG)(memory_search)


def _memory_group(app: typer.Typer) -> typer.Typer:
    """The one `memory` group, shared with the operators' `memory reindex`."""
    try:
        from pacore.cli.memory import memory_app
    except ImportError:  # without the operators' module, this one owns the group
        memory_app = _group("Conversation memory.")
        app.add_typer(memory_app, name="memory")
    return memory_app


# --------------------------------------------------------------------------- plumbing


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an error raised by the SDK."""
    if isinstance(exc, sdk.AuthenticationError | sdk.PermissionDeniedError):
        return EXIT_AUTH
    if isinstance(exc, sdk.NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, sdk.ConnectionError):
        return EXIT_CONNECTION
    if isinstance(exc, sdk.TimeoutError) and exc.status is None:
        return EXIT_CONNECTION
    if isinstance(exc, ValueError) and not isinstance(exc, ValidationError):
        return EXIT_USAGE  # an argument the SDK refused before sending anything
    return EXIT_API


def _handled(command: Callable[P, R]) -> Callable[P, R]:
    """Turns SDK errors into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (sdk.PACoreError, ValueError) as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exit_code_for(exc)) from None
        except KeyboardInterrupt:
            err.print()
            raise typer.Exit(130) from None

    return run


def _client(url: str | None, token: str | None) -> sdk.Client:
    return sdk.Client(base_url=url, token=token)


def _waiting(what: str) -> AbstractContextManager[Any]:
    """A spinner on stderr while waiting, only where a person is watching."""
    return err.status(what) if err.is_terminal else nullcontext()


class _Spinner:
    """A spinner stopped by whatever comes first: the first piece of an answer, or its end."""

    def __init__(self, what: str) -> None:
        self._status: Status | None = err.status(what) if err.is_terminal else None

    def start(self) -> None:
        if self._status is not None:
            self._status.start()

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _print_json(data: BaseModel | Sequence[BaseModel]) -> None:
    if isinstance(data, BaseModel):
        print(data.model_dump_json(indent=2))
    else:
        print(json.dumps([d.model_dump(mode="json") for d in data], indent=2))


def _table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A table on a terminal; tab-separated lines with a header row when piped."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if not out.is_terminal:
        for line in [list(columns), *cells]:
            print("\t".join(c.replace("\t", " ").replace("\n", " ") for c in line))
        return
    table = Table(*columns, header_style="bold", box=None, pad_edge=False)
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    out.print(table)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else ""


def _one_line(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _completion_options(
    provider: str | None, model: str | None, conversation: str | None, no_memory: bool
) -> sdk.CompleteOptions:
    options: sdk.CompleteOptions = {}
    if provider:
        options["provider"] = provider
    if model:
        options["model"] = model
    if conversation:
        options["conversation_id"] = conversation
    if no_memory:
        options["use_memory"] = False
    return options


# --------------------------------------------------------------------------- ask, chat


@_handled
def ask(
    question: Annotated[
        str | None, typer.Argument(help="the question; read from stdin when left out")
    ] = None,
    provider: ProviderOption = None,
    model: ModelOption = None,
    conversation: ConversationOption = None,
    no_memory: NoMemoryOption = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Ask one question and print only the answer, streamed as it arrives (pipe-friendly)."""
    if question is None:
        if sys.stdin.isatty():
            err.print("[red]error:[/] give a question, or pipe one in on stdin")
            raise typer.Exit(EXIT_USAGE)
        question = sys.stdin.read()
    if not question.strip():
        err.print("[red]error:[/] the question is empty")
        raise typer.Exit(EXIT_USAGE)
    options = _completion_options(provider, model, conversation, no_memory)
    with _client(url, token) as client:
        if as_json:
            with _waiting("waiting for the answer"):
                answer = client.complete(question, **options)
            _print_json(answer)
            return
        _stream_answer(client, question, options)


def _stream_answer(
    client: sdk.Client, text: str, options: sdk.CompleteOptions, prefix: str = ""
) -> sdk.CompletionDone:
    """Write the answer to stdout as it arrives, behind a spinner until the first piece
    (``prefix``, markup, goes before it)."""
    spinner = _Spinner("thinking")
    spinner.start()
    ended_with_newline = True
    try:
        with client.stream(text, **options) as stream:
            for chunk in stream:
                if not chunk.content:
                    continue
                spinner.stop()
                if prefix:
                    out.print(prefix, end="")
                    prefix = ""
                sys.stdout.write(chunk.content)
                sys.stdout.flush()
                ended_with_newline = chunk.content.endswith("\n")
    finally:
        spinner.stop()
    if not ended_with_newline:
        sys.stdout.write("\n")
        sys.stdout.flush()
    assert stream.done is not None  # a stream that ends without `done` raised instead
    return stream.done


CHAT_HELP = "/new starts a new conversation; /exit or Ctrl-D leaves."


@_handled
def chat(
    provider: ProviderOption = None,
    model: ModelOption = None,
    conversation: ConversationOption = None,
    no_memory: NoMemoryOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Chat in the terminal, with answers streamed as they are written.

    The conversation carries on across turns. /new starts a new conversation; /exit or Ctrl-D
    leaves.
    """
    conversation_id = conversation
    err.print(f"[dim]PA Core chat. {CHAT_HELP}[/]")
    with _client(url, token) as client:
        while True:
            try:
                line = out.input("[bold cyan]you>[/] ")
            except EOFError:
                out.print()
                return
            text = line.strip()
            if text in ("/exit", "/quit"):
                return
            if text == "/new":
                conversation_id = None
                err.print("[dim]new conversation[/]")
                continue
            if not text:
                continue
            options = _completion_options(provider, model, conversation_id, no_memory)
            conversation_id = _chat_turn(client, text, options)


def _chat_turn(client: sdk.Client, text: str, options: sdk.CompleteOptions) -> str | None:
    """One turn; the conversation id to carry on with (the old one if the turn failed)."""
    try:
        done = _stream_answer(client, text, options, prefix="[bold green]pacore>[/] ")
    except KeyboardInterrupt:
        out.print("\n[dim]stopped[/]")
        return options.get("conversation_id")
    except sdk.PACoreError as exc:
        out.print()
        if isinstance(exc, sdk.AuthenticationError | sdk.ConnectionError):
            raise
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return options.get("conversation_id")
    route = f"{done.provider}/{done.model}".rstrip("/")
    err.print(
        f"[dim]conversation {done.conversation_id} · {route} · {done.usage.total_tokens} tokens[/]"
    )
    return done.conversation_id


# --------------------------------------------------------------------------- tokens


@token_app.command("create", epilog=EPILOG)
@_handled
def token_create(
    name: Annotated[str, typer.Argument(help="a label to recognise the token by")],
    expires_in_days: Annotated[
        int | None, typer.Option("--expires-in-days", min=1, help="lifetime (default: none)")
    ] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Create an API token. Only the token goes to stdout; it is shown this once."""
    with _client(url, token) as client:
        created = client.tokens.create(name, expires_in_days=expires_in_days)
    if as_json:
        _print_json(created)
        return
    err.print(f"[green]created[/] token {created.id} ({escape(created.name)}); it is shown once:")
    print(created.token)


@token_app.command("list", epilog=EPILOG)
@_handled
def token_list(
    as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """List your API tokens (never their secrets)."""
    with _client(url, token) as client:
        tokens = client.tokens.list()
    if as_json:
        _print_json(tokens)
        return
    rows = [
        (t.id, t.name, _when(t.created_at), _when(t.expires_at), _when(t.last_used_at))
        for t in tokens
    ]
    _table(["id", "name", "created", "expires", "last used"], rows)


@token_app.command("revoke", epilog=EPILOG)
@_handled
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="the token's id (from `pacore token list`)")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Revoke an API token: it stops working at once."""
    with _client(url, token) as client:
        client.tokens.revoke(token_id)
    err.print(f"revoked token {token_id}")


# --------------------------------------------------------------------------- providers


def _option_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{pair}' is not KEY=VALUE", param_hint="--option")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


@providers_app.command("add", epilog=EPILOG)
@_handled
def providers_add(
    name: Annotated[str, typer.Argument(help="your label for it: openai, my-groq, …")],
    kind: Annotated[
        str, typer.Option("--kind", "-k", help="anthropic, openai, custom, ollama or vllm")
    ],
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="the provider's key; '-' reads it from stdin")
    ] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="endpoint URL")] = None,
    default_model: Annotated[
        str | None, typer.Option("--default-model", help="model used when none is named")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="KEY=VALUE, repeatable")
    ] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Add a provider, or replace the one with this name."""
    if api_key == "-":
        api_key = sys.stdin.readline().strip()
    options = _option_pairs(option or [])
    with _client(url, token) as client:
        provider = client.providers.configure(
            name,
            kind,
            api_key=api_key,
            base_url=base_url,
            default_model=default_model,
            options=options or None,
        )
    if as_json:
        _print_json(provider)
        return
    err.print(f"[green]saved[/] provider {escape(provider.name)} ({provider.kind})")


@providers_app.command("list", epilog=EPILOG)
@_handled
def providers_list(
    as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """List your providers, with a live health check of each."""
    with _client(url, token) as client, _waiting("checking providers"):
        providers = client.providers.list()
    if as_json:
        _print_json(providers)
        return
    health = {True: "healthy", False: "unhealthy", None: ""}
    rows = [(p.name, p.kind, p.default_model, p.base_url, health[p.healthy]) for p in providers]
    _table(["name", "kind", "default model", "base url", "health"], rows)


@providers_app.command("test", epilog=EPILOG)
@_handled
def providers_test(
    name: Annotated[str, typer.Argument(help="the provider's name")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Make a live call to a provider; exits 1 when it is unhealthy."""
    with _client(url, token) as client, _waiting(f"testing {name}"):
        result = client.providers.test(name)
    if as_json:
        _print_json(result)
    elif result.healthy:
        latency = f" in {result.latency_ms:.0f} ms" if result.latency_ms is not None else ""
        out.print(f"[green]{escape(name)}: healthy[/]{latency}")
    else:
        out.print(f"[red]{escape(name)}: unhealthy[/] {escape(result.detail or '')}".rstrip())
    if not result.healthy:
        raise typer.Exit(EXIT_API)


@providers_app.command("remove", epilog=EPILOG)
@_handled
def providers_remove(
    name: Annotated[str, typer.Argument(help="the provider's name")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Remove a provider and its stored key."""
    with _client(url, token) as client:
        client.providers.delete(name)
    err.print(f"removed provider {escape(name)}")


# --------------------------------------------------------------------------- memory


@_handled
def memory_search(
    query: Annotated[str, typer.Argument(help="what to look for, in your own words")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100)] = 10,
    conversation: Annotated[
        str | None, typer.Option("--conversation", "-c", help="only in this conversation")
    ] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", "-p", help="only answers of this provider")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="only with this tag")] = None,
    role: Annotated[str | None, typer.Option("--role", help="user, assistant, …")] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Search everything your conversations remember, by meaning."""
    with _client(url, token) as client, _waiting("searching"):
        results = client.memory.search(
            query,
            limit=limit,
            conversation_id=conversation,
            provider=provider,
            tags=tag,
            role=role,
        )
    if as_json:
        _print_json(results)
        return
    rows = [
        (f"{r.score:.3f}", r.role, r.conversation_id, _when(r.created_at), _one_line(r.content))
        for r in results
    ]
    _table(["score", "role", "conversation", "when", "content"], rows)


# --------------------------------------------------------------------------- conversations


@conversations_app.command("list", epilog=EPILOG)
@_handled
def conversations_list(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="how many to show")] = 20,
    every: Annotated[bool, typer.Option("--all", help="every conversation, all pages")] = False,
    tag: Annotated[str | None, typer.Option("--tag", help="only with this tag")] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List conversations, newest first."""
    with _client(url, token) as client:
        found = _take(
            client.conversations.iter(tag=tag, page_size=min(limit, 100)), None if every else limit
        )
    if as_json:
        _print_json(found)
        return
    rows = [
        (c.id, _one_line(c.title or "", 50), ",".join(c.tags), c.message_count, _when(c.updated_at))
        for c in found
    ]
    _table(["id", "title", "tags", "messages", "updated"], rows)


def _take(
    items: Iterator[sdk.ConversationSummary], limit: int | None
) -> list[sdk.ConversationSummary]:
    taken: list[sdk.ConversationSummary] = []
    for item in items:
        if limit is not None and len(taken) >= limit:
            break
        taken.append(item)
    return taken


@conversations_app.command("show", epilog=EPILOG)
@_handled
def conversations_show(
    conversation_id: Annotated[str, typer.Argument(help="the conversation's id")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Print a conversation with its messages."""
    with _client(url, token) as client:
        found = client.conversations.get(conversation_id)
    if as_json:
        _print_json(found)
        return
    tags = f" [{', '.join(found.tags)}]" if found.tags else ""
    out.print(f"[bold]{escape(found.title or found.id)}[/]{escape(tags)}")
    colours = {"user": "cyan", "assistant": "green"}
    for m in found.messages:
        who = f"{m.role} ({m.provider})" if m.provider and m.role == "assistant" else m.role
        out.print(f"\n[bold {colours.get(m.role, 'magenta')}]{escape(who)}>[/] {escape(m.content)}")


@conversations_app.command("delete", epilog=EPILOG)
@_handled
def conversations_delete(
    conversation_id: Annotated[str, typer.Argument(help="the conversation's id")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Delete a conversation, its messages and their memory."""
    with _client(url, token) as client:
        client.conversations.delete(conversation_id)
    err.print(f"deleted conversation {conversation_id}")


# --------------------------------------------------------------------------- agents


@agents_app.command("pair", epilog=EPILOG)
@_handled
def agents_pair(
    name: Annotated[str, typer.Argument(help="a name for the agent's machine")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Pair a new on-prem agent. Only its token goes to stdout; it is shown this once."""
    with _client(url, token) as client:
        paired = client.agents.pair(name)
    if as_json:
        _print_json(paired)
        return
    err.print(
        f"[green]paired[/] agent {paired.id} ({escape(paired.name)}); give it this token, "
        "shown once:"
    )
    print(paired.token)


@agents_app.command("list", epilog=EPILOG)
@_handled
def agents_list(
    as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """List paired agents and whether they are connected now."""
    with _client(url, token) as client:
        agents = client.agents.list()
    if as_json:
        _print_json(agents)
        return
    rows = [
        (
            a.id,
            a.name,
            "connected" if a.connected else "offline",
            _when(a.last_seen),
            ",".join(_model_names(a.capabilities)),
        )
        for a in agents
    ]
    _table(["id", "name", "state", "last seen", "models"], rows)


def _model_names(capabilities: dict[str, Any]) -> list[str]:
    models = capabilities.get("models") or []
    return [str(m.get("id", "")) if isinstance(m, dict) else str(m) for m in models]


@agents_app.command("revoke", epilog=EPILOG)
@_handled
def agents_revoke(
    agent_id: Annotated[str, typer.Argument(help="the agent's id")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Unpair an agent: its token stops working and it is disconnected."""
    with _client(url, token) as client:
        client.agents.revoke(agent_id)
    err.print(f"revoked agent {agent_id}")
