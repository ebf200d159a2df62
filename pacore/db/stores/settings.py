"""Each user's routing settings (default provider, data residency, per-type routes, fallbacks)."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from pacore.db.models import UserSettingsRow
from pacore.db.stores._base import StoreBase, integrity_error, utcnow
from pacore.db.stores.records import UserSettings
from pacore.protocol import SettingsBody

__all__ = ["SettingsStore"]


class SettingsStore(StoreBase):
    async def get(self, user_id: str) -> UserSettings:
        """The user's settings, or the defaults when none were saved."""
        async with self.db.session() as session:
            row = await session.get(UserSettingsRow, user_id)
        if row is None:
            return UserSettings()
        return UserSettings.model_validate(row.data)

    async def put(self, user_id: str, settings: SettingsBody) -> UserSettings:
        """Replace the user's settings; a missing data_residency means ``any``."""
        data = settings.model_dump(mode="json")
        if data.get("data_residency") is None:
            data["data_residency"] = "any"
        value = UserSettings.model_validate(data)
        try:
            async with self.db.transaction() as session:
                row = await session.get(UserSettingsRow, user_id, with_for_update=True)
                if row is None:
                    session.add(
                        UserSettingsRow(
                            user_id=user_id, data=value.model_dump(mode="json"), updated_at=utcnow()
                        )
                    )
                else:
                    row.data = value.model_dump(mode="json")
                    row.updated_at = utcnow()
        except IntegrityError as exc:
            raise integrity_error(exc, "settings changed concurrently; try again") from None
        await self.db.changed()
        return value
