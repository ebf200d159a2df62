"""Accounts: registration and password login."""

from __future__ import annotations

import asyncio

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from pacore.db.models import User
from pacore.db.stores._base import StoreBase, utcnow
from pacore.db.stores.records import UserRecord
from pacore.db.types import new_id
from pacore.errors import AuthenticationError, ConflictError, NotFoundError, ValidationError
from pacore.security.passwords import dummy_hash, hash_password, needs_rehash, verify_password

__all__ = ["UserStore", "normalize_email"]


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    local, _, domain = email.partition("@")
    if not local or not domain or len(email) > 254 or any(c.isspace() for c in email):
        raise ValidationError("not a valid e-mail address", param="email")
    return email


class UserStore(StoreBase):
    async def create(self, email: str, password: str) -> UserRecord:
        """A new user; ConflictError when the (case-folded) e-mail is taken."""
        email = normalize_email(email)
        if not password:
            raise ValidationError("the password must not be empty", param="password")
        # scrypt takes tens of milliseconds of CPU: keep it off the event loop.
        hashed = await asyncio.to_thread(hash_password, password)
        row = User(id=new_id(), email=email, password_hash=hashed, created_at=utcnow())
        try:
            async with self.db.transaction() as session:
                session.add(row)
        except IntegrityError:
            raise ConflictError("a user with this e-mail already exists", param="email") from None
        return UserRecord.model_validate(row)

    async def authenticate(self, email: str, password: str) -> UserRecord:
        """The user with this e-mail and password; AuthenticationError otherwise. An unknown
        e-mail costs as long as a wrong password, so timing reveals nothing."""
        try:
            email = normalize_email(email)
        except ValidationError:
            email = ""
        async with self.db.session() as session:
            row = (
                await session.execute(select(User).where(User.email == email))
            ).scalar_one_or_none()
        stored = row.password_hash if row is not None else dummy_hash()
        ok = await asyncio.to_thread(verify_password, password, stored)
        if row is None or not ok:
            raise AuthenticationError("invalid e-mail or password")
        if needs_rehash(row.password_hash):
            await self._rehash(row.id, password)
        return UserRecord.model_validate(row)

    async def get(self, user_id: str) -> UserRecord:
        async with self.db.session() as session:
            row = await session.get(User, user_id)
        if row is None:
            raise NotFoundError("user not found")
        return UserRecord.model_validate(row)

    async def get_by_email(self, email: str) -> UserRecord:
        """The user with this e-mail (for operators' tools; never exposed over the API)."""
        email = normalize_email(email)
        async with self.db.session() as session:
            row = (
                await session.execute(select(User).where(User.email == email))
            ).scalar_one_or_none()
        if row is None:
            raise NotFoundError("user not found")
        return UserRecord.model_validate(row)

    async def _rehash(self, user_id: str, password: str) -> None:
        hashed = await asyncio.to_thread(hash_password, password)
        async with self.db.transaction() as session:
            await session.execute(
                update(User).where(User.id == user_id).values(password_hash=hashed)
            )
