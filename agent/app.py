"""The agent's local Ray Serve app: one deployment per configured model, an OpenAI-compatible
ingress for office clients, and :class:`LocalModels`, the handles the cloud link calls.

Each model deployment wraps the platform's provider adapter for its kind (through the provider
registry), so a local Ollama, LM Studio, llama.cpp or vLLM server, or an in-process CPU/vLLM
engine, is served exactly as the cloud serves its own providers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from agent.config import AgentConfig, ModelConfig
from pacore.agents.protocol import Hardware, ModelCapability
from pacore.errors import BadRequestError, NotFoundError, PACoreError, UpstreamError
from pacore.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatMessageOut,
    ChatStreamChoice,
    ModelCard,
    ModelList,
    content_parts_from_openai,
)
from pacore.providers.registry import provider_class
from pacore.streaming import coalesce
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    Message,
    ProviderHealth,
    ToolCall,
)

__all__ = [
    "APP_NAME",
    "LocalApi",
    "LocalApp",
    "LocalModel",
    "LocalModels",
    "build_app",
    "detect_hardware",
    "engine_apps",
    "unwrap_error",
]

log = logging.getLogger(__name__)

APP_NAME = "pacore-agent"


def unwrap_error(exc: BaseException) -> BaseException:
    """The platform error behind a Serve handle's wrapper, if there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, PACoreError) else exc


def _deployment_name(model: str) -> str:
    return f"model-{model}"


class LocalModel:
    """One configured model, served by its provider adapter in a replica of its own."""

    def __init__(self, spec: ModelConfig) -> None:
        self.spec = spec
        config = spec.provider_config()
        self.provider = provider_class(config.kind)(config)

    @staticmethod
    def deployment_options(spec: ModelConfig) -> dict[str, Any]:
        # A self-hosted model's engine has a deployment (and the CPUs and GPUs) of its own.
        actor = {"num_cpus": 0.05} if spec.self_hosted else {
            "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus
        }
        return {
            "name": _deployment_name(spec.name),
            "ray_actor_options": actor,
            "max_ongoing_requests": spec.max_concurrency,
            "num_replicas": 1,
        }

    def _upstream(self, request: CompletionRequest) -> CompletionRequest:
        # Callers name the model by its configured name; the upstream knows its own id.
        return request.model_copy(update={"model": self.spec.upstream_model})

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        result = await self.provider.complete(self._upstream(request))
        # The cloud and local clients know the model by its configured name alone.
        return result.model_copy(update={"provider": self.spec.name, "model": self.spec.name})

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """The answer, with chunks that were ready together merged (each one pays the hop)."""
        async for chunk in coalesce(self.provider.stream(self._upstream(request))):
            if chunk.model is not None:
                chunk = chunk.model_copy(update={"model": self.spec.name})
            yield chunk

    async def health(self) -> ProviderHealth:
        try:
            return await self.provider.health_check()
        except PACoreError as exc:
            return ProviderHealth(healthy=False, detail=exc.message)

    async def __del__(self) -> None:
        await self.provider.aclose()


class LocalModels:
    """The local models as the link and the local API use them: by name, through Serve handles.
    A request that names no model goes to the first one configured."""

    def __init__(self, specs: list[ModelConfig], handles: dict[str, DeploymentHandle]) -> None:
        self.specs = {s.name: s for s in specs}
        self.handles = handles
        self.default = specs[0].name if specs else None

    def capabilities(self) -> list[ModelCapability]:
        return [
            ModelCapability(id=s.name, kind=s.kind, context_length=s.context_length)
            for s in self.specs.values()
        ]

    def resolve(self, name: str | None) -> tuple[str, DeploymentHandle]:
        """The model ``name`` names (None: the default) and its handle; 404 if there is none."""
        chosen = name or self.default
        if chosen is None:
            raise NotFoundError("this agent serves no models", param="model")
        handle = self.handles.get(chosen)
        if handle is None:
            raise NotFoundError(f"this agent has no model '{chosen}'", param="model")
        return chosen, handle

    async def complete(self, name: str | None, request: CompletionRequest) -> CompletionResult:
        model, handle = self.resolve(name)
        response = handle.complete.remote(request.model_copy(update={"model": model}))
        try:
            result: CompletionResult = await response
        except asyncio.CancelledError:
            response.cancel()  # the cloud cancelled: stop the replica's upstream call too
            raise
        return result

    async def stream(
        self, name: str | None, request: CompletionRequest
    ) -> AsyncIterator[CompletionChunk]:
        model, handle = self.resolve(name)
        gen = cast(
            DeploymentResponseGenerator[CompletionChunk],
            handle.options(stream=True).stream.remote(request.model_copy(update={"model": model})),
        )
        finished = False
        try:
            async for chunk in gen:
                yield chunk
            finished = True
        finally:
            if not finished:
                gen.cancel()  # the caller went away: stop the replica's upstream call too

    async def health(self) -> dict[str, ProviderHealth]:
        out: dict[str, ProviderHealth] = {}
        for name, handle in self.handles.items():
            try:
                out[name] = await handle.health.remote()
            except Exception as exc:  # noqa: BLE001 - a dead replica is an unhealthy model
                out[name] = ProviderHealth(healthy=False, detail=type(exc).__name__)
        return out


# --------------------------------------------------------------------------- local API


class LocalApi:
    """The OpenAI-compatible API on ``local_api.port``: chat completions and the model list."""

    def __init__(self, specs: list[ModelConfig], handles: dict[str, DeploymentHandle]) -> None:
        self.models = LocalModels(specs, handles)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_local_api(self.models)


def create_local_api(models: LocalModels) -> FastAPI:
    app = FastAPI(title="PA Core agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Exception)
    async def _error(_: Request, exc: Exception) -> JSONResponse:
        error = unwrap_error(exc)
        if not isinstance(error, PACoreError):
            log.exception("local API request failed")
            error = UpstreamError("the local model failed")
        return JSONResponse(error.to_wire(), status_code=error.status)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, owned_by="pacore-agent") for name in models.specs])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest) -> Any:
        request = completion_request(body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            models.resolve(body.model)  # an unknown model is a 404, not an error inside a 200
            return StreamingResponse(
                _sse(models.stream(body.model, request), body.model, include_usage),
                media_type="text/event-stream",
            )
        result = await models.complete(body.model, request)
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=body.model,
            choices=[ChatChoice(
                message=ChatMessageOut(
                    content=result.content or None,
                    tool_calls=_tool_call_dicts(result.tool_calls),
                ),
                finish_reason=result.finish_reason,
            )],
            usage=result.usage,
        )

    return app


def completion_request(body: ChatCompletionRequest) -> CompletionRequest:
    """An OpenAI chat request as the platform's request."""
    tool_choice = body.tool_choice
    if isinstance(tool_choice, dict):
        tool_choice = str(tool_choice.get("function", {}).get("name") or "auto")
    try:
        return CompletionRequest(
            messages=[_message(m) for m in body.messages],
            model=body.model,
            temperature=body.temperature,
            top_p=body.top_p,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            stop=[body.stop] if isinstance(body.stop, str) else body.stop,
            tools=body.tool_definitions(),
            tool_choice=tool_choice,
        )
    except ValueError as exc:
        raise BadRequestError(f"invalid request: {exc}") from None


def _message(m: Any) -> Message:
    calls = [
        ToolCall(
            id=c.get("id", ""), name=c.get("function", {}).get("name", ""),
            arguments=c.get("function", {}).get("arguments") or "{}",
        )
        for c in m.tool_calls or []
    ]
    return Message(
        role={"developer": "system", "function": "tool"}.get(m.role, m.role),
        content=content_parts_from_openai(m.content),
        name=m.name,
        tool_calls=calls or None,
        tool_call_id=m.tool_call_id,
    )


def _tool_call_dicts(calls: list[ToolCall] | None) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


async def _sse(
    chunks: AsyncIterator[CompletionChunk], model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def frame(delta: ChatDelta, finish: str | None = None, usage: Any = None) -> bytes:
        body = ChatCompletionStreamResponse(
            id=cid, created=created, model=model,
            choices=[ChatStreamChoice(delta=delta, finish_reason=finish)] if usage is None else [],
            usage=usage,
        )
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n".encode()

    try:
        yield frame(ChatDelta(role="assistant", content=""))
        async for chunk in chunks:
            if chunk.content or chunk.tool_calls:
                deltas = [d.model_dump(exclude_none=True) for d in chunk.tool_calls or []]
                yield frame(ChatDelta(content=chunk.content or None, tool_calls=deltas or None))
            if chunk.finish_reason is not None:
                yield frame(ChatDelta(), chunk.finish_reason)
                if include_usage and chunk.usage is not None:
                    yield frame(ChatDelta(), usage=chunk.usage)
        yield b"data: [DONE]\n\n"
    except Exception as exc:
        error = unwrap_error(exc)
        if not isinstance(error, PACoreError):
            log.exception("local stream failed")
            error = UpstreamError("the local model failed")
        yield f"data: {json.dumps(error.to_wire())}\n\n".encode()


# --------------------------------------------------------------------------- the app


def build_app(config: AgentConfig) -> Any:
    """The local Serve application: the model deployments behind the local API ingress."""
    handles = {
        m.name: serve.deployment(**LocalModel.deployment_options(m))(LocalModel).bind(m)
        for m in config.models
    }
    ingress = serve.deployment(
        name="LocalApi",
        ray_actor_options={"num_cpus": 0.05},
        max_ongoing_requests=256,
        num_replicas=1,
    )(serve.ingress()(LocalApi))
    return ingress.bind(config.models, handles)


def engine_apps(config: AgentConfig) -> dict[str, Any]:
    """The engine of each self-hosted model, as a Serve application of its own."""
    models = [m for m in config.models if m.self_hosted]
    if not models:
        return {}
    from deployments.selfhosted import bind_self_hosted  # loads engine code only when needed

    return {
        m.engine_app: bind_self_hosted([m.engine_spec()])[m.name] for m in models
    }


class LocalApp:
    """The running local app: Ray started (unless already running), Serve on loopback."""

    def __init__(self, config: AgentConfig, models: LocalModels, owns_ray: bool) -> None:
        self.config = config
        self.models = models
        self._owns_ray = owns_ray

    @classmethod
    def start(cls, config: AgentConfig) -> LocalApp:
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(
                address="local",
                num_cpus=config.runtime.num_cpus,
                num_gpus=config.runtime.num_gpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        api = config.local_api
        serve.start(
            proxy_location="HeadOnly" if api.enabled else "Disabled",
            http_options={"host": api.host, "port": api.port},
        )
        for name, engine in engine_apps(config).items():
            serve.run(engine, name=name, route_prefix=None)
        serve.run(build_app(config), name=APP_NAME, route_prefix="/" if api.enabled else None)
        handles = {
            m.name: serve.get_deployment_handle(_deployment_name(m.name), app_name=APP_NAME)
            for m in config.models
        }
        return cls(config, LocalModels(config.models, handles), owns_ray)

    @property
    def local_api_url(self) -> str | None:
        api = self.config.local_api
        return f"http://{api.host}:{api.port}/v1" if api.enabled else None

    def stop(self) -> None:
        try:
            serve.delete(APP_NAME)
            for m in self.config.models:
                if m.self_hosted:
                    serve.delete(m.engine_app)
        finally:
            if self._owns_ray:
                serve.shutdown()
                ray.shutdown()


def detect_hardware() -> Hardware:
    """This machine as announced to the cloud: CPUs, memory, and the GPUs Ray sees."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    return Hardware(cpus=os.cpu_count() or 0, memory_bytes=memory, gpus=gpus)
