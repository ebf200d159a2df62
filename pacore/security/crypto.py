"""Encryption of provider API keys at rest: AES-256-GCM under a master key, with key ids so the
master key can be rotated.

A ciphertext is ``version (1 byte) | key id (4 bytes) | nonce (12 bytes) | ciphertext+tag``.
The associated data binds it to where it is stored (the user and the provider name), so a
ciphertext copied into another user's row does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacore.errors import PACoreError

__all__ = [
    "AesGcmCipher",
    "KeyCipher",
    "KeyDecryptionError",
    "decode_master_key",
    "generate_master_key",
    "key_id_of",
    "provider_key_aad",
]

_VERSION = b"\x01"
_KEY_ID_LEN = 4
_NONCE_LEN = 12
_HEADER_LEN = 1 + _KEY_ID_LEN + _NONCE_LEN


class KeyDecryptionError(PACoreError):
    """A stored key cannot be decrypted: unknown key id, wrong master key, or tampering."""


@runtime_checkable
class KeyCipher(Protocol):
    """Authenticated encryption of small secrets, bound to associated data."""

    @property
    def key_id(self) -> str:
        """The id (hex) of the key new ciphertexts are made under."""
        ...

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes: ...

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes: ...


def key_id_of(key: bytes) -> str:
    """A short public id of a master key (a hash of it; it reveals nothing about the key)."""
    return hashlib.sha256(b"pacore-master-key-id:" + key).digest()[:_KEY_ID_LEN].hex()


def generate_master_key() -> str:
    """A fresh random 32-byte master key, base64 encoded as the settings expect it."""
    return AesGcmCipher.encode_key(os.urandom(32))


def decode_master_key(encoded: str) -> bytes:
    """The 32 bytes behind a base64 master key (standard or URL-safe alphabet)."""
    text = encoded.strip()
    try:
        key = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise PACoreError("the master key is not valid base64") from None
    if len(key) != 32:
        raise PACoreError(f"the master key must be 32 bytes (base64 of 32 bytes), not {len(key)}")
    return key


def provider_key_aad(user_id: str, provider_name: str) -> bytes:
    """Associated data of a stored provider key. JSON keeps the two parts unambiguous."""
    return json.dumps(["provider_key", user_id, provider_name]).encode()


class AesGcmCipher:
    """A keyring: encrypts under its primary key, decrypts under the primary or any previous
    key (by the key id in the ciphertext), which is what lets rotation re-encrypt row by row."""

    def __init__(self, primary: bytes, previous: Iterable[bytes] = ()) -> None:
        self._primary_id = key_id_of(primary)
        self._keys: dict[str, AESGCM] = {}
        for key in (primary, *previous):
            if len(key) != 32:
                raise PACoreError("AES-256-GCM keys are 32 bytes")
            self._keys.setdefault(key_id_of(key), AESGCM(key))

    @classmethod
    def from_base64(cls, primary: str, previous: Iterable[str] = ()) -> AesGcmCipher:
        return cls(decode_master_key(primary), [decode_master_key(k) for k in previous])

    @staticmethod
    def encode_key(key: bytes) -> str:
        """A raw 32-byte key in the base64 form the settings take."""
        return base64.b64encode(key).decode()

    @property
    def key_id(self) -> str:
        return self._primary_id

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._keys[self._primary_id].encrypt(nonce, plaintext, associated_data)
        return _VERSION + bytes.fromhex(self._primary_id) + nonce + sealed

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        if len(ciphertext) <= _HEADER_LEN or ciphertext[:1] != _VERSION:
            raise KeyDecryptionError("a stored provider key is malformed")
        key_id = ciphertext[1 : 1 + _KEY_ID_LEN].hex()
        aead = self._keys.get(key_id)
        if aead is None:
            raise KeyDecryptionError(
                f"a stored provider key was encrypted under master key id {key_id}, "
                "which this server does not hold"
            )
        nonce = ciphertext[1 + _KEY_ID_LEN : _HEADER_LEN]
        try:
            return aead.decrypt(nonce, ciphertext[_HEADER_LEN:], associated_data)
        except InvalidTag:
            raise KeyDecryptionError(
                "a stored provider key failed authentication (wrong owner or tampered)"
            ) from None

    @staticmethod
    def key_id_in(ciphertext: bytes) -> str | None:
        """The key id a ciphertext names, or None when it is not one of ours."""
        if len(ciphertext) <= _HEADER_LEN or ciphertext[:1] != _VERSION:
            return None
        return ciphertext[1 : 1 + _KEY_ID_LEN].hex()

    def __repr__(self) -> str:
        return f"AesGcmCipher(key_id={self._primary_id!r}, keys={len(self._keys)})"
