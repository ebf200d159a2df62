"""The OpenAI-compatible API: chat completions, models and embeddings, for existing clients."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from deployments import _handles
from deployments.deps import CurrentUser, Gateway
from deployments.framing import openai_chunk, tool_call_dicts
from deployments.gateway import check_rate
from deployments.turns import OpenTurn, open_turn, run_whole
from pacore.errors import BadRequestError, NotFoundError, PACoreError
from pacore.metrics import record_error
from pacore.orchestrator import TurnRequest
from pacore.protocol import (
    ChatCompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    content_parts_from_openai,
)
from pacore.types import Message, ToolCall

router = APIRouter(prefix="/v1", tags=["openai"])
logger = logging.getLogger("pacore.gateway")

_PASSTHROUGH = ("seed", "response_format", "frequency_penalty", "presence_penalty", "logit_bias",
                "parallel_tool_calls", "user")


def _turn(body: ChatCompletionRequest) -> TurnRequest:
    messages = [_message(m) for m in body.messages]
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    tool_choice: str | None
    if isinstance(body.tool_choice, dict):
        tool_choice = str(body.tool_choice.get("function", {}).get("name") or "auto")
    else:
        tool_choice = body.tool_choice
    extra = {k: getattr(body, k) for k in _PASSTHROUGH if getattr(body, k, None) is not None}
    return TurnRequest(
        messages=messages, model=body.model, conversation_id=body.conversation_id,
        use_memory=body.use_memory, temperature=body.temperature, top_p=body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens, stop=stop,
        tools=body.tool_definitions(), tool_choice=tool_choice, tags=body.tags, extra=extra,
        agent_tools=body.agent_tools, stream=body.stream,
    )


def _message(m: Any) -> Message:
    role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
    calls = None
    if m.tool_calls:
        calls = [
            ToolCall(
                id=c.get("id", ""), name=c.get("function", {}).get("name", ""),
                arguments=c.get("function", {}).get("arguments") or "{}",
            )
            for c in m.tool_calls
        ]
    return Message(
        role=role, content=content_parts_from_openai(m.content), name=m.name,
        tool_calls=calls, tool_call_id=m.tool_call_id,
    )


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, user: CurrentUser, gw: Gateway) -> Any:
    check_rate(gw, user.user_id)
    if not any(m.content or m.tool_calls for m in body.messages):
        raise BadRequestError("messages must not be empty", param="messages")
    turn = _turn(body)
    if body.stream:
        opened = await open_turn(gw, user.user_id, turn)
        model = f"{opened.started.provider}/{opened.started.model or ''}".rstrip("/")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _openai_stream(opened, model, include_usage), media_type="text/event-stream",
            headers={"cache-control": "no-cache",
                     "x-pacore-conversation-id": opened.started.conversation_id},
        )
    started, content, done = await run_whole(gw, user.user_id, turn)
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if done.tool_calls:
        message["tool_calls"] = tool_call_dicts(done.tool_calls)
    return JSONResponse(
        {
            "id": done.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": f"{done.provider}/{done.model}",
            "choices": [
                {"index": 0, "message": message, "finish_reason": done.finish_reason,
                 "logprobs": None}
            ],
            "usage": done.usage.model_dump(),
        },
        headers={"x-pacore-conversation-id": started.conversation_id},
    )


async def _openai_stream(opened: OpenTurn, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    cid, created = opened.started.id, int(time.time())
    try:
        yield openai_chunk(cid, created, model, role=True)
        async for chunk in opened.chunks():
            yield openai_chunk(cid, created, model, chunk=chunk)
        done = opened.done
        assert done is not None
        yield openai_chunk(cid, created, model, finish_reason=done.finish_reason)
        if include_usage:
            yield openai_chunk(
                cid, created, model, usage=done.usage.model_dump(), empty_choices=True
            )
        yield b"data: [DONE]\n\n"
    except PACoreError as exc:
        yield _error_frame(exc)
    except Exception:
        logger.exception("stream failed")
        yield _error_frame(PACoreError("internal error"))
    finally:
        await opened.aclose()


def _error_frame(exc: PACoreError) -> bytes:
    import json

    record_error(exc.type)
    return f"data: {json.dumps(exc.to_wire())}\n\n".encode()


@router.get("/models", response_model=ModelList)
async def models(user: CurrentUser, gw: Gateway) -> ModelList:
    found = await _handles.call(gw.router, "models", user.user_id)
    cards = [ModelCard(id="auto", owned_by="pacore")]
    cards += [ModelCard(id=m.id, owned_by=m.provider) for m in found]
    return ModelList(data=cards)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, user: CurrentUser, gw: Gateway) -> Any:
    check_rate(gw, user.user_id)
    if gw.embedder is None:
        raise NotFoundError("embeddings are not enabled on this deployment")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise BadRequestError("input must be a non-empty string or list of strings", param="input")
    if len(texts) > 2048:
        raise BadRequestError("at most 2048 inputs per request", param="input")
    vectors, counts = await asyncio.gather(
        _handles.call(gw.embedder, "embed", texts), _handles.call(gw.embedder, "count_tokens", texts)
    )
    tokens = sum(counts)
    if body.dimensions is not None and body.dimensions != len(vectors[0]):
        raise BadRequestError(
            f"this model produces {len(vectors[0])} dimensions", param="dimensions"
        )
    data = []
    for i, v in enumerate(vectors):
        emb: Any = (
            base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode()
            if body.encoding_format == "base64" else list(v)
        )
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": gw.settings.embedding_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
