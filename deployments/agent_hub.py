"""The AgentHub deployment: the agent hub on Ray Serve, one replica in-process, many over Redis.

Every method but ``ping`` is :class:`pacore.agents.hub.AgentHub`'s, called through a handle: the
Gateway calls ``attach`` (streaming), ``deliver``, ``detach``, ``revoke``, ``presence`` and
``ping``; the Router calls ``complete``, ``stream`` (streaming), ``tools``, ``call_tool``,
``health`` and ``connected_agents``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from pacore.agents.bus import Bus, InMemoryBus, RedisBus
from pacore.agents.hub import AgentHub, HubConfig, LinkClosed
from pacore.config import Settings
from pacore.errors import NotFoundError
from pacore.logs import to_replica_log
from pacore.metrics import agent_link_closed, agent_link_opened

__all__ = ["DEFAULT_OPTIONS", "AgentHubDeployment", "AgentStoreDirectory"]

log = logging.getLogger("pacore.agents")

# Without Redis the bus lives in the replica's memory, so there must be exactly one replica. The
# work is relaying frames: a sliver of a CPU, and many calls in flight, since every connected
# agent holds one ``attach`` stream open for as long as it stays connected.
DEFAULT_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0.1},
    "max_ongoing_requests": 10_000,
}

# With Redis the replicas share everything through it: scale them.
_REDIS_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 2_000,
    "upscale_delay_s": 10,
    "downscale_delay_s": 300,
}


class AgentStoreDirectory:
    """The agents table (:class:`pacore.db.stores.AgentStore`) as the hub's directory."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def owner_of(self, agent_id: str) -> str | None:
        try:
            record = await self.store.get_by_id(agent_id)
        except NotFoundError:
            return None
        return str(record.user_id)

    async def record(self, agent_id: str, capabilities: dict[str, Any] | None) -> None:
        try:
            await self.store.update_seen(agent_id, capabilities)
        except NotFoundError:
            log.warning("agent %s is connected but no longer in the agents table", agent_id)


def bus_for(settings: Settings, prefix: str = "pacore:agents:") -> Bus:
    """Redis when ``redis_url`` is set (names under ``prefix``), else the in-memory bus."""
    return RedisBus(settings.redis_url, prefix=prefix) if settings.redis_url else InMemoryBus()


class AgentHubDeployment(AgentHub):
    """One hub replica: the bus from ``settings.redis_url``, the directory from the database."""

    DEFAULT_OPTIONS = DEFAULT_OPTIONS

    @classmethod
    def options_for(cls, settings: Settings) -> dict[str, Any]:
        """One replica over the in-memory bus; autoscaled when ``redis_url`` is set."""
        options = copy.deepcopy(DEFAULT_OPTIONS)
        if settings.redis_url:
            del options["num_replicas"]
            options["autoscaling_config"] = dict(_REDIS_AUTOSCALING)
        return options

    def __init__(
        self,
        settings: dict[str, Any] | Settings | None = None,
        hub: dict[str, Any] | None = None,
        *,
        directory: bool = True,
        bus_prefix: str = "pacore:agents:",
    ) -> None:
        if not isinstance(settings, Settings):
            settings = Settings(**(settings or {}))
        to_replica_log(settings.log_level)
        self._db: Any = None
        super().__init__(
            bus_for(settings, bus_prefix),
            HubConfig.model_validate(hub or {}),
            directory=self._directory(settings) if directory else None,
        )

    def _directory(self, settings: Settings) -> AgentStoreDirectory:
        from pacore.db.engine import Database
        from pacore.db.stores import AgentStore

        self._db = Database.from_settings(settings)
        return AgentStoreDirectory(AgentStore(self._db))

    async def ping(self) -> None:
        """Readiness, for the gateway's health check: the bus answers."""
        await self.bus.get("ping")

    async def attach(
        self, agent_id: str, connection_id: str, *, user_id: str
    ) -> AsyncIterator[str | LinkClosed]:
        """The hub's ``attach``, counted in the agent-connection metrics once the link is up
        (a refused link is not a connection)."""
        opened = False
        try:
            async with aclosing(super().attach(  # type: ignore[type-var]
                agent_id, connection_id, user_id=user_id
            )) as items:
                async for item in items:
                    if not opened and not isinstance(item, LinkClosed):
                        opened = True
                        agent_link_opened()
                    yield item
        finally:
            if opened:
                agent_link_closed()

    async def aclose(self) -> None:
        """Close the bus and the database (a replica's process exit does it too)."""
        await self.bus.aclose()
        if self._db is not None:
            await self._db.dispose()
