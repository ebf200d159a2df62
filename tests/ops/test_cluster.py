"""Two Ray nodes on this machine: the graph spreads across them, keeps answering, and losing a
replica of each stateless deployment under load loses no request that had not started streaming."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opskit import STATELESS, Load, Stack, ray_nodes, summary, wait_for, waiting_at

from pacore.db.migrate import upgrade
from pacore.testing.openai_server import OpenAIServer, Scripted

pytestmark = [pytest.mark.serve, pytest.mark.slow]

# Two replicas of each stateless deployment, at most one per node: the spread an operator asks
# for with max_replicas_per_node, so that losing a node never loses a deployment.
TWO_PER_DEPLOYMENT = {name: {"num_replicas": 2, "max_replicas_per_node": 1} for name in STATELESS}
FIRST_TOKEN_S = 1.0
# How long Serve's HAProxy may route to an ingress replica that died before it notices.
PROXY_NOTICE_S = 3.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("ops-cluster")
    upgrade(f"sqlite+aiosqlite:///{data_dir / 'pacore.db'}")
    with OpenAIServer(tokens=12, token_delay_s=0.05, record=False) as upstream, \
            ray_nodes(2, data_dir) as metrics_ports:
        s = Stack(data_dir, upstream, metrics_ports)
        s.deploy(s.config_for(deployments=TWO_PER_DEPLOYMENT, proxy_location="HeadOnly"))
        s.wait_running()
        yield s


def test_graph_spreads_across_both_nodes_and_answers(stack: Stack) -> None:
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    for name in STATELESS:
        nodes = {r["node_id"] for r in stack.replicas(name)}
        assert len(nodes) == 2, (name, nodes)
    token = stack.register()
    with Load(stack.url, token, workers=2) as load:
        wait_for(lambda: load.completed() >= 6, 120, "answers")
    assert {o.result for o in load.outcomes} == {"done"}, summary(load.outcomes)


def test_losing_a_replica_of_each_stateless_deployment_under_load(stack: Stack) -> None:
    import ray

    token = stack.register()
    # The first token comes a second after each request reaches the upstream: at any moment
    # some requests wait for their answer to begin while others stream.
    stack.upstream.script(*[Scripted(delay_s=FIRST_TOKEN_S)] * 1000)
    kills: dict[str, float] = {}
    try:
        with Load(stack.url, token, workers=4, resends=2) as load:
            wait_for(lambda: load.completed() >= 8, 120, "load to flow")
            for name in ("Provider-openai", "Router", "Gateway"):
                victim = ray.get_actor(stack.replicas(name)[0]["actor_name"], namespace="serve")
                wait_for(lambda: load.between_answers(FIRST_TOKEN_S, margin_s=0.4), 30,
                         "requests waiting, none about to be answered", period_s=0.01)
                kills[name] = time.monotonic()
                ray.kill(victim, no_restart=True)
                time.sleep(1.5)
            done = load.completed()
            wait_for(lambda: all(stack.running(n) == 2 for n in STATELESS), 180,
                     "the lost replicas to be replaced")
            wait_for(lambda: load.completed() >= done + 8, 120, "answers after the losses")
    finally:
        stack.upstream.reset()
    outcomes, report = load.outcomes, summary(load.outcomes)
    # Every request still waiting for its answer when a replica died got its answer (a later
    # loss may cut that answer short, which the next assertion covers).
    for name, moment in kills.items():
        waiting = waiting_at(outcomes, moment)
        assert waiting, f"no request was waiting when {name} lost a replica: {report}"
        # Requests inside the lost gateway replica itself were sent again by HAProxy to the
        # other one (test_requests_inside_a_lost_gateway_replica_are_answered_by_the_other).
        assert all(o.streamed for o in waiting), (name, report)
    assert all(o.result == "done" for o in outcomes if not o.streamed), report
    # The proxy learns of a lost ingress replica within moments: requests it sent there in the
    # meantime failed at once with its own 5xx, before any replica took them, and were
    # answered when sent again. Nothing else failed before its answer began.
    failures = [t for o in outcomes for t in o.proxy_failures]
    assert all(0 <= t - kills["Gateway"] < PROXY_NOTICE_S for t in failures), (kills, failures)
    # Streams cut short end with an error event or a closed connection, never a hang.
    assert {o.result for o in outcomes} <= {"done", "error_event", "dropped"}, report
    assert all(o.detail == "service_unavailable" for o in outcomes if o.result == "error_event"), report


def test_requests_inside_a_lost_gateway_replica_are_answered_by_the_other(stack: Stack) -> None:
    """Requests that a gateway replica holds when it dies, none answered yet, are sent again by
    HAProxy to the other replica (retry-on empty-response) and answered: the client never
    sees the loss."""
    import concurrent.futures

    import httpx
    import ray

    def live_gateways() -> list[Any]:
        alive = []
        for replica in stack.replicas("Gateway"):
            try:
                alive.append(ray.get_actor(replica["actor_name"], namespace="serve"))
            except ValueError:  # one lost earlier, which the controller has not yet noticed
                pass
        return alive

    token = stack.register()
    wait_for(lambda: len(live_gateways()) == 2, 180, "two live gateway replicas")
    stack.upstream.script(*[Scripted(delay_s=FIRST_TOKEN_S)] * 100)

    def ask(i: int) -> int:
        r = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                       headers={"authorization": f"Bearer {token}"},
                       json={"model": "openai/loopback-model", "use_memory": False,
                             "messages": [{"role": "user", "content": f"question {i}"}]})
        return r.status_code

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = [pool.submit(ask, i) for i in range(12)]
            time.sleep(FIRST_TOKEN_S / 2)  # every request is inside a gateway, waiting
            ray.kill(live_gateways()[0], no_restart=True)
            statuses = [a.result() for a in answers]
    finally:
        stack.upstream.reset()
    assert statuses == [200] * 12, statuses
