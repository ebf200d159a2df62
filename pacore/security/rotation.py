"""Master-key rotation: every stored provider key re-encrypted under a new master key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from pacore.config import Settings
from pacore.db.engine import Database
from pacore.db.stores.providers import ProviderStore
from pacore.security.crypto import AesGcmCipher, KeyDecryptionError, key_id_of, provider_key_aad
from pacore.security.secrets import (
    ConfigurationError,
    load_secrets,
    master_key_file,
    pending_master_key_file,
    write_secret_file,
)

__all__ = ["Rotation", "rotate_master_key"]


@dataclass(frozen=True)
class Rotation:
    rotated: int
    old_key_id: str
    new_key_id: str
    new_key: SecretStr
    written_to: Path | None = None


async def rotate_master_key(settings: Settings, new_key: bytes, url: str | None = None) -> Rotation:
    """Re-encrypt every stored key under ``new_key`` in one transaction.

    Embedded mode with a generated key file: the new key is first saved beside the current one
    (``master_key.next``, which is loaded as a previous key), then the rows are rewritten, then
    the file replaces the current one, so no crash between the steps loses a key. Otherwise
    the caller shows ``Rotation.new_key`` to the operator, who sets ``PACORE_MASTER_KEY``.
    """
    secrets = load_secrets(settings)
    current = secrets.master_key.get_secret_value()
    if new_key == current:
        raise ConfigurationError("the new master key is the current one")
    keyring = AesGcmCipher(
        new_key, [current, *(k.get_secret_value() for k in secrets.previous_master_keys)]
    )
    in_file = settings.embedded and settings.master_key is None
    encoded = AesGcmCipher.encode_key(new_key)
    pending = pending_master_key_file(settings)
    if in_file:
        write_secret_file(pending, encoded)
    db = Database(url or settings.resolved_database_url)
    try:
        store = ProviderStore(db, keyring)
        count = await store.rotate(keyring)
        await _check_readable(store, AesGcmCipher(new_key))
    finally:
        await db.dispose()
    written = None
    if in_file:
        written = master_key_file(settings)
        os.replace(pending, written)
    return Rotation(count, key_id_of(current), key_id_of(new_key), SecretStr(encoded), written)


async def _check_readable(store: ProviderStore, cipher: AesGcmCipher) -> None:
    for row in await store.all_encrypted():
        try:
            cipher.decrypt(row.ciphertext, provider_key_aad(row.user_id, row.name))
        except KeyDecryptionError:
            raise ConfigurationError(
                "a provider key written during the rotation is not under the new master key; "
                "run the rotation again"
            ) from None
