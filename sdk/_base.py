"""What the sync and async clients share: configuration, request bodies, retry policy, errors.

Retries: a request the server refused with 429 or 503 before answering is sent again after the
server's ``retry-after`` (or an exponential backoff with full jitter when it gave none), up to
``max_retries`` times. A request that never left (the connection could not be opened) is retried
the same way. A request that may have reached the server and started work, such as a completion,
is never sent twice after a broken connection or a timeout; reads and idempotent writes are.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypedDict
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from sdk._exceptions import ConnectionError, PACoreError, TimeoutError, error_from_body
from sdk._models import Message, UserSettings

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "VERSION",
    "Call",
    "CompleteOptions",
    "MessageParam",
    "RetryPolicy",
    "TimeoutParam",
    "build_request",
    "complete_body",
    "default_headers",
    "error_for_response",
    "error_for_transport",
    "request_id_of",
    "resolve_base_url",
    "resolve_token",
    "segment",
    "settings_body",
    "without_none",
]

VERSION = "0.1.0"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Reads wait long: a completion that is not streamed answers only when the model has finished.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
RETRY_STATUSES = frozenset({429, 503})
# Failures in which the request provably never reached the server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

MessageParam = Message | Mapping[str, Any]
TimeoutParam = float | httpx.Timeout | None


def resolve_base_url(base_url: str | None) -> str:
    """The argument, else ``PACORE_URL``, else the local default; without a trailing slash."""
    url = base_url or os.environ.get("PACORE_URL") or DEFAULT_BASE_URL
    return url.rstrip("/")


def resolve_token(token: str | None) -> str | None:
    """The argument, else ``PACORE_TOKEN``, else None (only register, login and health work)."""
    return token or os.environ.get("PACORE_TOKEN") or None


def default_headers(extra: Mapping[str, str] | None) -> dict[str, str]:
    return {"user-agent": f"pacore-sdk/{VERSION}", "accept": "application/json", **(extra or {})}


@dataclass(frozen=True, slots=True)
class Call:
    """One API request. ``resendable`` says whether it may be sent again after it may have
    reached the server (a read, or a write whose repetition changes nothing)."""

    method: str
    path: str
    json: Any = None
    params: Mapping[str, Any] | None = None
    resendable: bool = True
    authenticated: bool = True
    # Error statuses whose body is still the answer (a degraded /health says so with 503).
    accept: frozenset[int] = frozenset()


def segment(value: str, what: str) -> str:
    """A path parameter, percent-encoded whole; an empty one would address another endpoint."""
    if not value:
        raise ValueError(f"{what} must not be empty")
    return quote(value, safe="")


def build_request(
    http: httpx.Client | httpx.AsyncClient,
    base_url: str,
    token: str | None,
    call: Call,
    timeout: TimeoutParam,
) -> httpx.Request:
    headers = {"authorization": f"Bearer {token}"} if call.authenticated and token else {}
    return http.build_request(
        call.method,
        base_url + call.path,
        json=call.json,
        params=call.params,
        headers=headers,
        timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
    )


def without_none(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def complete_body(prompt: str | None, options: CompleteOptions, *, stream: bool) -> dict[str, Any]:
    """The ``/v1/complete`` body; options given as None are not sent (the server's defaults)."""
    body: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if prompt is not None:
        body["prompt"] = prompt
    if "messages" in body:
        body["messages"] = [
            m.model_dump() if isinstance(m, Message) else dict(m) for m in body["messages"]
        ]
    for key in ("tags", "data_residency"):
        if isinstance(body.get(key), Sequence) and not isinstance(body[key], str):
            body[key] = list(body[key])
    body["stream"] = stream
    return body


def settings_body(settings: UserSettings | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(settings, BaseModel):
        return settings.model_dump(mode="json")
    return UserSettings.model_validate(settings).model_dump(mode="json")


class CompleteOptions(TypedDict, total=False):
    """Options of ``complete`` and ``stream``; any left out take the server's defaults.

    ``messages`` replaces the prompt with a whole message list (``[{"role", "content"}]``);
    ``provider``/``model`` pin where the request goes (otherwise the router chooses);
    ``conversation_id`` continues a conversation; ``use_memory=False`` leaves remembered context
    out; ``data_residency`` is ``"any"``, ``"on_prem"`` or a list of regions; ``tags`` label the
    conversation; ``agent_tools`` names one of your on-prem agents whose declared tools the model
    may call (the platform runs them through the agent and gives the model their results).
    """

    messages: Sequence[MessageParam]
    provider: str
    model: str
    conversation_id: str
    use_memory: bool
    temperature: float
    max_tokens: int
    data_residency: str | Sequence[str]
    tags: Sequence[str]
    agent_tools: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times and how long to wait before sending a refused request again."""

    max_retries: int = DEFAULT_MAX_RETRIES
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # A server asking for a longer pause than this is not waited for: the error is raised.
    max_retry_after_s: float = 60.0

    def delay_after_status(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up and raise."""
        if attempt >= self.max_retries or response.status_code not in RETRY_STATUSES:
            return None
        advised = retry_after(response.headers)
        if advised is None:
            return self._backoff(attempt)
        if advised > self.max_retry_after_s:
            return None
        # A little jitter on top keeps clients told the same moment from arriving together.
        return advised + random.uniform(0, self.base_delay_s / 2)

    def delay_after_failure(
        self, attempt: int, exc: httpx.TransportError, call: Call
    ) -> float | None:
        if attempt >= self.max_retries:
            return None
        if isinstance(exc, _NOT_SENT) or call.resendable:
            return self._backoff(attempt)
        return None

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)


def retry_after(headers: httpx.Headers) -> float | None:
    """The ``retry-after`` header in seconds (a number or an HTTP date), or None."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def request_id_of(headers: httpx.Headers) -> str | None:
    """The answer's request id (the first, should a proxy on the way have added its own)."""
    values = headers.get_list("x-request-id")
    return values[0] if values else None


def error_for_response(response: httpx.Response) -> PACoreError:
    """The exception for an error answer whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    return error_from_body(
        body,
        status=response.status_code,
        request_id=request_id_of(response.headers),
        retry_after=retry_after(response.headers),
    )


def error_for_transport(exc: httpx.TransportError, base_url: str) -> PACoreError:
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(f"no answer from {base_url} in time ({type(exc).__name__})")
    return ConnectionError(f"cannot reach {base_url}: {exc or type(exc).__name__}")
