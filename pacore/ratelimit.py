"""Per-user request budgets for the gateway: a token bucket per user and replica.

Each gateway replica refills ``rate_limit_per_minute / replicas`` worth of budget on its own;
no shared state is consulted on the hot path. A budget of 0 disables limiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pacore.config import Settings

__all__ = ["RateLimiter"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, per_minute: int, *, burst: int | None = None, max_users: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, per_minute))
        self.enabled = per_minute > 0
        self._buckets: dict[str, _Bucket] = {}
        self._max_users = max_users

    @classmethod
    def for_settings(cls, settings: Settings) -> RateLimiter:
        return cls(settings.rate_limit_per_minute)

    def hit(self, user_id: str, now: float | None = None) -> float | None:
        """Take one request from the user's budget: None if allowed, else seconds to wait."""
        if not self.enabled:
            return None
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(user_id)
        if bucket is None:
            if len(self._buckets) >= self._max_users:
                self._buckets.clear()  # bounded memory; a reset only grants a fresh burst
            bucket = self._buckets[user_id] = _Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self.rate
