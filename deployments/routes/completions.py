"""The native completion API: POST /v1/complete (JSON or SSE) and WS /v1/stream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError as PydanticValidationError

from deployments.deps import CurrentUser, Gateway, authenticate
from deployments.framing import done_payload, sse
from deployments.gateway import check_rate
from deployments.turns import OpenTurn, open_turn, run_whole, turn_from_complete
from pacore.errors import BadRequestError, PACoreError, ValidationError
from pacore.metrics import record_error
from pacore.protocol import CompleteBody

router = APIRouter(tags=["completions"])
logger = logging.getLogger("pacore.gateway")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@router.post("/v1/complete")
async def complete(body: CompleteBody, user: CurrentUser, gw: Gateway) -> Any:
    check_rate(gw, user.user_id)
    turn = turn_from_complete(body)
    if body.stream:
        opened = await open_turn(gw, user.user_id, turn)
        return StreamingResponse(
            _sse_events(opened), media_type="text/event-stream",
            headers={**SSE_HEADERS, "x-pacore-conversation-id": opened.started.conversation_id},
        )
    started, content, done = await run_whole(gw, user.user_id, turn)
    return JSONResponse(
        done_payload(started, done, content),
        headers={"x-pacore-conversation-id": started.conversation_id},
    )


async def _sse_events(opened: OpenTurn) -> AsyncIterator[bytes]:
    try:
        async for chunk in opened.chunks():
            yield sse({"content": chunk.content, **_tool_deltas(chunk)}, "chunk")
        assert opened.done is not None
        yield sse(done_payload(opened.started, opened.done), "done")
    except PACoreError as exc:
        record_error(exc.type)
        yield sse(exc.to_wire(), "error")
    except Exception:
        logger.exception("stream failed")
        record_error(PACoreError.type)
        yield sse(PACoreError("internal error").to_wire(), "error")
    finally:
        await opened.aclose()


def _tool_deltas(chunk: Any) -> dict[str, Any]:
    if not chunk.tool_calls:
        return {}
    return {"tool_calls": [d.model_dump(exclude_none=True) for d in chunk.tool_calls]}


@router.websocket("/v1/stream")
async def stream_ws(websocket: WebSocket) -> None:
    """Each JSON message is a /v1/complete body; the answer comes back as ``chunk`` messages
    and one ``done`` (or ``error``). The socket serves requests one after another."""
    gw = websocket.app.state.gateway
    token = websocket.headers.get("authorization") or _query_token(websocket)
    try:
        user = await authenticate(gw, token)
    except PACoreError as exc:
        # Accepted first so that the client sees the close code and reason, not a bare 403.
        await websocket.accept()
        await websocket.close(code=4401, reason=exc.message[:120])
        return
    await websocket.accept()
    try:
        while True:
            raw = await websocket.receive_text()
            await _serve_one(websocket, gw, user.user_id, raw)
    except WebSocketDisconnect:
        return


async def _serve_one(websocket: WebSocket, gw: Any, user_id: str, raw: str) -> None:
    try:
        body = CompleteBody.model_validate(json.loads(raw))
        check_rate(gw, user_id)
        turn = turn_from_complete(body)
        turn.stream = True  # a socket always streams
        opened = await open_turn(gw, user_id, turn)
    except json.JSONDecodeError:
        await _send_error(websocket, BadRequestError("the message is not valid JSON"))
        return
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        await _send_error(websocket, ValidationError(f"{param}: {first['msg']}", param=param))
        return
    except PACoreError as exc:
        await _send_error(websocket, exc)
        return
    try:
        async for chunk in opened.chunks():
            await websocket.send_json({"type": "chunk", "content": chunk.content, **_tool_deltas(chunk)})
        assert opened.done is not None
        await websocket.send_json({"type": "done", **done_payload(opened.started, opened.done)})
    except PACoreError as exc:
        await _send_error(websocket, exc)
    finally:
        await opened.aclose()


async def _send_error(websocket: WebSocket, exc: PACoreError) -> None:
    record_error(exc.type)
    await websocket.send_json({"type": "error", **exc.to_wire()})


def _query_token(websocket: WebSocket) -> str | None:
    token = websocket.query_params.get("token")
    return f"Bearer {token}" if token else None


