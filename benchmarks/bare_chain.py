"""The bare Ray Serve chain: ingress → router → provider, each hop only forwarding bytes.

It has the depth of PA Core's hot path, the same deployment options and the same Serve mode
(throughput-optimized with HAProxy on the public port), and no logic: whatever PA Core adds
above it is PA Core's own cost, and what it adds above a direct call is the floor of any Ray
Serve design on the machine. Run as a process of its own; it prints ``BARE_URL=<url>`` once it
answers and stops cleanly on SIGINT or SIGTERM::

    python -m benchmarks.bare_chain --port 8010 --upstream http://127.0.0.1:9100/v1 --data-dir D
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve.handle import DeploymentHandle

__all__ = ["BareIngress", "BareProvider", "BareRouter", "build_app", "main"]

APP_NAME = "bare"
CHAT_PATH = "/v1/chat/completions"
READY_TIMEOUT_S = 300.0
# The one thing the ingress must know about a body; a byte search, not a parse, keeps it a floor.
_STREAM = re.compile(rb'"stream"\s*:\s*true')


class BareProvider:
    """Posts the request body to the upstream and hands back its bytes.

    Its client is aiohttp, the fastest at hand here: httpx's pool stalls at high concurrency
    (encode/httpx#3215), and a floor must not carry a cost that a design can choose away.
    """

    def __init__(self, upstream: str, api_key: str) -> None:
        self.url = upstream.rstrip("/") + "/chat/completions"
        self.headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the loop that serves requests.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=60.0),
            )
        return self._session

    async def complete(self, body: bytes) -> tuple[int, bytes]:
        async with self._client().post(self.url, data=body) as r:
            return r.status, await r.read()

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        async with self._client().post(self.url, data=body) as r:
            async for piece in r.content.iter_any():
                yield piece


class BareRouter:
    """Passes each request on to the provider and each answer back."""

    def __init__(self, provider: DeploymentHandle) -> None:
        self.provider = provider

    async def complete(self, body: bytes) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await self.provider.complete.remote(body)
        return result

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        pieces: Any = self.provider.options(stream=True).stream.remote(body)
        async for piece in pieces:
            yield piece


class BareIngress:
    """The HTTP ingress: the raw body in, the upstream's bytes out, no validation."""

    def __init__(self, router: DeploymentHandle) -> None:
        self.router = router

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        async def health() -> JSONResponse:
            return JSONResponse({"status": "ok"})

        @app.post(CHAT_PATH)
        async def chat(request: Request) -> Response:
            body = await request.body()
            if _STREAM.search(body):
                pieces: Any = self.router.options(stream=True).stream.remote(body)
                return StreamingResponse(pieces, media_type="text/event-stream")
            status, content = await self.router.complete.remote(body)
            return Response(content, status_code=status, media_type="application/json")

        return app


def build_app(upstream: str, api_key: str) -> Any:
    """The three deployments bound with PA Core's own options for the hops they stand in for."""
    from ray import serve

    from deployments.gateway import GatewayDeployment
    from deployments.providers import ProviderDeployment
    from deployments.router import RouterDeployment

    def deploy(cls: type, name: str, options: dict[str, Any]) -> Any:
        return serve.deployment(cls, name=name, **options)

    provider = deploy(BareProvider, "BareProvider", ProviderDeployment.DEFAULT_OPTIONS)
    router = deploy(BareRouter, "BareRouter", RouterDeployment.DEFAULT_OPTIONS)
    ingress = deploy(serve.ingress()(BareIngress), "BareIngress", GatewayDeployment.DEFAULT_OPTIONS)
    return ingress.bind(router.bind(provider.bind(upstream, api_key)))


def serve_chain(port: int, upstream: str, api_key: str, data_dir: Path) -> None:
    """Start Ray the way ``pacore up`` does, deploy the chain, print its URL, wait for a signal."""
    import os

    from pacore.serving import fast_mode_env

    host = "127.0.0.1"
    os.environ.update(fast_mode_env(host, data_dir))
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, namespace="pacore-bench",
             logging_level=logging.WARNING, log_to_driver=False, _node_ip_address=host)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(upstream, api_key), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        _wait_healthy(url)
        print(f"BARE_URL={url}", flush=True)
        _wait_for_signal()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the bare chain did not answer on {url} in {READY_TIMEOUT_S:.0f} s")


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop["now"]:
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_chain",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's OpenAI base URL")
    parser.add_argument("--api-key", default="sk-bench")
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    serve_chain(args.port, args.upstream, args.api_key, args.data_dir)


if __name__ == "__main__":
    # Deploy the classes from their importable module, not from __main__, so that replicas
    # import them by name instead of receiving pickled copies.
    from benchmarks import bare_chain

    bare_chain.main()
