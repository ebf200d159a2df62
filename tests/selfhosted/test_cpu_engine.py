"""The transformers engine on a tiny local Llama: real loading, generation, streaming, stops."""

from __future__ import annotations

import asyncio

import pytest

from pacore.engines.cpu import CPUEngine
from pacore.errors import BadRequestError, ContextLengthError, NotFoundError
from pacore.types import CompletionRequest, ImagePart, Message, TextPart, ToolDefinition


def _request(**kw: object) -> CompletionRequest:
    kw.setdefault("messages", [Message(role="user", content="Tell me about the quick brown fox.")])
    kw.setdefault("temperature", 0)
    return CompletionRequest(**kw)  # type: ignore[arg-type]


def _clean_substring(text: str, start: int, length: int = 3) -> str | None:
    """A substring of ``text`` at or after ``start`` free of replacement characters."""
    for i in range(start, len(text) - length):
        piece = text[i : i + length]
        if "\ufffd" not in piece and piece.strip():
            return piece
    return None


async def _wait_idle(engine: CPUEngine) -> None:
    await asyncio.wait_for(engine.wait_idle(), 30)


async def test_generates_with_usage(engine: CPUEngine) -> None:
    result = await engine.complete(_request(max_tokens=24))
    assert result.content
    assert result.model == "tiny"
    assert result.usage.prompt_tokens > 5
    assert result.usage.completion_tokens == 24
    assert result.usage.total_tokens == result.usage.prompt_tokens + 24
    assert result.finish_reason == "length"


async def test_greedy_is_deterministic_and_stream_matches_complete(engine: CPUEngine) -> None:
    first = await engine.complete(_request(max_tokens=30))
    chunks = [c async for c in engine.stream(_request(max_tokens=30))]
    assert "".join(c.content for c in chunks) == first.content
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == first.usage


async def test_chunks_arrive_while_generating(engine: CPUEngine) -> None:
    stream = engine.stream(_request(max_tokens=2000))
    first = await anext(stream)
    assert first.finish_reason is None
    assert engine.busy  # the model is still generating when the first text is out
    await stream.aclose()


async def test_max_tokens_caps_completion(engine: CPUEngine) -> None:
    result = await engine.complete(_request(max_tokens=3))
    assert result.usage.completion_tokens == 3
    assert result.finish_reason == "length"


async def test_model_max_tokens_is_default_and_cap(engine: CPUEngine) -> None:
    engine.spec = engine.spec.model_copy(update={"max_tokens": 5})
    assert (await engine.complete(_request(max_tokens=None))).usage.completion_tokens == 5
    assert (await engine.complete(_request(max_tokens=50))).usage.completion_tokens == 5


async def test_stop_string_ends_the_answer_before_it(engine: CPUEngine) -> None:
    full = (await engine.complete(_request(max_tokens=40))).content
    stop = _clean_substring(full, 4)
    assert stop is not None, f"no usable stop string in {full!r}"
    cut = full[: full.index(stop)]
    streamed = [c async for c in engine.stream(_request(max_tokens=40, stop=[stop]))]
    text = "".join(c.content for c in streamed)
    assert text == cut
    assert stop not in text
    assert streamed[-1].finish_reason == "stop"
    assert streamed[-1].usage is not None
    assert streamed[-1].usage.completion_tokens < 40


async def test_sampling_parameters_are_accepted(engine: CPUEngine) -> None:
    result = await engine.complete(
        _request(temperature=0.8, top_p=0.9, max_tokens=8, extra={"top_k": 20})
    )
    assert result.usage.completion_tokens == 8


async def test_cancelling_a_stream_stops_generation(engine: CPUEngine) -> None:
    stream = engine.stream(_request(max_tokens=3000))
    await anext(stream)
    await stream.aclose()
    await _wait_idle(engine)
    assert engine.stats.cancelled == 1
    assert engine.stats.last_generated_tokens < 3000
    # The engine is free for the next request.
    assert (await engine.complete(_request(max_tokens=4))).usage.completion_tokens == 4


async def test_cancelling_the_consumer_task_stops_generation(engine: CPUEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(_request(max_tokens=3000)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(engine)
    assert engine.stats.last_generated_tokens < 3000


async def test_concurrent_requests_run_one_at_a_time(engine: CPUEngine) -> None:
    alone = await engine.complete(_request(max_tokens=20))
    both = await asyncio.gather(*(engine.complete(_request(max_tokens=20)) for _ in range(3)))
    assert [r.content for r in both] == [alone.content] * 3
    assert engine.stats.requests == 4


async def test_prompt_longer_than_context_is_rejected(engine: CPUEngine) -> None:
    engine.context_length = 16
    with pytest.raises(ContextLengthError):
        await engine.complete(_request())


async def test_completion_is_clamped_to_the_context(engine: CPUEngine) -> None:
    prompt = (await engine.complete(_request(max_tokens=1))).usage.prompt_tokens
    engine.context_length = prompt + 3
    result = await engine.complete(_request(max_tokens=50))
    assert result.usage.completion_tokens == 3
    assert result.finish_reason == "length"


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"model": "other"}, NotFoundError),
        ({"tools": [ToolDefinition(name="f")]}, BadRequestError),
        (
            {
                "messages": [
                    Message(
                        role="user", content=[TextPart(text="hi"), ImagePart(url="http://x/y.png")]
                    )
                ]
            },
            BadRequestError,
        ),
    ],
)
async def test_bad_requests(
    engine: CPUEngine, kw: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await engine.complete(_request(**kw))
    assert not engine.busy


async def test_model_named_by_path_or_name_is_accepted(engine: CPUEngine) -> None:
    for model in ("tiny", engine.spec.model):
        assert (
            await engine.complete(_request(model=model, max_tokens=2))
        ).usage.completion_tokens == 2


def test_missing_model_directory_is_not_found(tmp_path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    spec = tiny_spec.model_copy(update={"model": str(tmp_path / "absent")})
    with pytest.raises(NotFoundError):
        CPUEngine.load(spec, offline=True)


def test_model_info_and_health(engine: CPUEngine) -> None:
    info = engine.model_info()
    assert info.id == "tiny"
    assert info.context_length == 4096
    assert engine.health().healthy
