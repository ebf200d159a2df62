"""The closed-loop load generator: ``concurrency`` clients, each sending its next request when the
last one is answered, bounded by a request count and a time limit.

It runs in a process of its own so that its CPU is never counted as the system's::

    python -m benchmarks.loadgen --worker     # one JSON cell spec per stdin line, a result each
    python -m benchmarks.loadgen --url http://127.0.0.1:9100/v1/chat/completions -c 16 --stream

A request counts as answered only if it succeeded end to end: HTTP 200 and content for a JSON
answer; for a stream, content chunks and the closing ``[DONE]``. Time to first chunk is the time
to the first chunk that carries content (a role-only opening chunk does not count).

The client is aiohttp: httpx's connection pool stalls for seconds with 64 concurrent requests on
one client (encode/httpx#3215; here ~200 req/s and a 1.6 s p99 against an upstream that aiohttp
drives at several thousand), which would make the load generator, not the system, the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from benchmarks.stats import percentile

__all__ = ["CellResult", "CellSpec", "Sample", "run_cell", "summarize"]

MAX_CONCURRENCY = 1024
MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 3600.0


@dataclass(frozen=True)
class CellSpec:
    """One measurement: where, what, how many clients, and its bounds."""

    url: str
    body: dict[str, Any]
    concurrency: int
    max_requests: int
    duration_s: float
    headers: dict[str, str] = field(default_factory=dict)
    warmup: int = 0
    warmup_s: float = 5.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        host = urlsplit(self.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the load generator only targets loopback, not {host!r}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be within 1..{MAX_CONCURRENCY}")
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            raise ValueError(f"max_requests must be within 1..{MAX_REQUESTS}")
        if not (0 < self.duration_s <= MAX_DURATION_S and 0 < self.warmup_s <= MAX_DURATION_S):
            raise ValueError(f"duration_s and warmup_s must be within 0..{MAX_DURATION_S}")

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(frozen=True)
class Sample:
    """One request: whether it succeeded, how long it took, and (streams) its first chunk."""

    ok: bool
    latency_s: float
    first_chunk_s: float | None = None
    chunks: int = 0
    error: str | None = None


@dataclass(frozen=True)
class CellResult:
    """What one cell measured; latencies in milliseconds over successful requests."""

    ok: int
    errors: int
    warmup: int
    elapsed_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    ttfc_p50_ms: float | None
    ttfc_p99_ms: float | None
    chunks_p50: float | None
    first_error: str | None

    @property
    def sent(self) -> int:
        """Every request that reached the system, the warm-up included (for CPU per request)."""
        return self.ok + self.errors + self.warmup


def summarize(samples: list[Sample], elapsed_s: float, warmup: int) -> CellResult:
    good = [s for s in samples if s.ok]
    bad = [s for s in samples if not s.ok]
    lat = [s.latency_s * 1000 for s in good]
    ttfc = [s.first_chunk_s * 1000 for s in good if s.first_chunk_s is not None]
    return CellResult(
        ok=len(good), errors=len(bad), warmup=warmup, elapsed_s=elapsed_s,
        rps=len(good) / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
        mean_ms=sum(lat) / len(lat) if lat else None,
        ttfc_p50_ms=percentile(ttfc, 50), ttfc_p99_ms=percentile(ttfc, 99),
        chunks_p50=percentile([float(s.chunks) for s in good if s.chunks], 50),
        first_error=bad[0].error if bad else None,
    )


# ---------------------------------------------------------------------------- one request


async def one(session: aiohttp.ClientSession, spec: CellSpec, payload: bytes) -> Sample:
    start = time.perf_counter()
    try:
        async with session.post(spec.url, data=payload) as r:
            if r.status != 200:
                text = (await r.read()).decode("utf-8", "replace")
                return Sample(False, time.perf_counter() - start,
                              error=f"HTTP {r.status}: {text[:150]}")
            if spec.stream:
                return await _streamed(r, start)
            return await _whole(r, start)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"[:200])


async def _whole(r: aiohttp.ClientResponse, start: float) -> Sample:
    raw = await r.read()
    elapsed = time.perf_counter() - start
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return Sample(False, elapsed, error="answer without choices[0].message")
    if not content:
        return Sample(False, elapsed, error="answer without content")
    return Sample(True, elapsed)


async def _streamed(r: aiohttp.ClientResponse, start: float) -> Sample:
    first: float | None = None
    chunks, done = 0, False
    async for raw in r.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        if _has_content(data):
            chunks += 1
            if first is None:
                first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    if not done or not chunks:
        return Sample(False, elapsed, first, chunks, error="stream ended without content or [DONE]")
    return Sample(True, elapsed, first, chunks)


def _has_content(data: bytes) -> bool:
    try:
        event = json.loads(data)
        return bool(event["choices"][0]["delta"].get("content"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False


# ---------------------------------------------------------------------------- one cell


async def run_cell(spec: CellSpec) -> CellResult:
    """Warm up, then run closed-loop clients until ``max_requests`` are sent or time is up."""
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    headers = {"content-type": "application/json", **spec.headers}
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    payload = json.dumps(spec.body).encode()
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=timeout) as session:
        if spec.warmup:
            await _clients(session, spec, payload, spec.warmup, spec.warmup_s, [])
        samples: list[Sample] = []
        t0 = time.perf_counter()
        await _clients(session, spec, payload, spec.max_requests, spec.duration_s, samples)
        elapsed = time.perf_counter() - t0
    return summarize(samples, elapsed, spec.warmup)


async def _clients(
    session: aiohttp.ClientSession, spec: CellSpec, payload: bytes, count: int,
    duration_s: float, samples: list[Sample],
) -> None:
    deadline = time.perf_counter() + duration_s
    issued = 0

    async def loop() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            samples.append(await one(session, spec, payload))

    # Requests under way at the deadline finish within their own timeout; nothing runs longer.
    await asyncio.wait_for(
        asyncio.gather(*(loop() for _ in range(spec.concurrency))),
        timeout=duration_s + spec.timeout_s + 5,
    )


# ---------------------------------------------------------------------------- process modes


def spec_from_json(line: str) -> CellSpec:
    return CellSpec(**json.loads(line))


def result_json(result: CellResult) -> str:
    return json.dumps(asdict(result))


def _run(spec: CellSpec) -> CellResult:
    # uvloop when present (Ray installs it): the client's own overhead stays small next to the
    # systems it measures, which share the machine's cores with it.
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_cell(spec))


def worker() -> None:
    """Answer one cell spec per stdin line with one result line on stdout, until EOF."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = _run(spec_from_json(line))
            print(result_json(result), flush=True)
        except (ValueError, TypeError, TimeoutError) as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="read cell specs from stdin")
    parser.add_argument("--url", help="a chat-completions URL on loopback")
    parser.add_argument("--model", default="loopback-model")
    parser.add_argument("--api-key", default="sk-bench")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=200)
    parser.add_argument("-d", "--duration", type=float, default=10.0)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return
    if not args.url:
        parser.error("--url is required without --worker")
    body = {"model": args.model, "stream": args.stream,
            "messages": [{"role": "user", "content": "Say something short"}]}
    spec = CellSpec(url=args.url, body=body, concurrency=args.concurrency,
                    max_requests=args.requests, duration_s=args.duration,
                    headers={"authorization": f"Bearer {args.api_key}"},
                    warmup=args.concurrency)
    print(result_json(_run(spec)))


if __name__ == "__main__":
    main()
