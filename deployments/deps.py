"""FastAPI dependencies of the gateway: its replica state and the authenticated user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from pacore.errors import AuthenticationError

if TYPE_CHECKING:
    from deployments.gateway import GatewayDeployment

__all__ = ["API_AUDIENCES", "Authed", "CurrentUser", "Gateway", "authenticate"]

# Login sessions and long-lived API tokens both open the API; agent tokens never do.
API_AUDIENCES = ("api", "session")


def _gateway_of(request: Request) -> GatewayDeployment:
    gateway: GatewayDeployment = request.app.state.gateway
    return gateway


async def _gateway(request: Request) -> GatewayDeployment:
    # A coroutine: FastAPI would run a plain function in its thread pool, on every request.
    return _gateway_of(request)


Gateway = Annotated["GatewayDeployment", Depends(_gateway)]


@dataclass(frozen=True, slots=True)
class Authed:
    user_id: str
    token_id: str


async def authenticate(gw: GatewayDeployment, authorization: str | None) -> Authed:
    """The user behind a bearer token: a login session or an API token, not revoked."""
    if not authorization:
        raise AuthenticationError("missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
    claims = gw.services.tokens.verify(token.strip(), API_AUDIENCES)
    if not await gw.services.stores.tokens.is_active(claims.jti):
        raise AuthenticationError("the token has been revoked or has expired")
    return Authed(user_id=claims.sub, token_id=claims.jti)


async def _current_user(request: Request) -> Authed:
    return await authenticate(_gateway_of(request), request.headers.get("authorization"))


CurrentUser = Annotated[Authed, Depends(_current_user)]
