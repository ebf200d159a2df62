"""On-prem agents paired to a user, each with the jti of its token."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pacore.db.models import Agent, ApiToken
from pacore.db.stores._base import StoreBase, integrity_error, utcnow
from pacore.db.stores.records import AgentRecord
from pacore.db.types import new_id
from pacore.errors import NotFoundError, ValidationError

__all__ = ["AgentStore"]


class AgentStore(StoreBase):
    """Revoked agents are gone for every reader: ``get``, ``get_by_id`` and ``list`` skip them."""

    async def create(
        self,
        user_id: str,
        name: str,
        jti: str,
        *,
        agent_id: str | None = None,
        expires_at: datetime | None = None,
    ) -> AgentRecord:
        """Pair an agent whose token has id ``jti``. The token is recorded (audience ``agent``)
        in the same transaction unless it already was, so ``TokenStore.is_active`` covers it.
        ``agent_id`` lets the caller put the id into the token before the row exists."""
        name = name.strip()
        if not name or len(name) > 100:
            raise ValidationError("an agent name is 1 to 100 characters", param="name")
        now = utcnow()
        row = Agent(
            id=agent_id or new_id(),
            user_id=user_id,
            name=name,
            jti=jti,
            capabilities={},
            created_at=now,
        )
        try:
            async with self.db.transaction() as session:
                session.add(row)
                if await session.get(ApiToken, jti) is None:
                    session.add(
                        ApiToken(
                            id=jti,
                            user_id=user_id,
                            name=name,
                            aud="agent",
                            created_at=now,
                            expires_at=expires_at,
                        )
                    )
        except IntegrityError as exc:
            raise integrity_error(exc, "an agent with this id or token already exists") from None
        return AgentRecord.model_validate(row)

    async def list(self, user_id: str) -> builtins.list[AgentRecord]:
        query = (
            select(Agent)
            .where(Agent.user_id == user_id, Agent.revoked_at.is_(None))
            .order_by(Agent.created_at, Agent.id)
        )
        async with self.db.session() as session:
            rows = (await session.execute(query)).scalars().all()
        return [AgentRecord.model_validate(r) for r in rows]

    async def get(self, user_id: str, agent_id: str) -> AgentRecord:
        async with self.db.session() as session:
            row = await self._live(session, agent_id, user_id)
        return AgentRecord.model_validate(row)

    async def get_by_id(self, agent_id: str) -> AgentRecord:
        """Any user's agent: for the hub, once the agent's token has been verified."""
        async with self.db.session() as session:
            row = await self._live(session, agent_id)
        return AgentRecord.model_validate(row)

    async def revoke(self, user_id: str, agent_id: str) -> AgentRecord:
        """Unpair the agent and revoke its token, at once and together."""
        now = utcnow()
        async with self.db.transaction() as session:
            row = await self._live(session, agent_id, user_id, lock=True)
            row.revoked_at = now
            token = await session.get(ApiToken, row.jti, with_for_update=True)
            if token is not None and token.revoked_at is None:
                token.revoked_at = now
        await self.db.changed()  # replicas that remember the token as active learn it is not
        return AgentRecord.model_validate(row)

    async def update_seen(
        self,
        agent_id: str,
        capabilities: dict[str, Any] | None = None,
        last_seen: datetime | None = None,
    ) -> AgentRecord:
        """Record that the agent connected or answered, and what it announced it can do."""
        async with self.db.transaction() as session:
            row = await self._live(session, agent_id, lock=True)
            row.last_seen = last_seen or utcnow()
            if capabilities is not None:
                row.capabilities = dict(capabilities)
        return AgentRecord.model_validate(row)

    @staticmethod
    async def _live(
        session: AsyncSession, agent_id: str, user_id: str | None = None, *, lock: bool = False
    ) -> Agent:
        query = select(Agent).where(Agent.id == agent_id, Agent.revoked_at.is_(None))
        if user_id is not None:
            query = query.where(Agent.user_id == user_id)
        if lock:
            query = query.with_for_update()
        row = (await session.execute(query)).scalar_one_or_none()
        if row is None:
            raise NotFoundError("agent not found")
        return row
