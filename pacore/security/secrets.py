"""The platform's own secrets: the JWT signing secret and the master key for provider keys.

Embedded mode generates each once into a 0600 file in ``data_dir`` unless the settings give
it. Production mode takes both from the settings and refuses to start without real values.
A rotation in progress leaves the new master key in ``master_key.next``; it is loaded as a
previous key, so rows already re-encrypted under it stay readable whatever happens next.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretBytes, SecretStr

from pacore.config import PLACEHOLDER_SECRETS, Settings
from pacore.errors import ConfigurationError, PACoreError
from pacore.security.crypto import AesGcmCipher, decode_master_key, generate_master_key
from pacore.security.tokens import TokenService

__all__ = [
    "ConfigurationError",
    "PlatformSecrets",
    "jwt_secret_file",
    "load_secrets",
    "master_key_file",
    "pending_master_key_file",
    "write_secret_file",
]

log = logging.getLogger(__name__)

MIN_SECRET_LEN = 32
_GEN_SECRET = "python -c 'import secrets; print(secrets.token_urlsafe(48))'"
_GEN_MASTER = "python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'"


@dataclass(frozen=True)
class PlatformSecrets:
    jwt_secret: SecretStr
    master_key: SecretBytes
    previous_master_keys: tuple[SecretBytes, ...] = ()

    def cipher(self) -> AesGcmCipher:
        return AesGcmCipher(
            self.master_key.get_secret_value(),
            [k.get_secret_value() for k in self.previous_master_keys],
        )

    def token_service(self, algorithm: str = "HS256") -> TokenService:
        return TokenService(self.jwt_secret, algorithm)


def jwt_secret_file(settings: Settings) -> Path:
    return settings.data_dir / "jwt_secret"


def master_key_file(settings: Settings) -> Path:
    return settings.data_dir / "master_key"


def pending_master_key_file(settings: Settings) -> Path:
    return settings.data_dir / "master_key.next"


def load_secrets(settings: Settings) -> PlatformSecrets:
    """The secrets for ``settings``: given ones, generated ones (embedded), or a
    ConfigurationError that says what to set (production)."""
    if settings.mode == "production":
        return _production(settings)
    jwt_secret = _given(settings.secret_key) or _read_or_create(
        jwt_secret_file(settings), lambda: secrets.token_urlsafe(48)
    )
    given_master = _given(settings.master_key)
    master = given_master or _read_or_create(master_key_file(settings), generate_master_key)
    previous: list[SecretBytes] = []
    pending = pending_master_key_file(settings)
    if given_master is None and pending.exists():
        previous.append(SecretBytes(decode_master_key(pending.read_text())))
    return PlatformSecrets(
        jwt_secret=SecretStr(jwt_secret),
        master_key=SecretBytes(decode_master_key(master)),
        previous_master_keys=tuple(previous),
    )


def _given(value: SecretStr | None) -> str | None:
    if value is None or not value.get_secret_value().strip():
        return None
    return value.get_secret_value().strip()


def _is_placeholder(value: str | None) -> bool:
    return value is None or value.strip().lower() in PLACEHOLDER_SECRETS


def _production(settings: Settings) -> PlatformSecrets:
    secret = _given(settings.secret_key)
    if _is_placeholder(secret) or len(secret or "") < MIN_SECRET_LEN:
        raise ConfigurationError(
            "production mode needs PACORE_SECRET_KEY: a random JWT signing secret of at least "
            f"{MIN_SECRET_LEN} characters (not a placeholder). Generate one with: {_GEN_SECRET}"
        )
    master = _given(settings.master_key)
    if _is_placeholder(master):
        raise ConfigurationError(
            "production mode needs PACORE_MASTER_KEY: a base64-encoded random 32-byte key that "
            f"encrypts provider API keys. Generate one with: {_GEN_MASTER}"
        )
    try:
        key = decode_master_key(master or "")
    except PACoreError as exc:
        raise ConfigurationError(f"PACORE_MASTER_KEY is invalid: {exc.message}") from None
    return PlatformSecrets(jwt_secret=SecretStr(secret or ""), master_key=SecretBytes(key))


def _read_or_create(path: Path, generate: Callable[[], str]) -> str:
    """The secret in ``path``, created with ``generate()`` if absent. Two processes starting
    together agree on one value: the file appears atomically, and only once."""
    if path.exists():
        _tighten(path)
        value = path.read_text().strip()
        if value:
            return value
        raise ConfigurationError(f"the secret file {path} is empty; delete it to regenerate")
    value = generate()
    if write_secret_file(path, value, exclusive=True):
        return value
    return path.read_text().strip()  # another process won the race


def write_secret_file(path: Path, value: str, *, exclusive: bool = False) -> bool:
    """Write ``value`` to ``path`` with mode 0600, atomically. With ``exclusive``, an existing
    file is left alone and False is returned."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _tighten(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("secret file %s was readable by others (mode %o); now 0600", path, mode)
        path.chmod(0o600)
