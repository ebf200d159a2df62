"""The agent's configuration file (YAML): cloud link, local models, tools, local API, runtime.

The agent keeps no state beyond this file. ``pacore-agent pair`` writes ``cloud_url`` and
``agent_token`` into it (mode 0600, since the token is a credential).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pacore.engines.config import SelfHostedModel
from pacore.errors import BadRequestError
from pacore.providers.base import ProviderConfig

__all__ = [
    "AgentConfig",
    "ConfigError",
    "FileReadConfig",
    "HttpGetConfig",
    "LinkConfig",
    "LocalApiConfig",
    "ModelConfig",
    "RuntimeConfig",
    "ToolsConfig",
    "load_config",
    "write_credentials",
]

ModelKind = Literal["openai-compatible", "ollama", "cpu", "vllm"]

# Agent model kinds → the platform's provider kinds (pacore.providers.registry).
PROVIDER_KINDS: dict[str, Literal["custom", "ollama", "cpu", "vllm"]] = {
    "openai-compatible": "custom",
    "ollama": "ollama",
    "cpu": "cpu",
    "vllm": "vllm",
}


class ConfigError(BadRequestError):
    """The configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$",
        description="the name the cloud and local clients use for this model",
    )
    kind: ModelKind = Field(
        description="openai-compatible (LM Studio, llama.cpp, vLLM's server), ollama, "
        "cpu (transformers engine on this machine) or vllm (vLLM engine on this machine's GPU)"
    )
    base_url: str | None = Field(
        default=None, pattern=r"^https?://", description="the server's URL (HTTP kinds)"
    )
    model: str | None = Field(
        default=None,
        description="HTTP kinds: the server's model id; cpu/vllm: the weights' local directory "
        "or hub id. Default: name",
    )
    api_key: SecretStr | None = Field(default=None, description="if the local server wants one")
    context_length: int | None = Field(default=None, ge=1, description="announced to the cloud")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="HTTP kinds: the provider adapter's options; cpu/vllm: further fields of "
        "the engine's SelfHostedModel (device, max_tokens, tokenizer, engine_kwargs, …)",
    )
    timeout_s: float = Field(default=300.0, gt=0, description="read timeout for one call")
    num_cpus: float = Field(default=0.25, ge=0, description="Ray CPUs for this model's replica")
    num_gpus: float = Field(default=0, ge=0, description="Ray GPUs for this model's replica")
    max_concurrency: int = Field(default=64, ge=1, description="requests in flight at once")

    @property
    def self_hosted(self) -> bool:
        """Runs in an engine on this machine rather than behind a server's URL."""
        return self.kind in ("cpu", "vllm")

    @property
    def engine_app(self) -> str:
        """The local Serve application of this model's engine (self-hosted kinds)."""
        return f"pacore-agent-engine-{self.name}"

    @property
    def upstream_model(self) -> str:
        """The name the provider adapter is asked for: the engine's model name for self-hosted
        kinds, the server's model id otherwise."""
        return self.name if self.self_hosted else (self.model or self.name)

    @model_validator(mode="after")
    def _complete(self) -> ModelConfig:
        if not self.self_hosted and not self.base_url:
            raise ValueError(f"model '{self.name}' of kind {self.kind} needs a base_url")
        if self.self_hosted:
            try:
                self.engine_spec()
            except pydantic.ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "model"
                raise ValueError(f"model '{self.name}': {where}: {first['msg']}") from None
        return self

    def engine_spec(self) -> SelfHostedModel:
        """The engine's configuration (self-hosted kinds): one replica on this machine."""
        fields: dict[str, Any] = {
            "name": self.name,
            "engine": self.kind,
            "model": self.model or self.name,
            "context_length": self.context_length,
            "num_cpus": self.num_cpus or None,
            "num_gpus": self.num_gpus or None,
            "num_replicas": 1,
            **self.options,
        }
        return SelfHostedModel.model_validate(fields)

    def provider_config(self) -> ProviderConfig:
        return ProviderConfig(
            kind=PROVIDER_KINDS[self.kind],
            name=self.name,
            api_key=self.api_key,
            base_url=self.base_url,
            default_model=self.upstream_model,
            # Self-hosted providers find their engine's deployment in this application.
            options={"app": self.engine_app} if self.self_hosted else self.options,
            timeout_s=self.timeout_s,
        )


class FileReadConfig(_Strict):
    root: Path = Field(description="the only directory the tool may read, subdirectories included")
    max_bytes: int = Field(default=1_048_576, ge=1, description="longer files are cut")

    @field_validator("root")
    @classmethod
    def _existing_dir(cls, v: Path) -> Path:
        root = v.expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        return root


class HttpGetConfig(_Strict):
    allow_hosts: list[str] = Field(
        min_length=1, description="host names (or host:port) the tool may fetch from"
    )
    timeout_s: float = Field(default=10.0, gt=0)
    max_bytes: int = Field(default=1_048_576, ge=1, description="longer bodies are cut")
    max_redirects: int = Field(default=5, ge=0, le=20)

    @field_validator("allow_hosts")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v if h.strip()]


class ToolsConfig(_Strict):
    file_read: FileReadConfig | None = Field(default=None, description="read files under a root")
    http_get: HttpGetConfig | None = Field(default=None, description="GET allow-listed hosts")


class LocalApiConfig(_Strict):
    enabled: bool = Field(default=True, description="serve the local models to office clients")
    host: str = Field(default="127.0.0.1", description="loopback unless told otherwise")
    port: int = Field(default=8100, ge=1, le=65535)


class RuntimeConfig(_Strict):
    num_cpus: int = Field(default=2, ge=1, description="CPUs the local Ray instance may use")
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs; default: detected")


class LinkConfig(_Strict):
    reconnect_base_s: float = Field(default=1.0, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(default=60.0, gt=0, description="longest reconnect delay")
    open_timeout_s: float = Field(default=10.0, gt=0)
    ping_interval_s: float = Field(default=20.0, gt=0, description="WebSocket keepalive")
    ping_timeout_s: float = Field(default=20.0, gt=0)
    max_concurrent_requests: int = Field(default=64, ge=1)


class AgentConfig(_Strict):
    cloud_url: str = Field(pattern=r"^(https?|wss?)://", description="the PA Core cloud")
    agent_token: SecretStr | None = Field(default=None, description="written by pacore-agent pair")
    name: str | None = Field(default=None, max_length=100, description="announced to the cloud")
    models: list[ModelConfig] = Field(default_factory=list)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    local_api: LocalApiConfig = Field(default_factory=LocalApiConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique: {', '.join(dupes)}")
        return v

    @property
    def connect_url(self) -> str:
        """The agent socket's URL: ``ws(s)://…/v1/agents/connect``."""
        base = self.cloud_url.rstrip("/")
        if base.startswith("http"):
            base = "ws" + base[len("http"):]
        return base + "/v1/agents/connect"


def load_config(path: Path) -> AgentConfig:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"no configuration file at {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    try:
        return AgentConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration in {path}:\n{exc}") from None


def write_credentials(path: Path, cloud_url: str, agent_token: str, name: str | None) -> None:
    """Put the cloud URL and agent token into ``path`` (created if missing), keeping every
    other setting; the file is replaced atomically and readable by its owner only."""
    raw: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of settings")
        raw = loaded
    raw["cloud_url"] = cloud_url
    raw["agent_token"] = agent_token
    if name and not raw.get("name"):
        raw["name"] = name
    try:
        AgentConfig.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"the configuration in {path} would be invalid:\n{exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(raw, out, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
