"""On-prem agents: pair, list, revoke, and the agents' own WebSocket (``/v1/agents/connect``).

The socket ends at whichever gateway replica the agent reached. That replica relays every
inbound frame to the AgentHub, in order, and writes down the socket whatever the hub's
``attach`` stream yields, so a request entering through any replica reaches the agent.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, WebSocket

from deployments import _handles
from deployments.deps import CurrentUser, Gateway
from pacore.agents.hub import LinkClosed
from pacore.agents.protocol import CLOSE_UNAUTHORIZED, CLOSE_UNAVAILABLE
from pacore.errors import NotFoundError, PACoreError
from pacore.protocol import AgentCreate, AgentCreated, AgentInfo

router = APIRouter(prefix="/v1/agents", tags=["agents"])
logger = logging.getLogger("pacore.gateway")

AgentId = Annotated[str, Path(min_length=1, max_length=64)]


def _hub(gw: Any) -> Any:
    if gw.agent_hub is None:
        raise NotFoundError("on-prem agents are not enabled on this deployment")
    return gw.agent_hub


@router.post("", status_code=201, response_model=AgentCreated)
async def pair(body: AgentCreate, user: CurrentUser, gw: Gateway) -> AgentCreated:
    """A new agent for the user and its token (shown once; it never expires, revoke it)."""
    _hub(gw)
    agent_id, jti = str(uuid.uuid4()), str(uuid.uuid4())
    issued = gw.services.tokens.issue(agent_id, "agent", None, name=body.name, jti=jti)
    record = await gw.services.stores.agents.create(
        user.user_id, body.name, jti, agent_id=agent_id
    )
    return AgentCreated(id=record.id, token=issued.token, name=record.name)


@router.get("", response_model=list[AgentInfo])
async def list_agents(user: CurrentUser, gw: Gateway) -> list[AgentInfo]:
    hub = _hub(gw)
    records = await gw.services.stores.agents.list(user.user_id)
    presence: dict[str, Any] = {}
    if records:
        presence = await _handles.call(hub, "presence", user.user_id, [r.id for r in records])
    out = []
    for r in records:
        p = presence.get(r.id)
        out.append(AgentInfo(
            id=r.id, name=r.name, connected=bool(p and p.connected),
            last_seen=(p.last_seen if p and p.last_seen else r.last_seen),
            capabilities=(p.capabilities if p and p.capabilities else dict(r.capabilities or {})),
            created_at=r.created_at,
        ))
    return out


@router.delete("/{agent_id}", status_code=204)
async def revoke(agent_id: AgentId, user: CurrentUser, gw: Gateway) -> Response:
    """Unpair the agent: its token stops working and a live connection is dropped at once."""
    hub = _hub(gw)
    await gw.services.stores.agents.revoke(user.user_id, agent_id)
    await _handles.call(hub, "revoke", agent_id, user_id=user.user_id)
    return Response(status_code=204)


@router.websocket("/connect")
async def connect(websocket: WebSocket) -> None:
    gw = websocket.app.state.gateway
    await websocket.accept()
    try:
        agent_id, user_id = await _authenticate_agent(gw, websocket.headers.get("authorization"))
        hub = _hub(gw)
    except PACoreError as exc:
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason=exc.message[:120])
        return
    connection_id = uuid.uuid4().hex
    outbound = _handles.stream(hub, "attach", agent_id, connection_id, user_id=user_id)
    try:
        first = await outbound.__anext__()
    except (StopAsyncIteration, Exception):  # noqa: BLE001 - the hub is unreachable: retry later
        logger.warning("agent hub unavailable for agent link")
        await websocket.close(code=CLOSE_UNAVAILABLE, reason="try again later")
        return
    pump = _spawn_pump(websocket, outbound, first)
    try:
        await _relay_inbound(websocket, hub, agent_id, connection_id, pump)
    except Exception:  # the hub went away mid-link: the agent dials again
        logger.warning("agent link relay failed; closing the link", exc_info=True)
        with contextlib.suppress(Exception):
            await websocket.close(code=CLOSE_UNAVAILABLE, reason="try again later")
    finally:
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump
        with contextlib.suppress(Exception):
            await _handles.call(hub, "detach", agent_id, connection_id)


async def _authenticate_agent(gw: Any, authorization: str | None) -> tuple[str, str]:
    from pacore.errors import AuthenticationError

    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing agent token")
    claims = gw.services.tokens.verify(token.strip(), "agent")
    if not await gw.services.stores.tokens.is_active(claims.jti):
        raise AuthenticationError("the agent token has been revoked")
    try:
        record = await gw.services.stores.agents.get_by_id(claims.sub)
    except NotFoundError:
        raise AuthenticationError("unknown or revoked agent") from None
    if record.jti != claims.jti:
        raise AuthenticationError("the token does not belong to this agent")
    return record.id, record.user_id


def _spawn_pump(websocket: WebSocket, outbound: Any, first: Any) -> Any:
    """Write what the hub sends down the socket; a LinkClosed ends the link."""
    import asyncio

    async def pump() -> None:
        item = first
        try:
            while True:
                if isinstance(item, LinkClosed):
                    await websocket.close(code=item.code, reason=item.reason)
                    return
                await websocket.send_text(item)
                item = await outbound.__anext__()
        except StopAsyncIteration:
            await websocket.close(code=CLOSE_UNAVAILABLE, reason="link ended")
        except PACoreError:
            await websocket.close(code=CLOSE_UNAVAILABLE, reason="try again later")
        finally:
            with contextlib.suppress(Exception):
                await outbound.aclose()

    return asyncio.ensure_future(pump())


async def _relay_inbound(
    websocket: WebSocket, hub: Any, agent_id: str, connection_id: str, pump: Any
) -> None:
    """Inbound frames to the hub one at a time, in order, until either side ends the link."""
    import asyncio

    while not pump.done():
        receive = asyncio.ensure_future(websocket.receive())
        done, _ = await asyncio.wait({receive, pump}, return_when=asyncio.FIRST_COMPLETED)
        if receive not in done:
            receive.cancel()
            return
        message = receive.result()
        if message["type"] == "websocket.disconnect":
            return
        frame = message.get("text") or message.get("bytes")
        if frame is not None:
            await _handles.call(hub, "deliver", agent_id, frame, connection_id=connection_id)
