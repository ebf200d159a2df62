"""The `pacore` client commands as a user runs them: subprocesses against the real graph, with
PACORE_URL/PACORE_TOKEN in their environment, `chat` driven through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sdk
from pacore.testing.openai_server import OpenAIServer
from pacore.testing.platform import LocalPlatform, TestUser

pytestmark = pytest.mark.serve

SLOW_WORDS = ["north", "east", "south", "west", "up", "down", "left", "right"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[OpenAIServer]:
    with OpenAIServer(tokens=len(SLOW_WORDS), token_delay_s=0.25, words=SLOW_WORDS) as server:
        yield server


@pytest.fixture
def env(
    platform: LocalPlatform, user: TestUser, upstream: OpenAIServer, slow_upstream: OpenAIServer
) -> dict[str, str]:
    """The environment of a user with a fast default provider and a slow one."""
    with sdk.Client(platform.url, user.token) as client:
        for name, server in (("openai", upstream), ("slow", slow_upstream)):
            client.providers.configure(name, "openai", api_key="sk-loopback",
                                       base_url=server.base_url, default_model="loopback-model")
        client.settings.put({"default_provider": "openai"})
    base = {k: v for k, v in os.environ.items() if not k.startswith("PACORE_")}
    return {**base, "PACORE_URL": platform.url, "PACORE_TOKEN": user.token, "COLUMNS": "200"}


def pacore(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacore.cli", *args],
        input=stdin if stdin is not None else "", capture_output=True, text=True, env=env,
        timeout=180,
    )


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- help, usage


HELP_WALK = """
import json
from typer.main import get_command
from typer.testing import CliRunner
import pacore.cli as cli
cli._load()
root = get_command(cli.app)
paths = []
def walk(command, path):
    paths.append(path)
    for name, sub in getattr(command, "commands", {}).items():
        walk(sub, [*path, name])
walk(root, [])
runner = CliRunner()
print(json.dumps({" ".join(p): [r.exit_code, r.output] for p in paths
                  for r in [runner.invoke(cli.app, [*p, "--help"], terminal_width=200)]}))
"""

CLIENT_COMMANDS = [
    "chat", "ask", "token create", "token list", "token revoke", "providers add",
    "providers list", "providers test", "providers remove", "memory search",
    "conversations list", "conversations show", "conversations delete", "agents pair",
    "agents list", "agents revoke",
]


def test_help_everywhere_with_exit_codes() -> None:
    walked = subprocess.run([sys.executable, "-c", HELP_WALK], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert walked.returncode == 0, walked.stderr
    helps: dict[str, list[Any]] = json.loads(walked.stdout)
    assert all(code == 0 for code, _ in helps.values()), {p: c for p, (c, _) in helps.items() if c}
    for command in CLIENT_COMMANDS:
        assert command in helps, command
        text = " ".join(helps[command][1].split())
        assert "Exit codes: 0 ok, 1 API error, 2 usage error, 3 authentication error, 4 not found" \
            in text, command
    memory_help = helps["memory"][1]
    assert "reindex" in memory_help and "search" in memory_help


def test_usage_errors_exit_2(env: dict[str, str]) -> None:
    assert pacore("conversations", "list", "--limit", "0", env=env).returncode == 2
    assert pacore("token", "create", env=env).returncode == 2
    assert pacore("ask", "--no-such-option", "x", env=env).returncode == 2
    empty = pacore("ask", env=env, stdin="  \n")
    assert empty.returncode == 2 and empty.stdout == ""


# --------------------------------------------------------------------------- ask


def test_ask_prints_only_the_answer(env: dict[str, str]) -> None:
    answered = pacore("ask", "--no-memory", "pale blue dot", env=env)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout == "pale blue dot pale blue dot\n"

    piped = pacore("ask", "--no-memory", env=env, stdin="from the pipe\n")
    assert piped.returncode == 0 and piped.stdout == "from the pipe from the pipe\n"

    whole = _json(pacore("ask", "--json", "--no-memory", "--provider", "slow", "json here",
                         env=env))
    assert whole["content"] == " ".join(SLOW_WORDS) and whole["provider"] == "slow"
    followed = _json(pacore("ask", "--json", "-c", whole["conversation_id"], "again", env=env))
    assert followed["conversation_id"] == whole["conversation_id"]


def test_exit_codes_for_auth_not_found_and_connection(env: dict[str, str]) -> None:
    unauthenticated = pacore("ask", "hello", env={**env, "PACORE_TOKEN": "bad-token"})
    assert unauthenticated.returncode == 3 and unauthenticated.stdout == ""
    assert "error:" in unauthenticated.stderr
    assert pacore("conversations", "show", "no-such-id", env=env).returncode == 4
    assert pacore("ask", "hello", "--url", "http://127.0.0.1:9", env=env).returncode == 5
    assert pacore("ask", "hi", "--provider", "nobody", env=env).returncode == 4


# --------------------------------------------------------------------------- tokens, providers


def test_token_create_list_revoke(env: dict[str, str]) -> None:
    created = pacore("token", "create", "ci-bot", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret and "\n" not in secret and "shown once" in created.stderr

    listed = pacore("token", "list", env=env)
    assert listed.returncode == 0 and "\x1b[" not in listed.stdout  # plain when piped
    header, *rows = listed.stdout.splitlines()
    assert header.split("\t")[:2] == ["id", "name"]
    token_id, name = rows[0].split("\t")[:2]
    assert name == "ci-bot"

    as_bot = {**env, "PACORE_TOKEN": secret}
    assert pacore("conversations", "list", env=as_bot).returncode == 0
    assert pacore("token", "revoke", token_id, env=env).returncode == 0
    assert pacore("conversations", "list", env=as_bot).returncode == 3
    assert _json(pacore("token", "list", "--json", env=env)) == []


def test_providers_add_list_test_remove(env: dict[str, str], upstream: OpenAIServer) -> None:
    added = pacore("providers", "add", "groq-ish", "--kind", "custom", "--api-key", "-",
                   "--base-url", upstream.base_url, "--default-model", "loopback-model",
                   "-o", "retry_base_delay_s=0.01", env=env, stdin="sk-from-stdin\n")
    assert added.returncode == 0, added.stderr
    listed = {p["name"]: p for p in _json(pacore("providers", "list", "--json", env=env))}
    assert listed["groq-ish"]["kind"] == "custom" and listed["groq-ish"]["healthy"] is True
    assert "sk-from-stdin" not in json.dumps(listed)

    tested = pacore("providers", "test", "groq-ish", env=env)
    assert tested.returncode == 0 and "healthy" in tested.stdout
    assert pacore("providers", "remove", "groq-ish", env=env).returncode == 0
    assert pacore("providers", "test", "groq-ish", env=env).returncode == 4
    assert pacore("providers", "add", "x", "--kind", "nonsense", env=env).returncode == 1


# --------------------------------------------------------------------------- history, memory


def test_conversations_and_memory_search(env: dict[str, str]) -> None:
    answer = _json(pacore("ask", "--json", "--no-memory", "the orchard grows quinces", env=env))
    conversation = answer["conversation_id"]
    listed = _json(pacore("conversations", "list", "--all", "--json", env=env))
    assert [c["id"] for c in listed] == [conversation]

    deadline = time.monotonic() + 60
    while "assistant" not in (shown := pacore("conversations", "show", conversation, env=env)).stdout:
        assert shown.returncode == 0, shown.stderr
        assert time.monotonic() < deadline, "the turn was never stored"
        time.sleep(0.5)
    assert "user> the orchard grows quinces" in shown.stdout
    assert "assistant (openai)> the orchard grows quinces" in shown.stdout

    deadline = time.monotonic() + 60
    while True:
        found = _json(pacore("memory", "search", "quince orchard", "--json", env=env))
        if any("quinces" in r["content"] for r in found):
            break
        assert time.monotonic() < deadline, "the conversation never became searchable"
        time.sleep(1)
    assert {r["conversation_id"] for r in found} == {conversation}
    table = pacore("memory", "search", "quince orchard", "-n", "1", env=env)
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 2

    assert pacore("conversations", "delete", conversation, env=env).returncode == 0
    assert pacore("conversations", "show", conversation, env=env).returncode == 4


def test_agents_pair_list_revoke(env: dict[str, str]) -> None:
    listed = pacore("agents", "list", "--json", env=env)
    if listed.returncode == 4 and "no route" in listed.stderr:
        pytest.skip("this build of the gateway does not serve /v1/agents")
    assert _json(listed) == []
    paired = pacore("agents", "pair", "edge-box", env=env)
    assert paired.returncode == 0, paired.stderr
    assert paired.stdout.strip() and "shown once" in paired.stderr
    agents = _json(pacore("agents", "list", "--json", env=env))
    assert [(a["name"], a["connected"]) for a in agents] == [("edge-box", False)]
    assert pacore("agents", "revoke", agents[0]["id"], env=env).returncode == 0
    assert _json(pacore("agents", "list", "--json", env=env)) == []


# --------------------------------------------------------------------------- chat on a terminal


class Terminal:
    """A child process on a pseudo-terminal, read as it writes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        close_fds=True)
        os.close(slave)
        self.output = b""

    @property
    def text(self) -> str:
        return ANSI.sub(b"", self.output).decode(errors="replace").replace("\r", "")

    def expect(self, pattern: str, within_s: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + within_s
        while True:
            found = re.search(pattern, self.text)
            if found:
                return found
            assert time.monotonic() < deadline, f"never saw {pattern!r} in:\n{self.text}"
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    assert re.search(pattern, self.text), f"never saw {pattern!r}:\n{self.text}"

    def footers(self, count: int) -> list[str]:
        """The conversation ids of the first ``count`` finished answers, waiting for them."""
        pattern = r"right\nconversation (\S+)"
        self.expect(rf"(?s)(?:{pattern}.*){{{count}}}")
        return re.findall(pattern, self.text)

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> int:
        try:
            return self.process.wait(timeout=60)
        finally:
            os.close(self.master)


def test_chat_streams_and_keeps_the_conversation(env: dict[str, str]) -> None:
    term = Terminal([sys.executable, "-m", "pacore.cli", "chat", "--provider", "slow"],
                    {**env, "TERM": "xterm"})
    try:
        term.expect(r"you> ")
        term.send("first question")
        term.expect(r"pacore> north")
        # The first word is on screen while the rest is still being written.
        assert "right" not in term.text.split("pacore> ")[-1]
        [first] = term.footers(1)

        term.send("second question")
        assert term.footers(2) == [first, first]

        term.send("/new")
        term.expect(r"new conversation")
        term.send("third question")
        third = term.footers(3)[2]
        assert third != first
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
    with sdk.Client(env["PACORE_URL"], env["PACORE_TOKEN"]) as client:
        deadline = time.monotonic() + 60
        while len((kept := client.conversations.get(first)).messages) < 4:
            assert time.monotonic() < deadline, "the second turn was never stored"
            time.sleep(0.2)
    assert [m.content for m in kept.messages if m.role == "user"] == [
        "first question", "second question"
    ]


def test_chat_leaves_on_end_of_input(env: dict[str, str]) -> None:
    term = Terminal([sys.executable, "-m", "pacore.cli", "chat"], env)
    try:
        term.expect(r"you> ")
        os.write(term.master, b"\x04")  # Ctrl-D
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
