"""The user's routing settings."""

from __future__ import annotations

from fastapi import APIRouter

from deployments.deps import CurrentUser, Gateway
from pacore.errors import BadRequestError
from pacore.protocol import SettingsBody

router = APIRouter(prefix="/v1/settings", tags=["settings"])


@router.get("", response_model=SettingsBody)
async def get_settings(user: CurrentUser, gw: Gateway) -> SettingsBody:
    return SettingsBody.model_validate(
        (await gw.services.stores.settings.get(user.user_id)).model_dump()
    )


@router.put("", response_model=SettingsBody)
async def put_settings(body: SettingsBody, user: CurrentUser, gw: Gateway) -> SettingsBody:
    known = await _known_providers(gw, user.user_id)
    named = [
        ("default_provider", body.default_provider),
        *((f"routing.{k}", v) for k, v in body.routing.model_dump().items()),
        *((f"fallbacks.{i}", v) for i, v in enumerate(body.fallbacks)),
    ]
    for param, name in named:
        if name is not None and name not in known:
            raise BadRequestError(f"'{name}' is not one of your providers", param=param)
    saved = await gw.services.stores.settings.put(user.user_id, body)
    return SettingsBody.model_validate(saved.model_dump())


async def _known_providers(gw: Gateway, user_id: str) -> set[str]:
    stores = gw.services.stores
    names = {p.name for p in await stores.providers.list(user_id)}
    names.update(p.name for p in gw.args.shared_providers)
    names.update(m.engine for m in gw.args.self_hosted)
    names.update(f"agent:{a.id}" for a in await stores.agents.list(user_id))
    return names
