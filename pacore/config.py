"""Settings: the one place environment variables (``PACORE_*``) and the settings file are read."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pacore.engines.config import SelfHostedModel
from pacore.providers.base import ProviderConfig

__all__ = [
    "DeploymentOverride",
    "PlatformArgs",
    "Settings",
    "SharedProvider",
    "get_settings",
]

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "placeholder", "xxx", "test"}


class Settings(BaseSettings):
    """Platform settings. Precedence: init arguments, ``PACORE_*`` environment, the YAML file
    named by ``PACORE_CONFIG_FILE``, then these defaults (the embedded mode)."""

    model_config = SettingsConfigDict(
        env_prefix="PACORE_", extra="forbid", env_nested_delimiter="__", validate_default=True
    )

    mode: Literal["embedded", "production"] = Field(
        default="embedded",
        description="embedded: SQLite, in-process vectors, secrets generated into data_dir; "
        "production: every secret and store must be given",
    )
    config_file: Path | None = Field(default=None, description="YAML file of these settings")
    data_dir: Path = Field(
        default=Path("~/.pacore"), description="embedded database, vectors and generated secrets"
    )
    cache_dir: Path = Field(
        default=Path("~/.cache/pacore"),
        description="files derived from installed packages that can be rebuilt at any time "
        "(the embedding model's ONNX export); shared by every data_dir of the user",
    )

    # Storage
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default sqlite+aiosqlite in data_dir. "
        "PostgreSQL: postgresql+asyncpg://user@host/db",
    )
    database_pool_size: int = Field(default=10, ge=1)
    qdrant_url: str | None = Field(
        default=None, description="Qdrant server URL; unset means the embedded in-process index"
    )
    qdrant_api_key: SecretStr | None = None
    qdrant_collection: str = Field(default="pacore_messages")
    redis_url: str | None = Field(
        default=None, description="shared state across replicas (agent routing, rate limits)"
    )

    # Embeddings and memory
    embedding_model: str = Field(
        default="all-MiniLM-L6-v2",
        description="sentence-transformers model name or path; the default ships offline",
    )
    embedding_device: Literal["auto", "cpu", "cuda"] = "auto"
    embedding_backend: Literal["auto", "onnx", "torch"] = Field(
        default="auto",
        description="auto: ONNX Runtime on the CPU (the model is exported once into "
        "cache_dir/models and checked against torch; about 3x faster for short texts), torch on "
        "CUDA or for models the ONNX path cannot run; onnx: never fall back; torch: always torch",
    )
    embedding_precision: Literal["auto", "fp32", "int8"] = Field(
        default="auto",
        description="auto: int8 where ONNX Runtime encodes on the CPU (the model's matrix "
        "multiplications quantized once into cache_dir/models and kept only if its vectors "
        "agree with fp32's; a query encodes about 2x faster, a batch 3x), fp32 elsewhere; "
        "fp32: the exact vectors; int8: never fall back. Vectors stored under one precision "
        "stay searchable under the other; `pacore memory reindex` makes them all alike",
    )
    embedding_batch_size: int = Field(default=64, ge=1)
    embedding_batch_wait_s: float = Field(
        default=0.0, ge=0,
        description="how long a batch waits for more texts after its first; at 0 a batch is "
        "what queued while the previous one was encoding (no wait added at low load)",
    )
    hf_offline: bool = Field(
        default=False,
        description="self-hosted models load only from local directories or the Hugging Face "
        "cache (local_files_only, as HF_HUB_OFFLINE=1 does); nothing is downloaded",
    )
    memory_top_k: int = Field(default=5, ge=0, le=50, description="context messages injected")
    memory_token_budget: int = Field(default=1000, ge=0, description="tokens of injected context")
    memory_min_score: float = Field(default=0.3, ge=-1, le=1)
    memory_index_wait_s: float = Field(
        default=0.05, ge=0, le=5,
        description="how long a stored turn waits for others before they are embedded and "
        "indexed together (one embedder call and one index write for all of them); at 0 every "
        "turn is indexed on its own at once",
    )

    # Security
    secret_key: SecretStr | None = Field(
        default=None, description="JWT signing key; generated into data_dir in embedded mode"
    )
    master_key: SecretStr | None = Field(
        default=None,
        description="base64 32-byte AES-GCM key for provider API keys; generated in embedded mode",
    )
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    session_ttl_minutes: int = Field(default=60 * 24, ge=1, description="login token lifetime")

    # Usage
    price_table_file: Path | None = Field(
        default=None,
        description="YAML or JSON mapping model prefix -> {input, output} USD per 1M tokens; "
        "extends and overrides the built-in price table",
    )

    # HTTP
    host: str = Field(default="127.0.0.1", description="loopback unless told otherwise")
    port: int = Field(default=8000, ge=1, le=65535)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="larger bodies get 413")
    stream_linger_ms: float = Field(
        default=5.0, ge=0, le=1000,
        description="after an answer's first chunk, each hop sends at most one message per this "
        "many ms, merging the chunks that arrive meanwhile (0: merge only what is ready)",
    )
    rate_limit_per_minute: int = Field(default=600, ge=0, description="per user; 0 disables")
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("PACORE_CONFIG_FILE")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @field_validator("data_dir", "cache_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'pacore.db'}"

    @property
    def embedded(self) -> bool:
        return self.mode == "embedded"

    def public_dict(self) -> dict[str, Any]:
        """Settings as a dict safe to log or pass across processes (secrets kept as secrets)."""
        return self.model_dump(exclude={"config_file"})


def get_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


ProviderKindName = Literal["anthropic", "openai", "custom", "ollama"]
PROVIDER_KINDS: tuple[ProviderKindName, ...] = ("anthropic", "openai", "custom", "ollama")


class DeploymentOverride(BaseModel):
    """Per-deployment Serve options that replace the deployment's own defaults."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: dict[str, Any] | None = Field(
        default=None, description="min_replicas, max_replicas, target_ongoing_requests, …"
    )
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    ray_actor_options: dict[str, Any] | None = Field(
        default=None, description="num_cpus, num_gpus, memory, resources, …"
    )
    graceful_shutdown_timeout_s: float | None = Field(default=None, ge=0)

    def apply(self, options: dict[str, Any]) -> dict[str, Any]:
        merged = dict(options)
        for key, value in self.model_dump(exclude_none=True).items():
            if key == "ray_actor_options":
                merged[key] = {**options.get(key, {}), **value}
            else:
                merged[key] = value
        if "num_replicas" in self.model_fields_set:
            merged.pop("autoscaling_config", None)
        elif "autoscaling_config" in self.model_fields_set:
            merged.pop("num_replicas", None)
        return merged


class SharedProvider(BaseModel):
    """A provider the platform offers every user (its key from the environment, never a file)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["anthropic", "openai", "custom", "ollama"]
    api_key_env: str | None = Field(
        default=None, description="name of the environment variable that holds the key"
    )
    base_url: str | None = None
    default_model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    def config(self) -> ProviderConfig:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return ProviderConfig(
            kind=self.kind, name=self.name, api_key=SecretStr(key) if key else None,
            base_url=self.base_url, default_model=self.default_model, options=self.options,
        )


class PlatformArgs(BaseModel):
    """The arguments of ``deployments.app:build_app``: what `serve run`, `serve deploy` and a
    KubeRay RayService pass as ``args``. Settings given here override the environment's."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict, description="Settings fields (same names as PACORE_* without prefix)"
    )
    provider_kinds: list[ProviderKindName] = Field(
        default_factory=lambda: list(PROVIDER_KINDS),
        description="provider kinds that get a deployment",
    )
    shared_providers: list[SharedProvider] = Field(default_factory=list)
    self_hosted: list[SelfHostedModel] = Field(
        default_factory=list, description="self-hosted models (vLLM on GPUs, or the CPU engine)"
    )
    memory: bool = Field(default=True, description="deploy the Embedder and Memory")
    agents: bool = Field(default=True, description="deploy the AgentHub for on-prem agents")
    deployments: dict[str, DeploymentOverride] = Field(
        default_factory=dict,
        description="overrides keyed by deployment name: Gateway, Router, Embedder, Memory, "
        "AgentHub, Provider-<kind>, or a self-hosted model's name",
    )

    def build_settings(self) -> Settings:
        return Settings(**self.settings)

    def options_for(self, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
        override = self.deployments.get(name)
        return override.apply(defaults) if override else dict(defaults)
