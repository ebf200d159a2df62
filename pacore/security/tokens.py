"""Signed JWTs for sessions, API tokens and agent tokens.

A token carries ``sub`` (user id, or agent id for agent tokens), ``aud`` (``api``, ``agent`` or
``session``), ``iat``, ``exp`` (absent for tokens that never expire), ``jti`` and ``iss``.
:meth:`TokenService.verify` checks the signature with the one configured algorithm (so ``none``
and every other algorithm are refused), the audience, the issuer and the expiry. Revocation is
the caller's to check, because it needs the database: pass the store's ``is_active`` to
:meth:`TokenService.verify_active` (``TokenStore.is_active(jti)``), which does both.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt
from pydantic import BaseModel, ConfigDict, SecretStr

from pacore.errors import AuthenticationError, PACoreError
from pacore.lru import Lru

__all__ = ["ALGORITHMS", "Audience", "Claims", "IssuedToken", "TokenService"]

Audience = Literal["api", "agent", "session"]
ALGORITHMS = ("HS256", "HS384", "HS512")
ISSUER = "pacore"
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime | None

    def __repr__(self) -> str:
        return f"IssuedToken(jti={self.jti!r}, expires_at={self.expires_at!r})"


class Claims(BaseModel):
    model_config = ConfigDict(frozen=True)

    sub: str
    aud: str
    jti: str
    iat: datetime
    exp: datetime | None = None
    name: str | None = None


class TokenService:
    def __init__(self, secret: str | SecretStr, algorithm: str = "HS256") -> None:
        if algorithm not in ALGORITHMS:
            raise PACoreError(f"unsupported JWT algorithm {algorithm!r}; use one of {ALGORITHMS}")
        value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        if not value:
            raise PACoreError("the JWT signing secret is empty")
        self._secret = value
        self.algorithm = algorithm
        # Checking a signature is most of what authenticating a request costs; a token that
        # verified once verifies again until it expires (only the clock changes its answer).
        self._verified: Lru[tuple[str, tuple[str, ...]], Claims] = Lru(VERIFIED_CACHE_SIZE)

    def issue(
        self,
        sub: str,
        aud: Audience,
        ttl: timedelta | None,
        name: str | None = None,
        *,
        jti: str | None = None,
    ) -> IssuedToken:
        """A signed token; ``ttl`` None makes one that never expires (revocation still works).
        ``jti`` may be given when the caller must know it before the token exists."""
        now = datetime.now(UTC).replace(microsecond=0)
        jti = jti or str(uuid.uuid4())
        claims: dict[str, Any] = {"iss": ISSUER, "sub": sub, "aud": aud, "iat": now, "jti": jti}
        expires_at = None
        if ttl is not None:
            expires_at = now + ttl
            claims["exp"] = expires_at
        if name is not None:
            claims["name"] = name
        token = jwt.encode(claims, self._secret, algorithm=self.algorithm)
        return IssuedToken(token=token, jti=jti, expires_at=expires_at)

    def verify(self, token: str, aud: str | Collection[str]) -> Claims:
        """The token's claims, or AuthenticationError when the token is not valid for ``aud``
        (one audience or any of several)."""
        key = (token, (aud,) if isinstance(aud, str) else tuple(aud))
        claims = self._verified.get(key)
        if claims is not None:
            if claims.exp is not None and claims.exp <= datetime.now(UTC):
                self._verified.pop(key)
                raise AuthenticationError("token expired", code="token_expired")
            return claims
        claims = self._verify(token, aud)
        self._verified.put(key, claims)
        return claims

    def _verify(self, token: str, aud: str | Collection[str]) -> Claims:
        try:
            # Checked before decoding too, so that no other algorithm is ever tried.
            if jwt.get_unverified_header(token).get("alg") != self.algorithm:
                raise jwt.InvalidAlgorithmError("unexpected algorithm")
            raw = jwt.decode(
                token,
                self._secret,
                algorithms=[self.algorithm],
                audience=aud if isinstance(aud, str) else list(aud),
                issuer=ISSUER,
                options={"require": ["sub", "aud", "iat", "jti", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired", code="token_expired") from None
        except jwt.InvalidTokenError:
            raise AuthenticationError("invalid token", code="invalid_token") from None
        return Claims(
            sub=raw["sub"],
            aud=raw["aud"],
            jti=raw["jti"],
            iat=datetime.fromtimestamp(raw["iat"], UTC),
            exp=datetime.fromtimestamp(raw["exp"], UTC) if "exp" in raw else None,
            name=raw.get("name"),
        )

    async def verify_active(
        self,
        token: str,
        aud: str | Collection[str],
        is_active: Callable[[str], Awaitable[bool]],
    ) -> Claims:
        """:meth:`verify`, then ``is_active(jti)`` (revoked or unknown → AuthenticationError)."""
        claims = self.verify(token, aud)
        if not await is_active(claims.jti):
            raise AuthenticationError("token revoked", code="token_revoked")
        return claims

    def __repr__(self) -> str:
        return f"TokenService(algorithm={self.algorithm!r})"
