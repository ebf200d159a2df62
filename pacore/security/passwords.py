"""Password hashing with scrypt (hashlib), self-describing so parameters can be raised later.

A hash reads ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<digest b64>``; verification compares in
constant time and never raises on a malformed hash (it is simply not a match).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

__all__ = ["dummy_hash", "hash_password", "needs_rehash", "verify_password"]

_LOG2_N = 15  # n = 32768: ~32 MiB and tens of milliseconds per hash (OWASP's scrypt minimum+)
_R = 8
_P = 1
_SALT_LEN = 16
_DKLEN = 32


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=2 * 128 * r * n + 1_048_576,
        dklen=_DKLEN,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = os.urandom(_SALT_LEN)
    digest = _scrypt(password, salt, _LOG2_N, _R, _P)
    return f"scrypt${_LOG2_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, log2_n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt" or not 1 <= int(log2_n) <= 20:
            return False
        expected = _unb64(digest)
        actual = _scrypt(password, _unb64(salt), int(log2_n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(encoded: str) -> bool:
    """True when ``encoded`` was made with weaker parameters than today's."""
    parts = encoded.split("$")
    return len(parts) != 6 or parts[0] != "scrypt" or parts[1:4] != [str(_LOG2_N), str(_R), str(_P)]


@functools.cache
def dummy_hash() -> str:
    """A hash of a random password, verified against when an e-mail is unknown so that a miss
    costs as long as a wrong password."""
    return hash_password(base64.b64encode(os.urandom(16)).decode())
