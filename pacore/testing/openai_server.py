"""A loopback OpenAI Chat Completions server: real HTTP on 127.0.0.1, scriptable answers and faults.

Tests drive provider adapters (the official ``openai`` SDK inside) against it, and benchmarks run it
as their upstream in a process of its own::

    python -m pacore.testing.openai_server --port 9100 --token-delay-ms 5 --tokens 16

The answer is deterministic: ``tokens`` words taken from the last user message (or from ``words``),
cut short by the request's ``max_tokens``. One request at a time may be answered differently by
queueing :class:`Scripted` replies (an error status with headers, a tool call, a truncated or
malformed stream, a delay). Every request received is recorded, and so is every client that went
away before its answer was complete.

The hot path is a bare ASGI callable: no framework, no per-request logging, SSE frames assembled
from byte templates, and an undelayed stream written in one piece.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn

__all__ = ["OpenAIServer", "RecordedRequest", "Scripted", "ScriptedToolCall", "main"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
_MALFORMED = b'data: {"id": "chatcmpl-broken", "choices": [{"delta": \n\n'


@dataclass(frozen=True, slots=True)
class ScriptedToolCall:
    """A tool call the scripted answer makes."""

    name: str
    arguments: str = "{}"
    id: str = "call_0"


@dataclass(frozen=True, slots=True)
class Scripted:
    """How to answer one request instead of the normal way.

    Positions (``*_after``) count answer pieces (content tokens, then tool-call pieces) already
    streamed when the event happens: ``truncate_after`` drops the connection mid-response,
    ``end_after`` completes the response early (no finish, no ``[DONE]``), ``malformed_after``
    inserts an undecodable event, ``error_after`` sends an error event and ends the response, and
    ``delay_after`` pauses ``delay_s`` there (without it the delay comes before the answer).
    """

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    message: str = "scripted failure"
    error_type: str = "server_error"
    code: str | None = None
    delay_s: float = 0.0
    delay_after: int | None = None
    content: str | None = None
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    truncate_after: int | None = None
    end_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None


@dataclass(slots=True)
class RecordedRequest:
    """A request as it arrived: method, path, headers (lower-case names) and the JSON body."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def messages(self) -> list[dict[str, Any]]:
        if isinstance(self.body, dict):
            return list(self.body.get("messages") or [])
        return []


class _TruncatedStream(Exception):
    """Raised inside the app to make uvicorn drop the connection in the middle of a response."""


class _QuietOnPurpose(logging.Filter):
    """Drops uvicorn's traceback for a scripted truncation or an answer cut off by stop()."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _TruncatedStream | asyncio.CancelledError)


logging.getLogger("uvicorn.error").addFilter(_QuietOnPurpose())


class OpenAIServer:
    """An OpenAI-API server on loopback, run by uvicorn in a background thread (or in the
    foreground with :meth:`serve_forever`). ``base_url`` is what an OpenAI client is given."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = 16,
        token_delay_s: float = 0.0,
        words: Sequence[str] | None = None,
        models: Sequence[str] = ("loopback-model",),
        include_usage: bool = True,
        models_endpoint: bool = True,
        reject_stream_options: bool = False,
        api_key: str | None = None,
        record: bool = True,
    ) -> None:
        self.host = host
        self.tokens = tokens
        self.token_delay_s = token_delay_s
        self.words = list(words) if words else None
        self.models = list(models)
        self.include_usage = include_usage
        self.models_endpoint = models_endpoint
        self.reject_stream_options = reject_stream_options
        self.api_key = api_key
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self._script: deque[Scripted] = deque()
        self._ids = itertools.count(1)
        self._socket = _bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == CHAT_PATH]

    def script(self, *replies: Scripted) -> None:
        """Answer the next chat requests with these replies, one each, in order."""
        self._script.extend(replies)

    def reset(self) -> None:
        """Forget recorded requests, disconnects and unused scripted replies."""
        self.requests.clear()
        self._script.clear()
        self.disconnects = 0

    async def wait_for_disconnects(self, count: int = 1, timeout_s: float = 5.0) -> bool:
        """Wait until at least ``count`` clients went away mid-answer; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.disconnects < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def start(self) -> OpenAIServer:
        """Serve in a background thread; returns once the socket accepts requests."""
        if self._thread is not None:
            return self
        self._server = uvicorn.Server(self._config())
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]},
            name=f"openai-server-{self.port}", daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                raise RuntimeError("the loopback OpenAI server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            # Answers still under way (a scripted delay, an abandoned stream) are not waited for.
            self._server.force_exit = True
            self._server.should_exit = True
            self._thread.join(timeout=10.0)
        self._server = None
        self._thread = None
        self._socket.close()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (the process mode)."""
        uvicorn.Server(self._config()).run(sockets=[self._socket])

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self, log_config=None, log_level="warning", access_log=False, lifespan="off",
            loop="asyncio", http="h11", timeout_graceful_shutdown=1,
        )

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> OpenAIServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        raw = await _read_body(receive)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if self.record:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.requests.append(RecordedRequest(method, path, headers, body))
        if self.api_key is not None and not _authorized(scope, self.api_key):
            await _error(send, 401, "Incorrect API key provided", "invalid_request_error",
                         "invalid_api_key")
        elif path == CHAT_PATH and method == "POST":
            await self._chat(body, receive, send)
        elif path == MODELS_PATH and method == "GET" and self.models_endpoint:
            await _json(send, 200, self._model_list())
        else:
            await _error(send, 404, f"Unknown request URL: {method} {path}",
                         "invalid_request_error", "unknown_url")

    def _model_list(self) -> dict[str, Any]:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "loopback"}
                for m in self.models]
        return {"object": "list", "data": data}

    async def _chat(self, body: Any, receive: Receive, send: Send) -> None:
        scripted = self._script.popleft() if self._script else None
        problem = _invalid_chat_body(body)
        if problem is not None:
            await _error(send, 400, problem, "invalid_request_error", None)
            return
        if scripted is not None and scripted.delay_s > 0 and scripted.delay_after is None:
            if not await self._pause(scripted.delay_s, receive):
                return
        if scripted is not None and scripted.status is not None:
            await _error(send, scripted.status, scripted.message, scripted.error_type,
                         scripted.code, scripted.headers)
            return
        if self.reject_stream_options and "stream_options" in body:
            await _error(send, 400, "Unrecognized request argument supplied: stream_options",
                         "invalid_request_error", None)
            return
        answer = _Answer.build(self, body, scripted)
        if body.get("stream"):
            await self._stream(answer, body, scripted, receive, send)
        else:
            if self.token_delay_s > 0 and not await self._pause(
                self.token_delay_s * len(answer.tokens), receive
            ):
                return
            await _json(send, 200, answer.completion(self.include_usage))

    async def _pause(self, seconds: float, receive: Receive) -> bool:
        """Sleep, unless the client goes away first (then record it and return False)."""
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({watcher}, timeout=seconds)
        finally:
            watcher.cancel()
        if done:
            self.disconnects += 1
            return False
        return True

    async def _stream(
        self, answer: _Answer, body: dict[str, Any], scripted: Scripted | None,
        receive: Receive, send: Send,
    ) -> None:
        options = body.get("stream_options") or {}
        usage = self.include_usage and bool(options.get("include_usage"))
        frames, pieces = answer.frames(usage)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        if scripted is None and self.token_delay_s <= 0:
            await send({"type": "http.response.body", "body": b"".join(frames)})
            return
        await self._send_paced(frames, pieces, scripted, receive, send)

    async def _send_paced(
        self, frames: list[bytes], pieces: int, scripted: Scripted | None, receive: Receive,
        send: Send,
    ) -> None:
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            for i, frame in enumerate(frames):
                piece = i - 1  # frames[0] carries the role; answer pieces follow it
                if scripted is not None and not await self._scripted_event(
                    scripted, piece, watcher, send
                ):
                    return
                if 0 <= piece < pieces and self.token_delay_s > 0:
                    await asyncio.wait({watcher}, timeout=self.token_delay_s)
                if watcher.done():
                    self.disconnects += 1
                    return
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()

    async def _scripted_event(
        self, scripted: Scripted, piece: int, watcher: asyncio.Future[None], send: Send
    ) -> bool:
        """Play the scripted fault due before answer piece ``piece``; False ends the response."""
        if scripted.delay_after == piece and scripted.delay_s > 0:
            await asyncio.wait({watcher}, timeout=scripted.delay_s)
        if scripted.truncate_after == piece:
            raise _TruncatedStream
        if scripted.end_after == piece:
            await send({"type": "http.response.body", "body": b""})
            return False
        if scripted.malformed_after == piece:
            await send({"type": "http.response.body", "body": _MALFORMED, "more_body": True})
        if scripted.error_after == piece:
            error = {"error": {"message": scripted.message, "type": scripted.error_type,
                               "code": scripted.code}}
            frame = b"data: " + json.dumps(error).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": frame})
            return False
        return True


@dataclass(slots=True)
class _Answer:
    """One request's answer, rendered either as a completion object or as SSE frames."""

    id: str
    model: str
    created: int
    tokens: list[str]
    tool_calls: tuple[ScriptedToolCall, ...]
    finish_reason: str
    prompt_tokens: int

    @classmethod
    def build(cls, server: OpenAIServer, body: dict[str, Any], scripted: Scripted | None) -> _Answer:
        messages = body["messages"]
        tool_calls = scripted.tool_calls if scripted is not None else ()
        if scripted is not None and scripted.content is not None:
            words = scripted.content.split()
            count = len(words)
        else:
            words = server.words or _words(_last_user_text(messages)) or ["ok"]
            count = 0 if tool_calls else server.tokens
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "tool_calls" if tool_calls else "stop"
        if isinstance(limit, int) and limit < count:
            count, finish = limit, "length"
        tokens = [w if i == 0 else " " + w for i, w in zip(range(count), itertools.cycle(words))]
        return cls(
            id=f"chatcmpl-{next(server._ids)}", model=str(body["model"]), created=int(time.time()),
            tokens=tokens, tool_calls=tool_calls, finish_reason=finish,
            prompt_tokens=sum(len(_text(m.get("content")).split()) for m in messages),
        )

    def usage(self) -> dict[str, int]:
        completion = len(self.tokens) + sum(len(c.arguments.split()) for c in self.tool_calls)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def completion(self, include_usage: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.tokens) or None,
                                   "refusal": None}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        out: dict[str, Any] = {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason,
                         "logprobs": None}],
        }
        if include_usage:
            out["usage"] = self.usage()
        return out

    def frames(self, include_usage: bool) -> tuple[list[bytes], int]:
        """The SSE frames (role, content tokens, tool-call pieces, finish, usage, [DONE]) and how
        many of them are answer pieces."""
        head = (
            f'data: {{"id":"{self.id}","object":"chat.completion.chunk","created":{self.created},'
            f'"model":{json.dumps(self.model)},'
        ).encode()
        choice = head + b'"choices":[{"index":0,"delta":'
        tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
        frames = [choice + b'{"role":"assistant","content":""}' + tail]
        frames.extend(choice + b'{"content":' + json.dumps(t).encode() + b"}" + tail
                      for t in self.tokens)
        for index, call in enumerate(self.tool_calls):
            frames.extend(choice + json.dumps({"tool_calls": [d]}).encode() + tail
                          for d in _tool_call_deltas(index, call))
        pieces = len(frames) - 1
        finish = f',"logprobs":null,"finish_reason":"{self.finish_reason}"}}]}}\n\n'.encode()
        frames.append(choice + b"{}" + finish)
        if include_usage:
            frames.append(head + b'"choices":[],"usage":' + json.dumps(self.usage()).encode()
                          + b"}\n\n")
        frames.append(_DONE)
        return frames, pieces


def _tool_call_deltas(index: int, call: ScriptedToolCall) -> list[dict[str, Any]]:
    """A tool call as OpenAI streams it: id and name first, then the arguments in two pieces."""
    half = len(call.arguments) // 2
    first = {"index": index, "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": ""}}
    pieces = [call.arguments[:half], call.arguments[half:]]
    return [first, *({"index": index, "function": {"arguments": p}} for p in pieces if p)]


def _authorized(scope: Scope, api_key: str) -> bool:
    expected = f"Bearer {api_key}".encode("latin-1")
    return any(k == b"authorization" and v == expected for k, v in scope["headers"])


def _invalid_chat_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and "role" in m for m in messages
    ):
        return "'messages' must be a non-empty array of message objects"
    return None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _words(text: str) -> list[str]:
    return [w for w in (w.strip(".,;:!?\"'()[]{}") for w in text.split()) if w]


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json(send: Send, status: int, payload: Any,
                headers: Mapping[str, str] | None = None) -> None:
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS + extra})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def _error(send: Send, status: int, message: str, error_type: str, code: str | None,
                 headers: Mapping[str, str] | None = None) -> None:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    await _json(send, status, body, headers)


def _bind(host: str, port: int) -> socket.socket:
    # Naming the protocol makes asyncio set TCP_NODELAY on every accepted connection; without it
    # a kept-alive client waits out a 40 ms delayed ACK between the headers and the body.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server in the foreground; prints ``listening on <base_url>`` once bound."""
    parser = argparse.ArgumentParser(prog="python -m pacore.testing.openai_server",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="delay before each token")
    parser.add_argument("--words", default=None, help="fixed answer vocabulary, space-separated")
    parser.add_argument("--model", action="append", dest="models", help="a model to list")
    parser.add_argument("--no-usage", action="store_true", help="never report usage")
    parser.add_argument("--no-models", action="store_true", help="answer 404 on /v1/models")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument("--record", action="store_true", help="keep every request in memory")
    args = parser.parse_args(argv)
    server = OpenAIServer(
        host=args.host, port=args.port, tokens=args.tokens,
        token_delay_s=args.token_delay_ms / 1000.0,
        words=args.words.split() if args.words else None,
        models=args.models or ("loopback-model",), include_usage=not args.no_usage,
        models_endpoint=not args.no_models, api_key=args.api_key, record=args.record,
    )
    print(f"listening on {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
