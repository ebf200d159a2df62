"""The per-user stores over the SQL database, and the ``Stores`` container that builds them.

Every query is scoped by user id; a row of another user is a :class:`NotFoundError` (404), never
a 403 that would confirm it exists. Stores return immutable records (:mod:`.records`), never
ORM objects.
"""

from __future__ import annotations

from pacore.config import Settings
from pacore.db.engine import Database
from pacore.db.stores.agents import AgentStore
from pacore.db.stores.conversations import ConversationStore
from pacore.db.stores.providers import KEYLESS_KINDS, ProviderStore
from pacore.db.stores.records import (
    AgentRecord,
    ConversationRecord,
    EncryptedKey,
    MessageRecord,
    NewMessage,
    ProviderRecord,
    TokenAudience,
    TokenRecord,
    UsageBucket,
    UsageRecord,
    UsageSummary,
    UserRecord,
    UserSettings,
)
from pacore.db.stores.settings import SettingsStore
from pacore.db.stores.tokens import TokenStore
from pacore.db.stores.usage import UsageStore
from pacore.db.stores.users import UserStore
from pacore.security.crypto import KeyCipher
from pacore.usage import PriceTable

__all__ = [
    "KEYLESS_KINDS",
    "AgentRecord",
    "AgentStore",
    "ConversationRecord",
    "ConversationStore",
    "EncryptedKey",
    "MessageRecord",
    "NewMessage",
    "ProviderRecord",
    "ProviderStore",
    "SettingsStore",
    "Stores",
    "TokenAudience",
    "TokenRecord",
    "TokenStore",
    "UsageBucket",
    "UsageRecord",
    "UsageStore",
    "UsageSummary",
    "UserRecord",
    "UserSettings",
    "UserStore",
]


class Stores:
    """Every store over one database: ``Stores(db, cipher)``."""

    def __init__(self, db: Database, cipher: KeyCipher, prices: PriceTable | None = None) -> None:
        self.db = db
        self.users = UserStore(db)
        self.tokens = TokenStore(db)
        self.providers = ProviderStore(db, cipher)
        self.settings = SettingsStore(db)
        self.agents = AgentStore(db)
        self.conversations = ConversationStore(db)
        self.usage = UsageStore(db, prices)

    @classmethod
    def from_settings(cls, settings: Settings) -> Stores:
        """Stores for the configured database, with the configured (or generated) master key
        and price table. The schema must already be migrated (``pacore db upgrade``)."""
        from pacore.security.secrets import load_secrets

        secrets = load_secrets(settings)
        return cls(
            Database.from_settings(settings), secrets.cipher(), PriceTable.from_settings(settings)
        )

    async def aclose(self) -> None:
        await self.db.dispose()
