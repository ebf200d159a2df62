"""The Router deployment: runs the orchestrator against the graph's other deployments."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments import _handles
from pacore.config import PlatformArgs, Settings
from pacore.db.changes import ReadCache
from pacore.db.stores.records import ProviderRecord, UserSettings
from pacore.db.stores.usage import UsageEntry
from pacore.errors import NotFoundError
from pacore.logs import to_replica_log
from pacore.orchestrator import ContextResult, Orchestrator, TurnEvent, TurnRequest
from pacore.providers.base import Provider, ProviderConfig
from pacore.routing import EXEMPLARS, QueryClassifier, QueryType, RoutingContext, Target
from pacore.services import Services
from pacore.streaming import coalesce
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    Message,
    ModelInfo,
    ToolDefinition,
    Usage,
)
from pacore.usage_writer import UsageWriter

__all__ = ["RouterDeployment"]

logger = logging.getLogger("pacore.router")

SELF_HOSTED_KINDS = ("vllm", "cpu")


class _HandleMemory:
    """MemoryClient over the Embedder and Memory deployments."""

    def __init__(self, memory: DeploymentHandle, embedder: DeploymentHandle) -> None:
        self._memory = memory
        self._embedder = embedder
        self._pending: set[asyncio.Task[Any]] = set()

    async def embed_query(self, text: str) -> list[float]:
        vectors = await _handles.call(self._embedder, "embed", [text])
        return list(vectors[0])

    async def context_for(
        self, user_id: str, vector: list[float], messages: list[Message], conversation_id: str | None
    ) -> ContextResult:
        text, refs = await _handles.call(
            self._memory, "context_for_vector", user_id, vector, messages, conversation_id
        )
        return ContextResult(text, refs)

    async def check_conversation(self, user_id: str, conversation_id: str) -> None:
        await _handles.call(self._memory, "check_conversation", user_id, conversation_id)

    def store_turn(
        self, user_id: str, conversation_id: str, messages: list[Message], *, provider: str,
        model: str, usage: Usage, latency_ms: float, tags: list[str] | None, new: bool,
        known_vector: tuple[str, list[float]] | None = None,
    ) -> None:
        task = asyncio.ensure_future(
            _handles.call(
                self._memory, "store_turn", user_id, conversation_id, messages,
                provider=provider, model=model, usage=usage, latency_ms=latency_ms, tags=tags,
                new=new, known_vector=known_vector,
            )
        )
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("storing a turn failed: %s", type(task.exception()).__name__)


class RouterDeployment:
    """Stateless orchestrator replica; scales with request concurrency."""

    DEFAULT_OPTIONS: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": 256,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 64,
        },
        "graceful_shutdown_timeout_s": 120,
    }

    def __init__(
        self,
        args: dict[str, Any],
        providers: dict[str, DeploymentHandle],
        memory: DeploymentHandle | None,
        embedder: DeploymentHandle | None,
        agent_hub: DeploymentHandle | None = None,
        self_hosted: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        self.args = PlatformArgs.model_validate(args)
        self.settings: Settings = self.args.build_settings()
        to_replica_log(self.settings.log_level)
        self.services = Services.for_settings(self.settings)
        self._providers = providers
        self._hub = agent_hub
        self._self_hosted = _self_hosted_providers(self.args, self_hosted or {})
        self._embedder = embedder
        mem = _HandleMemory(memory, embedder) if memory is not None and embedder is not None else None
        self.orchestrator = Orchestrator(
            routing=self, providers=self, memory=mem, usage=self,
            agent_tools=self if agent_hub is not None else None,
        )
        self._usage = UsageWriter(self.services.stores.usage)
        # What every turn reads (settings, providers, their keys), until a write changes it.
        self._reads = ReadCache(self.services.db.changes)
        # Serve awaits the instance's __del__ on graceful shutdown (the class has none, so the
        # garbage collector never makes an un-awaited coroutine of it).
        self.__del__ = self.aclose
        self._classifier_ready = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        if embedder is not None:
            self._spawn(self._load_classifier())

    # ------------------------------------------------------------------ public methods

    async def run(self, user_id: str, turn: TurnRequest) -> AsyncIterator[TurnEvent]:
        """The turn's events; chunks that are ready together are merged into one."""
        linger_s = self.settings.stream_linger_ms / 1000
        async for event in coalesce(self.orchestrator.run(user_id, turn), linger_s=linger_s):
            yield event

    async def run_whole(self, user_id: str, turn: TurnRequest) -> list[TurnEvent]:
        """The turn's events in one answer, for clients that do not stream (one message per
        hop instead of one per chunk)."""
        return [event async for event in self.orchestrator.run(user_id, turn)]

    async def aclose(self) -> None:
        """Write the queued usage entries and release the database."""
        await self._usage.aclose()
        await self.services.aclose()

    async def ping(self) -> None:
        """Readiness: answering at all is the check."""

    async def models(self, user_id: str) -> list[ModelInfo]:
        ctx = await self.routing_context(user_id)
        out: list[ModelInfo] = []
        for target in ctx.targets.values():
            models = await self._target_models(user_id, target)
            out.extend(ModelInfo(id=f"{target.provider}/{m}", provider=target.provider) for m in models)
        return out

    async def test_provider(self, user_id: str, name: str) -> dict[str, Any]:
        config = await self._config(user_id, name)
        health = await _handles.call(self._providers[config.kind], "health", user_id, config)
        return health.model_dump()

    async def forget_provider(self, user_id: str, name: str, kind: str) -> None:
        handle = self._providers.get(kind)
        if handle is not None:
            await _handles.call(handle, "forget", user_id, name)

    # ------------------------------------------------------------------ RoutingSource

    async def routing_context(
        self, user_id: str, turn: TurnRequest | None = None
    ) -> RoutingContext:
        settings, providers = await self._user_setup(user_id)
        # In order of ownership, which decides when no preference does: the user's own
        # providers, then the user's agents, then what the platform offers.
        targets: dict[str, Target] = {}
        for p in providers:
            if p.configured:
                targets[p.name] = Target(
                    p.name, p.kind, p.default_model, region=(p.options or {}).get("region")
                )
        if _may_pick_any_agent(settings.data_residency, turn):
            # Residency may choose an agent the request does not name: only online ones count.
            for agent_id, models in await self._agents(user_id):
                name = f"agent:{agent_id}"
                targets[name] = Target(name, "agent", models[0] if models else None, on_prem=True)
        else:
            # Agents named by the request or the settings are targets as they are; the hub
            # answers 404 or 503 for one that is not the user's or not online (and a fallback
            # takes over), so the common request makes no call to the hub at all.
            for name in _agent_names(settings, turn):
                targets.setdefault(name, Target(name, "agent", None, on_prem=True))
        for shared in self.args.shared_providers:
            targets.setdefault(shared.name, Target(shared.name, shared.kind, shared.default_model))
        for model in self.args.self_hosted:
            targets.setdefault(
                model.engine, Target(model.engine, model.engine, model.name, on_prem=True)
            )
        return RoutingContext(
            targets=targets,
            default_provider=settings.default_provider,
            data_residency=settings.data_residency,
            routing=settings.routing.model_dump(),
            fallbacks=list(settings.fallbacks),
        )

    # ------------------------------------------------------------------ ProviderClient

    async def stream(
        self, user_id: str, target: Target, request: CompletionRequest
    ) -> AsyncIterator[CompletionChunk]:
        if target.is_agent:
            if self._hub is None:
                raise NotFoundError(f"provider '{target.provider}' is not configured")
            async for chunk in _handles.stream(
                self._hub, "stream", user_id, target.agent_id, request
            ):
                yield chunk
            return
        if target.kind in SELF_HOSTED_KINDS:
            provider, request = self._self_hosted_for(target, request)
            async for chunk in provider.stream(request):
                yield chunk
            return
        config = await self._config(user_id, target.provider)
        async for chunk in _handles.stream(
            self._providers[config.kind], "stream", user_id, config, request
        ):
            yield chunk

    # ------------------------------------------------------------------ AgentTools

    async def tools(self, user_id: str, agent_id: str) -> list[ToolDefinition]:
        assert self._hub is not None
        return list(await _handles.call(self._hub, "tools", user_id, agent_id))

    async def call_tool(
        self, user_id: str, agent_id: str, name: str, arguments: dict[str, Any]
    ) -> Any:
        assert self._hub is not None
        return await _handles.call(self._hub, "call_tool", user_id, agent_id, name, arguments)

    async def complete(
        self, user_id: str, target: Target, request: CompletionRequest
    ) -> CompletionResult:
        if target.is_agent:
            if self._hub is None:
                raise NotFoundError(f"provider '{target.provider}' is not configured")
            result: CompletionResult = await _handles.call(
                self._hub, "complete", user_id, target.agent_id, request
            )
            return result
        if target.kind in SELF_HOSTED_KINDS:
            provider, request = self._self_hosted_for(target, request)
            return await provider.complete(request)
        config = await self._config(user_id, target.provider)
        result = await _handles.call(
            self._providers[config.kind], "complete", user_id, config, request
        )
        return result

    # ------------------------------------------------------------------ UsageSink

    def record(
        self, user_id: str, provider: str, model: str, usage: Usage, latency_ms: float, status: str
    ) -> None:
        self._usage.add(UsageEntry(
            user_id, provider, model, usage.prompt_tokens, usage.completion_tokens, latency_ms,
            status,
        ))

    # ------------------------------------------------------------------ helpers

    def _self_hosted_for(
        self, target: Target, request: CompletionRequest
    ) -> tuple[Provider, CompletionRequest]:
        """The provider of the self-hosted model a request asks for, and the request naming it."""
        model = request.model or target.model or ""
        provider = self._self_hosted.get(model)
        if provider is None:
            raise NotFoundError(f"model '{model}' is not served here", param="model")
        return provider, request.model_copy(update={"model": model})

    async def _user_setup(self, user_id: str) -> tuple[UserSettings, list[ProviderRecord]]:
        """The user's settings and providers, read once and cached until either changes."""
        stores = self.services.stores

        async def load() -> tuple[UserSettings, list[ProviderRecord]]:
            settings, providers = await asyncio.gather(
                stores.settings.get(user_id), stores.providers.list(user_id)
            )
            return settings, providers

        return await self._reads.get(("setup", user_id), load)

    async def _config(self, user_id: str, name: str) -> ProviderConfig:
        for shared in self.args.shared_providers:
            if shared.name == name:
                _, providers = await self._user_setup(user_id)
                if not any(p.name == name for p in providers):
                    return shared.config()
        stores = self.services.stores
        return await self._reads.get(
            ("config", user_id, name), lambda: stores.providers.get_config(user_id, name)
        )

    async def _target_models(self, user_id: str, target: Target) -> list[str]:
        if target.is_agent or target.kind in SELF_HOSTED_KINDS:
            if target.kind in SELF_HOSTED_KINDS:
                return [m.name for m in self.args.self_hosted if m.engine == target.kind]
            return [target.model] if target.model else []
        try:
            config = await self._config(user_id, target.provider)
            models = await _handles.call(self._providers[config.kind], "models", user_id, config)
            return [m.id for m in models]
        except Exception:  # noqa: BLE001 - one unreachable provider must not hide the others
            return [target.model] if target.model else []

    async def _agents(self, user_id: str) -> list[tuple[str, list[str]]]:
        if self._hub is None:
            return []
        try:
            return list(await _handles.call(self._hub, "connected_agents", user_id))
        except Exception:  # noqa: BLE001 - the hub being down only removes agent targets
            logger.warning("agent hub unavailable; routing without agents")
            return []

    async def _load_classifier(self) -> None:
        assert self._embedder is not None
        labels = list(EXEMPLARS)
        texts = [t for label in labels for t in EXEMPLARS[label]]
        for attempt in range(30):
            try:
                vectors = await _handles.call(self._embedder, "embed", texts)
                break
            except Exception:  # noqa: BLE001 - the embedder may still be starting
                await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
        else:
            logger.warning("query classifier uses keywords only: the embedder did not answer")
            return
        by_label: dict[QueryType, list[list[float]]] = {label: [] for label in labels}
        i = 0
        for label in labels:
            for _ in EXEMPLARS[label]:
                by_label[label].append(vectors[i])
                i += 1
        self.orchestrator.set_classifier(QueryClassifier(by_label))
        self._classifier_ready.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _self_hosted_providers(
    args: PlatformArgs, handles: dict[str, DeploymentHandle]
) -> dict[str, Provider]:
    """One provider per self-hosted model, talking to that model's deployment."""
    from pacore.providers.cpu import CPUProvider
    from pacore.providers.vllm import VLLMProvider

    out: dict[str, Provider] = {}
    for model in args.self_hosted:
        handle = handles.get(model.name)
        if handle is None:
            continue
        config = ProviderConfig(kind=model.engine, name=model.engine, default_model=model.name)
        if model.engine == "cpu":
            out[model.name] = CPUProvider.over_handle(config, handle, model.name)
        else:
            out[model.name] = VLLMProvider(config, handle=handle)
    return out


def _may_pick_any_agent(residency: object, turn: TurnRequest | None) -> bool:
    if turn is None:  # listing models: every online agent
        return True
    wanted = turn.data_residency if turn.data_residency is not None else residency
    return wanted not in (None, "any")


def _agent_names(settings: Any, turn: TurnRequest | None) -> set[str]:
    from pacore.routing import AGENT_PREFIX, parse_model

    names = {settings.default_provider, *settings.fallbacks, *settings.routing.model_dump().values()}
    if turn is not None:
        names.add(turn.provider)
        names.add(parse_model(turn.model)[0])
    return {n for n in names if isinstance(n, str) and n.startswith(AGENT_PREFIX)}
