"""Liveness and readiness of every component the gateway depends on."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments import _handles
from deployments.deps import Gateway

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0


@router.get("/health")
async def health(gw: Gateway) -> JSONResponse:
    checks: dict[str, Any] = {"database": gw.services.ping(), "router": _ping(gw.router)}
    if gw.memory is not None:
        checks["memory"] = _ping(gw.memory)
    if gw.embedder is not None:
        checks["embedder"] = _ping(gw.embedder)
    if gw.agent_hub is not None:
        checks["agent_hub"] = _ping(gw.agent_hub)
    results = await asyncio.gather(
        *(asyncio.wait_for(c, CHECK_TIMEOUT_S) for c in checks.values()), return_exceptions=True
    )
    components = {"gateway": "ok"}
    for name, result in zip(checks, results, strict=True):
        components[name] = "ok" if not isinstance(result, BaseException) else "unavailable"
    healthy = all(v == "ok" for v in components.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "components": components},
        status_code=200 if healthy else 503,
    )


async def _ping(handle: Any) -> None:
    await _handles.call(handle, "ping")
