"""The Gateway deployment: the FastAPI ingress — auth, validation, limits, errors, framing."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacore.config import PlatformArgs, Settings
from pacore.errors import PACoreError, PayloadTooLargeError, RateLimitError
from pacore.logs import to_replica_log
from pacore.metrics import RequestMetricsMiddleware, record_error
from pacore.ratelimit import RateLimiter
from pacore.services import Services

__all__ = ["GatewayDeployment", "create_app"]

logger = logging.getLogger("pacore.gateway")


class GatewayDeployment:
    """Stateless ingress replica. Its FastAPI app is built per replica around this object."""

    DEFAULT_OPTIONS: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 0.2},
        "max_ongoing_requests": 512,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 128,
        },
        "graceful_shutdown_timeout_s": 120,
        "graceful_shutdown_wait_loop_s": 2,
    }

    def __init__(
        self,
        args: dict[str, Any],
        router: DeploymentHandle,
        memory: DeploymentHandle | None = None,
        embedder: DeploymentHandle | None = None,
        agent_hub: DeploymentHandle | None = None,
    ) -> None:
        self.args = PlatformArgs.model_validate(args)
        self.settings: Settings = self.args.build_settings()
        to_replica_log(self.settings.log_level)
        self.services = Services.for_settings(self.settings)
        self.router = router
        self.memory = memory
        self.embedder = embedder
        self.agent_hub = agent_hub
        self.limiter = RateLimiter.for_settings(self.settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self)

    async def __del__(self) -> None:
        await self.services.aclose()


def create_app(gateway: Any) -> FastAPI:
    """The HTTP surface of one gateway replica."""
    from deployments.routes import (
        agents,
        auth,
        completions,
        conversations,
        health,
        memory,
        openai_compat,
        providers,
        settings,
    )

    app = FastAPI(
        title="PA Core",
        version="0.1.0",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.gateway = gateway
    for module in (
        health, auth, providers, settings, completions, openai_compat, memory, conversations,
        agents,
    ):
        app.include_router(module.router)
    _install_error_handlers(app)
    cfg: Settings = gateway.settings
    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "x-pacore-conversation-id"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(RequestMetricsMiddleware)
    return app


# --------------------------------------------------------------------------- errors


def error_response(exc: PACoreError, request_id: str | None = None) -> JSONResponse:
    record_error(exc.type)
    headers = {"x-request-id": request_id} if request_id else {}
    if isinstance(exc, RateLimitError) and exc.retry_after is not None:
        headers["retry-after"] = str(max(1, int(exc.retry_after + 0.999)))
    return JSONResponse(exc.to_wire(), status_code=exc.status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PACoreError)
    async def _platform(request: Request, exc: PACoreError) -> JSONResponse:
        return error_response(exc, _rid(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc), _rid(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        from pacore.errors import error_for_status

        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        if exc.status_code == 405:
            return JSONResponse(
                {"error": {"message": message, "type": "invalid_request_error", "param": None,
                           "code": "method_not_allowed"}},
                status_code=405,
            )
        return error_response(error_for_status(exc.status_code, message), _rid(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error request_id=%s", _rid(request))
        return error_response(PACoreError("internal error"), _rid(request))


def _validation_error(exc: RequestValidationError) -> PACoreError:
    from pacore.errors import BadRequestError, ValidationError

    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return BadRequestError("the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field '{param}'"
    elif first.get("type") == "missing":
        msg = f"missing field '{param}'"
    elif param:
        msg = f"{param}: {msg}"
    return ValidationError(msg, param=param, code=str(first.get("type", "invalid")))


def _rid(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def check_rate(gateway: Any, user_id: str) -> None:
    """Per-user request budget; raises RateLimitError with retry-after."""
    wait = gateway.limiter.hit(user_id)
    if wait is not None:
        raise RateLimitError("rate limit exceeded for this user", retry_after=wait)


# --------------------------------------------------------------------------- middleware


class RequestIdMiddleware:
    """Every request has an id (``request.state.request_id``) and every response carries it in
    ``x-request-id``. Serve's ingress assigns one (or keeps a sane one the client sent) and
    echoes it on the response itself; only a request that arrives without one gets a new id
    here, and the header added."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = _incoming_id(scope)
        rid = incoming or "req_" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        if incoming is not None:
            await self.app(scope, receive, send)
            return
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _incoming_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return None


class BodyLimitMiddleware:
    """Refuses bodies over the limit with 413, by Content-Length or by counting what arrives.

    The body is read here (bounded by the limit) and replayed to the app, so the app never
    sees part of an oversize body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(scope, send)
                return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            parts.append(body)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(parts), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        exc = PayloadTooLargeError(
            f"the request body is larger than {self.max_bytes} bytes", code="body_too_large"
        )
        body = json.dumps(exc.to_wire()).encode()
        rid = scope.get("state", {}).get("request_id", "")
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", str(rid).encode()),
            ],
        })
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    queue = list(messages)

    async def replay() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay
