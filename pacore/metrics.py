"""Platform metrics: their one definition, created lazily in each process, and cheap helpers to record them.

Every metric is a Ray Serve metric (``ray.serve.metrics``): inside a replica Ray adds the
``deployment``, ``replica`` and ``application`` tags itself, and the values leave through each
node's metrics agent on the same Prometheus endpoint as Serve's own ``ray_serve_*`` metrics
(Ray prefixes every name with ``ray_``). Outside a Ray worker (unit tests, the CLI) every helper
does nothing.

Labels are bounded, never per user: ``provider`` is a provider kind (``openai``, ``vllm``,
``agent``, …), ``model`` is capped at :data:`MAX_MODELS` distinct values per process (later ones
count as ``other``), ``endpoint`` is a route template, ``error_type`` is an error class's type.
Tag dictionaries are built once per label combination and reused.

========================================  =========  ==============================
name                                      kind       tags
========================================  =========  ==============================
pacore_http_requests_total                counter    endpoint, method, status
pacore_http_request_duration_seconds      histogram  endpoint, method
pacore_errors_total                       counter    error_type
pacore_completions_total                  counter    provider, model, status
pacore_completion_duration_seconds        histogram  provider, model
pacore_time_to_first_token_seconds        histogram  provider, model
pacore_input_tokens_total                 counter    provider, model
pacore_output_tokens_total                counter    provider, model
pacore_provider_errors_total              counter    provider, error_type
pacore_memory_search_duration_seconds     histogram  operation
pacore_agent_connections                  gauge      (none)
pacore_agent_connects_total               counter    (none)
========================================  =========  ==============================
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ParamSpec

from pacore.errors import PACoreError

__all__ = [
    "DEFINITIONS",
    "MAX_MODELS",
    "RequestMetricsMiddleware",
    "agent_link_closed",
    "agent_link_opened",
    "error_type_of",
    "record_error",
    "record_first_token",
    "record_http",
    "record_memory_search",
    "record_provider_error",
    "record_turn",
]

logger = logging.getLogger("pacore.metrics")

MAX_MODELS = 64
MAX_LABEL_LEN = 64
OTHER = "other"

# Seconds. Completions and streams run long; first tokens and searches are short.
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
_FAST_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "WS"})

# name -> (kind, description, tag keys, histogram boundaries)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "pacore_http_requests_total": (
        "counter", "HTTP requests and WebSocket sessions answered by the gateway",
        ("endpoint", "method", "status"), None,
    ),
    "pacore_http_request_duration_seconds": (
        "histogram", "time from a request's arrival to the end of its answer (streams included)",
        ("endpoint", "method"), _LATENCY_BUCKETS,
    ),
    "pacore_errors_total": (
        "counter", "errors answered to clients, by error type (HTTP errors and stream error events)",
        ("error_type",), None,
    ),
    "pacore_completions_total": (
        "counter", "completion turns by the provider kind and model that answered, and outcome",
        ("provider", "model", "status"), None,
    ),
    "pacore_completion_duration_seconds": (
        "histogram", "whole completion turns, memory and routing included",
        ("provider", "model"), _LATENCY_BUCKETS,
    ),
    "pacore_time_to_first_token_seconds": (
        "histogram", "time from a turn's start to its first streamed chunk",
        ("provider", "model"), _LATENCY_BUCKETS,
    ),
    "pacore_input_tokens_total": (
        "counter", "prompt tokens the providers reported", ("provider", "model"), None,
    ),
    "pacore_output_tokens_total": (
        "counter", "completion tokens the providers reported", ("provider", "model"), None,
    ),
    "pacore_provider_errors_total": (
        "counter", "failed provider calls, fallbacks included, by provider kind and error type",
        ("provider", "error_type"), None,
    ),
    "pacore_memory_search_duration_seconds": (
        "histogram", "semantic memory searches (operation: search or context)",
        ("operation",), _FAST_BUCKETS,
    ),
    "pacore_agent_connections": (
        "gauge", "on-prem agent links open on this hub replica", (), None,
    ),
    "pacore_agent_connects_total": (
        "counter", "on-prem agent links opened", (), None,
    ),
}


class _Bounded:
    """Maps label values to themselves until ``limit`` distinct ones are known, then to 'other'."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: dict[str, str] = {}

    def __call__(self, value: str | None) -> str:
        value = value or "unknown"
        known = self._known.get(value)
        if known is not None:
            return known
        if len(self._known) >= self._limit:
            return OTHER
        label = value[:MAX_LABEL_LEN]
        self._known[value] = label
        return label


class _Metrics:
    """The metric objects of one process, and their prepared tag dictionaries."""

    def __init__(self) -> None:
        from ray.serve import metrics as serve_metrics

        self.by_name: dict[str, Any] = {}
        for name, (kind, description, tags, buckets) in DEFINITIONS.items():
            # Ray annotates tag_keys as a one-element tuple; any tuple of names is what it takes.
            keys: Any = tags
            if kind == "counter":
                metric: Any = serve_metrics.Counter(name, description, tag_keys=keys)
            elif kind == "gauge":
                metric = serve_metrics.Gauge(name, description, tag_keys=keys)
            else:
                metric = serve_metrics.Histogram(name, description, buckets or [], tag_keys=keys)
            self.by_name[name] = metric
        m = self.by_name
        self.http_requests = m["pacore_http_requests_total"]
        self.http_duration = m["pacore_http_request_duration_seconds"]
        self.errors = m["pacore_errors_total"]
        self.completions = m["pacore_completions_total"]
        self.completion_duration = m["pacore_completion_duration_seconds"]
        self.first_token = m["pacore_time_to_first_token_seconds"]
        self.input_tokens = m["pacore_input_tokens_total"]
        self.output_tokens = m["pacore_output_tokens_total"]
        self.provider_errors = m["pacore_provider_errors_total"]
        self.memory_search = m["pacore_memory_search_duration_seconds"]
        self.agent_connections = m["pacore_agent_connections"]
        self.agent_connects = m["pacore_agent_connects_total"]
        self.agent_links = 0
        self.model = _Bounded(MAX_MODELS)
        self.label = _Bounded(256)
        self._tags: dict[tuple[str, ...], dict[str, str]] = {}

    def tags(self, *pairs: str) -> dict[str, str]:
        """The tag dict for alternating key, value arguments, built once and then reused."""
        tags = self._tags.get(pairs)
        if tags is None:
            tags = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
            self._tags[pairs] = tags
        return tags


_instance: _Metrics | None = None
_unavailable = False
_lock = threading.Lock()
_P = ParamSpec("_P")


def _metrics() -> _Metrics | None:
    """This process's metrics, created on first use; None outside a Ray worker."""
    if _instance is not None:
        return _instance
    if _unavailable:
        return None
    import ray

    if not ray.is_initialized():
        return None
    return _create()


def _create() -> _Metrics | None:
    global _instance, _unavailable
    with _lock:
        if _instance is None and not _unavailable:
            try:
                _instance = _Metrics()
            except Exception:
                _unavailable = True
                logger.warning("platform metrics are off in this process", exc_info=True)
        return _instance


def _never_raises(record: Callable[_P, None]) -> Callable[_P, None]:
    """Recording a metric must never fail the request it measures."""

    @functools.wraps(record)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            logger.debug("recording a metric failed", exc_info=True)

    return wrapper


# --------------------------------------------------------------------------- helpers


def error_type_of(exc: BaseException | None) -> str:
    """The bounded label for an exception: a platform error's type, 'cancelled' when the
    caller went away, else 'internal_error'."""
    if exc is None:
        return "none"
    if isinstance(exc, PACoreError):
        return exc.type
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    return "internal_error"


@_never_raises
def record_http(endpoint: str, method: str, status: int, seconds: float) -> None:
    """One request the gateway answered (``endpoint`` is its route template)."""
    m = _metrics()
    if m is None:
        return
    method = method if method in _METHODS else "OTHER"
    m.http_requests.inc(1, m.tags("endpoint", m.label(endpoint), "method", method,
                                  "status", str(status)))
    m.http_duration.observe(seconds, m.tags("endpoint", m.label(endpoint), "method", method))


@_never_raises
def record_error(error_type: str) -> None:
    """An error answered to a client (``error_type``: the wire ``type`` of the error)."""
    m = _metrics()
    if m is not None:
        m.errors.inc(1, m.tags("error_type", m.label(error_type)))


@_never_raises
def record_first_token(provider: str, model: str | None, seconds: float) -> None:
    """The first chunk of a turn arrived ``seconds`` after the turn started."""
    m = _metrics()
    if m is not None:
        m.first_token.observe(seconds, m.tags("provider", m.label(provider),
                                              "model", m.model(model)))


@_never_raises
def record_turn(
    provider: str, model: str | None, usage: Any, seconds: float, error: BaseException | None
) -> None:
    """A finished turn: its outcome, duration and the tokens ``usage`` reports (``error`` is
    what ended it early, None when it completed)."""
    m = _metrics()
    if m is None:
        return
    provider, model = m.label(provider), m.model(model)
    status = "ok" if error is None else error_type_of(error)
    m.completions.inc(1, m.tags("provider", provider, "model", model, "status", status))
    tags = m.tags("provider", provider, "model", model)
    m.completion_duration.observe(seconds, tags)
    prompt = getattr(usage, "prompt_tokens", 0) or 0
    completion = getattr(usage, "completion_tokens", 0) or 0
    if prompt > 0:
        m.input_tokens.inc(prompt, tags)
    if completion > 0:
        m.output_tokens.inc(completion, tags)


@_never_raises
def record_provider_error(provider: str, error_type: str) -> None:
    """One failed provider call (also those a fallback recovered from)."""
    m = _metrics()
    if m is not None:
        m.provider_errors.inc(1, m.tags("provider", m.label(provider),
                                        "error_type", m.label(error_type)))


@_never_raises
def record_memory_search(operation: str, seconds: float) -> None:
    """One memory search (``operation``: 'search' for the API, 'context' for a turn)."""
    m = _metrics()
    if m is not None:
        m.memory_search.observe(seconds, m.tags("operation", m.label(operation)))


@_never_raises
def agent_link_opened() -> None:
    m = _metrics()
    if m is None:
        return
    m.agent_links += 1
    m.agent_connects.inc(1)
    m.agent_connections.set(m.agent_links)


@_never_raises
def agent_link_closed() -> None:
    m = _metrics()
    if m is None:
        return
    m.agent_links = max(0, m.agent_links - 1)
    m.agent_connections.set(m.agent_links)


# --------------------------------------------------------------------------- HTTP middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestMetricsMiddleware:
    """Counts and times every HTTP request and WebSocket session, labelled by the route
    template that served it (``unmatched`` when none did), so label values stay bounded."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            mtype = message["type"]
            if mtype in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
            elif mtype == "websocket.accept":
                status = 101
            elif mtype == "websocket.close" and status == 500:
                status = 403
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = "WS" if kind == "websocket" else scope.get("method", "OTHER")
            record_http(endpoint, method, status, time.perf_counter() - started)
