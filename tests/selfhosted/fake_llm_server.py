"""A stand-in for Ray Serve LLM's ``LLMServer`` that speaks its handle interface.

``chat`` answers like ``LLMServer.chat``: a streamed request gets batches (lists) of
``data: {json}`` strings ending with a usage event and ``[DONE]``; a whole request gets one
response; a failure gets an error response. The content echoes the requested model and the
multiplexed model id, so tests see how the provider addressed it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel
from ray import serve


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chunk(model: str, content: str | None, finish: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _data(
        {"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
    )


class FakeLLMServer:
    def __init__(self, static_adapters: list[str], dynamic: bool) -> None:
        self._static = static_adapters
        self._dynamic = dynamic

    async def chat(
        self, request: dict[str, Any], raw_request_info: Any = None
    ) -> AsyncIterator[Any]:
        return self._answer(request)

    async def _answer(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        model = request["model"]
        if request["messages"][-1]["content"] == "fail":
            yield ErrorResponse(
                error=ErrorInfo(message="no such thing", type="BadRequestError", code=400)
            )
            return
        words = [f"model={model} ", f"mux={serve.get_multiplexed_model_id() or '-'} ", "done"]
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        if not request["stream"]:
            message = {"role": "assistant", "content": "".join(words)}
            yield {
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
            return
        assert request["stream_options"] == {"include_usage": True}
        yield [_chunk(model, "", None), _chunk(model, words[0])]
        yield [_chunk(model, words[1])]
        yield [
            _chunk(model, words[2], "stop"),
            _data({"model": model, "choices": [], "usage": usage}),
            "data: [DONE]\n\n",
        ]

    async def llm_config(self) -> SimpleNamespace:
        modules = [{"name": name, "path": f"/adapters/{name}"} for name in self._static]
        return SimpleNamespace(
            engine_kwargs={"lora_modules": modules} if modules else {},
            lora_config={"dynamic_lora_loading_path": "s3://b/a"} if self._dynamic else None,
        )

    async def check_health(self) -> None:
        return None
