"""Streamed answers: the SSE decoder and the sync/async iterators of typed chunks.

The server sends ``event: chunk`` frames (``{content}``) as the model produces them, then one
``event: done`` (the completion without its text) or ``event: error`` (the API's error body).
Chunks are handed out as they arrive; the ``done`` object is kept for afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from sdk._base import request_id_of
from sdk._exceptions import ConnectionError, PACoreError, TimeoutError, error_from_body
from sdk._models import Completion, CompletionChunk, CompletionDone

__all__ = ["AsyncCompletionStream", "CompletionStream", "SSEDecoder", "ServerSentEvent"]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


class SSEDecoder:
    """Turns lines of a ``text/event-stream`` into events (the WHATWG rules we need: ``event``,
    multi-line ``data``, comments, a blank line ending each event)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


class _StreamState:
    """What both iterators do with each event: chunks out, ``done`` kept, ``error`` raised."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.decoder = SSEDecoder()
        self.done: CompletionDone | None = None
        self.parts: list[str] = []

    @property
    def request_id(self) -> str | None:
        return request_id_of(self.response.headers)

    def on_line(self, line: str) -> CompletionChunk | None:
        event = self.decoder.feed(line)
        if event is None or self.done is not None:
            return None
        payload = self._decode(event.data)
        if event.event == "chunk":
            chunk = CompletionChunk.model_validate(payload)
            self.parts.append(chunk.content)
            return chunk
        if event.event == "done":
            self.done = CompletionDone.model_validate(payload)
        elif event.event == "error":
            raise error_from_body(payload, status=None, request_id=self.request_id)
        return None

    def on_end(self) -> None:
        if self.done is None:
            raise ConnectionError(
                "the stream ended before the answer was complete", request_id=self.request_id
            )

    def _decode(self, data: str) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            raise ConnectionError(
                "the server sent an event that is not JSON", request_id=self.request_id
            ) from None

    def transport_error(self, exc: httpx.TransportError) -> PACoreError:
        if isinstance(exc, httpx.TimeoutException):
            return TimeoutError(
                "the server sent nothing more within the timeout", request_id=self.request_id
            )
        return ConnectionError(
            f"the connection broke before the answer was complete ({type(exc).__name__})",
            request_id=self.request_id,
        )

    def final(self) -> Completion:
        assert self.done is not None
        return Completion(**self.done.model_dump(), content="".join(self.parts))


class _StreamView:
    _state: _StreamState

    @property
    def done(self) -> CompletionDone | None:
        """The closing ``done`` object (usage, conversation id, …); None until the end."""
        return self._state.done

    @property
    def content(self) -> str:
        """The text received so far."""
        return "".join(self._state.parts)

    @property
    def conversation_id(self) -> str | None:
        """The conversation the answer belongs to, known from the first byte on."""
        if self._state.done is not None:
            return self._state.done.conversation_id
        header: str | None = self._state.response.headers.get("x-pacore-conversation-id")
        return header

    @property
    def request_id(self) -> str | None:
        return self._state.request_id


class CompletionStream(_StreamView):
    """An iterator of :class:`CompletionChunk` as they arrive; ``done`` is set at the end.

    Use it as a context manager, or iterate it to the end, so the connection is released::

        with client.stream("Hello") as stream:
            for chunk in stream:
                print(chunk.content, end="", flush=True)
        print(stream.done.usage)
    """

    def __init__(self, response: httpx.Response) -> None:
        self._state = _StreamState(response)
        self._iterator = self._chunks()

    def _chunks(self) -> Generator[CompletionChunk, None, None]:
        try:
            for line in self._state.response.iter_lines():
                chunk = self._state.on_line(line)
                if chunk is not None:
                    yield chunk
            self._state.on_end()
        except httpx.TransportError as exc:
            raise self._state.transport_error(exc) from None
        finally:
            self._state.response.close()

    def __iter__(self) -> Iterator[CompletionChunk]:
        return self

    def __next__(self) -> CompletionChunk:
        return next(self._iterator)

    def final(self) -> Completion:
        """Read what is left and return the whole answer, text included."""
        for _ in self:
            pass
        return self._state.final()

    def close(self) -> None:
        """Stop reading; the server notices the client went away and stops the model."""
        self._iterator.close()
        self._state.response.close()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncCompletionStream(_StreamView):
    """The async twin of :class:`CompletionStream`::

    async with await client.stream("Hello") as stream:
        async for chunk in stream:
            print(chunk.content, end="", flush=True)
    """

    def __init__(self, response: httpx.Response) -> None:
        self._state = _StreamState(response)
        self._iterator = self._chunks()

    async def _chunks(self) -> AsyncGenerator[CompletionChunk, None]:
        try:
            async for line in self._state.response.aiter_lines():
                chunk = self._state.on_line(line)
                if chunk is not None:
                    yield chunk
            self._state.on_end()
        except httpx.TransportError as exc:
            raise self._state.transport_error(exc) from None
        finally:
            await self._state.response.aclose()

    def __aiter__(self) -> AsyncIterator[CompletionChunk]:
        return self

    async def __anext__(self) -> CompletionChunk:
        return await anext(self._iterator)

    async def final(self) -> Completion:
        """Read what is left and return the whole answer, text included."""
        async for _ in self:
            pass
        return self._state.final()

    async def aclose(self) -> None:
        await self._iterator.aclose()
        await self._state.response.aclose()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
