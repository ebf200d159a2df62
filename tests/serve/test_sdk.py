"""The Python SDK against the real graph: every call sync and async, streaming as chunks arrive,
errors mapped to their classes; its retry policy against a loopback server that refuses on cue;
and its install into a fresh virtualenv without the platform's stack."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import sdk
from pacore.testing.loopback import Answer, DropConnection, LoopbackServer, RecordedRequest
from pacore.testing.openai_server import OpenAIServer, Scripted
from pacore.testing.platform import LocalPlatform, TestUser

pytestmark = pytest.mark.serve

SDK_DIR = Path(__file__).resolve().parents[2] / "sdk"
PASSWORD = "correct horse battery"
SLOW_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[OpenAIServer]:
    """An upstream that writes one word every 100 ms, so a stream visibly takes time."""
    with OpenAIServer(tokens=len(SLOW_WORDS), token_delay_s=0.1, words=SLOW_WORDS) as server:
        yield server


def _configure(client: sdk.Client, upstream: OpenAIServer, slow: OpenAIServer) -> None:
    for name, server in (("openai", upstream), ("slow", slow)):
        client.providers.configure(
            name, "openai", api_key="sk-loopback", base_url=server.base_url,
            default_model="loopback-model", options={"retry_base_delay_s": 0.01},
        )
    client.settings.put({"default_provider": "openai"})


@pytest.fixture
def client(
    platform: LocalPlatform, user: TestUser, upstream: OpenAIServer, slow_upstream: OpenAIServer
) -> Iterator[sdk.Client]:
    """An SDK client of a fresh user with a fast default provider and a slow one."""
    with sdk.Client(platform.url, user.token) as c:
        _configure(c, upstream, slow_upstream)
        yield c


def _searchable(results: list[sdk.MemoryResult], needle: str) -> bool:
    return any(needle in r.content for r in results)


def _wait_searchable(client: sdk.Client, query: str, needle: str) -> list[sdk.MemoryResult]:
    """Indexing happens after the answer is sent: wait until the message can be found."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        results = client.memory.search(query, limit=20)
        if _searchable(results, needle):
            return results
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} never became searchable")


def _stored(client: sdk.Client, conversation_id: str, messages: int) -> sdk.Conversation:
    """The turn is written after the answer is sent: wait until it holds ``messages``."""
    deadline = time.monotonic() + 60
    while True:
        conversation = client.conversations.get(conversation_id)
        if len(conversation.messages) >= messages:
            return conversation
        assert time.monotonic() < deadline, f"{conversation_id} never held {messages} messages"
        time.sleep(0.2)


# --------------------------------------------------------------------------- surface, configuration


def test_public_surface_is_explicit() -> None:
    public = {n for n in dir(sdk) if not n.startswith("_")} - {"annotations"}
    assert set(sdk.__all__) == public | {"__version__"}
    assert len(sdk.__all__) == len(set(sdk.__all__))
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None
    for error in ("AuthenticationError", "NotFoundError", "ValidationError", "RateLimitError",
                  "PayloadTooLargeError", "TimeoutError", "ConnectionError", "UpstreamError"):
        assert issubclass(getattr(sdk, error), sdk.PACoreError)
    assert issubclass(sdk.UpstreamError, sdk.ServerError)


def test_url_and_token_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACORE_URL", "http://pacore.example:9000/")
    monkeypatch.setenv("PACORE_TOKEN", "from-env")
    with sdk.Client() as c:
        assert (c.base_url, c.token) == ("http://pacore.example:9000", "from-env")
    with sdk.Client("http://other.example", "explicit") as c:
        assert (c.base_url, c.token) == ("http://other.example", "explicit")
    monkeypatch.delenv("PACORE_URL")
    monkeypatch.delenv("PACORE_TOKEN")
    with sdk.Client() as c:
        assert (c.base_url, c.token) == (sdk.DEFAULT_BASE_URL, None)


# --------------------------------------------------------------------------- sync calls


def test_register_login_me(platform: LocalPlatform) -> None:
    email = f"sdk-{uuid.uuid4().hex[:10]}@example.com"
    with sdk.Client(platform.url, token=None) as c:
        registered = c.auth.register(email, PASSWORD)
        login = c.auth.login(email, PASSWORD)
        assert login.token and login.expires_at is not None
        c.token = login.token
        me = c.auth.me()
        assert (me.user_id, me.email) == (registered.user_id, email)
        with pytest.raises(sdk.AuthenticationError):
            c.auth.login(email, "not the password")
        with pytest.raises(sdk.ConflictError):
            c.auth.register(email, PASSWORD)


def test_providers_and_settings(client: sdk.Client, upstream: OpenAIServer) -> None:
    assert {p.name for p in client.providers.list()} == {"openai", "slow"}
    saved = client.providers.configure(
        "extra", "custom", base_url=upstream.base_url, default_model="loopback-model"
    )
    assert (saved.name, saved.kind, saved.configured) == ("extra", "custom", True)
    listed = {p.name: p for p in client.providers.list()}
    assert listed["extra"].base_url == upstream.base_url and listed["openai"].healthy is True
    assert client.providers.test("extra").healthy is True

    wanted = sdk.UserSettings(
        default_provider="extra", data_residency="any", routing=sdk.Routing(code="openai"),
        fallbacks=["slow"],
    )
    assert client.settings.put(wanted) == wanted
    assert client.settings.get() == wanted
    with pytest.raises(sdk.BadRequestError) as refused:
        client.settings.put({"default_provider": "nobody"})
    assert refused.value.param == "default_provider"

    client.settings.put({"default_provider": "openai"})
    client.providers.delete("extra")
    assert "extra" not in {p.name for p in client.providers.list()}
    with pytest.raises(sdk.NotFoundError):
        client.providers.test("extra")


def test_complete_and_conversations(client: sdk.Client) -> None:
    first = client.complete("red green blue", use_memory=False, tags=["colours"])
    assert first.content == "red green blue red green blue"
    assert first.provider == "openai" and first.model == "loopback-model"
    assert first.usage.completion_tokens > 0 and first.route is not None
    again = client.complete(
        messages=[{"role": "user", "content": "cyan magenta"}],
        conversation_id=first.conversation_id, use_memory=False,
    )
    assert again.conversation_id == first.conversation_id
    others = [client.complete(f"topic {i}", use_memory=False).conversation_id for i in range(2)]

    # Turns are stored after their answers went out (off the response path).
    deadline = time.monotonic() + 60
    while len(client.conversations.list(limit=3).data) < 3:
        assert time.monotonic() < deadline, "the last turns' conversations were never stored"
        time.sleep(0.2)
    page = client.conversations.list(limit=1)
    assert len(page.data) == 1 and page.next_cursor
    every = [c.id for c in client.conversations.iter(page_size=1)]
    assert sorted(every) == sorted([first.conversation_id, *others])
    tagged = client.conversations.list(tag="colours").data
    assert [c.id for c in tagged] == [first.conversation_id]

    whole = _stored(client, first.conversation_id, 4)
    assert [m.role for m in whole.messages] == ["user", "assistant", "user", "assistant"]
    assert whole.messages[2].content == "cyan magenta"
    assert client.conversations.tag(first.conversation_id, ["kept"]).tags == ["kept"]

    client.conversations.delete(others[0])
    with pytest.raises(sdk.NotFoundError):
        client.conversations.get(others[0])


def test_memory_search(client: sdk.Client) -> None:
    answer = client.complete("the lighthouse keeper paints the stairs", use_memory=False)
    results = _wait_searchable(client, "lighthouse keeper", "lighthouse")
    hit = next(r for r in results if "lighthouse" in r.content)
    assert hit.conversation_id == answer.conversation_id and hit.score > 0
    only_user = client.memory.search("lighthouse", role="user",
                                     conversation_id=answer.conversation_id)
    assert only_user and {r.role for r in only_user} == {"user"}


def test_stream_yields_chunks_as_they_arrive(client: sdk.Client) -> None:
    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    with client.stream("count for me", provider="slow", use_memory=False) as stream:
        assert stream.conversation_id  # known from the answer's head, before any chunk
        for chunk in stream:
            arrivals.append((time.monotonic(), chunk.content))
            if len(arrivals) == 1:
                assert stream.done is None  # the rest is still being written
    ended = time.monotonic()
    assert "".join(c for _, c in arrivals) == " ".join(SLOW_WORDS) == stream.content
    assert len(arrivals) > 2
    first = arrivals[0][0]
    # The first word came in the first half of the whole stream: nothing waited for the end.
    assert first - started < ended - first
    assert stream.done is not None and stream.done.usage.completion_tokens == len(SLOW_WORDS)
    assert stream.done.conversation_id == stream.conversation_id


def test_stream_final_continues_the_conversation(client: sdk.Client) -> None:
    opening = client.complete("north south", use_memory=False)
    stream = client.stream("east west", conversation_id=opening.conversation_id, use_memory=False)
    final = stream.final()
    assert final.content == "east west east west east west"
    assert final.conversation_id == opening.conversation_id
    assert _stored(client, opening.conversation_id, 4).message_count == 4


def test_tokens(client: sdk.Client, platform: LocalPlatform) -> None:
    created = client.tokens.create("ci", expires_in_days=30)
    assert created.expires_at is not None
    assert [t.name for t in client.tokens.list()] == ["ci"]
    with sdk.Client(platform.url, created.token) as scripted:
        assert scripted.auth.me().user_id == client.auth.me().user_id
        client.tokens.revoke(created.id)
        with pytest.raises(sdk.AuthenticationError):
            scripted.auth.me()
    assert client.tokens.list() == []


def _agents_served(client: sdk.Client) -> bool:
    try:
        client.agents.list()
    except sdk.NotFoundError as exc:
        if exc.message.startswith("no route"):
            return False
        raise
    return True


def test_agents(client: sdk.Client) -> None:
    if not _agents_served(client):
        pytest.skip("this build of the gateway does not serve /v1/agents")
    paired = client.agents.pair("edge-box")
    assert paired.name == "edge-box" and paired.token
    listed = client.agents.list()
    assert [(a.id, a.name, a.connected) for a in listed] == [(paired.id, "edge-box", False)]
    client.agents.revoke(paired.id)
    assert client.agents.list() == []


def test_health(platform: LocalPlatform) -> None:
    with sdk.Client(platform.url) as c:
        health = c.health()
    assert health.status == "ok" and health.components["gateway"] == "ok"


# --------------------------------------------------------------------------- errors


def test_errors_map_to_their_classes(client: sdk.Client, platform: LocalPlatform) -> None:
    with sdk.Client(platform.url, "not-a-token") as stranger:
        with pytest.raises(sdk.AuthenticationError) as unauthenticated:
            stranger.auth.me()
    e = unauthenticated.value
    assert (e.status, e.type) == (401, "authentication_error") and e.request_id

    with pytest.raises(sdk.NotFoundError) as missing:
        client.conversations.get("no-such-conversation")
    assert (missing.value.status, missing.value.type) == (404, "not_found_error")

    with pytest.raises(sdk.ValidationError) as invalid:
        client.complete("hello", temperature=5)
    assert (invalid.value.status, invalid.value.param) == (422, "temperature")
    with pytest.raises(sdk.ValidationError):
        client.complete()  # neither a prompt nor messages

    with pytest.raises(sdk.PayloadTooLargeError) as too_large:
        client.complete("x" * 2_000_000)
    assert (too_large.value.status, too_large.value.code) == (413, "body_too_large")

    with pytest.raises(ValueError, match="must not be empty"):
        client.conversations.get("")


def test_stream_errors_before_and_during_the_answer(
    client: sdk.Client, slow_upstream: OpenAIServer
) -> None:
    with pytest.raises(sdk.NotFoundError):
        client.stream("hello", provider="nobody")
    # The provider fails after two words: too late for a fallback, so the stream reports it.
    slow_upstream.script(Scripted(error_after=2, message="the model fell over"))
    stream = client.stream("hello", provider="slow", use_memory=False)
    received = []
    with pytest.raises(sdk.PACoreError) as broken:
        for chunk in stream:
            received.append(chunk.content)
    assert received and broken.value.status is None and broken.value.type
    assert stream.done is None


def test_unreachable_server_is_a_connection_error() -> None:
    with sdk.Client("http://127.0.0.1:9", "t", max_retries=0) as c:
        with pytest.raises(sdk.ConnectionError) as unreachable:
            c.auth.me()
    assert unreachable.value.status is None


# --------------------------------------------------------------------------- async twin


async def test_async_client_covers_every_call(
    platform: LocalPlatform, upstream: OpenAIServer, slow_upstream: OpenAIServer
) -> None:
    email = f"async-{uuid.uuid4().hex[:10]}@example.com"
    async with sdk.AsyncClient(platform.url) as c:
        registered = await c.auth.register(email, PASSWORD)
        c.token = (await c.auth.login(email, PASSWORD)).token
        assert (await c.auth.me()).user_id == registered.user_id

        for name, server in (("openai", upstream), ("slow", slow_upstream)):
            await c.providers.configure(name, "openai", api_key="sk-loopback",
                                        base_url=server.base_url, default_model="loopback-model")
        assert (await c.settings.put({"default_provider": "openai"})).default_provider == "openai"
        assert (await c.settings.get()).default_provider == "openai"
        assert {p.name for p in await c.providers.list()} == {"openai", "slow"}
        assert (await c.providers.test("openai")).healthy

        answer = await c.complete("async tide pools", use_memory=False)
        assert answer.content.startswith("async tide pools")
        stream = await c.stream("and more", provider="slow", conversation_id=answer.conversation_id,
                                use_memory=False)
        started, arrivals = time.monotonic(), []
        async with stream:
            async for _ in stream:
                arrivals.append(time.monotonic())
        ended = time.monotonic()
        assert stream.content == " ".join(SLOW_WORDS) and len(arrivals) > 2
        assert arrivals[0] - started < ended - arrivals[0]
        assert stream.done is not None and stream.done.conversation_id == answer.conversation_id
        final = await (await c.stream("last words", use_memory=False)).final()
        assert final.content.startswith("last words")

        # A turn is stored after its answer went out (off the response path): wait for the
        # last one's conversation as for the streamed turn below.
        deadline = time.monotonic() + 60
        while len((await c.conversations.list(limit=2)).data) < 2:
            assert time.monotonic() < deadline, "the last turn's conversation was never stored"
            await asyncio.sleep(0.2)
        page = await c.conversations.list(limit=1)
        assert len(page.data) == 1 and page.next_cursor
        ids = [s.id async for s in c.conversations.iter(page_size=1)]
        assert sorted(ids) == sorted([answer.conversation_id, final.conversation_id])
        deadline = time.monotonic() + 60
        while len((await c.conversations.get(answer.conversation_id)).messages) < 4:
            assert time.monotonic() < deadline, "the streamed turn was never stored"
            await asyncio.sleep(0.2)
        assert (await c.conversations.tag(answer.conversation_id, ["tide"])).tags == ["tide"]
        await c.conversations.delete(final.conversation_id)
        with pytest.raises(sdk.NotFoundError):
            await c.conversations.get(final.conversation_id)

        deadline = time.monotonic() + 60
        while not _searchable(await c.memory.search("tide pools"), "tide"):
            assert time.monotonic() < deadline, "the answer never became searchable"
            await asyncio.sleep(0.5)

        created = await c.tokens.create("async-ci")
        assert [t.id for t in await c.tokens.list()] == [created.id]
        await c.tokens.revoke(created.id)
        assert await c.tokens.list() == []

        await c.providers.delete("slow")
        assert {p.name for p in await c.providers.list()} == {"openai"}
        assert (await c.health()).status == "ok"


async def test_async_agents_and_errors(platform: LocalPlatform, user: TestUser) -> None:
    async with sdk.AsyncClient(platform.url, user.token) as c:
        with pytest.raises(sdk.ValidationError):
            await c.complete("hi", max_tokens=0)
        with pytest.raises(sdk.NotFoundError):
            await c.stream("hi", provider="nobody")
        try:
            paired = await c.agents.pair("async-box")
        except sdk.NotFoundError as exc:
            if exc.message.startswith("no route"):
                pytest.skip("this build of the gateway does not serve /v1/agents")
            raise
        assert [a.id for a in await c.agents.list()] == [paired.id]
        await c.agents.revoke(paired.id)
        assert await c.agents.list() == []
    async with sdk.AsyncClient(platform.url, "bad-token") as stranger:
        with pytest.raises(sdk.AuthenticationError):
            await stranger.auth.me()


# --------------------------------------------------------------------------- retry policy


class FrontDoor(LoopbackServer):
    """A loopback server that plays scripted answers first, then a plain ``/v1/auth/me``."""

    def __init__(self) -> None:
        super().__init__()
        self.script: deque[Answer] = deque()

    async def handle(self, request: RecordedRequest) -> Answer:
        if self.script:
            return self.script.popleft()
        return Answer.json({"user_id": "u-1", "email": "front@example.com"})


@pytest.fixture
def front_door() -> Iterator[FrontDoor]:
    with FrontDoor() as server:
        yield server


def _refused(status: int, retry_after: str | None = None) -> Answer:
    body = {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": None}}
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Answer.json(body, status=status, headers=headers)


async def _drops_after_head() -> AsyncIterator[bytes]:
    raise DropConnection
    yield b""  # pragma: no cover - makes this an async generator


def _dropped() -> Answer:
    return Answer(stream=_drops_after_head())


def test_refusals_are_retried_after_retry_after(front_door: FrontDoor) -> None:
    front_door.script.extend([_refused(429, "0"), _refused(503, "0")])
    with sdk.Client(front_door.url, "t", max_retries=2) as c:
        assert c.auth.me().email == "front@example.com"
    assert len(front_door.requests) == 3


def test_a_refused_completion_is_retried(front_door: FrontDoor) -> None:
    done = {"id": "c1", "conversation_id": "conv", "provider": "p", "model": "m",
            "content": "fine", "usage": {}}
    front_door.script.extend([_refused(503), Answer.json(done)])
    with sdk.Client(front_door.url, "t", max_retries=1) as c:
        assert c.complete("hello").content == "fine"
    assert [r.path for r in front_door.requests] == ["/v1/complete", "/v1/complete"]


def test_retries_give_up_with_the_servers_advice(front_door: FrontDoor) -> None:
    front_door.script.extend([_refused(429, "0")] * 2 + [_refused(429, "120")])
    with sdk.Client(front_door.url, "t", max_retries=5) as c:
        with pytest.raises(sdk.RateLimitError) as limited:
            c.auth.me()
    # A wait longer than the policy allows is not slept through: the error says how long.
    assert limited.value.retry_after == 120 and len(front_door.requests) == 3


def test_a_completion_that_may_have_started_is_never_resent(front_door: FrontDoor) -> None:
    front_door.script.extend([_dropped(), Answer.json({}, delay_s=3), Answer.json({}, delay_s=3)])
    with sdk.Client(front_door.url, "t", max_retries=3, timeout=1.0) as c:
        with pytest.raises(sdk.ConnectionError):
            c.complete("hello")
        assert len(front_door.requests) == 1
        with pytest.raises(sdk.TimeoutError) as late:
            c.complete("hello")
        assert late.value.status is None and len(front_door.requests) == 2
        with pytest.raises(sdk.TimeoutError):
            c.stream("hello")  # the same rule for streams
        assert len(front_door.requests) == 3


def test_reads_are_resent_after_a_broken_connection(front_door: FrontDoor) -> None:
    front_door.script.extend([_dropped()])
    with sdk.Client(front_door.url, "t", max_retries=1) as c:
        assert c.auth.me().user_id == "u-1"
    assert len(front_door.requests) == 2


async def test_async_retries_follow_the_same_policy(front_door: FrontDoor) -> None:
    front_door.script.extend([_refused(429, "0"), _dropped()])
    async with sdk.AsyncClient(front_door.url, "t", max_retries=2) as c:
        assert (await c.auth.me()).user_id == "u-1"
        assert len(front_door.requests) == 3
        front_door.script.append(_dropped())
        with pytest.raises(sdk.ConnectionError):
            await c.complete("hello")
    assert len(front_door.requests) == 4


# --------------------------------------------------------------------------- standalone install


@pytest.mark.slow
def test_sdk_installs_alone_into_a_fresh_venv(tmp_path: Path) -> None:
    source = tmp_path / "sdk"
    shutil.copytree(SDK_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                    "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    probe = (
        "import sys, importlib.metadata as md, sdk\n"
        "heavy = {'ray', 'torch', 'sqlalchemy', 'fastapi', 'typer', 'rich', 'pacore'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "print(sdk.Client.__name__, sdk.__version__)\n"
        "print(' '.join(sorted(d.metadata['Name'].lower() for d in md.distributions())))\n"
        "import importlib.resources as res\n"
        "assert res.files('sdk').joinpath('py.typed').is_file()\n"
    )
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    names, installed = run.stdout.splitlines()
    assert names == f"Client {sdk.__version__}"
    dists = set(installed.split())
    assert {"pacore-sdk", "httpx", "pydantic"} <= dists
    assert not dists & {"ray", "torch", "sqlalchemy", "fastapi", "pacore", "typer", "rich"}
