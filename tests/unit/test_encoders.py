"""The embedding runtimes: ONNX Runtime (the CPU default) against torch, on the real MiniLM model."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pacore.errors import PACoreError
from pacore.memory.embedder import Embedder, resolve_model_path
from pacore.memory.encoders import load_encoder, onnx_layout

MODEL_DIR = resolve_model_path("all-MiniLM-L6-v2")
LONG = " ".join(f"sentence {i} talks about topic{i % 7} at some length." for i in range(300))
TEXTS = ["how do I sort a list in python", "a", "Die Zugfahrt dauert drei Stunden.", LONG]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "models"


@pytest.fixture(scope="module")
def onnx(cache: Path) -> Embedder:
    return Embedder(device="cpu", cache_dir=cache)


@pytest.fixture(scope="module")
def torch_embedder() -> Embedder:
    return Embedder(device="cpu", backend="torch")


def _copy_model(tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(MODEL_DIR, copy)
    return copy


def test_onnx_is_the_cpu_default_and_exports_once(onnx: Embedder, cache: Path) -> None:
    assert onnx.backend == "onnx"
    [exported] = list(cache.glob("*.onnx"))
    assert not list(cache.glob("*.tmp"))  # nothing half-written is left behind
    stamp = exported.stat().st_mtime_ns
    again = Embedder(device="cpu", cache_dir=cache)
    assert again.backend == "onnx"
    assert exported.stat().st_mtime_ns == stamp  # the cached export is reused
    assert (cache.stat().st_mode & 0o777) == 0o700


def test_onnx_and_torch_give_the_same_vectors(onnx: Embedder, torch_embedder: Embedder) -> None:
    a, b = onnx.encode(TEXTS), torch_embedder.encode(TEXTS)
    assert a.dtype == np.float32 and a.shape == (4, 384)
    np.testing.assert_allclose(a, b, atol=1e-4)  # the long text truncated the same way too
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # A batch in any order gives each text its own vector.
    np.testing.assert_allclose(onnx.encode(TEXTS[::-1])[::-1], a, atol=1e-5)


def test_onnx_and_torch_count_and_chunk_alike(onnx: Embedder, torch_embedder: Embedder) -> None:
    assert onnx.max_tokens == torch_embedder.max_tokens == 254
    assert onnx.dimension == torch_embedder.dimension == 384
    assert onnx.chunk(LONG) == torch_embedder.chunk(LONG)
    assert onnx.count_tokens(LONG) == torch_embedder.count_tokens(LONG)


def test_the_onnx_embedder_keeps_torch_out_of_the_process(cache: Path) -> None:
    script = (
        "import sys; from pacore.memory.embedder import Embedder; "
        f"e = Embedder(device='cpu', cache_dir={str(cache)!r}); e.encode(['hello']); "
        "print(e.backend, 'torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["onnx", "False", "False"]


def test_layout_reads_pooling_window_and_casing() -> None:
    assert onnx_layout(MODEL_DIR) == {"pooling": "mean", "max_seq_length": 256,
                                      "lower_case": False}


@pytest.mark.parametrize(
    "change",
    [
        "extra_module",
        "weighted_pooling",
        "no_tokenizer_json",
    ],
)
def test_models_the_onnx_path_cannot_reproduce_are_recognised(tmp_path: Path, change: str) -> None:
    model = _copy_model(tmp_path)
    if change == "extra_module":
        modules = json.loads((model / "modules.json").read_text())
        modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                           "type": "sentence_transformers.models.Dense"})
        (model / "modules.json").write_text(json.dumps(modules))
    elif change == "weighted_pooling":
        (model / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 384, "pooling_mode_weightedmean_tokens": True}))
    else:
        (model / "tokenizer.json").unlink()
    assert onnx_layout(str(model)) is None


def test_auto_falls_back_to_torch_and_onnx_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _copy_model(tmp_path)
    (model / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_mean_sqrt_len_tokens": True}))
    with caplog.at_level(logging.WARNING, logger="pacore.memory"):
        encoder = load_encoder(str(model), "cpu", "auto", tmp_path / "cache")
    assert encoder.backend == "torch"
    assert "embedding on torch" in caplog.text
    with pytest.raises(PACoreError) as err:
        load_encoder(str(model), "cpu", "onnx", tmp_path / "cache")
    assert err.value.code == "embedding_backend_unavailable"


def test_a_failed_export_leaves_no_file_and_is_a_clear_error(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    (model / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(PACoreError) as err:
        load_encoder(str(model), "cpu", "onnx", tmp_path / "cache")
    assert err.value.code == "embedding_backend_unavailable"
    assert "export" in err.value.message
    assert not list((tmp_path / "cache").glob("*"))


def test_onnx_on_cuda_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PACoreError) as err:
        load_encoder(MODEL_DIR, "cuda", "onnx", tmp_path)
    assert err.value.code == "embedding_backend_unavailable"
