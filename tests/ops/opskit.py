"""What the operations tests share: the cluster files, Ray instances they start themselves (one
node, or two on this machine), the graph deployed from a Serve config, and bounded load."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from pacore.serving import fast_mode_env, free_port
from pacore.testing.openai_server import OpenAIServer

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
PRODUCTION = CLUSTER / "serve" / "production.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
APP = "pacore"
UPSTREAM_KEY_ENV = "PACORE_OPS_UPSTREAM_KEY"
STATELESS = ("Gateway", "Router", "Provider-openai")

# What a test machine changes for itself; the rest is the production environment. Replicas stay
# reachable for one second, not thirty, once they start draining (no load balancer to wait for).
TEST_ENV = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    "RAY_SERVE_HAPROXY_RETRIES": "6",
    UPSTREAM_KEY_ENV: "sk-ops-loopback",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def production_env() -> dict[str, str]:
    """The plain (non-secret) environment rayservice.yaml gives every Ray container."""
    service = load_yaml(RAYSERVICE)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    return {e["name"]: e["value"] for e in head["containers"][0]["env"] if "value" in e}


def local_config(
    upstream: OpenAIServer,
    data_dir: Path,
    port: int,
    deployments: dict[str, dict[str, Any]] | None = None,
    provider_options: dict[str, Any] | None = None,
    proxy_location: str = "EveryNode",
    default_model: str = "loopback-model",
) -> dict[str, Any]:
    """cluster/serve/production.yaml made to run here: the embedded database, no memory or
    agents, one provider kind (the loopback upstream as the shared provider), tiny CPU
    reservations, one replica each; every other option (graceful shutdown, surge) as shipped.
    ``deployments`` overrides options per deployment."""
    config = copy.deepcopy(load_yaml(PRODUCTION))
    config["proxy_location"] = proxy_location
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["logging_config"]["log_level"] = "WARNING"
    app = config["applications"][0]
    app["args"] = {
        "settings": {"mode": "embedded", "data_dir": str(data_dir), "rate_limit_per_minute": 0},
        "provider_kinds": ["openai"],
        "shared_providers": [{
            "name": "openai", "kind": "openai", "api_key_env": UPSTREAM_KEY_ENV,
            "base_url": upstream.base_url, "default_model": default_model,
            "options": provider_options or {"retry_base_delay_s": 0.01},
        }],
        "memory": False,
        "agents": False,
    }
    kept = []
    for entry in app["deployments"]:
        if entry["name"] not in STATELESS:
            continue
        entry["ray_actor_options"] = {"num_cpus": 0.05}
        # A fixed count needs autoscaling switched off explicitly: Serve keeps the code's
        # autoscaling_config (which then wins over num_replicas) unless the config nulls it.
        entry["autoscaling_config"] = None
        entry["num_replicas"] = 1
        for key, value in (deployments or {}).get(entry["name"], {}).items():
            entry[key] = value
        if entry["autoscaling_config"] is not None:
            entry.pop("num_replicas")
        kept.append(entry)
    app["deployments"] = kept
    return config


# --------------------------------------------------------------------------- Ray instances


@contextlib.contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in os.environ (read by the Ray processes started inside), restored after."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _node_args(metrics_port: int) -> dict[str, Any]:
    # The nodes keep the host's address: a driver joining an existing instance always dials
    # it there (ray.init turns a loopback address into the host's). Clients still reach the
    # graph on 127.0.0.1, where the proxy listens.
    return {"num_cpus": 1, "metrics_export_port": metrics_port}


@contextlib.contextmanager
def ray_nodes(count: int, data_dir: Path) -> Iterator[list[int]]:
    """A Ray instance of ``count`` nodes on this machine, in the production environment
    (Serve's fast mode included); yields each node's metrics port. Stops only what it started."""
    import ray

    production = production_env()
    production.pop("RAY_SERVE_HAPROXY_BINARY_PATH")  # the image's path; here this install's
    env = {**fast_mode_env("127.0.0.1", data_dir), **production, **TEST_ENV}
    ports = [free_port() for _ in range(count)]
    system_config = {"metrics_report_interval_ms": 1000}
    with environment(env):
        cluster = None
        if count == 1:
            ray.init(
                num_cpus=2, include_dashboard=False, namespace="pacore-ops",
                _node_ip_address="127.0.0.1", _metrics_export_port=ports[0],
                _system_config=system_config, logging_level="WARNING",
            )
        else:
            from ray.cluster_utils import Cluster

            cluster = Cluster(
                initialize_head=True,
                head_node_args={**_node_args(ports[0]), "_system_config": system_config,
                                "include_dashboard": False},
            )
            for port in ports[1:]:
                cluster.add_node(**_node_args(port))
            ray.init(address=cluster.address, namespace="pacore-ops", logging_level="WARNING")
            cluster.wait_for_nodes()
        try:
            yield ports
        finally:
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                if cluster is not None:
                    cluster.shutdown()


# --------------------------------------------------------------------------- the deployed graph


@dataclass
class Stack:
    """The graph deployed from a Serve config (as `serve deploy` and KubeRay do) and what tests
    need to watch it."""

    data_dir: Path
    upstream: OpenAIServer
    metrics_ports: list[int]
    port: int = field(default_factory=free_port)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_for(self, **kwargs: Any) -> dict[str, Any]:
        return local_config(self.upstream, self.data_dir, self.port, **kwargs)

    def deploy(self, config: dict[str, Any]) -> None:
        """What the dashboard's PUT /api/serve/applications/ does with the config."""
        from ray.serve._private.api import serve_start
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(config)
        client = serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
            grpc_options=schema.grpc_options.model_dump(),
        )
        client.deploy_apps(schema)
        self.config = config

    def wait_running(self, timeout_s: float = 300.0) -> None:
        """Until the application runs every replica it asked for and /health answers."""
        from ray import serve

        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            app = serve.status().applications.get(APP)
            if app is not None and app.status == "RUNNING" and self._healthy():
                return
            last = app.status if app is not None else "absent"
            time.sleep(0.5)
        raise AssertionError(f"the application did not reach RUNNING: {last}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def running(self, deployment: str) -> int:
        from ray import serve

        states = serve.status().applications[APP].deployments[deployment].replica_states
        return int(states.get("RUNNING", 0))

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        """The RUNNING replicas of ``deployment`` (actor name, node id, pid, …)."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        app = details["applications"].get(APP, {})
        # A deployment briefly leaves the details while a new config is being applied.
        found = app.get("deployments", {}).get(deployment, {}).get("replicas", [])
        return [r for r in found if r["state"] == "RUNNING"]

    def register(self) -> str:
        email = f"ops-{uuid.uuid4().hex[:10]}@example.com"
        r = httpx.post(f"{self.url}/v1/auth/register",
                       json={"email": email, "password": "correct horse battery"}, timeout=60)
        r.raise_for_status()
        return str(r.json()["token"])

    def metrics_text(self) -> str:
        return "\n".join(
            httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text
            for p in self.metrics_ports
        )


def wait_for(check: Any, timeout_s: float, what: str, period_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(period_s)


# --------------------------------------------------------------------------- load


@dataclass
class Outcome:
    """One streamed completion as its client saw it."""

    started_at: float
    responded_at: float | None = None  # the stream's 200 and headers arrived
    ended_at: float | None = None
    chunks: int = 0
    model: str | None = None
    result: str = "pending"  # done | error_event | http_<status> | dropped | hang
    detail: str = ""
    proxy_failures: list[float] = field(default_factory=list)

    @property
    def streamed(self) -> bool:
        return self.responded_at is not None


class Load:
    """``workers`` threads, each streaming native completions back to back until stopped."""

    def __init__(
        self, url: str, token: str, workers: int, read_timeout_s: float = 60.0, resends: int = 0
    ) -> None:
        self.url = url
        self.token = token
        self.read_timeout_s = read_timeout_s
        self.resends = resends
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"ops-load-{i}", daemon=True)
            for i in range(workers)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.read_timeout_s + 30)

    def completed(self) -> int:
        with self._lock:
            return sum(o.result == "done" for o in self.outcomes)

    def in_flight(self) -> int:
        with self._lock:
            return sum(o.result == "pending" for o in self.outcomes)

    def between_answers(self, first_token_s: float, margin_s: float) -> bool:
        """Whether some requests wait for their answer and none of them is about to get its
        first byte (each was sent less than ``first_token_s - margin_s`` ago), so that a
        failure injected now hits requests that have clearly not started streaming."""
        now = time.monotonic()
        with self._lock:
            waiting = [o for o in self.outcomes if o.result == "pending" and not o.streamed]
        return bool(waiting) and all(now - o.started_at < first_token_s - margin_s
                                     for o in waiting)

    def _run(self) -> None:
        timeout = httpx.Timeout(10.0, read=self.read_timeout_s)
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=timeout) as client:
            while not self._stop.is_set():
                outcome = Outcome(started_at=time.monotonic())
                with self._lock:
                    self.outcomes.append(outcome)
                stream_one(client, outcome, self.resends)


PROXY_ERROR = "Internal Server Error"  # the body Serve's HAProxy answers its own 5xx with


def stream_one(client: httpx.Client, outcome: Outcome, resends: int = 0) -> None:
    """One streamed completion. With ``resends``, a request the proxy itself failed (its
    plain-text 5xx: no replica took the request) is sent again, as OpenAI-compatible clients
    do; each such failure's time is kept in ``outcome.proxy_failures``."""
    for _ in range(resends + 1):
        _attempt(client, outcome)
        if not (outcome.result.startswith("http_5") and outcome.detail == PROXY_ERROR):
            return
        outcome.proxy_failures.append(outcome.ended_at or time.monotonic())
        outcome.result, outcome.detail = "pending", ""


def _attempt(client: httpx.Client, outcome: Outcome) -> None:
    body = {"prompt": "stream please", "provider": "openai", "stream": True}
    try:
        with client.stream("POST", "/v1/complete", json=body) as r:
            if r.status_code != 200:
                r.read()
                outcome.result, outcome.detail = f"http_{r.status_code}", r.text[:200]
                return
            outcome.responded_at = time.monotonic()
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "chunk":
                        outcome.chunks += 1
                    elif event == "done":
                        outcome.result = "done"
                        outcome.model = json.loads(line[6:]).get("model")
                    elif event == "error":
                        outcome.result = "error_event"
                        outcome.detail = json.loads(line[6:])["error"]["type"]
            if outcome.result == "pending":
                outcome.result = "dropped"
    except httpx.ReadTimeout:
        outcome.result = "hang"
    except httpx.HTTPError as exc:
        outcome.result, outcome.detail = "dropped", type(exc).__name__
    finally:
        outcome.ended_at = time.monotonic()


def waiting_at(outcomes: list[Outcome], moment: float) -> list[Outcome]:
    """The requests that had been sent but not answered yet at ``moment``."""
    return [
        o for o in outcomes
        if o.started_at < moment and (o.responded_at or o.ended_at or moment + 1) > moment
    ]


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.result}{'' if o.streamed else ' (before streaming)'}"
        counts[key] = counts.get(key, 0) + 1
    return counts
