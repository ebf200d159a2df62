"""AES-256-GCM provider-key encryption: round trips, binding to owner, tampering, keyring."""

from __future__ import annotations

import base64
import os

import pytest

from pacore.errors import PACoreError
from pacore.security.crypto import (
    AesGcmCipher,
    KeyCipher,
    KeyDecryptionError,
    decode_master_key,
    generate_master_key,
    key_id_of,
    provider_key_aad,
)

SECRET = b"sk-ant-api03-PLAINTEXT-KEY"
AAD = provider_key_aad("user-a", "anthropic")


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def test_round_trip_with_key_id_and_fresh_nonce(key: bytes) -> None:
    cipher = AesGcmCipher(key)
    assert isinstance(cipher, KeyCipher)
    one, two = cipher.encrypt(SECRET, AAD), cipher.encrypt(SECRET, AAD)
    assert one != two  # a new nonce every time
    assert SECRET not in one
    assert AesGcmCipher.key_id_in(one) == cipher.key_id == key_id_of(key)
    assert cipher.decrypt(one, AAD) == cipher.decrypt(two, AAD) == SECRET


def test_ciphertext_is_bound_to_user_and_provider(key: bytes) -> None:
    cipher = AesGcmCipher(key)
    sealed = cipher.encrypt(SECRET, AAD)
    for other in (provider_key_aad("user-b", "anthropic"), provider_key_aad("user-a", "openai")):
        with pytest.raises(KeyDecryptionError):
            cipher.decrypt(sealed, other)
    # The two parts cannot be re-split to forge the same associated data.
    assert provider_key_aad("a:b", "c") != provider_key_aad("a", "b:c")


def test_tampering_and_garbage_are_rejected(key: bytes) -> None:
    cipher = AesGcmCipher(key)
    sealed = bytearray(cipher.encrypt(SECRET, AAD))
    sealed[-1] ^= 1
    with pytest.raises(KeyDecryptionError):
        cipher.decrypt(bytes(sealed), AAD)
    for garbage in (b"", b"\x01", b"\x02" + bytes(40)):
        with pytest.raises(KeyDecryptionError):
            cipher.decrypt(garbage, AAD)


def test_wrong_master_key_is_an_unknown_key_id(key: bytes) -> None:
    sealed = AesGcmCipher(key).encrypt(SECRET, AAD)
    with pytest.raises(KeyDecryptionError, match=key_id_of(key)) as caught:
        AesGcmCipher(os.urandom(32)).decrypt(sealed, AAD)
    assert SECRET.decode() not in str(caught.value) + repr(caught.value)


def test_keyring_reads_old_keys_and_writes_the_new_one(key: bytes) -> None:
    old_sealed = AesGcmCipher(key).encrypt(SECRET, AAD)
    new = os.urandom(32)
    ring = AesGcmCipher(new, [key])
    assert ring.key_id == key_id_of(new) and set(ring.key_ids) == {key_id_of(new), key_id_of(key)}
    assert ring.decrypt(old_sealed, AAD) == SECRET
    resealed = ring.encrypt(SECRET, AAD)
    assert AesGcmCipher.key_id_in(resealed) == key_id_of(new)
    assert AesGcmCipher(new).decrypt(resealed, AAD) == SECRET
    with pytest.raises(KeyDecryptionError):
        AesGcmCipher(key).decrypt(resealed, AAD)


def test_master_key_encoding() -> None:
    encoded = generate_master_key()
    assert len(decode_master_key(encoded)) == 32
    urlsafe = base64.urlsafe_b64encode(decode_master_key(encoded)).decode()
    assert decode_master_key(urlsafe) == decode_master_key(encoded)
    assert AesGcmCipher.from_base64(encoded).key_id == key_id_of(decode_master_key(encoded))
    with pytest.raises(PACoreError, match="32 bytes"):
        decode_master_key(base64.b64encode(b"short").decode())
    with pytest.raises(PACoreError, match="base64"):
        decode_master_key("not base64 !!")
    with pytest.raises(PACoreError):
        AesGcmCipher(b"short")


def test_repr_shows_no_key(key: bytes) -> None:
    text = repr(AesGcmCipher(key))
    assert key.hex() not in text and base64.b64encode(key).decode() not in text
