"""Accounts and API tokens: register, login, me, and the user's long-lived tokens."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Response

from deployments.deps import CurrentUser, Gateway
from pacore.protocol import (
    LoginBody,
    LoginResponse,
    RegisterBody,
    RegisterResponse,
    TokenCreate,
    TokenCreated,
    TokenInfo,
    UserInfo,
)

router = APIRouter(prefix="/v1/auth", tags=["auth"])


async def _session_token(gw: Gateway, user_id: str, name: str):  # type: ignore[no-untyped-def]
    ttl = timedelta(minutes=gw.settings.session_ttl_minutes)
    issued = gw.services.tokens.issue(user_id, "session", ttl, name=name)
    await gw.services.stores.tokens.record(issued.jti, user_id, name, "session", issued.expires_at)
    return issued


@router.post("/register", status_code=201, response_model=RegisterResponse)
async def register(body: RegisterBody, gw: Gateway) -> RegisterResponse:
    user = await gw.services.stores.users.create(body.email, body.password)
    issued = await _session_token(gw, user.id, "session")
    return RegisterResponse(user_id=user.id, token=issued.token)


@router.post("/login", response_model=LoginResponse)
async def login(body: LoginBody, gw: Gateway) -> LoginResponse:
    user = await gw.services.stores.users.authenticate(body.email, body.password)
    issued = await _session_token(gw, user.id, "session")
    return LoginResponse(token=issued.token, expires_at=issued.expires_at)


@router.get("/me", response_model=UserInfo)
async def me(user: CurrentUser, gw: Gateway) -> UserInfo:
    record = await gw.services.stores.users.get(user.user_id)
    return UserInfo(user_id=record.id, email=record.email)


@router.post("/tokens", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenCreate, user: CurrentUser, gw: Gateway) -> TokenCreated:
    ttl = timedelta(days=body.expires_in_days) if body.expires_in_days else None
    issued = gw.services.tokens.issue(user.user_id, "api", ttl, name=body.name)
    await gw.services.stores.tokens.record(
        issued.jti, user.user_id, body.name, "api", issued.expires_at
    )
    return TokenCreated(
        id=issued.jti, token=issued.token, name=body.name, expires_at=issued.expires_at
    )


@router.get("/tokens", response_model=list[TokenInfo])
async def list_tokens(user: CurrentUser, gw: Gateway) -> list[TokenInfo]:
    records = await gw.services.stores.tokens.list(user.user_id, "api")
    return [
        TokenInfo(
            id=r.id, name=r.name, created_at=r.created_at, expires_at=r.expires_at,
            last_used_at=r.last_used_at,
        )
        for r in records
    ]


@router.delete("/tokens/{token_id}", status_code=204)
async def revoke_token(token_id: str, user: CurrentUser, gw: Gateway) -> Response:
    await gw.services.stores.tokens.revoke(user.user_id, token_id)
    return Response(status_code=204)
