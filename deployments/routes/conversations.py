"""Conversation history: list (cursor pages), get with messages, tag, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from deployments import _handles
from deployments.deps import CurrentUser, Gateway
from pacore.errors import NotFoundError
from pacore.protocol import TagsBody

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

ConversationId = Annotated[str, Path(min_length=1, max_length=64)]


def _memory(gw: Gateway) -> Any:
    if gw.memory is None:
        raise NotFoundError("memory is not enabled on this deployment")
    return gw.memory


@router.get("")
async def list_conversations(
    user: CurrentUser,
    gw: Gateway,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    items, next_cursor = await _handles.call(
        _memory(gw), "list_conversations", user.user_id, limit, cursor, tag
    )
    return {"data": [_summary(c) for c in items], "next_cursor": next_cursor}


@router.get("/{conversation_id}")
async def get_conversation(
    conversation_id: ConversationId, user: CurrentUser, gw: Gateway
) -> dict[str, Any]:
    c = await _handles.call(_memory(gw), "get_conversation", user.user_id, conversation_id)
    out = _summary(c)
    out["messages"] = [
        {
            "id": m.id, "role": m.role, "content": m.content, "provider": m.provider,
            "model": m.model, "tool_calls": m.tool_calls, "created_at": m.created_at.isoformat(),
            "usage": {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens},
        }
        for m in c.messages or []
    ]
    return out


@router.put("/{conversation_id}/tags")
async def set_tags(
    conversation_id: ConversationId, body: TagsBody, user: CurrentUser, gw: Gateway
) -> dict[str, Any]:
    c = await _handles.call(_memory(gw), "set_tags", user.user_id, conversation_id, body.tags)
    return _summary(c)


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(
    conversation_id: ConversationId, user: CurrentUser, gw: Gateway
) -> Response:
    await _handles.call(_memory(gw), "delete_conversation", user.user_id, conversation_id)
    return Response(status_code=204)


def _summary(c: Any) -> dict[str, Any]:
    return {
        "id": c.id, "title": c.title, "tags": list(c.tags),
        "created_at": c.created_at.isoformat(), "updated_at": c.updated_at.isoformat(),
        "message_count": c.message_count,
    }
