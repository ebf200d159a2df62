"""The user's provider configurations: put, list (never a key), test, delete."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Response

from deployments import _handles
from deployments.deps import CurrentUser, Gateway
from pacore.protocol import ProviderInfo, ProviderPut

router = APIRouter(prefix="/v1/providers", tags=["providers"])

ProviderName = Annotated[
    str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
HEALTH_TIMEOUT_S = 3.0


@router.get("", response_model=list[ProviderInfo])
async def list_providers(user: CurrentUser, gw: Gateway) -> list[ProviderInfo]:
    records = await gw.services.stores.providers.list(user.user_id)

    async def health(name: str) -> bool | None:
        try:
            result = await asyncio.wait_for(
                _handles.call(gw.router, "test_provider", user.user_id, name), HEALTH_TIMEOUT_S
            )
            return bool(result.get("healthy"))
        except Exception:  # noqa: BLE001 - unreachable or misconfigured means unhealthy
            return False

    healthy = await asyncio.gather(*(health(r.name) if r.configured else _none() for r in records))
    return [
        ProviderInfo(
            name=r.name, kind=r.kind, configured=r.configured, base_url=r.base_url,
            default_model=r.default_model, healthy=h,
        )
        for r, h in zip(records, healthy, strict=True)
    ]


async def _none() -> None:
    return None


@router.put("/{name}", response_model=ProviderInfo)
async def put_provider(
    name: ProviderName, body: ProviderPut, user: CurrentUser, gw: Gateway
) -> ProviderInfo:
    record = await gw.services.stores.providers.put(
        user.user_id, name, body.kind, api_key=body.api_key, base_url=body.base_url,
        default_model=body.default_model, options=body.options,
    )
    await _handles.call(gw.router, "forget_provider", user.user_id, name, record.kind)
    return ProviderInfo(
        name=record.name, kind=record.kind, configured=record.configured,
        base_url=record.base_url, default_model=record.default_model, healthy=None,
    )


@router.delete("/{name}", status_code=204)
async def delete_provider(name: ProviderName, user: CurrentUser, gw: Gateway) -> Response:
    record = await gw.services.stores.providers.get(user.user_id, name)
    await gw.services.stores.providers.delete(user.user_id, name)
    await _handles.call(gw.router, "forget_provider", user.user_id, name, record.kind)
    return Response(status_code=204)


@router.post("/{name}/test")
async def test_provider(name: ProviderName, user: CurrentUser, gw: Gateway) -> dict[str, object]:
    """A live call to the provider with the user's configuration."""
    result = await _handles.call(gw.router, "test_provider", user.user_id, name)
    return {"name": name, **result}
