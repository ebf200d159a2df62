"""On-prem agents end to end: a real ``pacore-agent run`` process (its own Ray instance and
local Serve app, a loopback model server behind it) paired through the API and dialling the
real gateway; completions, presence, isolation, revocation, failures and the tool loop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import websockets.sync.client as ws_client
import yaml
from openai import OpenAI
from websockets.exceptions import ConnectionClosed

from pacore.agents.protocol import CLOSE_UNAUTHORIZED
from pacore.testing.openai_server import OpenAIServer, Scripted, ScriptedToolCall
from pacore.testing.platform import LocalPlatform, TestUser

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

MODEL = "office-llm"
OFFICE_WORDS = ["from", "the", "office", "model"]
HANDBOOK = "the office opens at nine"
T = TypeVar("T")
_AGENT_CLI = shutil.which("pacore-agent") or str(Path(sys.executable).with_name("pacore-agent"))


def _eventually(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


def _sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        if data:
            events.append((name, json.loads(data)))
    return events


class AgentProcess:
    """``pacore-agent run -c <config>`` in a process group of its own, with a Ray instance of
    its own (its own temp dir, none of the platform's Serve switches)."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.log = workdir / "agent.log"
        # A short directory: Ray's socket paths under it must stay within the AF_UNIX limit.
        self.ray_tmp = tempfile.mkdtemp(prefix="pa-agent-", dir="/tmp")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_SERVE_") and k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = self.ray_tmp
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [_AGENT_CLI, "run", "-c", str(config), "-v"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the agent did not exit within {timeout_s:.0f}s:\n{self.output()[-3000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the agent process alone (its Ray processes die with it)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """End the agent and everything in its process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _agent_config(
    platform: LocalPlatform, token: str, office: OpenAIServer, docs: Path, name: str
) -> dict[str, Any]:
    return {
        "cloud_url": platform.url,
        "agent_token": token,
        "name": name,
        "models": [{
            "name": MODEL, "kind": "openai-compatible", "base_url": office.base_url,
            "model": "office-model", "num_cpus": 0.05,
            "options": {"retry_base_delay_s": 0.01},
        }],
        "tools": {"file_read": {"root": str(docs)}},
        "local_api": {"enabled": False},
        "runtime": {"num_cpus": 1},
        "link": {"reconnect_base_s": 0.2, "reconnect_max_s": 1.0, "open_timeout_s": 5},
    }


def _pair(owner: TestUser, name: str) -> dict[str, Any]:
    r = owner.client.post("/v1/agents", json={"name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _agent_info(owner: TestUser, agent_id: str) -> dict[str, Any] | None:
    r = owner.client.get("/v1/agents")
    assert r.status_code == 200, r.text
    return next((a for a in r.json() if a["id"] == agent_id), None)


def _connected(owner: TestUser, agent_id: str) -> dict[str, Any] | None:
    info = _agent_info(owner, agent_id)
    if info and info["connected"] and info["capabilities"].get("models"):
        return info
    return None


def _disconnected(owner: TestUser, agent_id: str) -> bool:
    info = _agent_info(owner, agent_id)
    return info is not None and info["connected"] is False


class RunningAgent:
    """A paired agent and its process."""

    def __init__(self, owner: TestUser, paired: dict[str, Any], process: AgentProcess) -> None:
        self.owner = owner
        self.id: str = paired["id"]
        self.token: str = paired["token"]
        self.process = process

    @property
    def model(self) -> str:
        return f"agent:{self.id}/{MODEL}"

    def wait_connected(self, timeout_s: float = 240) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.process.proc.poll() is not None:
                raise AssertionError(f"the agent exited:\n{self.process.output()[-3000:]}")
            return _connected(self.owner, self.id)

        return _eventually(check, timeout_s, "the agent to connect")


def _start_agent(
    platform: LocalPlatform, owner: TestUser, office: OpenAIServer, docs: Path, workdir: Path,
    name: str,
) -> RunningAgent:
    paired = _pair(owner, name)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "agent.yaml"
    config.write_text(yaml.safe_dump(_agent_config(platform, paired["token"], office, docs, name)))
    return RunningAgent(owner, paired, AgentProcess(config, workdir))


@pytest.fixture(scope="module")
def office() -> Iterator[OpenAIServer]:
    """The office's model server behind the agent, with words of its own."""
    with OpenAIServer(tokens=4, words=OFFICE_WORDS, models=("office-model",)) as server:
        yield server


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("office-docs")
    (root / "handbook.txt").write_text(HANDBOOK)
    return root


@pytest.fixture(scope="module")
def owner(platform: LocalPlatform, upstream: OpenAIServer) -> Iterator[TestUser]:
    """The agents' owner, with a cloud provider of their own too (the loopback upstream)."""
    u = platform.register()
    r = u.client.put(
        "/v1/providers/openai",
        json={"kind": "openai", "api_key": "sk-loopback", "base_url": upstream.base_url,
              "default_model": "loopback-model", "options": {"retry_base_delay_s": 0.01}},
    )
    assert r.status_code == 200, r.text
    yield u
    u.client.close()


@pytest.fixture(scope="module")
def agent(
    platform: LocalPlatform, owner: TestUser, office: OpenAIServer, docs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningAgent]:
    running = _start_agent(
        platform, owner, office, docs, tmp_path_factory.mktemp("agent"), "office"
    )
    try:
        running.wait_connected()
        yield running
    finally:
        running.process.stop()


@pytest.fixture(autouse=True)
def _fresh_upstreams(office: OpenAIServer, upstream: OpenAIServer) -> None:
    office.reset()
    upstream.reset()


# --------------------------------------------------------------------------- completions


def test_complete_through_the_agent(agent: RunningAgent, office: OpenAIServer) -> None:
    r = agent.owner.client.post("/v1/complete", json={
        "model": agent.model, "prompt": "what does the office say?", "use_memory": False,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"] == "from the office model"
    assert body["provider"] == f"agent:{agent.id}"
    assert office.chat_requests[-1].body["model"] == "office-model"


def test_stream_through_the_agent(agent: RunningAgent) -> None:
    r = agent.owner.client.post("/v1/complete", json={
        "model": agent.model, "prompt": "stream it", "use_memory": False, "stream": True,
    })
    assert r.status_code == 200, r.text
    events = _sse_events(r.text)
    assert [name for name, _ in events][-1] == "done"
    assert "".join(d["content"] for name, d in events if name == "chunk") == (
        "from the office model"
    )
    assert events[-1][1]["provider"] == f"agent:{agent.id}"


def test_openai_client_through_the_agent(platform: LocalPlatform, agent: RunningAgent) -> None:
    client = OpenAI(base_url=f"{platform.url}/v1", api_key=agent.owner.token, max_retries=0)
    messages: Any = [{"role": "user", "content": "hello office"}]
    resp = client.chat.completions.create(
        model=agent.model, messages=messages, extra_body={"use_memory": False}
    )
    assert resp.choices[0].message.content == "from the office model"
    assert resp.model == agent.model
    stream = client.chat.completions.create(
        model=agent.model, messages=messages, stream=True,
        stream_options={"include_usage": True}, extra_body={"use_memory": False},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "from the office model"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_on_prem_residency_routes_to_the_agent(agent: RunningAgent) -> None:
    # The owner also has a cloud provider: only residency sends this to the agent.
    r = agent.owner.client.post("/v1/complete", json={
        "prompt": "keep this in the building", "data_residency": "on_prem", "use_memory": False,
    })
    assert r.status_code == 200, r.text
    assert r.json()["provider"] == f"agent:{agent.id}"
    assert r.json()["content"] == "from the office model"
    assert "on_prem" in r.json()["route"]["reason"]


def test_the_agent_is_listed_with_its_capabilities(
    platform: LocalPlatform, agent: RunningAgent
) -> None:
    info = _agent_info(agent.owner, agent.id)
    assert info is not None and info["connected"] is True and info["name"] == "office"
    caps = info["capabilities"]
    assert [m["id"] for m in caps["models"]] == [MODEL]
    assert [t["name"] for t in caps["tools"]] == ["file_read"]
    client = OpenAI(base_url=f"{platform.url}/v1", api_key=agent.owner.token, max_retries=0)
    assert agent.model in {m.id for m in client.models.list()}


def test_requests_reach_the_agent_through_either_gateway_replica(
    platform: LocalPlatform, agent: RunningAgent
) -> None:
    # The agent's socket ends on one of the two gateway replicas; the front door spreads new
    # connections over both, so with a fresh connection per request about half of these enter
    # through the replica that does not hold the socket and reach the agent only through the
    # hub's shared bus. All of them succeeding is the cross-replica path working.
    def one(i: int) -> str:
        body = {"model": agent.model, "prompt": f"request {i}", "use_memory": False,
                "stream": i % 2 == 0}
        with platform.client(agent.owner.token) as fresh:
            r = fresh.post("/v1/complete", json=body)
        assert r.status_code == 200, r.text
        if body["stream"]:
            events = _sse_events(r.text)
            assert events[-1][0] == "done", events[-1]
            return "".join(d["content"] for name, d in events if name == "chunk")
        return str(r.json()["content"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(one, range(16)))
    assert answers == ["from the office model"] * 16


# --------------------------------------------------------------------------- the tool loop


def test_the_model_calls_the_agents_tool(agent: RunningAgent, upstream: OpenAIServer) -> None:
    upstream.script(Scripted(tool_calls=(
        ScriptedToolCall("file_read", '{"path": "handbook.txt"}', id="call_read"),
    )))
    r = agent.owner.client.post("/v1/complete", json={
        "model": "openai/loopback-model", "prompt": "when does the office open",
        "agent_tools": agent.id, "use_memory": False,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"] == "when does the office open when"
    assert body["finish_reason"] == "stop" and "tool_calls" not in body
    first, second = upstream.chat_requests
    assert [t["function"]["name"] for t in first.body["tools"]] == ["file_read"]
    assert [m["role"] for m in second.messages] == ["user", "assistant", "tool"]
    assert second.messages[1]["tool_calls"][0]["function"]["name"] == "file_read"
    result = second.messages[2]
    assert result["tool_call_id"] == "call_read"
    assert json.loads(result["content"])["content"] == HANDBOOK

    # The stored turn (written off the response path) keeps the tool round.
    def stored_roles() -> list[str] | None:
        convo = agent.owner.client.get(f"/v1/conversations/{body['conversation_id']}")
        return [m["role"] for m in convo.json()["messages"]] if convo.status_code == 200 else None

    assert _eventually(stored_roles, 30, "the stored turn") == [
        "user", "assistant", "tool", "assistant"
    ]


def test_the_sdk_lends_the_model_an_agents_tools(
    platform: LocalPlatform, agent: RunningAgent, upstream: OpenAIServer
) -> None:
    import sdk

    upstream.script(Scripted(tool_calls=(
        ScriptedToolCall("file_read", '{"path": "handbook.txt"}', id="call_read"),
    )))
    with sdk.Client(platform.url, agent.owner.token) as client:
        answer = client.complete("when does the office open", model="openai/loopback-model",
                                 agent_tools=agent.id, use_memory=False)
    assert answer.content == "when does the office open when"
    assert [m["role"] for m in upstream.chat_requests[-1].messages] == ["user", "assistant", "tool"]


def test_only_the_last_round_streams(
    platform: LocalPlatform, agent: RunningAgent, upstream: OpenAIServer
) -> None:
    upstream.script(Scripted(tool_calls=(
        ScriptedToolCall("file_read", '{"path": "handbook.txt"}'),
    )))
    client = OpenAI(base_url=f"{platform.url}/v1", api_key=agent.owner.token, max_retries=0)
    stream = client.chat.completions.create(
        model="openai/loopback-model", stream=True,
        messages=[{"role": "user", "content": "read me the handbook"}],
        extra_body={"agent_tools": agent.id, "use_memory": False},
    )
    chunks = [c for c in stream if c.choices]
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "read me the handbook read me"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert HANDBOOK in upstream.chat_requests[1].messages[-1]["content"]


def test_undeclared_tools_and_paths_outside_the_root_are_refused(
    agent: RunningAgent, upstream: OpenAIServer
) -> None:
    upstream.script(Scripted(tool_calls=(
        ScriptedToolCall("shell_exec", '{"cmd": "cat /etc/passwd"}', id="call_shell"),
        ScriptedToolCall("file_read", '{"path": "../../etc/passwd"}', id="call_escape"),
    )))
    r = agent.owner.client.post("/v1/complete", json={
        "model": "openai/loopback-model", "prompt": "try your luck",
        "agent_tools": agent.id, "use_memory": False,
    })
    assert r.status_code == 200, r.text
    assert r.json()["content"]
    results = {m["tool_call_id"]: json.loads(m["content"])["error"]
               for m in upstream.chat_requests[1].messages if m["role"] == "tool"}
    assert results["call_shell"]["code"] == "unknown_tool"
    assert results["call_escape"]["code"] == "path_outside_root"


def test_the_clients_own_tool_calls_are_returned(
    platform: LocalPlatform, agent: RunningAgent, upstream: OpenAIServer
) -> None:
    upstream.script(Scripted(tool_calls=(
        ScriptedToolCall("get_weather", '{"city": "Oslo"}', id="call_weather"),
    )))
    client = OpenAI(base_url=f"{platform.url}/v1", api_key=agent.owner.token, max_retries=0)
    weather: Any = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}}}}
    resp = client.chat.completions.create(
        model="openai/loopback-model", tools=[weather],
        messages=[{"role": "user", "content": "weather in Oslo?"}],
        extra_body={"agent_tools": agent.id, "use_memory": False},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_weather", "get_weather", '{"city": "Oslo"}')
    ]
    assert len(upstream.chat_requests) == 1
    offered = [t["function"]["name"] for t in upstream.chat_requests[0].body["tools"]]
    assert offered == ["get_weather", "file_read"]


# --------------------------------------------------------------------------- isolation, tokens


def test_another_user_cannot_reach_the_agent(
    platform: LocalPlatform, agent: RunningAgent, upstream: OpenAIServer
) -> None:
    other = platform.register()
    try:
        r = other.client.put("/v1/providers/openai", json={
            "kind": "openai", "api_key": "sk-other", "base_url": upstream.base_url,
        })
        assert r.status_code == 200, r.text
        r = other.client.post("/v1/complete", json={
            "model": agent.model, "prompt": "let me in", "use_memory": False,
        })
        assert r.status_code == 404, r.text
        r = other.client.post("/v1/complete", json={
            "model": "openai/loopback-model", "prompt": "let me in", "agent_tools": agent.id,
            "use_memory": False,
        })
        assert r.status_code == 404, r.text
        assert upstream.chat_requests == []
        assert other.client.get("/v1/agents").json() == []
        assert other.client.delete(f"/v1/agents/{agent.id}").status_code == 404
    finally:
        other.client.close()
    assert _connected(agent.owner, agent.id) is not None


def _refusal_code(platform: LocalPlatform, token: str) -> int:
    """The close code the agents' socket answers a connection with ``token`` with."""
    url = platform.url.replace("http://", "ws://") + "/v1/agents/connect"
    with ws_client.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
    ) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
    assert info.value.rcvd is not None
    return int(info.value.rcvd.code)


def test_user_tokens_do_not_open_the_agent_socket(platform: LocalPlatform, owner: TestUser) -> None:
    api = owner.client.post("/v1/auth/tokens", json={"name": "not an agent"})
    assert api.status_code == 201, api.text
    assert _refusal_code(platform, owner.token) == CLOSE_UNAUTHORIZED  # a login session
    assert _refusal_code(platform, api.json()["token"]) == CLOSE_UNAUTHORIZED  # an API token
    assert _refusal_code(platform, "not-a-token") == CLOSE_UNAUTHORIZED


# --------------------------------------------------------------------------- failures


def _read_events(response: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """SSE events of a streamed response, as they arrive."""
    name, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif not line and data:
            yield name, json.loads(data)
            name, data = "message", ""


def test_an_agent_killed_mid_stream_fails_the_stream(
    platform: LocalPlatform, owner: TestUser, office: OpenAIServer, docs: Path,
    tmp_path: Path,
) -> None:
    doomed = _start_agent(platform, owner, office, docs, tmp_path / "doomed", "doomed")
    try:
        doomed.wait_connected()
        # The office model pauses after its first word, long enough to be killed meanwhile.
        office.script(Scripted(delay_s=120, delay_after=1))
        body = {"model": doomed.model, "prompt": "a long story", "use_memory": False,
                "stream": True}
        seen: list[str] = []
        timeout = httpx.Timeout(30.0)  # a hang would surface as a read timeout, not a pass
        with platform.client(owner.token) as client, client.stream(
            "POST", "/v1/complete", json=body, timeout=timeout
        ) as response:
            assert response.status_code == 200
            events = _read_events(response)
            name, data = next(events)
            assert (name, data["content"]) == ("chunk", "from")
            doomed.process.kill()
            killed = time.monotonic()
            seen = [name for name, _ in events]
        assert seen[-1:] == ["error"], seen
        assert time.monotonic() - killed < 30
        _eventually(lambda: _disconnected(owner, doomed.id), 30, "the agent to show as gone")
    finally:
        doomed.process.stop()


def _kill_gateway_replicas() -> int:
    import ray

    prefix = "SERVE_REPLICA::pacore#Gateway#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(prefix)]
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return len(names)


def _gateway_running(replicas: int) -> bool:
    from ray import serve

    status = serve.status().applications["pacore"].deployments["Gateway"]
    return bool(status.status == "HEALTHY" and status.replica_states.get("RUNNING") == replicas)


def test_the_agent_reconnects_after_the_gateway_restarts(
    platform: LocalPlatform, agent: RunningAgent
) -> None:
    pid = agent.process.proc.pid
    replicas = _kill_gateway_replicas()
    assert replicas >= 1

    def served() -> bool:
        try:
            with platform.client(agent.owner.token, timeout=30) as client:
                r = client.post("/v1/complete", json={
                    "model": agent.model, "prompt": "are you back", "use_memory": False,
                })
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json()["content"] == "from the office model"

    _eventually(served, 240, "a completion through the reconnected agent")
    assert agent.process.proc.poll() is None and agent.process.proc.pid == pid
    # The rest of the suite shares this graph: leave it whole.
    _eventually(lambda: _gateway_running(replicas), 120, "the gateway replicas to be back")


def test_a_revoked_agent_is_dropped_and_refused(platform: LocalPlatform, agent: RunningAgent) -> None:
    r = agent.owner.client.delete(f"/v1/agents/{agent.id}")
    assert r.status_code == 204, r.text
    code = agent.process.wait_exit(60)
    assert code != 0
    assert "4403" in agent.process.output()
    assert _agent_info(agent.owner, agent.id) is None
    assert _refusal_code(platform, agent.token) == CLOSE_UNAUTHORIZED
    r = agent.owner.client.post("/v1/complete", json={
        "model": agent.model, "prompt": "anyone there", "use_memory": False,
    })
    assert r.status_code == 404, r.text
