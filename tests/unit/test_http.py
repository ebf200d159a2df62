"""The shared transport policy: backoff, retry-after, retries before the first item, error mapping."""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import httpx2
import pytest

from pacore.errors import (
    AuthenticationError,
    BadRequestError,
    PACoreError,
    RateLimitError,
    TimeoutError,
    UpstreamError,
    UpstreamUnavailableError,
)
from pacore.providers import _http
from pacore.providers._http import (
    RetryPolicy,
    call_with_retries,
    error_from_response,
    new_http_client,
    new_sdk_http_client,
    parse_retry_after,
    stream_with_retries,
    translate_transport_error,
)

# --------------------------------------------------------------------------- RetryPolicy


@pytest.mark.parametrize("attempt", range(8))
def test_delay_is_jittered_within_the_exponential_ceiling(attempt: int) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    ceiling = min(4.0, 0.5 * 2**attempt)
    for _ in range(50):
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling


def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0, max_retry_after_s=30.0)
    assert policy.delay(5, retry_after=7.0) == 7.0
    assert policy.delay(0, retry_after=0.0) == 0.0
    assert policy.delay(0, retry_after=120.0) == 30.0
    assert policy.delay(0, retry_after=-3.0) == 0.0


# --------------------------------------------------------------------------- parse_retry_after


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


@pytest.mark.parametrize(("headers", "expected"), [
    (None, None),
    ({}, None),
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
    ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
    ({"retry-after": "soon"}, None),
    ({"retry-after": ""}, None),
    ({"retry-after": http_date(-60)}, 0.0),
])
def test_parse_retry_after(headers: dict[str, str] | None, expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    seconds = parse_retry_after({"retry-after": http_date(30)})
    assert seconds is not None and 25 <= seconds <= 31


def test_parse_retry_after_ignores_header_case() -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": "4"})) == 4.0
    assert parse_retry_after(httpx2.Headers({"Retry-After-Ms": "500"})) == 0.5


# --------------------------------------------------------------------------- error mapping


def test_error_from_response_keeps_only_the_upstream_message() -> None:
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate"}}
    err = error_from_response(429, body, {"retry-after": "2"}, "openai")
    assert isinstance(err, RateLimitError)
    assert (err.message, err.provider, err.retry_after) == ("openai: Rate limit reached", "openai", 2.0)


@pytest.mark.parametrize(("body", "message"), [
    ({"message": "flat"}, "p: flat"),
    ({"error": "just a string"}, "p: just a string"),
    ("  plain text  ", "p: plain text"),
    (None, "p: upstream answered HTTP 500"),
    ({"error": {"type": "no message"}}, "p: upstream answered HTTP 500"),
])
def test_error_from_response_message_shapes(body: object, message: str) -> None:
    assert error_from_response(500, body, None, "p").message == message


def test_error_from_response_truncates_long_messages() -> None:
    err = error_from_response(400, {"error": {"message": "x" * 5000}}, None, "p")
    assert isinstance(err, BadRequestError)
    assert len(err.message) == len("p: ") + 500


@pytest.mark.parametrize(("exc", "cls"), [
    (httpx.ReadTimeout("slow"), TimeoutError),
    (httpx2.ConnectTimeout("slow"), TimeoutError),
    (builtins.TimeoutError(), TimeoutError),
    (httpx.ConnectError("refused"), UpstreamUnavailableError),
    (httpx2.ConnectError("refused"), UpstreamUnavailableError),
    (httpx.RemoteProtocolError("closed"), UpstreamError),
    (httpx2.RemoteProtocolError("closed"), UpstreamError),
    (httpx.ReadError("reset"), UpstreamError),
    (RuntimeError("anything"), UpstreamError),
])
def test_translate_transport_error(exc: BaseException, cls: type[PACoreError]) -> None:
    err = translate_transport_error(exc, "p")
    assert type(err) is cls
    assert err.provider == "p" and err.retryable


def test_translate_transport_error_passes_platform_errors_through() -> None:
    err = AuthenticationError("no")
    assert translate_transport_error(err, "p") is err


async def test_clients_carry_the_timeouts() -> None:
    client = new_http_client(timeout_s=12, connect_timeout_s=3, base_url="http://127.0.0.1:1",
                             headers={"x-a": "b"})
    assert (client.timeout.read, client.timeout.connect) == (12, 3)
    assert client.headers["x-a"] == "b"
    await client.aclose()
    import openai

    sdk = new_sdk_http_client(openai.DefaultAioHttpClient, timeout_s=12, connect_timeout_s=3)
    assert isinstance(sdk, openai.DefaultAioHttpClient) and isinstance(sdk, httpx2.AsyncClient)
    assert (sdk.timeout.read, sdk.timeout.connect) == (12, 3)
    await sdk.aclose()


# --------------------------------------------------------------------------- call_with_retries

# Taken before any test replaces asyncio.sleep to record backoff delays.
_yield_to_loop = asyncio.sleep

FAST = RetryPolicy(max_retries=2, base_delay_s=0.001, max_delay_s=0.002)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays asked for, without waiting them out."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(_http.asyncio, "sleep", fake_sleep)
    return recorded


def failing(*errors: BaseException, result: str = "ok") -> tuple[Callable[[], Any], list[int]]:
    calls: list[int] = []

    async def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return fn, calls


async def test_call_succeeds_after_retryable_failures(sleeps: list[float]) -> None:
    fn, calls = failing(UpstreamError("a"), RateLimitError("b", retry_after=1.25))
    assert await call_with_retries(fn, FAST) == "ok"
    assert len(calls) == 3
    assert 0.0005 <= sleeps[0] <= 0.001
    assert sleeps[1] == 1.25  # retry-after beats backoff


async def test_call_gives_up_after_the_budget(sleeps: list[float]) -> None:
    fn, calls = failing(*[UpstreamError(str(i)) for i in range(5)])
    with pytest.raises(UpstreamError, match="2"):
        await call_with_retries(fn, FAST)
    assert len(calls) == FAST.max_retries + 1
    assert len(sleeps) == FAST.max_retries


async def test_call_does_not_retry_what_cannot_help(sleeps: list[float]) -> None:
    fn, calls = failing(AuthenticationError("bad key"))
    with pytest.raises(AuthenticationError):
        await call_with_retries(fn, FAST)
    fn, calls2 = failing(UpstreamError("x", retryable=False))
    with pytest.raises(UpstreamError):
        await call_with_retries(fn, FAST)
    fn, calls3 = failing(ValueError("a bug"))
    with pytest.raises(ValueError):
        await call_with_retries(fn, FAST)
    assert (len(calls), len(calls2), len(calls3), sleeps) == (1, 1, 1, [])


async def test_no_retries_means_one_attempt(sleeps: list[float]) -> None:
    fn, calls = failing(UpstreamError("x"))
    with pytest.raises(UpstreamError):
        await call_with_retries(fn, RetryPolicy(max_retries=0))
    assert len(calls) == 1


# --------------------------------------------------------------------------- stream_with_retries


class Upstream:
    """A scripted stream source: each start yields ``items`` and may fail after ``fail_after``."""

    def __init__(self, *plans: tuple[int | None, BaseException | None], items: int = 3) -> None:
        self.plans = list(plans)
        self.items = items
        self.starts = 0
        self.closed = 0

    def start(self) -> AsyncIterator[int]:
        plan = self.plans[self.starts] if self.starts < len(self.plans) else (None, None)
        self.starts += 1
        return self._run(*plan)

    async def _run(self, fail_after: int | None, error: BaseException | None) -> AsyncIterator[int]:
        try:
            for i in range(self.items):
                if fail_after == i and error is not None:
                    raise error
                yield i
                await _yield_to_loop(0)
        finally:
            self.closed += 1


async def drain(it: AsyncIterator[int]) -> list[int]:
    return [i async for i in it]


async def test_stream_retries_before_the_first_item(sleeps: list[float]) -> None:
    up = Upstream((0, UpstreamError("a")), (0, RateLimitError("b", retry_after=0.5)))
    assert await drain(stream_with_retries(up.start, FAST)) == [0, 1, 2]
    assert up.starts == 3
    assert up.closed == 3  # every abandoned attempt was closed
    assert sleeps[1] == 0.5


async def test_stream_never_retries_after_the_first_item(sleeps: list[float]) -> None:
    up = Upstream((2, UpstreamError("mid-stream")))
    seen: list[int] = []
    with pytest.raises(UpstreamError, match="mid-stream"):
        async for item in stream_with_retries(up.start, FAST):
            seen.append(item)
    assert (seen, up.starts, up.closed, sleeps) == ([0, 1], 1, 1, [])


async def test_stream_gives_up_after_the_budget(sleeps: list[float]) -> None:
    up = Upstream(*[(0, UpstreamError("down"))] * 5)
    with pytest.raises(UpstreamError):
        await drain(stream_with_retries(up.start, FAST))
    assert up.starts == FAST.max_retries + 1
    assert up.closed == up.starts


async def test_stream_does_not_retry_what_cannot_help(sleeps: list[float]) -> None:
    up = Upstream((0, BadRequestError("bad")))
    with pytest.raises(BadRequestError):
        await drain(stream_with_retries(up.start, FAST))
    up2 = Upstream((0, KeyError("a bug")))
    with pytest.raises(KeyError):
        await drain(stream_with_retries(up2.start, FAST))
    assert (up.starts, up.closed, up2.starts, up2.closed, sleeps) == (1, 1, 1, 1, [])


async def test_empty_stream(sleeps: list[float]) -> None:
    up = Upstream(items=0)
    assert await drain(stream_with_retries(up.start, FAST)) == []
    assert up.starts == 1


async def test_closing_the_stream_closes_the_inner_iterator() -> None:
    up = Upstream(items=100)
    stream = stream_with_retries(up.start, FAST)
    assert await anext(stream) == 0
    assert await anext(stream) == 1
    await stream.aclose()  # type: ignore[attr-defined]
    assert up.closed == 1


async def test_cancelling_the_consumer_closes_the_inner_iterator() -> None:
    up = Upstream(items=10**6)
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in stream_with_retries(up.start, FAST):
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert up.closed == 1
