"""Semantic search over the user's remembered messages."""

from __future__ import annotations

from fastapi import APIRouter

from deployments import _handles
from deployments.deps import CurrentUser, Gateway
from deployments.gateway import check_rate
from pacore.errors import NotFoundError
from pacore.protocol import MemorySearchBody, MemorySearchResponse, MemorySearchResult

router = APIRouter(prefix="/v1/memory", tags=["memory"])


@router.post("/search", response_model=MemorySearchResponse)
async def search(body: MemorySearchBody, user: CurrentUser, gw: Gateway) -> MemorySearchResponse:
    check_rate(gw, user.user_id)
    if gw.memory is None:
        raise NotFoundError("memory is not enabled on this deployment")
    hits = await _handles.call(
        gw.memory, "search", user.user_id, body.query, body.limit, body.filters
    )
    return MemorySearchResponse(results=[MemorySearchResult.model_validate(h) for h in hits])
