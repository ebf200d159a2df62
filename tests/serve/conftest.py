"""One real PA Core graph (Ray Serve in its fast mode, on loopback) shared by the whole suite,
with a loopback OpenAI-compatible upstream that records what it receives."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacore.testing.openai_server import OpenAIServer
from pacore.testing.platform import LocalPlatform, TestUser
from pacore.testing.tiny_model import build_tiny_llama

pytestmark = pytest.mark.serve


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def upstream() -> Iterator[OpenAIServer]:
    with OpenAIServer(tokens=6, models=("loopback-model", "loopback-big")) as server:
        yield server


@pytest.fixture(scope="session")
def fallback_upstream() -> Iterator[OpenAIServer]:
    with OpenAIServer(tokens=4, words=["from", "the", "fallback"]) as server:
        yield server


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPlatform]:
    settings: dict[str, object] = {"rate_limit_per_minute": 0, "memory_min_score": 0.2}
    deployments: dict[str, object] = {}
    if _redis_up():
        # Two gateway replicas sharing agent routing through Redis: a request must reach an
        # agent whichever replica holds its socket.
        settings["redis_url"] = "redis://127.0.0.1:6379/0"
        deployments["Gateway"] = {"num_replicas": 2}
    # A tiny random-weight Llama built here (no hub) and served by the CPU engine in the graph.
    tiny = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    self_hosted = [{"name": "tiny", "engine": "cpu", "model": str(tiny), "max_tokens": 32}]
    deployments["tiny"] = {"ray_actor_options": {"num_cpus": 0.05}}
    data_dir: Path = tmp_path_factory.mktemp("pacore-data")
    args = {"settings": settings, "deployments": deployments, "self_hosted": self_hosted}
    p = LocalPlatform(data_dir, args).start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def _fresh_upstreams(request: pytest.FixtureRequest) -> None:
    """Each test starts with no scripted replies or recorded requests left by another."""
    for name in ("upstream", "fallback_upstream"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


@pytest.fixture
def user(platform: LocalPlatform) -> Iterator[TestUser]:
    u = platform.register()
    yield u
    u.client.close()


@pytest.fixture
def user_with_upstream(user: TestUser, upstream: OpenAIServer) -> TestUser:
    r = user.client.put(
        "/v1/providers/openai",
        json={"kind": "openai", "api_key": "sk-loopback", "base_url": upstream.base_url,
              "default_model": "loopback-model", "options": {"retry_base_delay_s": 0.01}},
    )
    assert r.status_code == 200, r.text
    return user
