"""The agent's configuration file and its CLI: validation with clear errors, pairing against a
loopback cloud, the token written with owner-only permissions."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Header, HTTPException
from typer.testing import CliRunner

from agent.cli import app
from agent.config import AgentConfig, ConfigError, load_config, write_credentials

USER_TOKEN = "user-api-token"


def test_connect_url_follows_the_cloud_url() -> None:
    for cloud, expected in [
        ("https://pacore.example", "wss://pacore.example/v1/agents/connect"),
        ("http://127.0.0.1:8000/", "ws://127.0.0.1:8000/v1/agents/connect"),
        ("wss://edge.example/base", "wss://edge.example/base/v1/agents/connect"),
    ]:
        assert AgentConfig(cloud_url=cloud).connect_url == expected


def test_model_kinds_map_to_provider_kinds() -> None:
    cfg = AgentConfig.model_validate({
        "cloud_url": "https://c.example",
        "models": [
            {"name": "lmstudio", "kind": "openai-compatible", "base_url": "http://127.0.0.1:1234/v1"},
            {"name": "llama3", "kind": "ollama", "base_url": "http://127.0.0.1:11434",
             "model": "llama3:8b"},
            {"name": "tiny", "kind": "cpu", "model": "/models/tiny"},
            {"name": "big", "kind": "vllm", "model": "/models/big", "num_gpus": 1},
        ],
    })
    configs = [m.provider_config() for m in cfg.models]
    assert [c.kind for c in configs] == ["custom", "ollama", "cpu", "vllm"]
    # HTTP kinds ask their server for its model id; engines are asked for the model by name,
    # and find their engine's deployment in its own local application.
    assert [c.default_model for c in configs] == ["lmstudio", "llama3:8b", "tiny", "big"]
    assert configs[2].options == {"app": "pacore-agent-engine-tiny"}
    engine = cfg.models[3].engine_spec()
    assert (engine.engine, engine.model, engine.num_gpus, engine.num_replicas) == (
        "vllm", "/models/big", 1, 1
    )


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_invalid_configurations_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(tmp_path / "missing.yaml")
    cases = [
        ({"cloud_url": "https://c.example", "colour": "blue"}, "colour"),
        ({"cloud_url": "ftp://c.example"}, "cloud_url"),
        ({"cloud_url": "https://c.example", "models": [{"name": "m", "kind": "ollama"}]},
         "needs a base_url"),
        ({"cloud_url": "https://c.example", "models": [
            {"name": "m", "kind": "cpu"}, {"name": "m", "kind": "cpu"}]}, "unique"),
        ({"cloud_url": "https://c.example", "tools": {"file_read": {"root": "/no/such/dir"}}},
         "not a directory"),
        ({"cloud_url": "https://c.example", "tools": {"http_get": {"allow_hosts": []}}},
         "allow_hosts"),
        ({"cloud_url": "https://c.example", "models": [
            {"name": "m", "kind": "cpu", "options": {"tensor_parallel_size": 2}}]},
         "engine 'vllm' only"),
        ({"cloud_url": "https://c.example", "models": [
            {"name": "m", "kind": "cpu", "options": {"colour": "blue"}}]}, "colour"),
    ]
    for data, needle in cases:
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path / "agent.yaml", data))
        assert needle in info.value.message, (data, info.value.message)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_credentials_are_written_for_the_owner_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "agent.yaml", {
        "cloud_url": "https://old.example",
        "models": [{"name": "m", "kind": "cpu"}],
        "local_api": {"port": 9123},
    })
    path.chmod(0o644)
    write_credentials(path, "https://new.example", "agent-token-1", "office")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = load_config(path)
    assert cfg.cloud_url == "https://new.example"
    assert cfg.agent_token is not None and cfg.agent_token.get_secret_value() == "agent-token-1"
    assert (cfg.name, cfg.local_api.port, cfg.models[0].name) == ("office", 9123, "m")
    fresh = tmp_path / "sub" / "new.yaml"
    write_credentials(fresh, "https://c.example", "agent-token-2", None)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert list(fresh.parent.iterdir()) == [fresh]  # no temporary file left behind


class _Cloud:
    """``POST /v1/agents`` as the cloud answers it, on loopback."""

    def __init__(self) -> None:
        self.paired: list[str] = []
        api = FastAPI()

        @api.post("/v1/agents", status_code=201)
        async def create(body: dict[str, Any], authorization: str = Header("")) -> dict[str, Any]:
            if authorization != f"Bearer {USER_TOKEN}":
                raise HTTPException(401, "bad token")
            if not body.get("name"):
                raise HTTPException(422, "name required")
            self.paired.append(body["name"])
            return {"id": f"agent-{len(self.paired)}", "token": "fresh-agent-token",
                    "name": body["name"]}

        self.server = uvicorn.Server(uvicorn.Config(
            api, host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        ))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the loopback cloud did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def cloud() -> Iterator[tuple[_Cloud, str]]:
    c = _Cloud()
    url = c.start()
    yield c, url
    c.stop()


def test_pair_writes_the_agent_token(cloud: tuple[_Cloud, str], tmp_path: Path) -> None:
    server, url = cloud
    path = tmp_path / "agent.yaml"
    result = CliRunner().invoke(
        app, ["pair", "--url", url, "--token", USER_TOKEN, "--name", "office", "--config", str(path)]
    )
    assert result.exit_code == 0, result.output
    assert "paired" in result.output
    cfg = load_config(path)
    assert cfg.agent_token is not None and cfg.agent_token.get_secret_value() == "fresh-agent-token"
    assert cfg.cloud_url == url
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert server.paired[-1] == "office"


def test_pair_asks_for_the_token_when_left_out(cloud: tuple[_Cloud, str], tmp_path: Path) -> None:
    _, url = cloud
    path = tmp_path / "agent.yaml"
    result = CliRunner().invoke(
        app, ["pair", "--url", url, "--name", "lab", "--config", str(path)], input=f"{USER_TOKEN}\n"
    )
    assert result.exit_code == 0, result.output
    assert USER_TOKEN not in result.output


def test_pair_explains_refusals(cloud: tuple[_Cloud, str], tmp_path: Path) -> None:
    _, url = cloud
    path = tmp_path / "agent.yaml"
    runner = CliRunner()
    refused = runner.invoke(
        app, ["pair", "--url", url, "--token", "wrong", "--name", "x", "--config", str(path)]
    )
    assert refused.exit_code == 1
    assert "refused the API token" in refused.output
    unreachable = runner.invoke(
        app, ["pair", "--url", "http://127.0.0.1:9", "--token", "t", "--name", "x",
              "--config", str(path)]
    )
    assert unreachable.exit_code == 1
    assert "cannot reach" in unreachable.output
    assert not path.exists()


def test_run_explains_a_bad_configuration(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["run", "--config", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2
    assert "no configuration file" in missing.output
    unpaired = _write(tmp_path / "agent.yaml", {"cloud_url": "https://c.example"})
    result = runner.invoke(app, ["run", "--config", str(unpaired)])
    assert result.exit_code == 2
    assert "pacore-agent pair" in result.output
