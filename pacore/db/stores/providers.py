"""Users' provider configurations, with API keys encrypted at rest and decrypted only on demand."""

from __future__ import annotations

import builtins
import json
import re
from typing import Any, get_args

from pydantic import SecretStr
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pacore.db.engine import Database
from pacore.db.models import ProviderConfigRow
from pacore.db.stores._base import StoreBase, integrity_error, utcnow
from pacore.db.stores.records import EncryptedKey, ProviderRecord
from pacore.db.types import new_id
from pacore.errors import NotFoundError, ValidationError
from pacore.providers.base import ProviderConfig, ProviderKind
from pacore.security.crypto import KeyCipher, provider_key_aad

__all__ = ["KEYLESS_KINDS", "ProviderStore"]

# Kinds that work without a key: self-hosted servers, and any OpenAI-compatible URL.
KEYLESS_KINDS = frozenset({"custom", "ollama", "vllm", "cpu", "agent"})
_KINDS = set(get_args(ProviderKind)) - {"agent"}
# No ':' (agent:<id> is reserved) and no '/' (models are named <provider>/<model>).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Options that are fields of ProviderConfig rather than adapter options.
_CONFIG_FIELDS = ("timeout_s", "connect_timeout_s", "max_retries")


def _record(row: ProviderConfigRow) -> ProviderRecord:
    has_key = row.encrypted_key is not None
    return ProviderRecord(
        name=row.name,
        kind=row.kind,
        configured=has_key or row.kind in KEYLESS_KINDS,
        has_key=has_key,
        base_url=row.base_url,
        default_model=row.default_model,
        options=dict(row.options or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _check(name: str, kind: str, options: dict[str, Any]) -> None:
    if not _NAME.match(name):
        raise ValidationError(
            "a provider name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
            param="name",
        )
    if kind not in _KINDS:
        raise ValidationError(f"unknown provider kind '{kind}'", param="kind")
    try:
        json.dumps(options)
    except (TypeError, ValueError):
        raise ValidationError("options must be JSON", param="options") from None


def _secret(api_key: str | SecretStr) -> bytes:
    value = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
    if not value:
        raise ValidationError("api_key must not be empty", param="api_key")
    return value.encode()


class ProviderStore(StoreBase):
    def __init__(self, db: Database, cipher: KeyCipher) -> None:
        super().__init__(db)
        self.cipher = cipher

    async def put(
        self,
        user_id: str,
        name: str,
        kind: str,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        default_model: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> ProviderRecord:
        """Create or replace the user's provider ``name``. ``api_key=None`` keeps a stored key."""
        options = dict(options or {})
        _check(name, kind, options)
        sealed = None
        if api_key is not None:
            sealed = self.cipher.encrypt(_secret(api_key), provider_key_aad(user_id, name))
        fields: dict[str, Any] = {
            "kind": kind,
            "base_url": base_url,
            "default_model": default_model,
            "options": options,
        }
        if sealed is not None:
            fields.update(encrypted_key=sealed, key_id=self.cipher.key_id)
        conflict = f"provider '{name}' changed concurrently; try again"
        try:
            return await self._upsert(user_id, name, fields)
        except IntegrityError as exc:
            if "foreign key" in str(exc.orig).lower():
                raise integrity_error(exc, conflict) from None
        # Another request created the same name at the same moment: this one updates it.
        try:
            return await self._upsert(user_id, name, fields)
        except IntegrityError as exc:
            raise integrity_error(exc, conflict) from None

    async def _upsert(self, user_id: str, name: str, fields: dict[str, Any]) -> ProviderRecord:
        now = utcnow()
        async with self.db.transaction() as session:
            row = await self._row(session, user_id, name, lock=True)
            if row is None:
                row = ProviderConfigRow(
                    id=new_id(),
                    user_id=user_id,
                    name=name,
                    created_at=now,
                    updated_at=now,
                    **fields,
                )
                session.add(row)
            else:
                for key, value in fields.items():
                    setattr(row, key, value)
                row.updated_at = now
        await self.db.changed()
        return _record(row)

    async def list(self, user_id: str) -> builtins.list[ProviderRecord]:
        query = (
            select(ProviderConfigRow)
            .where(ProviderConfigRow.user_id == user_id)
            .order_by(ProviderConfigRow.name)
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).scalars().all()
        return [_record(r) for r in rows]

    async def get(self, user_id: str, name: str) -> ProviderRecord:
        async with self.db.session() as session:
            row = await self._row(session, user_id, name)
        if row is None:
            raise NotFoundError(f"provider '{name}' not found")
        return _record(row)

    async def get_config(self, user_id: str, name: str) -> ProviderConfig:
        """The configuration a provider adapter is built from, the key decrypted in memory."""
        async with self.db.session() as session:
            row = await self._row(session, user_id, name)
        if row is None:
            raise NotFoundError(f"provider '{name}' not found")
        api_key = None
        if row.encrypted_key is not None:
            plain = self.cipher.decrypt(row.encrypted_key, provider_key_aad(user_id, name))
            api_key = SecretStr(plain.decode())
        options = dict(row.options or {})
        lifted = {k: options.pop(k) for k in _CONFIG_FIELDS if k in options}
        try:
            return ProviderConfig(
                kind=row.kind,  # checked on the way in
                name=row.name,
                api_key=api_key,
                base_url=row.base_url,
                default_model=row.default_model,
                options=options,
                **lifted,
            )
        except PydanticValidationError as exc:
            field = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise ValidationError(
                f"provider '{name}' has an invalid setting: {field}", param=field
            ) from None

    async def delete(self, user_id: str, name: str) -> None:
        async with self.db.transaction() as session:
            row = await self._row(session, user_id, name, lock=True)
            if row is None:
                raise NotFoundError(f"provider '{name}' not found")
            await session.delete(row)
        await self.db.changed()

    async def all_encrypted(self) -> builtins.list[EncryptedKey]:
        """Every stored key of every user, as ciphertext."""
        query = select(ProviderConfigRow).where(ProviderConfigRow.encrypted_key.is_not(None))
        async with self.db.session() as session:
            rows = (await session.execute(query)).scalars().all()
        return [
            EncryptedKey(
                id=r.id,
                user_id=r.user_id,
                name=r.name,
                key_id=r.key_id,
                ciphertext=r.encrypted_key or b"",
            )
            for r in rows
        ]

    async def rotate(self, cipher: KeyCipher) -> int:
        """Re-encrypt every stored key under ``cipher``'s primary key, in one transaction.

        ``cipher`` must also hold the key(s) the rows are under now (a keyring with the old
        master key as a previous key). If any row fails to decrypt, nothing is changed. The
        store uses ``cipher`` from then on. Returns how many keys were re-encrypted.
        """
        query = (
            select(ProviderConfigRow)
            .where(ProviderConfigRow.encrypted_key.is_not(None))
            .with_for_update()
        )
        count = 0
        async with self.db.transaction() as session:
            for row in (await session.execute(query)).scalars():
                aad = provider_key_aad(row.user_id, row.name)
                plain = cipher.decrypt(row.encrypted_key or b"", aad)
                row.encrypted_key = cipher.encrypt(plain, aad)
                row.key_id = cipher.key_id
                count += 1
        self.cipher = cipher
        await self.db.changed()
        return count

    @staticmethod
    async def _row(
        session: AsyncSession, user_id: str, name: str, *, lock: bool = False
    ) -> ProviderConfigRow | None:
        query = select(ProviderConfigRow).where(
            ProviderConfigRow.user_id == user_id, ProviderConfigRow.name == name
        )
        if lock:
            query = query.with_for_update()
        return (await session.execute(query)).scalar_one_or_none()
