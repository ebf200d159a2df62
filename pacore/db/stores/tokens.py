"""Issued tokens by jti: listing, revocation, and the liveness check every request makes."""

from __future__ import annotations

from datetime import datetime
from typing import get_args

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from pacore.db.changes import ReadCache
from pacore.db.engine import Database
from pacore.db.models import ApiToken
from pacore.db.stores._base import StoreBase, integrity_error, utcnow
from pacore.db.stores.records import TokenAudience, TokenRecord
from pacore.errors import ConflictError, NotFoundError, ValidationError

__all__ = ["TokenStore"]

_AUDIENCES = set(get_args(TokenAudience))


class TokenStore(StoreBase):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self._liveness = ReadCache(db.changes)

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
            revoking = row.revoked_at is None
            if revoking:
                row.revoked_at = utcnow()
        if revoking:
            await self.db.changed()
        return TokenRecord.model_validate(row)

    async def is_active(self, jti: str) -> bool:
        """True when the token was recorded, is not revoked and has not expired. Every request
        asks, so the answer is cached until a revocation anywhere moves the change counter."""
        live, expires_at = await self._liveness.get(jti, lambda: self._load_liveness(jti))
        return live and (expires_at is None or expires_at > utcnow())

    async def _load_liveness(self, jti: str) -> tuple[bool, datetime | None]:
        query = select(ApiToken.revoked_at, ApiToken.expires_at).where(ApiToken.id == jti)
        async with self.db.session() as session:
            row = (await session.execute(query)).first()
        if row is None:
            return False, None
        return row.revoked_at is None, row.expires_at

    async def touch(self, jti: str) -> None:
        """Note that the token was just used."""
        async with self.db.transaction() as session:
            await session.execute(
                update(ApiToken).where(ApiToken.id == jti).values(last_used_at=utcnow())
            )
