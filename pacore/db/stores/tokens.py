"""Issued tokens by jti: listing, revocation, and the liveness check every request makes."""

from __future__ import annotations

from datetime import datetime
from typing import get_args

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from pacore.db.models import ApiToken
from pacore.db.stores._base import StoreBase, integrity_error, utcnow
from pacore.db.stores.records import TokenAudience, TokenRecord
from pacore.errors import ConflictError, NotFoundError, ValidationError

__all__ = ["TokenStore"]

_AUDIENCES = set(get_args(TokenAudience))


class TokenStore(StoreBase):
    async def record(
        self, jti: str, user_id: str, name: str, aud: str, expires_at: datetime | None
    ) -> TokenRecord:
        """Remember an issued token. Recording the same jti twice is harmless."""
        if aud not in _AUDIENCES:
            raise ValidationError(f"unknown token audience '{aud}'", param="aud")
        values = {
            "id": jti,
            "user_id": user_id,
            "name": name[:100],
            "aud": aud,
            "created_at": utcnow(),
            "expires_at": expires_at,
        }
        insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
        try:
            async with self.db.transaction() as session:
                await session.execute(
                    insert(ApiToken).values(**values).on_conflict_do_nothing(index_elements=["id"])
                )
                row = await session.get(ApiToken, jti)
        except IntegrityError as exc:
            raise integrity_error(exc, "token already recorded") from None
        if row is None or row.user_id != user_id:
            raise ConflictError("token id already in use")
        return TokenRecord.model_validate(row)

    async def list(self, user_id: str, aud: str = "api") -> list[TokenRecord]:
        """The user's tokens of one audience that were not revoked, newest first."""
        query = (
            select(ApiToken)
            .where(ApiToken.user_id == user_id, ApiToken.aud == aud, ApiToken.revoked_at.is_(None))
            .order_by(ApiToken.created_at.desc(), ApiToken.id)
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).scalars().all()
        return [TokenRecord.model_validate(r) for r in rows]

    async def get(self, user_id: str, token_id: str) -> TokenRecord:
        async with self.db.session() as session:
            row = await session.get(ApiToken, token_id)
        if row is None or row.user_id != user_id:
            raise NotFoundError("token not found")
        return TokenRecord.model_validate(row)

    async def revoke(self, user_id: str, token_id: str) -> TokenRecord:
        """Revoke at once; revoking a revoked token is a no-op. Another user's is NotFound."""
        async with self.db.transaction() as session:
            row = await session.get(ApiToken, token_id, with_for_update=True)
            if row is None or row.user_id != user_id:
                raise NotFoundError("token not found")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
        return TokenRecord.model_validate(row)

    async def is_active(self, jti: str) -> bool:
        """True when the token was recorded, is not revoked and has not expired."""
        now = utcnow()
        query = select(ApiToken.id).where(
            ApiToken.id == jti,
            ApiToken.revoked_at.is_(None),
            (ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > now),
        )
        async with self.db.session() as session:
            return (await session.execute(query)).first() is not None

    async def touch(self, jti: str) -> None:
        """Note that the token was just used."""
        async with self.db.transaction() as session:
            await session.execute(
                update(ApiToken).where(ApiToken.id == jti).values(last_used_at=utcnow())
            )
