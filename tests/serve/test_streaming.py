"""Streaming end to end: a client that leaves cancels the upstream call, a provider that fails
mid-stream ends the stream with an error event, and a self-hosted CPU model streams through the
whole graph to the official openai client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from openai import OpenAI

from pacore.testing.openai_server import OpenAIServer, Scripted

pytestmark = pytest.mark.serve


def test_client_disconnect_cancels_upstream(platform, user):
    """A long answer (200 tokens, 50 ms apart: 10 s) whose client leaves after the first chunk:
    the upstream sees its connection dropped long before the answer would have ended."""
    with OpenAIServer(tokens=200, token_delay_s=0.05) as slow:
        r = user.client.put("/v1/providers/slow", json={
            "kind": "custom", "base_url": slow.base_url, "default_model": "loopback-model",
        })
        assert r.status_code == 200, r.text

        async def leave_after_first_chunk() -> float:
            async with httpx.AsyncClient(base_url=platform.url, headers=user.headers,
                                         timeout=30) as c:
                body = {"prompt": "a long answer please", "stream": True, "use_memory": False,
                        "provider": "slow"}
                async with c.stream("POST", "/v1/complete", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return time.monotonic()  # the client goes away mid-answer
            raise AssertionError("no chunk arrived")

        left = asyncio.run(leave_after_first_chunk())
        assert asyncio.run(slow.wait_for_disconnects(1, timeout_s=8))
        assert time.monotonic() - left < 8  # well before the 10 s the answer would take


def test_provider_failure_mid_stream_is_an_error_event(platform, user_with_upstream, upstream):
    upstream.script(Scripted(error_after=2, message="upstream fell over"))
    started = time.monotonic()
    r = user_with_upstream.client.post(
        "/v1/complete", json={"prompt": "hello", "stream": True, "use_memory": False}
    )
    assert r.status_code == 200
    events = [b for b in r.text.strip().split("\n\n") if b]
    assert events[0].startswith("event: chunk")
    last = events[-1]
    assert last.startswith("event: error")
    error = json.loads(last.split("data: ", 1)[1])["error"]
    assert error["type"] in ("upstream_error", "service_unavailable")
    assert time.monotonic() - started < 30  # ended, never hung


def test_openai_stream_mid_failure_raises_in_client(platform, user_with_upstream, upstream):
    import openai

    upstream.script(Scripted(truncate_after=2))
    client = OpenAI(base_url=f"{platform.url}/v1", api_key=user_with_upstream.token,
                    max_retries=0)
    stream = client.chat.completions.create(
        model="openai/loopback-model", messages=[{"role": "user", "content": "hi"}],
        stream=True, extra_body={"use_memory": False},
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_cpu_model_streams_through_the_graph(platform, user):
    """The tiny random-weight Llama served by the CPU engine, reached with the openai client."""
    client = OpenAI(base_url=f"{platform.url}/v1", api_key=user.token, max_retries=0)
    assert "cpu/tiny" in {m.id for m in client.models.list()}
    stream = client.chat.completions.create(
        model="cpu/tiny", messages=[{"role": "user", "content": "hello tiny model"}],
        stream=True, max_tokens=12, stream_options={"include_usage": True},
        extra_body={"use_memory": False},
    )
    chunks = list(stream)
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 12
    whole = client.chat.completions.create(
        model="cpu/tiny", messages=[{"role": "user", "content": "again"}], max_tokens=5,
        extra_body={"use_memory": False},
    )
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.model == "cpu/tiny"
