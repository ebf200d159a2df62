"""What a replica needs from the settings: the database with its stores, and the token service."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from pacore.config import Settings
from pacore.db.engine import Database
from pacore.db.stores import Stores
from pacore.security.secrets import load_secrets
from pacore.security.tokens import TokenService
from pacore.usage import PriceTable

__all__ = ["Services"]


@dataclass(slots=True)
class Services:
    settings: Settings
    db: Database
    stores: Stores
    tokens: TokenService

    @classmethod
    def for_settings(cls, settings: Settings) -> Services:
        """Build from settings (secrets loaded or generated once, schema already migrated)."""
        secrets = load_secrets(settings)
        db = Database.from_settings(settings)
        stores = Stores(db, secrets.cipher(), PriceTable.from_settings(settings))
        return cls(settings, db, stores, secrets.token_service(settings.jwt_algorithm))

    async def ping(self) -> None:
        async with self.db.session() as session:
            await session.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        await self.db.dispose()
