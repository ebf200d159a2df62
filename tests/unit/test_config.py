"""Settings: PACORE_ environment variables, the YAML settings file, and the embedded defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest

from pacore.config import Settings, get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the PACORE_ variables it sets."""
    for name in list(os.environ):
        if name.startswith("PACORE_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_embedded_mode_on_loopback(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings()
    assert (settings.mode, settings.embedded) == ("embedded", True)
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.data_dir == tmp_path / ".pacore"
    assert settings.cache_dir == tmp_path / ".cache" / "pacore"
    assert (settings.embedding_backend, settings.embedding_precision) == ("auto", "auto")
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path / '.pacore' / 'pacore.db'}"
    assert settings.qdrant_url is None and settings.redis_url is None
    assert settings.secret_key is None and settings.master_key is None


def test_database_url_follows_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "state")
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path / 'state' / 'pacore.db'}"
    explicit = Settings(database_url="postgresql+asyncpg://postgres@127.0.0.1/test")
    assert explicit.resolved_database_url == "postgresql+asyncpg://postgres@127.0.0.1/test"


def test_environment_uses_the_pacore_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACORE_PORT", "9100")
    monkeypatch.setenv("PACORE_MODE", "production")
    monkeypatch.setenv("PACORE_SECRET_KEY", "s3cr3t-value")
    monkeypatch.setenv("PACORE_CORS_ORIGINS", '["https://app.example.com"]')
    monkeypatch.setenv("PORT", "1234")  # unprefixed: not ours
    settings = Settings()
    assert (settings.port, settings.mode) == (9100, "production")
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(settings)
    assert settings.cors_origins == ["https://app.example.com"]


def test_invalid_environment_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACORE_PORT", "70000")
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_yaml_file_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pacore.yaml"
    path.write_text(
        "port: 9200\n"
        "memory_top_k: 7\n"
        f"data_dir: {tmp_path / 'from-file'}\n"
        "redis_url: redis://127.0.0.1:6379/0\n"
    )
    monkeypatch.setenv("PACORE_CONFIG_FILE", str(path))
    settings = Settings()
    assert (settings.port, settings.memory_top_k) == (9200, 7)
    assert settings.data_dir == tmp_path / "from-file"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.config_file == path

    monkeypatch.setenv("PACORE_PORT", "9300")
    assert Settings().port == 9300  # the environment beats the file
    assert get_settings(port=9400).port == 9400  # arguments beat both


def test_yaml_file_with_an_unknown_setting_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pacore.yaml"
    path.write_text("port: 9200\nprot: 9201\n")
    monkeypatch.setenv("PACORE_CONFIG_FILE", str(path))
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_public_dict_keeps_secrets_secret() -> None:
    settings = Settings(secret_key="top-secret-key", master_key="bWFzdGVy")
    dumped = settings.public_dict()
    assert "config_file" not in dumped
    assert "top-secret-key" not in repr(dumped) and "bWFzdGVy" not in repr(dumped)


def test_production_mode_names_its_stores(tmp_path: Path) -> None:
    # Nothing in production falls back to a file on one replica's disk.
    import asyncio

    from pacore.db.engine import Database
    from pacore.errors import ConfigurationError
    from pacore.memory.vector import open_index

    production = Settings(mode="production", data_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="PACORE_DATABASE_URL"):
        Database.from_settings(production)
    with pytest.raises(ConfigurationError, match="PACORE_QDRANT_URL"):
        asyncio.run(open_index(production, 8))
    assert not (tmp_path / "pacore.db").exists() and not (tmp_path / "vectors").exists()
