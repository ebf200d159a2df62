"""The runtimes that turn texts into sentence vectors: ONNX Runtime on CPUs, torch elsewhere.

Both read the same sentence-transformers model directory and give the same vectors (the ONNX
export is checked against torch when it is made). On CPUs ONNX Runtime encodes a short query in
about a third of torch's time and keeps torch out of the serving process; torch serves CUDA and
models whose modules the ONNX path does not reproduce.

On the CPU the exported model's matrix multiplications are quantized to int8 by default (once,
per output channel, activations quantized as they come): they hold nearly all of the model's
work and weights, and in int8 a query encodes about twice as fast and a batch about three times.
The quantized model is kept only if its sentence vectors agree with fp32's on a probe set
(cosine similarity ``MIN_INT8_COSINE`` or more for every probe); ``fp32`` keeps the exact ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pacore.errors import PACoreError

__all__ = [
    "MIN_INT8_COSINE",
    "QUANTIZE_VERSION",
    "Backend",
    "OnnxEncoder",
    "Precision",
    "SentenceEncoder",
    "TorchEncoder",
    "load_encoder",
    "onnx_layout",
]

logger = logging.getLogger("pacore.memory")

Backend = Literal["auto", "onnx", "torch"]
Precision = Literal["auto", "fp32", "int8"]

# The int8 model is kept only if every probe's vector is at least this close to fp32's: a broken
# quantization lands far below. Measured against fp32 on 2,188 English sentences: cosine mean
# 0.994, lowest 0.983; the nearest ten of 300 queries were 91% the same ones, and each query
# found its source sentence first about as often (0.90 vs 0.91). One- and two-word replies move
# most ("thanks" 0.968, "ok" 0.974), texts that carry little to search by in either precision.
MIN_INT8_COSINE = 0.97
# Part of the cache key of the quantized file: bump it when the quantization changes.
QUANTIZE_VERSION = 1
_INT8_PROBES = [
    "how do I sort a list in python",
    "a",
    "Die Zugfahrt dauert drei Stunden.",
    "SELECT id, name FROM users WHERE created_at > now() - interval '7 days';",
    "The quarterly report shows revenue up 12% while operating costs fell for the third time.",
    "Please move the meeting to Thursday afternoon if the room is free.",
    "Rust's borrow checker rejects two mutable references to the same value in one scope.",
    "¿Dónde está la estación de tren más cercana?",
]

_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
# sentence-transformers' pooling flags that the ONNX path implements, and what it calls them.
_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
_EXPORT_TIMEOUT_S = 600.0


class SentenceEncoder(Protocol):
    """A loaded model: normalised float32 vectors for texts, and its tokenizer for counting."""

    backend: str
    device: str
    precision: str  # the weights' number format: fp32 or int8
    dimension: int
    max_seq_length: int  # tokens the model reads, its special tokens included

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...

    def new_tokenizer(self) -> Any:
        """A ``tokenizers.Tokenizer`` of the model's, without truncation or padding."""
        ...


class TorchEncoder:
    """sentence-transformers on torch (any model it loads, on any device)."""

    backend = "torch"
    precision = "fp32"

    def __init__(self, path: str, device: str, threads: int | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.device = device
        self._model = SentenceTransformer(path, device=device, local_files_only=True)
        self.dimension = int(self._model.get_embedding_dimension() or 0)
        self.max_seq_length = int(
            self._model.max_seq_length or self._model.tokenizer.model_max_length
        )

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def new_tokenizer(self) -> Any:
        return _bare_copy(self._model.tokenizer.backend_tokenizer)


class OnnxEncoder:
    """The model's transformer in ONNX Runtime, with sentence-transformers' pooling and
    normalisation done in numpy, and its tokenizer from ``tokenizer.json``."""

    backend = "onnx"
    device = "cpu"

    def __init__(
        self,
        model_dir: str,
        onnx_file: str,
        layout: dict[str, Any],
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.precision = precision
        self._pooling: str = layout["pooling"]
        self._lower: bool = layout["lower_case"]
        self.max_seq_length = int(layout["max_seq_length"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads would spin on cores the rest of the graph serves requests with.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            onnx_file, options, providers=["CPUExecutionProvider"]
        )
        self._inputs = [i.name for i in self._session.get_inputs()]
        root = Path(model_dir)
        self._tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.max_seq_length)
        pad_token = _pad_token(root)
        pad_id = self._tokenizer.token_to_id(pad_token)
        self._tokenizer.enable_padding(pad_id=pad_id or 0, pad_token=pad_token)
        self.dimension = int(self.encode(["dimension"], 1).shape[1])

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if self.precision == "int8":
            # int8 activations are scaled by the whole input's range, so companions and padding
            # in a batch would move a text's vector (measured down to cosine 0.95 against the
            # same text alone): one text per run keeps each vector a function of its text only,
            # and costs no speed here (no padding; 433 vs 356 texts/s at batch 64, one thread).
            batch_size = 1
        if self._lower:
            texts = [t.lower() for t in texts]
        # Like sentence-transformers: longest first, so that a batch pads to similar lengths.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        parts = [
            self._encode_batch([texts[i] for i in order[start : start + batch_size]])
            for start in range(0, len(order), batch_size)
        ]
        result = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
        result[order] = np.concatenate(parts)
        return result

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        feed = {name: np.asarray(columns[name], dtype=np.int64) for name in self._inputs}
        hidden = self._session.run(None, feed)[0]
        mask = np.asarray(columns["attention_mask"], dtype=np.float32)[:, :, None]
        if self._pooling == "mean":
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        elif self._pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = np.where(mask > 0, hidden, -1e9).max(axis=1)
        norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return np.asarray(pooled / norms, dtype=np.float32)

    def new_tokenizer(self) -> Any:
        return _bare_copy(self._tokenizer)


def onnx_layout(model_dir: str) -> dict[str, Any] | None:
    """What the ONNX path needs to know of a sentence-transformers directory (pooling, window,
    casing), or None when its modules are not exactly transformer → pooling (→ normalise) with
    a pooling mode it implements, or it has no ``tokenizer.json``."""
    root = Path(model_dir)
    try:
        modules = json.loads((root / "modules.json").read_text())
        config = json.loads((root / "sentence_bert_config.json").read_text())
    except (OSError, ValueError):
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in ([_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE]):
        return None
    if modules[0].get("path") or not (root / "tokenizer.json").is_file():
        return None
    try:
        pooling = json.loads((root / modules[1]["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    chosen = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if len(chosen) != 1 or chosen[0] not in _POOLING_MODES:
        return None
    return {
        "pooling": _POOLING_MODES[chosen[0]],
        "max_seq_length": int(config.get("max_seq_length") or 512),
        "lower_case": bool(config.get("do_lower_case")),
    }


def load_encoder(
    path: str,
    device: str,
    backend: Backend,
    cache_dir: Path,
    threads: int | None = None,
    precision: Precision = "auto",
) -> SentenceEncoder:
    """The encoder for ``path`` on ``device``. ``auto`` is ONNX Runtime on the CPU when the
    model's modules allow it (exported once into ``cache_dir``), torch otherwise or when the
    export fails; ``onnx`` fails rather than fall back. ``precision`` ``auto`` is int8 where
    ONNX Runtime encodes and fp32 elsewhere (and where the int8 model disagrees with fp32);
    ``int8`` fails rather than fall back."""
    if precision == "int8" and (backend == "torch" or device != "cpu"):
        raise PACoreError("int8 embeddings run on the onnx backend on the CPU only",
                          code="embedding_backend_unavailable")
    if backend == "torch" or (backend == "auto" and device != "cpu"):
        return TorchEncoder(path, device, threads)
    if device != "cpu":
        raise PACoreError("the onnx embedding backend runs on the CPU only",
                          code="embedding_backend_unavailable")
    try:
        return _onnx_encoder(path, cache_dir, threads, precision)
    except PACoreError as exc:
        if backend == "onnx" or precision == "int8":
            raise
        logger.warning("embedding on torch: %s", exc.message)
        return TorchEncoder(path, device, threads)


def _onnx_encoder(
    path: str, cache_dir: Path, threads: int | None, precision: Precision
) -> OnnxEncoder:
    layout = onnx_layout(path) if Path(path).is_dir() else None
    if layout is None:
        raise PACoreError(f"the ONNX runtime cannot run the embedding model at {path}",
                          code="embedding_backend_unavailable")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise PACoreError("the onnx embedding backend needs onnxruntime",
                          code="embedding_backend_unavailable") from exc
    target = cache_dir / f"{Path(path).name}-{_digest(path)}.onnx"
    if not target.is_file():
        _export(path, target)
    if precision != "fp32":
        try:
            int8 = _quantized(path, target, layout)
            return OnnxEncoder(path, str(int8), layout, threads, precision="int8")
        except PACoreError as exc:
            if precision == "int8":
                raise
            logger.warning("embedding in fp32: %s", exc.message)
    return OnnxEncoder(path, str(target), layout, threads)


def _quantized(path: str, fp32_file: Path, layout: dict[str, Any]) -> Path:
    """The int8 form of ``fp32_file`` beside it: made once, written under a temporary name and
    renamed into place only when its vectors agree with fp32's, so a cache never holds a
    partial or a wrong one."""
    target = fp32_file.with_name(f"{fp32_file.stem}-int8-v{QUANTIZE_VERSION}.onnx")
    if target.is_file():
        return target
    logger.info("quantizing the embedding model to int8 (once): %s", target)
    fd, name = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    scratch = Path(name)
    try:
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _quantizer_quiet():
                quantize_dynamic(
                    str(fp32_file), str(scratch), weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=["MatMul"],
                )
        except Exception as exc:  # any failure leaves the fp32 model in use
            raise PACoreError(f"quantizing the embedding model to int8 failed: {exc}",
                              code="embedding_backend_unavailable") from exc
        exact = OnnxEncoder(path, str(fp32_file), layout, threads=1).encode(_INT8_PROBES, 16)
        candidate = OnnxEncoder(path, str(scratch), layout, threads=1, precision="int8")
        int8 = candidate.encode(_INT8_PROBES, 16)  # encoded as it will serve: one text per run
        worst = float(np.min(np.sum(exact * int8, axis=1)))
        if worst < MIN_INT8_COSINE:
            raise PACoreError(
                f"the int8 embedding model disagrees with fp32 (cosine {worst:.3f} < "
                f"{MIN_INT8_COSINE})", code="embedding_backend_unavailable",
            )
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    return target


@contextmanager
def _quantizer_quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs to the root logger, a line per tensor and advice meant
    for image models: noise for this one."""

    def drop(record: logging.LogRecord) -> bool:
        return "quantization" not in Path(record.pathname).parts

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _export(path: str, target: Path) -> None:
    logger.info("exporting the embedding model to ONNX (once): %s", target)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pacore.memory.onnx_export", path, str(target)],
            capture_output=True, text=True, timeout=_EXPORT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PACoreError(f"exporting the embedding model to ONNX failed: {exc}",
                          code="embedding_backend_unavailable") from exc
    if done.returncode != 0 or not target.is_file():
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PACoreError(f"exporting the embedding model to ONNX failed: {reason}",
                          code="embedding_backend_unavailable")


def _digest(path: str) -> str:
    """Identifies the exported file: the model's configuration, tokenizer and weights, and the
    export's own version."""
    from pacore.memory.onnx_export import EXPORT_VERSION

    h = hashlib.sha256(f"export-v{EXPORT_VERSION}".encode())
    root = Path(path)
    for name in ("config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin"):
        file = root / name
        if file.is_file():
            h.update(name.encode())
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _pad_token(root: Path) -> str:
    try:
        token = json.loads((root / "tokenizer_config.json").read_text()).get("pad_token")
    except (OSError, ValueError):
        token = None
    if isinstance(token, dict):
        token = token.get("content")
    return str(token or "[PAD]")


def _bare_copy(tokenizer: Any) -> Any:
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy
