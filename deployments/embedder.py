"""The Embedder deployment: one loaded model per replica, concurrent calls batched with ``serve.batch``."""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from ray import serve

from pacore.config import Settings
from pacore.errors import BadRequestError
from pacore.logs import to_replica_log
from pacore.memory.embedder import Embedder, Vector

__all__ = ["DEFAULT_OPTIONS", "EmbedderDeployment", "EncodeTurns", "gpu_options", "options_for"]

# A replica is CPU-bound while it encodes; a quarter of a CPU as its reservation keeps the graph
# schedulable on a 2-core laptop (the model still uses every core torch gives it). Requests are
# many small ones, and batching needs them in the replica at once: max_ongoing_requests covers
# several full batches.
DEFAULT_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.25},
    "max_ongoing_requests": 256,
    "autoscaling_config": {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 64,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
    },
}


def gpu_options(num_gpus: float = 1.0) -> dict[str, Any]:
    """The options for replicas that embed on a GPU (one replica per GPU share)."""
    options = copy.deepcopy(DEFAULT_OPTIONS)
    options["ray_actor_options"]["num_gpus"] = num_gpus
    options["ray_actor_options"]["num_cpus"] = 1
    return options


def options_for(settings: Settings) -> dict[str, Any]:
    """GPU options when the settings ask for CUDA, the CPU defaults otherwise."""
    if settings.embedding_device == "cuda":
        return gpu_options()
    return copy.deepcopy(DEFAULT_OPTIONS)


class EmbedderDeployment:
    """Embeds texts for the Router (query classification), Memory (indexing, search) and the
    OpenAI-compatible ``/v1/embeddings``.

    Every text travels through one ``serve.batch`` queue: a call with one text and a call with
    a hundred both become items of the next batch, so many concurrent small calls are encoded
    together. The decorator is applied to the bound method in the constructor, which gives each
    instance its own queue (bound to the event loop it first runs on) and lets the batch size
    and wait come from the settings.
    """

    def __init__(
        self, settings: Settings | dict[str, Any] | None = None, *, embedder: Embedder | None = None
    ) -> None:
        if not isinstance(settings, Settings):
            settings = Settings(**(settings or {}))
        self.settings = settings
        to_replica_log(settings.log_level)
        self.embedder = embedder or Embedder.from_settings(settings, threads=_reserved_cores())
        # Two queues, one model: queries (someone is waiting for the answer) and documents
        # (memory indexing, off every response path). Batches take turns on the model, and a
        # waiting query batch always goes before a waiting document batch.
        self._turns = EncodeTurns()
        batching = serve.batch(
            max_batch_size=settings.embedding_batch_size,
            batch_wait_timeout_s=settings.embedding_batch_wait_s,
        )
        self._encode_one = batching(self._encode_query_batch)
        self._encode_document = batching(self._encode_document_batch)

    DEFAULT_OPTIONS = DEFAULT_OPTIONS
    options_for = staticmethod(options_for)

    def set_max_batch_size(self, size: int) -> None:
        for batched in (self._encode_one, self._encode_document):
            batched.set_max_batch_size(size)  # type: ignore[attr-defined]

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        for batched in (self._encode_one, self._encode_document):
            batched.set_batch_wait_timeout_s(seconds)  # type: ignore[attr-defined]

    async def _encode_query_batch(self, texts: list[str]) -> list[Vector]:
        async with self._turns.turn(urgent=True):
            return await self._encode(texts)

    async def _encode_document_batch(self, texts: list[str]) -> list[Vector]:
        async with self._turns.turn(urgent=False):
            return await self._encode(texts)

    async def _encode(self, texts: list[str]) -> list[Vector]:
        arr = await asyncio.to_thread(self.embedder.encode, texts, len(texts))
        vectors: list[Vector] = arr.tolist()
        return vectors

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One normalised vector per text (a text longer than the model's window is truncated)."""
        return list(await asyncio.gather(*(self._encode_one(t) for t in _texts(texts))))

    async def embed_documents(self, texts: list[str]) -> list[list[list[float]]]:
        """Each text cut into the model's windows, one vector per window."""
        return [[v for _, v in cs] for cs in await self.embed_chunks(texts)]

    async def embed_chunks(self, texts: list[str]) -> list[list[tuple[str, list[float]]]]:
        """Each text's windows with their vectors (what the memory index stores)."""
        checked = _texts(texts)
        chunks = await asyncio.to_thread(lambda: [self.embedder.chunk(t) for t in checked])
        flat = iter(
            await asyncio.gather(*(self._encode_document(c) for cs in chunks for c in cs))
        )
        return [[(c, next(flat)) for c in cs] for cs in chunks]

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model counts them (for usage reports and budgets)."""
        checked = _texts(texts)
        return await asyncio.to_thread(lambda: [self.embedder.count_tokens(t) for t in checked])

    async def ping(self) -> None:
        """Health probe: the model loaded with the replica, so a replica that answers is ready."""

    async def info(self) -> dict[str, Any]:
        e = self.embedder
        return {
            "model": e.model_name,
            "dimension": e.dimension,
            "max_tokens": e.max_tokens,
            "device": e.device,
            "backend": e.backend,
            "precision": e.precision,
        }


class EncodeTurns:
    """One batch on the model at a time; among those waiting, urgent ones first, then in order
    of arrival."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    @asynccontextmanager
    async def turn(self, *, urgent: bool) -> AsyncIterator[None]:
        if self._busy:
            granted = asyncio.get_running_loop().create_future()
            self._waiting[urgent].append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._hand_over()  # the turn came as the caller left: pass it on
                raise
        self._busy = True
        try:
            yield
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        for urgent in (True, False):
            queue = self._waiting[urgent]
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # still busy: the turn passes to the waiter
                    return
        self._busy = False


def _reserved_cores() -> int | None:
    """Encode with as many threads as the replica reserved cores (at least one). Torch and ONNX
    Runtime would start one per core of the machine, and idle threads spin: on a small machine
    they burn the cores the rest of the graph serves requests with (twice the CPU per encode on
    2 cores for a fraction of the speed-up). None outside Ray: the runtime's own default."""
    import ray

    if not ray.is_initialized():
        return None
    reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return max(1, int(reserved))


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise BadRequestError("input must be a list of strings", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise BadRequestError("input must be a list of strings", param="input")
    return list(texts)
