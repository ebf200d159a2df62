"""One Ray node running the graph from cluster/serve/production.yaml: the platform's metrics on
Ray's Prometheus endpoint, autoscaling up and back down, replicas draining their streams when
scaled in, and an in-place config upgrade under load."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opskit import STATELESS, Load, Outcome, Stack, ray_nodes, stream_one, summary, wait_for

from pacore.db.migrate import upgrade
from pacore.testing.openai_server import OpenAIServer

pytestmark = [pytest.mark.serve, pytest.mark.slow]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of metric ``name`` in Prometheus text."""
    found = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            found.append({**dict(_LABEL.findall(m.group(2))), "_value": m.group(3)})
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("ops-serve")
    upgrade(f"sqlite+aiosqlite:///{data_dir / 'pacore.db'}")
    with OpenAIServer(tokens=12, token_delay_s=0.05, record=False,
                      models=("loopback-model", "loopback-big")) as upstream, \
            ray_nodes(1, data_dir) as metrics_ports:
        s = Stack(data_dir, upstream, metrics_ports)
        s.deploy(s.config_for())
        s.wait_running()
        yield s


@pytest.fixture(scope="module")
def token(stack: Stack) -> str:
    return stack.register()


def _client(stack: Stack, token: str, read_s: float = 60.0) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"},
                        timeout=httpx.Timeout(10.0, read=read_s))


def _redeploy(stack: Stack, **kwargs: Any) -> None:
    stack.deploy(stack.config_for(**kwargs))
    stack.wait_running()


# --------------------------------------------------------------------------- metrics


def test_metrics_endpoint_exposes_the_platform_metrics(stack: Stack, token: str) -> None:
    with _client(stack, token) as client:
        r = client.post("/v1/complete", json={"prompt": "count to three", "provider": "openai"})
        assert r.status_code == 200, r.text
        stream_one(client, outcome := Outcome(started_at=time.monotonic()))
        assert outcome.result == "done", outcome
        assert client.post("/v1/complete", json={"prompt": "x", "provider": "nope"}).status_code == 404

    expected = {
        "ray_pacore_http_requests_total": {"deployment": "Gateway", "endpoint": "/v1/complete",
                                           "method": "POST", "status": "200"},
        "ray_pacore_http_request_duration_seconds_count": {"endpoint": "/v1/complete"},
        "ray_pacore_errors_total": {"deployment": "Gateway", "error_type": "not_found_error"},
        "ray_pacore_completions_total": {"deployment": "Router", "provider": "openai",
                                         "model": "loopback-model", "status": "ok"},
        "ray_pacore_time_to_first_token_seconds_count": {"provider": "openai"},
        "ray_pacore_completion_duration_seconds_count": {"provider": "openai"},
        "ray_pacore_input_tokens_total": {"provider": "openai", "model": "loopback-model"},
        "ray_pacore_output_tokens_total": {"provider": "openai", "model": "loopback-model"},
    }

    def exported() -> bool:
        text = stack.metrics_text()
        return all(
            any(labels.items() <= s.items() for s in samples(text, name))
            for name, labels in expected.items()
        )

    wait_for(exported, 60, "the platform's metrics on Ray's metrics endpoint", period_s=1)
    text = stack.metrics_text()
    # On the same endpoint as Serve's own metrics, and never labelled with a user.
    assert any(line.startswith("ray_serve_") for line in text.splitlines())
    assert "user_id" not in text
    [ttft] = [s for s in samples(text, "ray_pacore_time_to_first_token_seconds_count")
              if s.get("provider") == "openai"][:1]
    assert float(ttft["_value"]) >= 2


# --------------------------------------------------------------------------- autoscaling


def test_load_scales_a_deployment_up_and_it_comes_back_down(stack: Stack, token: str) -> None:
    autoscaling = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "metrics_interval_s": 0.5, "look_back_period_s": 2,
        "upscale_delay_s": 1, "downscale_delay_s": 3,
    }
    _redeploy(stack, deployments={"Router": {"autoscaling_config": autoscaling}})
    assert stack.running("Router") == 1
    with Load(stack.url, token, workers=4) as load:
        wait_for(lambda: stack.running("Router") == 2, 120, "the Router to scale up", period_s=0.25)
    assert load.completed() > 0
    assert {o.result for o in load.outcomes} == {"done"}, summary(load.outcomes)
    wait_for(lambda: stack.running("Router") == 1, 120, "the Router to scale back down")


# --------------------------------------------------------------------------- graceful drain


def test_replicas_scaled_in_finish_their_streams(stack: Stack, token: str) -> None:
    two = {name: {"num_replicas": 2} for name in STATELESS}
    _redeploy(stack, deployments=two)
    stack.upstream.token_delay_s = 0.3  # each answer streams for about four seconds
    outcomes = [Outcome(started_at=time.monotonic()) for _ in range(8)]
    try:
        with _client(stack, token, read_s=120) as client:
            threads = [threading.Thread(target=stream_one, args=(client, o)) for o in outcomes]
            for t in threads:
                t.start()
            wait_for(lambda: all(o.streamed for o in outcomes), 60, "every stream to begin",
                     period_s=0.05)
            # Scale every stateless deployment in while all eight answers are streaming.
            stack.deploy(stack.config_for())
            wait_for(lambda: _stopping(stack) > 0, 30, "replicas to start draining",
                     period_s=0.05)
            draining_while_streaming = not all(o.ended_at for o in outcomes)
            for t in threads:
                t.join(timeout=120)
    finally:
        stack.upstream.token_delay_s = 0.05
    assert draining_while_streaming
    assert [o.result for o in outcomes] == ["done"] * 8, summary(outcomes)
    assert all(o.chunks >= 1 for o in outcomes)
    stack.wait_running()
    wait_for(lambda: all(len(stack.replicas(n)) == 1 for n in STATELESS), 120,
             "one replica of each")


def _stopping(stack: Stack) -> int:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"]["pacore"]["deployments"]
    return sum(r["state"] == "STOPPING" for name in STATELESS for r in details[name]["replicas"])


# --------------------------------------------------------------------------- in-place upgrade


def test_in_place_upgrade_of_a_provider_setting_under_load_drops_nothing(
    stack: Stack, token: str
) -> None:
    before = {name: {r["actor_name"] for r in stack.replicas(name)} for name in STATELESS}
    with Load(stack.url, token, workers=4) as load:
        wait_for(lambda: load.completed() >= 8, 120, "load to flow")
        # The shared provider's default model and retry setting change: a new `args`, so Serve
        # rolls every replica built from them while the load runs.
        stack.deploy(stack.config_for(provider_options={"retry_base_delay_s": 0.02},
                                      default_model="loopback-big"))
        wait_for(lambda: _rolled(stack, before), 240, "the upgrade to roll every replica")
        stack.wait_running()
        done = load.completed()
        wait_for(lambda: load.completed() >= done + 8, 120, "answers from the new version")
    outcomes = load.outcomes
    assert {o.result for o in outcomes} == {"done"}, [o for o in outcomes if o.result != "done"]
    assert outcomes[0].model == "loopback-model"
    assert {o.model for o in outcomes[-4:]} == {"loopback-big"}


def _rolled(stack: Stack, before: dict[str, set[str]]) -> bool:
    for name in ("Gateway", "Router"):
        now = {r["actor_name"] for r in stack.replicas(name)}
        if not now or now & before[name]:
            return False
    return True
