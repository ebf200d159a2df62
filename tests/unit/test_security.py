"""Passwords, signed tokens and the platform's own secrets."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from pacore.config import Settings
from pacore.errors import AuthenticationError, PACoreError
from pacore.security.crypto import generate_master_key
from pacore.security.passwords import hash_password, needs_rehash, verify_password
from pacore.security.secrets import (
    ConfigurationError,
    jwt_secret_file,
    load_secrets,
    master_key_file,
    pending_master_key_file,
    write_secret_file,
)
from pacore.security.tokens import TokenService


@pytest.fixture(autouse=True)
def _no_pacore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings here come from the test alone, not from the environment it runs in."""
    for name in [n for n in os.environ if n.startswith("PACORE_")]:
        monkeypatch.delenv(name)


SECRET = "a-test-signing-secret-long-enough-for-every-hmac-algorithm-0123456789"

# ---------------------------------------------------------------------------------- passwords


def test_password_hash_and_verify() -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("scrypt$") and "correct horse" not in hashed
    assert hash_password("correct horse") != hashed  # salted
    assert verify_password("correct horse", hashed)
    assert not verify_password("correct horsf", hashed)
    assert not needs_rehash(hashed)
    weaker = hashed.replace("scrypt$15$", "scrypt$14$", 1)
    assert needs_rehash(weaker)
    for broken in ("", "scrypt$", "bcrypt$1$2$3$4$5", "scrypt$99$8$1$AA$AA", "scrypt$x$8$1$AA$AA"):
        assert not verify_password("correct horse", broken)


# ---------------------------------------------------------------------------------- tokens


@pytest.fixture
def service() -> TokenService:
    return TokenService(SECRET, "HS256")


def _claims(**over: object) -> dict[str, object]:
    now = datetime.now(UTC)
    claims: dict[str, object] = {
        "iss": "pacore", "sub": "user-1", "aud": "api", "iat": now, "jti": "j-1",
        "exp": now + timedelta(minutes=5),
    }
    claims.update(over)
    return claims


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, default=str).encode()).decode().rstrip("=")


def test_issue_and_verify(service: TokenService) -> None:
    issued = service.issue("user-1", "api", timedelta(minutes=5), name="laptop")
    claims = service.verify(issued.token, "api")
    assert (claims.sub, claims.aud, claims.jti, claims.name) == ("user-1", "api", issued.jti, "laptop")
    assert claims.exp == issued.expires_at
    assert service.verify(issued.token, ["session", "api"]).sub == "user-1"
    forever = service.issue("agent-1", "agent", None, jti="fixed-jti")
    assert forever.expires_at is None and forever.jti == "fixed-jti"
    assert service.verify(forever.token, "agent").exp is None
    assert SECRET not in repr(service) and forever.token not in repr(forever)


def test_rejects_forged_and_misused_tokens(service: TokenService) -> None:
    good = service.issue("user-1", "api", timedelta(minutes=5)).token
    header, _payload, signature = good.split(".")
    attacks = {
        "wrong signature": jwt.encode(_claims(), "another-secret-of-enough-length-000000", algorithm="HS256"),
        "alg none": jwt.encode(_claims(), None, algorithm="none"),
        "alg none, hand made": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(iat=0))}.",
        "other algorithm": jwt.encode(_claims(), SECRET, algorithm="HS512"),
        "tampered payload": f"{header}.{_b64(_claims(sub='admin'))}.{signature}",
        "wrong audience": service.issue("user-1", "agent", timedelta(minutes=5)).token,
        "no jti": jwt.encode({k: v for k, v in _claims().items() if k != "jti"}, SECRET, algorithm="HS256"),
        "other issuer": jwt.encode(_claims(iss="evil"), SECRET, algorithm="HS256"),
        "garbage": "not.a.token",
    }
    for name, token in attacks.items():
        with pytest.raises(AuthenticationError):
            service.verify(token, "api")
            pytest.fail(f"accepted: {name}")
    # And a token is only good for the audience it was issued for, in both directions.
    with pytest.raises(AuthenticationError):
        service.verify(good, "agent")


def test_expired_token_is_rejected(service: TokenService) -> None:
    expired = service.issue("user-1", "api", timedelta(seconds=-1)).token
    with pytest.raises(AuthenticationError) as caught:
        service.verify(expired, "api")
    assert caught.value.code == "token_expired"


def test_a_verified_token_still_expires_and_still_needs_its_audience(
    service: TokenService,
) -> None:
    import time

    issued = service.issue("user-1", "api", timedelta(seconds=1))
    assert service.verify(issued.token, "api").sub == "user-1"
    assert service.verify(issued.token, "api").sub == "user-1"  # verified once, remembered
    with pytest.raises(AuthenticationError):
        service.verify(issued.token, "agent")  # remembered per audience, never across
    time.sleep(1.1)
    with pytest.raises(AuthenticationError) as caught:
        service.verify(issued.token, "api")
    assert caught.value.code == "token_expired"
    forged = issued.token[:-2] + ("AA" if not issued.token.endswith("AA") else "BB")
    with pytest.raises(AuthenticationError):
        service.verify(forged, "api")


def test_other_configured_algorithm_rejects_hs256() -> None:
    hs512 = TokenService(SECRET, "HS512")
    hs256_token = TokenService(SECRET, "HS256").issue("u", "api", timedelta(minutes=1)).token
    with pytest.raises(AuthenticationError):
        hs512.verify(hs256_token, "api")
    assert hs512.verify(hs512.issue("u", "api", timedelta(minutes=1)).token, "api").sub == "u"
    with pytest.raises(PACoreError):
        TokenService(SECRET, "none")
    with pytest.raises(PACoreError):
        TokenService("", "HS256")


async def test_verify_active_consults_revocation(service: TokenService) -> None:
    issued = service.issue("user-1", "api", timedelta(minutes=5))
    revoked: set[str] = set()

    async def is_active(jti: str) -> bool:
        return jti not in revoked

    assert (await service.verify_active(issued.token, "api", is_active)).jti == issued.jti
    revoked.add(issued.jti)
    with pytest.raises(AuthenticationError, match="revoked"):
        await service.verify_active(issued.token, "api", is_active)


# ---------------------------------------------------------------------------------- secrets


def test_embedded_secrets_are_generated_once_into_0600_files(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = load_secrets(settings)
    second = load_secrets(settings)
    assert first.jwt_secret == second.jwt_secret and first.master_key == second.master_key
    for path in (jwt_secret_file(settings), master_key_file(settings)):
        assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data").stat().st_mode & 0o077 == 0
    assert len(first.master_key.get_secret_value()) == 32
    assert len(first.jwt_secret.get_secret_value()) >= 32
    text = repr(first)
    assert first.jwt_secret.get_secret_value() not in text
    assert master_key_file(settings).read_text().strip() not in text


def test_embedded_secrets_from_settings_and_loose_permissions(tmp_path: Path) -> None:
    master = generate_master_key()
    settings = Settings(data_dir=tmp_path, secret_key=SECRET, master_key=master)
    loaded = load_secrets(settings)
    assert loaded.jwt_secret.get_secret_value() == SECRET
    assert loaded.master_key.get_secret_value() == base64.b64decode(master)
    assert not jwt_secret_file(settings).exists() and not master_key_file(settings).exists()

    loose = Settings(data_dir=tmp_path / "loose")
    load_secrets(loose)
    jwt_secret_file(loose).chmod(0o644)
    load_secrets(loose)
    assert jwt_secret_file(loose).stat().st_mode & 0o777 == 0o600


def test_pending_rotation_key_is_loaded_as_a_previous_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    current = load_secrets(settings)
    pending = generate_master_key()
    write_secret_file(pending_master_key_file(settings), pending)
    loaded = load_secrets(settings)
    assert loaded.master_key == current.master_key
    assert [k.get_secret_value() for k in loaded.previous_master_keys] == [base64.b64decode(pending)]
    assert len(loaded.cipher().key_ids) == 2


def test_write_secret_file_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "s"
    assert write_secret_file(path, "one", exclusive=True)
    assert not write_secret_file(path, "two", exclusive=True)
    assert path.read_text().strip() == "one"
    assert write_secret_file(path, "three")
    assert path.read_text().strip() == "three" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary files left behind


@pytest.mark.parametrize(
    ("secret_key", "master_key", "complaint"),
    [
        (None, "GENERATED", "PACORE_SECRET_KEY"),
        ("changeme", "GENERATED", "PACORE_SECRET_KEY"),
        ("too-short", "GENERATED", "PACORE_SECRET_KEY"),
        (SECRET, None, "PACORE_MASTER_KEY"),
        (SECRET, "placeholder", "PACORE_MASTER_KEY"),
        (SECRET, base64.b64encode(b"sixteen bytes!!!").decode(), "PACORE_MASTER_KEY is invalid"),
    ],
)
def test_production_refuses_missing_or_placeholder_secrets(
    tmp_path: Path, secret_key: str | None, master_key: str | None, complaint: str
) -> None:
    if master_key == "GENERATED":
        master_key = generate_master_key()
    settings = Settings(
        mode="production", data_dir=tmp_path, secret_key=secret_key, master_key=master_key
    )
    with pytest.raises(ConfigurationError, match=complaint) as caught:
        load_secrets(settings)
    if master_key:
        assert master_key not in caught.value.message
    assert list(tmp_path.iterdir()) == []  # production never writes secrets to disk


def test_production_uses_given_secrets(tmp_path: Path) -> None:
    master = generate_master_key()
    settings = Settings(mode="production", data_dir=tmp_path, secret_key=SECRET, master_key=master)
    loaded = load_secrets(settings)
    assert loaded.master_key.get_secret_value() == base64.b64decode(master)
    assert loaded.token_service().verify(
        loaded.token_service().issue("u", "session", timedelta(minutes=1)).token, "session"
    ).sub == "u"
    assert os.listdir(tmp_path) == []


def test_lru_forgets_the_least_recently_used() -> None:
    from pacore.lru import Lru

    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c"), len(lru)) == (1, None, 3, 2)
    lru.pop("a")
    lru.pop("missing")
    assert lru.get("a") is None and len(lru) == 1
