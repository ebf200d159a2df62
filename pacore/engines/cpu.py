"""The transformers engine: one causal LM on CPU (or CUDA), generating in a worker thread.

``model.generate`` is blocking, so it runs on a thread of the engine's own; tokens come back to
the event loop through a :class:`~transformers.generation.streamers.BaseStreamer` that hands
them over with ``call_soon_threadsafe``. The consumer detokenizes incrementally, applies stop
strings and coalesces every token that is ready into one chunk.

One generation runs at a time per engine: Hugging Face ``generate`` does no continuous batching,
and two generations side by side on the same cores only contend for them (each step of each gets
slower, so both finish later than they would one after the other). Waiting requests queue in
order on an ``asyncio.Lock`` and can be cancelled while they wait; more throughput comes from
more replicas. A consumer that stops reading (a disconnected client) sets a flag that a
``StoppingCriteria`` checks at every step, so the engine is free again one step later.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacore.engines.config import SelfHostedModel
from pacore.errors import BadRequestError, ContextLengthError, NotFoundError, PACoreError
from pacore.types import (
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    FinishReason,
    ImagePart,
    ModelInfo,
    ProviderHealth,
    Usage,
)

if TYPE_CHECKING:
    import torch

__all__ = ["CPUEngine", "EngineStats"]

# Request.extra keys handed to ``generate`` as they are; other keys are for other providers.
_SAMPLING_EXTRAS = ("top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size")
_END = object()


@dataclass
class EngineStats:
    """Counters an operator (or a test) reads to see what the engine has done; the token
    counts are of tokens the model produced, read or not."""

    requests: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    last_generated_tokens: int = 0


@dataclass
class _Job:
    """One prepared generation: the encoded prompt and the arguments for ``generate``."""

    inputs: dict[str, torch.Tensor]
    prompt_tokens: int
    max_new_tokens: int
    sampling: dict[str, Any]
    stop: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)


class CPUEngine:
    """A loaded causal LM and tokenizer that answers :class:`CompletionRequest` objects."""

    def __init__(self, spec: SelfHostedModel, model: Any, tokenizer: Any, device: str) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise BadRequestError(
                f"model '{spec.name}' has no chat template; give one in its tokenizer",
                param="model",
            )
        self.spec = spec
        self.device = device
        self.stats = EngineStats()
        self._model = model
        self._tokenizer = tokenizer
        self._eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self._pad_id = self._eos_ids[0] if pad is None else int(pad)
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gen-{spec.name}")
        self.context_length = spec.context_length or _context_length(model, tokenizer)

    @classmethod
    def load(cls, spec: SelfHostedModel, *, offline: bool = False) -> CPUEngine:
        """Load weights and tokenizer with transformers' own loading code (blocking).

        ``offline`` passes ``local_files_only``: a hub id must then already be in the cache.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = _pick_device(spec.device)
        kwargs = dict(spec.engine_kwargs)
        kwargs.setdefault("dtype", torch.float32 if device == "cpu" else "auto")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                spec.tokenizer or spec.model, local_files_only=offline
            )
            model: Any = AutoModelForCausalLM.from_pretrained(
                spec.model, local_files_only=offline, **kwargs
            )
        except OSError as exc:
            raise NotFoundError(
                f"cannot load model '{spec.name}' from '{spec.model}'", param="model"
            ) from exc
        model.to(device).eval()
        return cls(spec, model, tokenizer, device)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> bool:
        """Whether a generation holds the engine (waiting requests queue behind it)."""
        return self._lock.locked()

    def model_info(self) -> ModelInfo:
        return ModelInfo(id=self.name, context_length=self.context_length, owned_by="self-hosted")

    def health(self) -> ProviderHealth:
        return ProviderHealth(healthy=True, detail=f"{self.name} on {self.device}")

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        parts: list[str] = []
        last = CompletionChunk()
        async for chunk in self.stream(request):
            parts.append(chunk.content)
            last = chunk
        return CompletionResult(
            content="".join(parts),
            finish_reason=last.finish_reason or "stop",
            usage=last.usage or Usage(),
            model=self.name,
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        """Chunks as tokens are generated; the last carries ``finish_reason`` and ``usage``."""
        job = self._prepare(request)
        queue: asyncio.Queue[object] = asyncio.Queue()
        await self._start(job, queue)
        self.stats.requests += 1
        try:
            async for chunk in self._consume(job, queue):
                yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            self.stats.cancelled += 1
            raise
        finally:
            # Whatever ended the stream (done, stop string, consumer gone), stop generating.
            job.cancel.set()

    async def wait_idle(self) -> None:
        """Return once no generation runs and none waits (for draining before shutdown)."""
        async with self._lock:
            pass

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- preparing a request ---------------------------------------------------------------

    def _prepare(self, request: CompletionRequest) -> _Job:
        if request.model not in (None, self.name, self.spec.model):
            raise NotFoundError(f"model '{request.model}' is not served here", param="model")
        if request.tools and request.tool_choice != "none":
            raise BadRequestError(f"model '{self.name}' does not take tools", param="tools")
        inputs = self._encode(request)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        room = self.context_length - prompt_tokens
        if room <= 0:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens; model '{self.name}' takes "
                f"{self.context_length} in all",
                param="messages",
            )
        # Like vLLM: the model's max_tokens is the default and the cap.
        wanted = min(request.max_tokens or self.spec.max_tokens, self.spec.max_tokens)
        return _Job(
            inputs=inputs,
            prompt_tokens=prompt_tokens,
            max_new_tokens=min(wanted, room),
            sampling=_sampling(request),
            stop=[s for s in request.stop or [] if s],
        )

    def _encode(self, request: CompletionRequest) -> dict[str, torch.Tensor]:
        messages = []
        for message in request.messages:
            if not isinstance(message.content, str) and any(
                isinstance(p, ImagePart) for p in message.content
            ):
                raise BadRequestError(f"model '{self.name}' does not take images", param="messages")
            messages.append({"role": message.role, "content": message.text()})
        encoded = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {k: v.to(self.device) for k, v in encoded.items()}

    # -- running it ------------------------------------------------------------------------

    async def _start(self, job: _Job, queue: asyncio.Queue[object]) -> None:
        """Wait for the engine, then start ``generate`` on its thread.

        The lock is released when ``generate`` returns, not when the consumer leaves, so the
        next request never shares the cores with the tail of a cancelled one.
        """
        await self._lock.acquire()
        try:
            loop = asyncio.get_running_loop()
            streamer = _QueueStreamer(loop, queue, job.cancel)
            future = loop.run_in_executor(self._executor, self._generate, job, streamer)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(lambda _: self._lock.release())

    def _generate(self, job: _Job, streamer: _QueueStreamer) -> None:
        from transformers import StoppingCriteriaList

        try:
            self._model.generate(
                **job.inputs,
                streamer=streamer,
                max_new_tokens=job.max_new_tokens,
                stopping_criteria=StoppingCriteriaList([_cancel_criteria(job.cancel)]),
                pad_token_id=self._pad_id,
                **job.sampling,
            )
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised on its loop
            streamer.fail(exc)
        finally:
            self.stats.generated_tokens += streamer.generated
            self.stats.last_generated_tokens = streamer.generated
            streamer.end()

    async def _consume(
        self, job: _Job, queue: asyncio.Queue[object]
    ) -> AsyncIterator[CompletionChunk]:
        detok = _Detokenizer(self._tokenizer)
        stops = _StopMatcher(job.stop)
        generated: list[int] = []
        ended = False
        while not ended:
            batch = [await queue.get()]
            while not queue.empty():  # coalesce everything that is ready into one chunk
                batch.append(queue.get_nowait())
            for item in batch:
                if item is _END:
                    ended = True
                elif isinstance(item, BaseException):
                    raise _generation_error(self.name, item)
                else:
                    assert isinstance(item, list)
                    generated.extend(item)
            text, stopped = stops.feed(
                detok.feed(generated) + (detok.flush(generated) if ended else "")
            )
            if stopped or ended:
                reason = "stop" if stopped else self._finish_reason(generated, job)
                yield self._final(text + ("" if stopped else stops.flush()), reason, job, generated)
                return
            if text:
                yield CompletionChunk(content=text, model=self.name)

    def _finish_reason(self, generated: list[int], job: _Job) -> FinishReason:
        if generated and generated[-1] in self._eos_ids:
            return "stop"
        return "length" if len(generated) >= job.max_new_tokens else "stop"

    def _final(
        self, text: str, reason: FinishReason, job: _Job, generated: list[int]
    ) -> CompletionChunk:
        return CompletionChunk(
            content=text,
            finish_reason=reason,
            usage=Usage.of(job.prompt_tokens, len(generated)),
            model=self.name,
        )


class _QueueStreamer:
    """A ``generate`` streamer that hands token ids to an asyncio queue on another thread."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[object], cancel: threading.Event
    ) -> None:
        self._loop = loop
        self._queue = queue
        self._cancel = cancel
        self._prompt_seen = False
        self.generated = 0

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first echoes the prompt
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.generated += len(ids)
        self._send(ids)

    def end(self) -> None:
        self._send(_END)

    def fail(self, exc: BaseException) -> None:
        self._send(exc)

    def _send(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancel.set()


def _cancel_criteria(cancel: threading.Event) -> Any:
    """A StoppingCriteria that ends generation once ``cancel`` is set."""
    import torch
    from transformers import StoppingCriteria

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.full(
                (input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return _Cancelled()


class _Detokenizer:
    """Incremental detokenization over a sliding window (the approach vLLM and TGI use).

    Text is released only when it does not end in U+FFFD, i.e. when no multi-byte character is
    still waiting for its remaining bytes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def feed(self, ids: list[int]) -> str:
        prefix_text = self._decode(ids[self._prefix : self._read])
        new_text = self._decode(ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self, ids: list[int]) -> str:
        """Whatever is left at the end, incomplete characters included."""
        prefix_text = self._decode(ids[self._prefix : self._read])
        rest = self._decode(ids[self._prefix :])[len(prefix_text) :]
        self._prefix = self._read = len(ids)
        return rest


class _StopMatcher:
    """Applies stop strings to streamed text, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to emit, and whether a stop string was reached."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        keep = max((self._partial(buf, s) for s in self._stops), default=0)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        for k in range(min(len(stop) - 1, len(buf)), 0, -1):
            if buf.endswith(stop[:k]):
                return k
        return 0


def _sampling(request: CompletionRequest) -> dict[str, Any]:
    """``generate`` arguments: 0 means greedy, nothing given means the model's own defaults."""
    kwargs: dict[str, Any] = {k: request.extra[k] for k in _SAMPLING_EXTRAS if k in request.extra}
    if request.temperature == 0:
        kwargs["do_sample"] = False
        return kwargs
    if request.temperature is not None or request.top_p is not None:
        kwargs["do_sample"] = True
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
    return kwargs


def _generation_error(name: str, exc: BaseException) -> PACoreError:
    if isinstance(exc, PACoreError):
        return exc
    if isinstance(exc, ValueError):  # transformers' complaints about the arguments
        err: PACoreError = BadRequestError(f"model '{name}' cannot take these arguments")
    else:
        err = PACoreError(f"model '{name}' failed while generating")
    err.__cause__ = exc
    return err


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None] or [0]


def _context_length(model: Any, tokenizer: Any) -> int:
    length = getattr(model.config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    return int(min(getattr(tokenizer, "model_max_length", 2048), 1 << 20))
