"""A whole PA Core graph on a local Ray instance, for tests and benchmarks.

:class:`LocalPlatform` migrates a fresh embedded database in a temporary data directory, starts
Ray and Serve in the platform's fast mode on loopback, deploys ``build_app(args)`` and waits
until ``/health`` answers. It is what ``pacore up`` does, minus the terminal.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["LocalPlatform", "TestUser"]


@dataclass
class TestUser:
    """A registered user and an authenticated client for them."""

    __test__ = False  # not a pytest class

    user_id: str
    email: str
    token: str
    client: httpx.Client

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class LocalPlatform:
    data_dir: Path
    args: dict[str, Any] = field(default_factory=dict)
    num_cpus: int = 2
    ready_timeout_s: float = 240.0
    port: int = 0
    url: str = ""

    def start(self) -> LocalPlatform:
        from pacore.config import PlatformArgs
        from pacore.db.migrate import upgrade
        from pacore.serving import fast_mode_env, free_port

        self.data_dir.mkdir(parents=True, exist_ok=True)
        settings = {**self.args.get("settings", {}), "data_dir": str(self.data_dir)}
        self.args = {**self.args, "settings": settings}
        pargs = PlatformArgs.model_validate(self.args)
        upgrade(pargs.build_settings().resolved_database_url)
        os.environ.update(fast_mode_env("127.0.0.1", self.data_dir))
        self.port = self.port or free_port()

        import ray
        from ray import serve

        from deployments.app import build_app

        if not ray.is_initialized():
            # "local": a Ray instance of its own, even when another one on this machine was
            # started with `ray start` (ray.init would otherwise join that one).
            ray.init(
                address="local", num_cpus=self.num_cpus, include_dashboard=False,
                namespace="pacore-test",
                _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
            )
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(build_app(self.args), name="pacore", route_prefix="/", blocking=False)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise RuntimeError(f"the platform did not become healthy: {last}")

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    def client(self, token: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def register(self, email: str | None = None, password: str = "correct horse battery") -> TestUser:
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        r = httpx.post(
            f"{self.url}/v1/auth/register", json={"email": email, "password": password}, timeout=30
        )
        r.raise_for_status()
        body = r.json()
        return TestUser(body["user_id"], email, body["token"], self.client(body["token"]))
