"""The agent's link to the cloud: one WebSocket dialled out, requests served concurrently.

The link sends ``hello`` and ``capabilities``, then serves every request in a task of its own
(many streams share the socket, told apart by request id), answers pings and health checks,
stops a request when the cloud cancels it, and reconnects with capped exponential backoff and
full jitter whenever the connection ends, unless the cloud refused the agent for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from agent.app import LocalModels, unwrap_error
from agent.config import AgentConfig
from agent.tools import ToolBox
from pacore.agents.protocol import (
    FATAL_CLOSE_CODES,
    MAX_FRAME_BYTES,
    SUPPORTED_VERSIONS,
    UNKNOWN_ID,
    Cancel,
    Capabilities,
    ErrorFrame,
    ErrorInfo,
    Frame,
    FrameError,
    Hardware,
    HealthCheck,
    HealthResponse,
    Hello,
    LlmRequest,
    LlmResponse,
    LlmStream,
    LlmStreamEnd,
    Ping,
    Pong,
    ToolRequest,
    ToolResponse,
    encode,
    parse_message,
)
from pacore.errors import BadRequestError, ConflictError, PACoreError, RateLimitError, UpstreamError
from pacore.streaming import coalesce
from pacore.types import FinishReason, Usage

__all__ = ["AgentLink", "AgentRefused", "LinkState"]

log = logging.getLogger(__name__)

LinkState = str
"""``connecting``, ``connected``, ``disconnected`` (then a retry), ``refused`` or ``stopped``."""

# A session that lasted this long was healthy: the next reconnect starts from the base delay.
_HEALTHY_SESSION_S = 30.0


class AgentRefused(Exception):
    """The cloud refused this agent for good (bad or revoked token, replaced, no common
    protocol); reconnecting cannot help."""


class AgentLink:
    """Keeps the agent connected to the cloud and serves what the cloud asks of it."""

    def __init__(
        self,
        config: AgentConfig,
        models: LocalModels,
        tools: ToolBox,
        *,
        version: str,
        hardware: Hardware | None = None,
        on_state: Callable[[LinkState, str], None] | None = None,
    ) -> None:
        if config.agent_token is None:
            raise AgentRefused("the configuration has no agent_token: run `pacore-agent pair`")
        self.config = config
        self.models = models
        self.tools = tools
        self.version = version
        self.hardware = hardware
        self._on_state = on_state
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._replies: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def connection(self) -> ClientConnection | None:
        """The live WebSocket, while there is one."""
        return self._ws

    async def wait_connected(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Stay connected until :meth:`stop`; raises :class:`AgentRefused` when the cloud
        refuses the agent for good."""
        attempt = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            self._state("connecting", self.config.connect_url)
            try:
                detail = await self._session()
            except AgentRefused as exc:
                self._state("refused", str(exc))
                raise
            except (OSError, TimeoutError, WebSocketException) as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self._stopping.is_set():
                break
            if time.monotonic() - started >= _HEALTHY_SESSION_S:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            self._state("disconnected", f"{detail}; reconnecting in {delay:.1f}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
        self._state("stopped", "")

    async def stop(self) -> None:
        self._stopping.set()
        if self._ws is not None:
            await self._ws.close(1001, "agent shutting down")

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
        cfg = self.config.link
        ceiling = min(cfg.reconnect_max_s, cfg.reconnect_base_s * (2 ** min(attempt, 30)))
        return random.uniform(0, ceiling)

    def _state(self, state: LinkState, detail: str) -> None:
        if state != "connected":
            self._connected.clear()
        log.info("link %s %s", state, detail)
        if self._on_state is not None:
            self._on_state(state, detail)

    # ------------------------------------------------------------------ one connection

    async def _session(self) -> str:
        """One connection, from dialling to its end; returns why it ended."""
        ws = await self._dial()
        self._ws = ws
        if self._stopping.is_set():  # stop() came while dialling, when there was no socket
            await ws.close(1001, "agent shutting down")
        try:
            await self._send(Hello(
                agent_version=self.version,
                protocol_versions=list(SUPPORTED_VERSIONS),
                name=self.config.name,
            ))
            await self._send(Capabilities(
                models=self.models.capabilities(),
                tools=self.tools.definitions(),
                hardware=self.hardware,
            ))
            self._connected.set()
            self._state("connected", self.config.connect_url)
            async for message in ws:
                self._dispatch(message)
            await ws.wait_closed()
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._connected.clear()
            await self._cancel_all()
        code, reason = ws.close_code, ws.close_reason or ""
        if code in FATAL_CLOSE_CODES:
            raise AgentRefused(f"the cloud closed the link for good ({code}: {reason})")
        return f"connection closed ({code}{': ' + reason if reason else ''})"

    async def _dial(self) -> ClientConnection:
        cfg = self.config
        assert cfg.agent_token is not None
        try:
            return await websockets.connect(
                cfg.connect_url,
                additional_headers={"Authorization": f"Bearer {cfg.agent_token.get_secret_value()}"},
                user_agent_header=f"pacore-agent/{self.version}",
                open_timeout=cfg.link.open_timeout_s,
                ping_interval=cfg.link.ping_interval_s,
                ping_timeout=cfg.link.ping_timeout_s,
                max_size=MAX_FRAME_BYTES,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AgentRefused(
                    f"the cloud refused the agent token (HTTP {status}); pair the agent again"
                ) from None
            raise

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, frame: Frame) -> None:
        ws = self._ws
        if ws is None:
            return  # the link is gone; the cloud has failed this request already
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode(frame))

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, message: str | bytes) -> None:
        try:
            frame = parse_message(message)
        except FrameError as exc:
            log.warning("link: refused a frame from the cloud: %s", exc.message)
            self._spawn_reply(ErrorFrame(id=exc.frame_id or UNKNOWN_ID, error=ErrorInfo.of(exc)))
            return
        if isinstance(frame, LlmRequest):
            self._start(frame.id, self._serve_llm(frame))
        elif isinstance(frame, ToolRequest):
            self._start(frame.id, self._serve_tool(frame))
        elif isinstance(frame, HealthCheck):
            self._start(frame.id, self._serve_health(frame))
        elif isinstance(frame, Cancel):
            task = self._tasks.pop(frame.id, None)
            if task is not None:
                task.cancel()
        elif isinstance(frame, Ping):
            self._spawn_reply(Pong(id=frame.id))
        elif isinstance(frame, ErrorFrame):
            log.warning("link: the cloud reported for %s: %s", frame.id, frame.error.message)
        elif not isinstance(frame, Pong):
            error = BadRequestError(f"'{frame.type}' frames go from the agent to the cloud",
                                    code="unexpected_frame")
            self._spawn_reply(ErrorFrame(id=frame.id, error=ErrorInfo.of(error)))

    def _start(self, request_id: str, work: Coroutine[Any, Any, None]) -> None:
        refusal: PACoreError | None = None
        if request_id in self._tasks:
            refusal = ConflictError(f"request '{request_id}' is already in progress")
        elif len(self._tasks) >= self.config.link.max_concurrent_requests:
            refusal = RateLimitError("the agent is at its concurrency limit", retry_after=1.0)
        if refusal is not None:
            work.close()
            self._spawn_reply(ErrorFrame(id=request_id, error=ErrorInfo.of(refusal)))
            return
        task = asyncio.get_running_loop().create_task(work)
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._forget(request_id, task))

    def _forget(self, request_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]

    def _spawn_reply(self, frame: Frame) -> None:
        self._start_untracked(self._send(frame))

    def _start_untracked(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    # ------------------------------------------------------------------ serving

    async def _serve_llm(self, frame: LlmRequest) -> None:
        try:
            if frame.stream:
                await self._stream(frame)
            else:
                result = await self.models.complete(frame.model, frame.request)
                await self._send(LlmResponse(id=frame.id, result=result))
        except asyncio.CancelledError:
            raise  # cancelled by the cloud, or the link is gone: nothing to answer
        except Exception as exc:  # noqa: BLE001 - every failure is answered, never leaked
            await self._send(ErrorFrame(id=frame.id, error=ErrorInfo.of(unwrap_error(exc))))

    async def _stream(self, frame: LlmRequest) -> None:
        finish: FinishReason = "stop"
        usage: Usage | None = None
        model: str | None = None
        # Chunks that pile up while a frame is being written travel together in the next one.
        async for chunk in coalesce(self.models.stream(frame.model, frame.request)):
            finish = chunk.finish_reason or finish
            usage = chunk.usage or usage
            model = chunk.model or model
            if chunk.content or chunk.tool_calls:
                body = chunk.model_copy(update={"finish_reason": None, "usage": None})
                await self._send(LlmStream(id=frame.id, chunks=[body]))
        await self._send(LlmStreamEnd(id=frame.id, finish_reason=finish, usage=usage, model=model))

    async def _serve_tool(self, frame: ToolRequest) -> None:
        try:
            result = await self.tools.call(frame.name, frame.arguments)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, PACoreError):
                log.exception("tool %s failed", frame.name)
                exc = UpstreamError(f"tool '{frame.name}' failed")
            await self._send(ToolResponse(id=frame.id, error=ErrorInfo.of(exc)))
            return
        await self._send(ToolResponse(id=frame.id, result=result))

    async def _serve_health(self, frame: HealthCheck) -> None:
        models = await self.models.health()
        healthy = all(h.healthy for h in models.values())
        await self._send(HealthResponse(id=frame.id, healthy=healthy, models=models))
