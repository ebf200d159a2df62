"""Per-call usage logs with estimated cost, and per-user summaries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, insert, select
from sqlalchemy.exc import IntegrityError

from pacore.db.engine import Database
from pacore.db.models import UsageLog
from pacore.db.stores._base import StoreBase, integrity_error, utcnow
from pacore.db.stores.records import UsageBucket, UsageRecord, UsageSummary
from pacore.db.types import new_id
from pacore.usage import PriceTable, default_price_table

__all__ = ["UsageEntry", "UsageStore"]


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One provider call to log."""

    user_id: str
    provider: str
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float | None
    status: str = "ok"
    kind: str | None = None
    at: datetime | None = None


class UsageStore(StoreBase):
    def __init__(self, db: Database, prices: PriceTable | None = None) -> None:
        super().__init__(db)
        self.prices = prices or default_price_table()

    async def record(
        self,
        user_id: str,
        provider: str,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float | None,
        status: str = "ok",
        *,
        kind: str | None = None,
    ) -> UsageRecord:
        """Log one provider call; ``kind`` (the provider's kind) marks self-hosted ones free."""
        cost = self.prices.cost(provider, model, prompt_tokens, completion_tokens, kind=kind)
        row = UsageLog(
            id=new_id(),
            user_id=user_id,
            provider=provider,
            model=model,
            prompt_tokens=max(0, prompt_tokens),
            completion_tokens=max(0, completion_tokens),
            latency_ms=latency_ms,
            status=status[:16],
            cost_usd=cost,
            created_at=utcnow(),
        )
        try:
            async with self.db.transaction() as session:
                session.add(row)
        except IntegrityError as exc:
            raise integrity_error(exc, "usage already recorded") from None
        return UsageRecord.model_validate(row)

    async def record_many(self, entries: Sequence[UsageEntry]) -> int:
        """Log many provider calls in one transaction (the Router batches them off the
        response path); returns how many were written."""
        now = utcnow()
        rows = [
            {
                "id": new_id(), "user_id": e.user_id, "provider": e.provider, "model": e.model,
                "prompt_tokens": max(0, e.prompt_tokens),
                "completion_tokens": max(0, e.completion_tokens), "latency_ms": e.latency_ms,
                "status": e.status[:16],
                "cost_usd": self.prices.cost(
                    e.provider, e.model, e.prompt_tokens, e.completion_tokens, kind=e.kind
                ),
                "created_at": e.at or now,
            }
            for e in entries
        ]
        if rows:
            # A bulk INSERT of plain rows: nothing reads them back, so no ORM objects are built.
            async with self.db.transaction() as session:
                await session.execute(insert(UsageLog), rows)
        return len(rows)

    async def summary(self, user_id: str, since: datetime | None = None) -> UsageSummary:
        """Totals per (provider, model) and overall, optionally since a time."""
        query = (
            select(
                UsageLog.provider,
                UsageLog.model,
                func.count(),
                func.sum(case((UsageLog.status != "ok", 1), else_=0)),
                func.coalesce(func.sum(UsageLog.prompt_tokens), 0),
                func.coalesce(func.sum(UsageLog.completion_tokens), 0),
                func.coalesce(func.sum(UsageLog.cost_usd), 0.0),
                func.sum(case((UsageLog.cost_usd.is_(None), 1), else_=0)),
            )
            .where(UsageLog.user_id == user_id)
            .group_by(UsageLog.provider, UsageLog.model)
            .order_by(UsageLog.provider, UsageLog.model)
        )
        if since is not None:
            query = query.where(UsageLog.created_at >= since)
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        buckets = [
            UsageBucket(
                provider=provider,
                model=model,
                requests=int(n),
                errors=int(errors or 0),
                prompt_tokens=int(prompt),
                completion_tokens=int(completion),
                cost_usd=float(cost),
                unpriced_requests=int(unpriced or 0),
            )
            for provider, model, n, errors, prompt, completion, cost, unpriced in rows
        ]
        return UsageSummary(
            since=since,
            requests=sum(b.requests for b in buckets),
            errors=sum(b.errors for b in buckets),
            prompt_tokens=sum(b.prompt_tokens for b in buckets),
            completion_tokens=sum(b.completion_tokens for b in buckets),
            cost_usd=sum(b.cost_usd for b in buckets),
            unpriced_requests=sum(b.unpriced_requests for b in buckets),
            by_model=buckets,
        )
