"""pacore.metrics without Ray: what each helper records, with which bounded labels, and the
HTTP middleware's route templates. (test_serve_ops.py reads them off Ray's endpoint.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket

import pacore.metrics as pm
from pacore.errors import NotFoundError, RateLimitError
from pacore.types import Usage


class FakeMetric:
    """Records what is recorded, and checks tags as strictly as Ray does."""

    def __init__(self, name: str, description: str = "", *args: Any,
                 tag_keys: tuple[str, ...] = ()) -> None:
        self.name = name
        self.tag_keys = tag_keys
        self.points: list[tuple[float, dict[str, str]]] = []

    def _record(self, value: float, tags: dict[str, str] | None = None) -> None:
        tags = tags or {}
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        assert all(isinstance(v, str) for v in tags.values())
        self.points.append((value, tags))

    inc = observe = set = _record


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, FakeMetric]]:
    from ray.serve import metrics as serve_metrics

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(serve_metrics, kind, FakeMetric)
    instance = pm._Metrics()
    monkeypatch.setattr(pm, "_instance", instance)
    yield instance.by_name


def _values(metric: FakeMetric) -> list[tuple[float, dict[str, str]]]:
    return metric.points


def test_helpers_do_nothing_outside_a_ray_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(pm, "_instance", None)
    assert not ray.is_initialized()
    pm.record_http("/v1/complete", "POST", 200, 0.1)
    pm.record_turn("openai", "gpt", Usage(prompt_tokens=1, completion_tokens=2), 0.2, None)
    pm.record_first_token("openai", "gpt", 0.05)
    pm.record_error("not_found_error")
    pm.record_memory_search("search", 0.01)
    pm.agent_link_opened()
    assert pm._instance is None


def test_a_finished_turn_records_outcome_duration_and_tokens(
    recorded: dict[str, FakeMetric],
) -> None:
    pm.record_first_token("openai", "gpt-4o", 0.12)
    pm.record_turn("openai", "gpt-4o", Usage(prompt_tokens=7, completion_tokens=3), 0.5, None)
    tags = {"provider": "openai", "model": "gpt-4o"}
    assert _values(recorded["pacore_time_to_first_token_seconds"]) == [(0.12, tags)]
    assert _values(recorded["pacore_completions_total"]) == [(1, {**tags, "status": "ok"})]
    assert _values(recorded["pacore_completion_duration_seconds"]) == [(0.5, tags)]
    assert _values(recorded["pacore_input_tokens_total"]) == [(7, tags)]
    assert _values(recorded["pacore_output_tokens_total"]) == [(3, tags)]


def test_a_failed_or_abandoned_turn_is_labelled_by_what_ended_it(
    recorded: dict[str, FakeMetric],
) -> None:
    import asyncio

    pm.record_turn("agent", None, Usage(), 1.0, RateLimitError("slow down"))
    pm.record_turn("openai", "m", Usage(), 1.0, asyncio.CancelledError())
    pm.record_turn("openai", "m", Usage(), 1.0, ValueError("a bug"))
    statuses = [tags["status"] for _, tags in _values(recorded["pacore_completions_total"])]
    assert statuses == ["rate_limit_error", "cancelled", "internal_error"]
    assert _values(recorded["pacore_completions_total"])[0][1]["model"] == "unknown"
    # No usage reported, no tokens counted (Ray refuses non-positive increments).
    assert not _values(recorded["pacore_input_tokens_total"])


def test_model_labels_are_capped_and_tag_dicts_reused(recorded: dict[str, FakeMetric]) -> None:
    for i in range(pm.MAX_MODELS + 10):
        pm.record_first_token("custom", f"model-{i}", 0.1)
    models = [tags["model"] for _, tags in _values(recorded["pacore_time_to_first_token_seconds"])]
    assert len(set(models)) == pm.MAX_MODELS + 1
    assert models[-1] == pm.OTHER
    # The first label sets came before the cap; a long value is cut to a bounded label.
    pm.record_first_token("custom", "x" * 500, 0.1)
    assert _values(recorded["pacore_time_to_first_token_seconds"])[-1][1]["model"] == pm.OTHER
    # The same labels reuse one prepared tag dict rather than building one per call.
    pm.record_first_token("custom", "model-0", 0.1)
    points = _values(recorded["pacore_time_to_first_token_seconds"])
    assert points[-1][1] is points[0][1]


def test_long_label_values_are_cut(recorded: dict[str, FakeMetric]) -> None:
    pm.record_first_token("custom", "x" * 500, 0.1)
    [(_, tags)] = _values(recorded["pacore_time_to_first_token_seconds"])
    assert tags["model"] == "x" * pm.MAX_LABEL_LEN


def test_errors_provider_errors_memory_and_agent_links(recorded: dict[str, FakeMetric]) -> None:
    pm.record_error(NotFoundError("gone").type)
    pm.record_provider_error("anthropic", "upstream_unavailable")
    pm.record_memory_search("context", 0.004)
    pm.agent_link_opened()
    pm.agent_link_opened()
    pm.agent_link_closed()
    assert _values(recorded["pacore_errors_total"]) == [(1, {"error_type": "not_found_error"})]
    assert _values(recorded["pacore_provider_errors_total"]) == [
        (1, {"provider": "anthropic", "error_type": "upstream_unavailable"})
    ]
    assert _values(recorded["pacore_memory_search_duration_seconds"]) == [
        (0.004, {"operation": "context"})
    ]
    assert [v for v, _ in _values(recorded["pacore_agent_connections"])] == [1, 2, 1]
    assert len(_values(recorded["pacore_agent_connects_total"])) == 2


def test_error_type_labels() -> None:
    import asyncio

    assert pm.error_type_of(None) == "none"
    assert pm.error_type_of(NotFoundError("x")) == "not_found_error"
    assert pm.error_type_of(asyncio.CancelledError()) == "cancelled"
    assert pm.error_type_of(GeneratorExit()) == "cancelled"
    assert pm.error_type_of(KeyError("x")) == "internal_error"


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/conversations/{conversation_id}")
    async def conversation(conversation_id: str) -> dict[str, str]:
        return {"id": conversation_id}

    @app.post("/boom")
    async def boom() -> None:
        raise RuntimeError("unhandled")

    @app.websocket("/v1/stream")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    app.add_middleware(pm.RequestMetricsMiddleware)
    return app


async def test_the_middleware_labels_requests_by_route_template(
    recorded: dict[str, FakeMetric],
) -> None:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/v1/conversations/c-123")).status_code == 200
        assert (await client.get("/v1/conversations/c-456")).status_code == 200
        assert (await client.get("/no/such/path")).status_code == 404
        assert (await client.post("/boom")).status_code == 500
    labels = [tags for _, tags in _values(recorded["pacore_http_requests_total"])]
    assert labels == [
        {"endpoint": "/v1/conversations/{conversation_id}", "method": "GET", "status": "200"},
        {"endpoint": "/v1/conversations/{conversation_id}", "method": "GET", "status": "200"},
        {"endpoint": "unmatched", "method": "GET", "status": "404"},
        {"endpoint": "/boom", "method": "POST", "status": "500"},
    ]
    durations = _values(recorded["pacore_http_request_duration_seconds"])
    assert len(durations) == 4 and all(v >= 0 for v, _ in durations)


def test_the_middleware_counts_websocket_sessions(recorded: dict[str, FakeMetric]) -> None:
    from starlette.testclient import TestClient

    with TestClient(_app()) as client, client.websocket_connect("/v1/stream"):
        pass
    [(_, tags)] = _values(recorded["pacore_http_requests_total"])
    assert tags == {"endpoint": "/v1/stream", "method": "WS", "status": "101"}


def test_a_failing_metric_never_fails_the_request(
    recorded: dict[str, FakeMetric], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the metrics agent went away")

    monkeypatch.setattr(recorded["pacore_completions_total"], "inc", broken)
    pm.record_turn("openai", "m", Usage(prompt_tokens=1), 0.1, None)  # does not raise
    pm.record_error("not_found_error")
    assert len(_values(recorded["pacore_errors_total"])) == 1
