"""A scriptable HTTP upstream on loopback: a raw ASGI app served by uvicorn in its own thread.

Protocol servers (Anthropic, Ollama, …) subclass :class:`LoopbackServer` and implement
:meth:`LoopbackServer.handle`; the base owns the lifecycle, the request log, the queue of
scripted :class:`Reply` objects and the bookkeeping of responses the client abandoned.
The server runs its own event loop, so it keeps answering while a test blocks or awaits.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import uvicorn

__all__ = [
    "Answer",
    "DropConnection",
    "LoopbackServer",
    "RecordedRequest",
    "Reply",
    "ScriptedToolCall",
    "StreamFault",
    "play",
    "split_words",
]

ASGIMessage = MutableMapping[str, Any]

StreamFault = Literal["truncate", "malformed", "error", "drop"]
"""How a scripted stream fails after ``fault_after`` content pieces: ``truncate`` ends the body
cleanly without the protocol's final event, ``malformed`` sends a line that is not JSON,
``error`` sends the protocol's in-stream error, ``drop`` aborts the connection mid-body."""


@dataclass(frozen=True)
class ScriptedToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = "call_1"


@dataclass(frozen=True)
class Reply:
    """What the next request to an answering route gets; the defaults give the echo answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    error_type: str | None = None
    text: str | None = None
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    fault: StreamFault | None = None
    fault_after: int = 1

    @classmethod
    def error(
        cls,
        status: int,
        message: str | None = None,
        *,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        return cls(status=status, message=message, error_type=error_type, headers=headers or {})

    @classmethod
    def tool_call(
        cls, name: str, arguments: dict[str, Any], *, id: str = "call_1", text: str = ""
    ) -> Reply:
        return cls(text=text, tool_calls=(ScriptedToolCall(name, arguments, id),))

    @property
    def is_error(self) -> bool:
        return self.status >= 400


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any


@dataclass
class Answer:
    """One HTTP response: a whole ``body``, or a ``stream`` of byte pieces, after ``delay_s``."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    content_type: str = "application/json"
    delay_s: float = 0.0

    @classmethod
    def json(
        cls,
        data: object,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> Answer:
        return cls(
            status=status, headers=headers or {}, body=json.dumps(data).encode(), delay_s=delay_s
        )


class DropConnection(Exception):
    """Raised by an answer's stream to abort the connection without finishing the body."""


def split_words(text: str) -> list[str]:
    """``text`` in streaming pieces: each word with the whitespace before it."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []


FrameKind = Literal["head", "content", "tail"]


async def play(
    frames: list[tuple[FrameKind, bytes]], reply: Reply, *, malformed: bytes, error: bytes
) -> AsyncIterator[bytes]:
    """Send a stream's frames as ``reply`` scripts it: paced by ``chunk_delay_s``, and failing
    with ``reply.fault`` once ``fault_after`` content frames are out (before the tail at the
    latest). ``malformed`` and ``error`` are the protocol's bad line and in-stream error."""
    sent = 0
    for kind, frame in frames:
        if reply.fault and kind != "head" and sent >= reply.fault_after:
            if reply.fault == "drop":
                raise DropConnection
            if reply.fault == "malformed":
                yield malformed
            elif reply.fault == "error":
                yield error
            return
        if kind == "content":
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
            sent += 1
        yield frame


class LoopbackServer(ABC):
    """An HTTP server on ``127.0.0.1`` and an ephemeral port; a context manager (sync or async)."""

    def __init__(self) -> None:
        self.default_reply = Reply()
        self._requests: list[RecordedRequest] = []
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._disconnects = 0
        self._completed = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @abstractmethod
    async def handle(self, request: RecordedRequest) -> Answer:
        """The answer to one request (the request is already recorded)."""

    # --- scripting and inspection -------------------------------------------------------------

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests to an answering route with ``replies``, in order."""
        with self._lock:
            self._replies.extend(replies)

    def reset(self) -> None:
        """Forget requests, queued replies and counts, so that one running server serves many
        tests."""
        with self._lock:
            self.default_reply = Reply()
            self._requests.clear()
            self._replies.clear()
            self._disconnects = self._completed = 0

    def next_reply(self) -> Reply:
        with self._lock:
            return self._replies.popleft() if self._replies else self.default_reply

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def disconnects(self) -> int:
        """Responses the client abandoned (closed the connection) before their end."""
        with self._lock:
            return self._disconnects

    @property
    def completed(self) -> int:
        """Responses sent to their end."""
        with self._lock:
            return self._completed

    def wait_for_disconnect(self, count: int = 1, within_s: float = 5.0) -> bool:
        deadline = time.monotonic() + within_s
        while self.disconnects < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    async def until_disconnected(self, count: int = 1, within_s: float = 5.0) -> bool:
        """The async twin of :meth:`wait_for_disconnect`, which keeps the caller's loop running."""
        deadline = time.monotonic() + within_s
        while self.disconnects < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        if self._thread is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",
            lifespan="off",
            log_config=None,
            log_level="critical",
            access_log=False,
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            daemon=True,
            name=f"{type(self).__name__}:{self._port}",
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        # Tests stop servers with streams still open on purpose: leave without draining them.
        server.force_exit = True
        server.should_exit = True
        thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # --- ASGI ---------------------------------------------------------------------------------

    async def _asgi(self, scope: ASGIMessage, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await _read_body(receive)
        request = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            body=_parse_body(raw),
        )
        with self._lock:
            self._requests.append(request)
        answer = await self.handle(request)
        await self._respond(answer, receive, send)

    async def _respond(self, answer: Answer, receive: Any, send: Any) -> None:
        """Send ``answer`` while watching for the client going away, which is recorded."""
        finished = False

        async def pump() -> None:
            nonlocal finished
            if answer.delay_s:
                await asyncio.sleep(answer.delay_s)
            headers = {"content-type": answer.content_type, **answer.headers}
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
                }
            )
            if answer.stream is None:
                finished = True
                await send({"type": "http.response.body", "body": answer.body})
                return
            async for piece in answer.stream:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b""})

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandoned = watch_task.done() and not finished
            for task in (pump_task, watch_task):
                task.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            if answer.stream is not None and hasattr(answer.stream, "aclose"):
                await answer.stream.aclose()
        with self._lock:
            if abandoned:
                self._disconnects += 1
            elif finished:
                self._completed += 1
        if pump_task.done() and not pump_task.cancelled():
            error = pump_task.exception()
            if error is not None:
                # Raising out of the app is how ASGI aborts a response already under way.
                raise error


async def _read_body(receive: Any) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


async def _until_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
