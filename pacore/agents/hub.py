"""The agent hub: routes completions and tool calls to on-prem agents over their links.

A link is one agent WebSocket, held by a gateway replica. The gateway relays what the agent sends
to :meth:`AgentHub.deliver` and writes down the socket whatever :meth:`AgentHub.attach` yields.
Callers (the Router) use :meth:`AgentHub.complete`, :meth:`AgentHub.stream` and
:meth:`AgentHub.call_tool`. Any of these calls may land on any hub replica, so replicas meet on a
:class:`~pacore.agents.bus.Bus`:

- key ``conn:<agent>`` names the agent's live connection, refreshed by heartbeats and gone
  within seconds when its holder dies; ``owner:<agent>`` the user it belongs to;
  ``caps:<agent>`` and ``seen:<agent>`` what it announced and when it last answered;
- channel ``out:<connection>`` carries frames (and the order to close) to the link's holder;
  ``resp:<request>`` carries the agent's answers to the waiting caller; ``link:<connection>``
  tells every waiting caller that the link is gone, so no request outlives its link.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pacore.agents.bus import Bus, Subscription
from pacore.agents.protocol import (
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_REPLACED,
    CLOSE_REVOKED,
    CLOSE_UNSUPPORTED_PROTOCOL,
    SUPPORTED_VERSIONS,
    UNKNOWN_ID,
    Cancel,
    Capabilities,
    ErrorFrame,
    ErrorInfo,
    Frame,
    FrameError,
    HealthCheck,
    HealthResponse,
    Hello,
    LlmRequest,
    LlmResponse,
    LlmStream,
    LlmStreamEnd,
    Ping,
    Pong,
    ToolRequest,
    ToolResponse,
    encode,
    parse_message,
)
from pacore.errors import (
    BadRequestError,
    NotFoundError,
    PACoreError,
    TimeoutError,
    UpstreamError,
    UpstreamUnavailableError,
)
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    ProviderHealth,
    ToolCallDelta,
    ToolDefinition,
)

__all__ = [
    "AgentDirectory",
    "AgentHub",
    "AgentPresence",
    "HubConfig",
    "LinkClosed",
    "provider_name",
]

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
_RESPONSES = (LlmResponse, LlmStream, LlmStreamEnd, ToolResponse, HealthResponse, ErrorFrame)
_CLOUD_ONLY = (LlmRequest, ToolRequest, HealthCheck, Cancel)


@dataclass(frozen=True, slots=True)
class LinkClosed:
    """The last item :meth:`AgentHub.attach` yields: close the socket with this code."""

    code: int
    reason: str


class AgentPresence(BaseModel):
    agent_id: str
    connected: bool
    last_seen: datetime | None = None
    capabilities: dict[str, Any] = Field(default_factory=dict)


class AgentDirectory(Protocol):
    """The durable record of agents (the agents table): who owns an agent the bus has not seen
    connect, and where its last connection and announced capabilities are kept."""

    async def owner_of(self, agent_id: str) -> str | None: ...

    async def record(self, agent_id: str, capabilities: dict[str, Any] | None) -> None:
        """Note that the agent connected now (and what it announced, when given)."""
        ...


class HubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ping_interval_s: float = Field(default=5.0, gt=0, description="heartbeat period of a link")
    missed_pongs: int = Field(
        default=3, ge=1, description="a link is dead after this many periods without a pong"
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="longest a whole answer, tool call or stream may take"
    )
    idle_timeout_s: float = Field(
        default=120.0, gt=0, description="longest wait for the next frame of an answer"
    )
    liveness_check_s: float = Field(
        default=2.0, gt=0, description="how often a waiting caller re-checks that its link lives"
    )
    health_timeout_s: float = Field(default=15.0, gt=0)
    last_seen_ttl_s: float = Field(default=30 * 86400, gt=0)
    revoked_ttl_s: float = Field(
        default=86400, gt=0, description="how long a revoked agent is refused on reconnect"
    )


def _conn(agent_id: str) -> str:
    return f"conn:{agent_id}"


def _owner(agent_id: str) -> str:
    return f"owner:{agent_id}"


def _caps(agent_id: str) -> str:
    return f"caps:{agent_id}"


def _seen(agent_id: str) -> str:
    return f"seen:{agent_id}"


def _revoked(agent_id: str) -> str:
    return f"revoked:{agent_id}"


def _agents_of(user_id: str) -> str:
    return f"agents:{user_id}"


def _out(connection_id: str) -> str:
    return f"out:{connection_id}"


def _link(connection_id: str) -> str:
    return f"link:{connection_id}"


def _resp(request_id: str) -> str:
    return f"resp:{request_id}"


def _frame_msg(text: str) -> str:
    return "f" + text


def _close_msg(code: int, reason: str) -> str:
    return "c" + json.dumps([code, reason])


def provider_name(agent_id: str) -> str:
    return f"agent:{agent_id}"


class _Answers:
    """How long the agent has been silent, by this replica's clock alone: ``seen`` is written by
    whichever replica took the pong, so only its changes count here, never its clock."""

    def __init__(self, seen: str | None) -> None:
        self._seen = seen
        self._changed = time.monotonic()

    def silent_s(self, seen: str | None) -> float:
        if seen != self._seen:
            self._seen, self._changed = seen, time.monotonic()
        return time.monotonic() - self._changed


class _Call:
    """One request in flight on a link: the frames answering it, or why none will come."""

    def __init__(
        self, hub: AgentHub, agent_id: str, connection_id: str, sub: Subscription,
        timeout_s: float,
    ) -> None:
        self.hub, self.agent_id, self.connection_id, self._sub = hub, agent_id, connection_id, sub
        self.finished = False
        self.deadline = time.monotonic() + timeout_s

    async def next(self, idle_timeout_s: float | None = None) -> Frame:
        """The next answer frame, within ``idle_timeout_s`` and the call's deadline; an
        ``error`` frame, a dropped link or a timeout raise."""
        cfg = self.hub.config
        idle_deadline = self.deadline
        if idle_timeout_s is not None:
            idle_deadline = min(idle_deadline, time.monotonic() + idle_timeout_s)
        while True:
            left = idle_deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"agent '{self.agent_id}' did not answer in time",
                    provider=provider_name(self.agent_id),
                )
            item = await self._sub.get(min(left, cfg.liveness_check_s))
            if item is None:
                await self._check_link()
                continue
            channel, message = item
            if channel == _link(self.connection_id):
                self.finished = True
                raise UpstreamError(
                    f"agent '{self.agent_id}' disconnected during the request ({message})",
                    provider=provider_name(self.agent_id),
                )
            sender, _, text = message.partition("\n")
            if sender != self.agent_id:
                continue  # only the agent the request went to may answer it
            frame = parse_message(text)
            if isinstance(frame, ErrorFrame):
                self.finished = True
                raise frame.error.to_exception(provider_name(self.agent_id))
            return frame

    async def _check_link(self) -> None:
        current = await self.hub.bus.get(_conn(self.agent_id))
        if current != self.connection_id:
            self.finished = True
            raise UpstreamError(
                f"agent '{self.agent_id}' lost its connection during the request",
                provider=provider_name(self.agent_id),
            )


class AgentHub:
    """Agents' links and the requests that travel over them, shared by all hub replicas."""

    def __init__(
        self,
        bus: Bus,
        config: HubConfig | None = None,
        *,
        directory: AgentDirectory | None = None,
    ) -> None:
        self.bus = bus
        self.config = config or HubConfig()
        self.directory = directory

    @property
    def _presence_ttl_s(self) -> float:
        cfg = self.config
        return cfg.ping_interval_s * (cfg.missed_pongs + 1)

    # ------------------------------------------------------------------ gateway side

    async def attach(
        self, agent_id: str, connection_id: str, *, user_id: str
    ) -> AsyncIterator[str | LinkClosed]:
        """Serve one agent connection: yields text frames to write down its socket, then a
        :class:`LinkClosed` when the link must end (revoked, replaced, heartbeat lost, detached).

        The first item comes as soon as the link is registered (a ping, or a refusal): relay the
        socket's inbound frames to :meth:`deliver` only after it, so that replies to them have
        somewhere to go. The socket's holder closes the socket when this ends, and calls
        :meth:`detach` when the socket closes first."""
        refusal = await self._refusal(agent_id, user_id)
        if refusal is not None:
            yield refusal
            return
        async with self.bus.subscribe(_out(connection_id)) as sub:
            await self._register(agent_id, connection_id, user_id)
            reason = "link closed"
            try:
                yield encode(Ping())
                async for item in self._outbound(agent_id, connection_id, sub):
                    if isinstance(item, LinkClosed):
                        reason = item.reason
                    yield item
            finally:
                await _shielded(self._release(agent_id, connection_id, reason))

    async def _refusal(self, agent_id: str, user_id: str) -> LinkClosed | None:
        revoked, owner = await self.bus.get_many([_revoked(agent_id), _owner(agent_id)])
        if revoked is not None:
            return LinkClosed(CLOSE_REVOKED, "agent revoked")
        if owner is not None and owner != user_id:
            return LinkClosed(CLOSE_REVOKED, "agent token does not match the agent's owner")
        return None

    async def _register(self, agent_id: str, connection_id: str, user_id: str) -> None:
        await self.bus.put(_owner(agent_id), user_id)
        await self.bus.add_member(_agents_of(user_id), agent_id)
        await self.bus.put(_seen(agent_id), str(time.time()), ttl_s=self.config.last_seen_ttl_s)
        previous = await self.bus.swap(_conn(agent_id), connection_id, ttl_s=self._presence_ttl_s)
        if previous is not None and previous != connection_id:
            await self.bus.publish(
                _out(previous),
                _close_msg(CLOSE_REPLACED, "another connection of this agent took over"),
            )
            await self.bus.publish(_link(previous), "replaced by a newer connection")
        await self._record(agent_id, None)

    async def _outbound(
        self, agent_id: str, connection_id: str, sub: Subscription
    ) -> AsyncIterator[str | LinkClosed]:
        interval = self.config.ping_interval_s
        next_ping = time.monotonic() + interval
        answers = _Answers(await self.bus.get(_seen(agent_id)))
        while True:
            item = await sub.get(max(0.0, next_ping - time.monotonic()))
            if item is not None:
                message = item[1]
                if message.startswith("f"):
                    yield message[1:]
                    continue
                code, reason = json.loads(message[1:])
                yield LinkClosed(int(code), str(reason))
                return
            closed = await self._heartbeat(agent_id, connection_id, answers)
            if closed is not None:
                yield closed
                return
            yield encode(Ping())
            next_ping = time.monotonic() + interval

    async def _heartbeat(
        self, agent_id: str, connection_id: str, answers: _Answers
    ) -> LinkClosed | None:
        cfg = self.config
        silent_s = answers.silent_s(await self.bus.get(_seen(agent_id)))
        if silent_s > cfg.ping_interval_s * cfg.missed_pongs:
            return LinkClosed(CLOSE_HEARTBEAT_TIMEOUT, "the agent stopped answering pings")
        if not await self.bus.refresh_if(
            _conn(agent_id), connection_id, ttl_s=self._presence_ttl_s
        ):
            return LinkClosed(CLOSE_REPLACED, "another connection of this agent took over")
        return None

    async def _release(self, agent_id: str, connection_id: str, reason: str) -> None:
        try:
            await self.bus.delete_if(_conn(agent_id), connection_id)
            await self.bus.publish(_link(connection_id), reason)
        except Exception:  # cleanup; the key expires on its own
            log.warning("agent hub: releasing link of agent %s failed", agent_id, exc_info=True)

    async def deliver(
        self, agent_id: str, frame: str | bytes, *, connection_id: str | None = None
    ) -> None:
        """Take one frame the agent sent. Frames must be delivered in the order they arrived
        (await each before the next). A bad frame is answered with an ``error`` frame."""
        try:
            msg = parse_message(frame)
        except FrameError as exc:
            await self._reply(agent_id, connection_id, ErrorFrame(
                id=exc.frame_id or UNKNOWN_ID, error=ErrorInfo.of(exc)
            ))
            return
        if isinstance(msg, _RESPONSES):
            text = frame.decode() if isinstance(frame, bytes) else frame
            await self._route_response(agent_id, connection_id, msg, text)
        elif isinstance(msg, Pong):
            await self._touch(agent_id)
        elif isinstance(msg, Ping):
            await self._reply(agent_id, connection_id, Pong(id=msg.id))
        elif isinstance(msg, Hello):
            await self._hello(agent_id, connection_id, msg)
        elif isinstance(msg, Capabilities):
            await self._capabilities_announced(agent_id, msg)
        elif isinstance(msg, _CLOUD_ONLY):
            error = BadRequestError(f"'{msg.type}' frames go from the cloud to the agent",
                                    code="unexpected_frame")
            await self._reply(agent_id, connection_id, ErrorFrame(id=msg.id, error=ErrorInfo.of(error)))

    async def _route_response(
        self, agent_id: str, connection_id: str | None, msg: Frame, text: str
    ) -> None:
        received = await self.bus.publish(_resp(msg.id), f"{agent_id}\n{text}")
        if received == 0 and isinstance(msg, LlmStream):
            # Nobody waits for this stream any more (its caller went away): stop the agent.
            await self._reply(agent_id, connection_id, Cancel(id=msg.id))

    async def _hello(self, agent_id: str, connection_id: str | None, hello: Hello) -> None:
        if not set(hello.protocol_versions) & set(SUPPORTED_VERSIONS):
            conn = connection_id or await self.bus.get(_conn(agent_id))
            if conn is not None:
                await self.bus.publish(_out(conn), _close_msg(
                    CLOSE_UNSUPPORTED_PROTOCOL,
                    f"no common protocol version; the cloud speaks {list(SUPPORTED_VERSIONS)}",
                ))
            return
        await self._touch(agent_id)

    async def _capabilities_announced(self, agent_id: str, msg: Capabilities) -> None:
        caps = msg.model_dump(mode="json", include={"models", "tools", "hardware"})
        await self.bus.put(_caps(agent_id), json.dumps(caps), ttl_s=self.config.last_seen_ttl_s)
        await self._touch(agent_id)
        await self._record(agent_id, caps)

    async def _record(self, agent_id: str, caps: dict[str, Any] | None) -> None:
        if self.directory is None:
            return
        try:
            await self.directory.record(agent_id, caps)
        except Exception:  # the durable copy must not break the live link
            log.warning("agent hub: recording agent %s failed", agent_id, exc_info=True)

    async def _touch(self, agent_id: str) -> None:
        await self.bus.put(_seen(agent_id), str(time.time()), ttl_s=self.config.last_seen_ttl_s)

    async def _reply(self, agent_id: str, connection_id: str | None, frame: Frame) -> None:
        conn = connection_id or await self.bus.get(_conn(agent_id))
        if conn is not None:
            await self.bus.publish(_out(conn), _frame_msg(encode(frame)))

    async def detach(self, agent_id: str, connection_id: str, *, reason: str = "socket closed") -> None:
        """The socket closed: end :meth:`attach` for it and fail its requests in flight."""
        await self.bus.publish(_out(connection_id), _close_msg(CLOSE_NORMAL, reason))
        await self._release(agent_id, connection_id, reason)

    async def revoke(self, agent_id: str, *, user_id: str | None = None) -> None:
        """Forget the agent and drop its live connection now (close code 4403); reconnects
        are refused for ``revoked_ttl_s``. With ``user_id``, only its owner may revoke it."""
        owner, conn = await self.bus.get_many([_owner(agent_id), _conn(agent_id)])
        if user_id is not None and owner is not None and owner != user_id:
            raise NotFoundError(f"agent '{agent_id}' not found", code="agent_not_found")
        await self.bus.put(_revoked(agent_id), "1", ttl_s=self.config.revoked_ttl_s)
        if conn is not None:
            await self.bus.publish(_out(conn), _close_msg(CLOSE_REVOKED, "agent revoked"))
            await self._release(agent_id, conn, "agent revoked")
        if owner is not None:
            await self.bus.remove_member(_agents_of(owner), agent_id)
        await self.bus.delete(_owner(agent_id), _caps(agent_id), _seen(agent_id), _conn(agent_id))

    # ------------------------------------------------------------------ caller side

    async def _route(self, user_id: str, agent_id: str) -> str:
        """The live connection of ``user_id``'s agent: 404 if not theirs, 503 if offline."""
        owner, conn, revoked = await self.bus.get_many(
            [_owner(agent_id), _conn(agent_id), _revoked(agent_id)]
        )
        if owner is None and revoked is None and self.directory is not None:
            try:
                owner = await self.directory.owner_of(agent_id)
            except Exception:
                # Unknown to the bus means not connected, whoever owns it.
                log.warning("agent hub: directory lookup of %s failed", agent_id, exc_info=True)
                raise self._offline(agent_id) from None
        if owner is None or owner != user_id or revoked is not None:
            raise NotFoundError(f"agent '{agent_id}' not found", code="agent_not_found")
        if conn is None:
            raise self._offline(agent_id)
        return conn

    @staticmethod
    def _offline(agent_id: str) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(
            f"agent '{agent_id}' is not connected", provider=provider_name(agent_id),
            code="agent_offline",
        )

    @contextlib.asynccontextmanager
    async def _open(
        self, user_id: str, agent_id: str, frame: Frame, timeout_s: float | None
    ) -> AsyncIterator[_Call]:
        """Send ``frame`` to the agent and wait on its answers, for at most ``timeout_s`` in all
        (default: the config's ``request_timeout_s``); cancels it if left unfinished."""
        conn = await self._route(user_id, agent_id)
        async with self.bus.subscribe(_resp(frame.id), _link(conn)) as sub:
            call = _Call(self, agent_id, conn, sub, timeout_s or self.config.request_timeout_s)
            if await self.bus.publish(_out(conn), _frame_msg(encode(frame))) == 0:
                raise self._offline(agent_id)
            try:
                yield call
            finally:
                if not call.finished:
                    await _shielded(self._cancel(conn, frame.id))

    async def _cancel(self, connection_id: str, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.bus.publish(_out(connection_id), _frame_msg(encode(Cancel(id=request_id))))

    async def complete(
        self, user_id: str, agent_id: str, request: CompletionRequest,
        *, timeout_s: float | None = None,
    ) -> CompletionResult:
        """The whole answer of the agent's model ``request.model`` (None: its default)."""
        frame = LlmRequest(model=request.model, request=request, stream=False)
        async with self._open(user_id, agent_id, frame, timeout_s) as call:
            answer = await call.next()
            call.finished = True
            if not isinstance(answer, LlmResponse):
                raise self._unexpected(agent_id, answer)
            return answer.result.model_copy(update={"provider": provider_name(agent_id)})

    async def stream(
        self, user_id: str, agent_id: str, request: CompletionRequest,
        *, timeout_s: float | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        """The agent's answer as it is produced; the last chunk carries finish_reason and usage.
        Closing the iterator early cancels the request on the agent. ``timeout_s`` bounds the
        whole stream; the config's ``idle_timeout_s`` bounds each wait for the next frame."""
        frame = LlmRequest(model=request.model, request=request, stream=True)
        async with self._open(user_id, agent_id, frame, timeout_s) as call:
            while True:
                answer = await call.next(self.config.idle_timeout_s)
                if isinstance(answer, LlmStream):
                    for chunk in answer.chunks:
                        yield chunk
                    continue
                call.finished = True
                if isinstance(answer, LlmStreamEnd):
                    yield CompletionChunk(
                        finish_reason=answer.finish_reason, usage=answer.usage, model=answer.model
                    )
                    return
                if isinstance(answer, LlmResponse):
                    yield _as_chunk(answer.result)
                    return
                raise self._unexpected(agent_id, answer)

    async def call_tool(
        self, user_id: str, agent_id: str, name: str, arguments: dict[str, Any],
        *, timeout_s: float | None = None,
    ) -> Any:
        """Run one of the tools the agent declared; returns its JSON result."""
        caps = await self._capabilities(agent_id)
        if caps is not None and name not in {t.get("name") for t in caps.get("tools", [])}:
            await self._route(user_id, agent_id)  # ownership first: never reveal another's tools
            raise BadRequestError(
                f"agent '{agent_id}' has no tool '{name}'", code="unknown_tool", param="name"
            )
        frame = ToolRequest(name=name, arguments=arguments)
        async with self._open(user_id, agent_id, frame, timeout_s) as call:
            answer = await call.next()
            call.finished = True
            if not isinstance(answer, ToolResponse):
                raise self._unexpected(agent_id, answer)
            if answer.error is not None:
                raise answer.error.to_exception(provider_name(agent_id))
            return answer.result

    async def tools(self, user_id: str, agent_id: str) -> list[ToolDefinition]:
        """The tools ``user_id``'s agent declared: 404 if it is not theirs, 503 if offline."""
        await self._route(user_id, agent_id)
        caps = await self._capabilities(agent_id) or {}
        return [ToolDefinition.model_validate(t) for t in caps.get("tools", [])]

    async def health(self, user_id: str, agent_id: str) -> ProviderHealth:
        """A live round trip to the agent and its local models."""
        started = time.monotonic()
        timeout_s = self.config.health_timeout_s
        async with self._open(user_id, agent_id, HealthCheck(), timeout_s) as call:
            answer = await call.next()
            call.finished = True
        if not isinstance(answer, HealthResponse):
            raise self._unexpected(agent_id, answer)
        sick = [f"{name}: {h.detail or 'unhealthy'}" for name, h in answer.models.items()
                if not h.healthy]
        return ProviderHealth(
            healthy=answer.healthy,
            latency_ms=(time.monotonic() - started) * 1000,
            detail="; ".join(sick) or None,
        )

    async def presence(self, user_id: str, agent_ids: list[str]) -> dict[str, AgentPresence]:
        """Whether each agent is connected, when it was last seen, what it announced. Agents
        that are not ``user_id``'s read as never seen."""
        keys = [k for a in agent_ids for k in (_owner(a), _conn(a), _seen(a), _caps(a))]
        values = await self.bus.get_many(keys)
        out: dict[str, AgentPresence] = {}
        for i, agent_id in enumerate(agent_ids):
            owner, conn, seen, caps = values[4 * i : 4 * i + 4]
            if owner != user_id:
                out[agent_id] = AgentPresence(agent_id=agent_id, connected=False)
                continue
            out[agent_id] = AgentPresence(
                agent_id=agent_id,
                connected=conn is not None,
                last_seen=datetime.fromtimestamp(float(seen), UTC) if seen else None,
                capabilities=json.loads(caps) if caps else {},
            )
        return out

    async def connected_agents(self, user_id: str) -> list[tuple[str, list[str]]]:
        """``user_id``'s connected agents with the model names each announced (its default
        model first)."""
        agent_ids: list[str] = sorted(await self.bus.members(_agents_of(user_id)))
        found = await self.presence(user_id, agent_ids)
        return [
            (a, [str(m["id"]) for m in p.capabilities.get("models", [])])
            for a, p in found.items()
            if p.connected
        ]

    async def _capabilities(self, agent_id: str) -> dict[str, Any] | None:
        caps = await self.bus.get(_caps(agent_id))
        return json.loads(caps) if caps else None

    @staticmethod
    def _unexpected(agent_id: str, frame: Frame) -> PACoreError:
        return UpstreamError(
            f"agent '{agent_id}' answered with an unexpected '{frame.type}' frame",
            provider=provider_name(agent_id),
        )


def _as_chunk(result: CompletionResult) -> CompletionChunk:
    deltas = [
        ToolCallDelta(index=i, id=c.id, name=c.name, arguments=c.arguments)
        for i, c in enumerate(result.tool_calls or [])
    ]
    return CompletionChunk(
        content=result.content,
        tool_calls=deltas or None,
        finish_reason=result.finish_reason,
        usage=result.usage,
        model=result.model,
    )


async def _shielded(coro: Any) -> None:
    """Run cleanup to the end even when the caller is being cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
