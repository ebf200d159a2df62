"""The embedding runtimes: ONNX Runtime (the CPU default, int8 unless asked for fp32) against
torch, on the real MiniLM model."""

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
from pacore.memory import encoders
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
    return Embedder(device="cpu", cache_dir=cache, precision="fp32")


@pytest.fixture(scope="module")
def int8(cache: Path, onnx: Embedder) -> Embedder:
    return Embedder(device="cpu", cache_dir=cache)


@pytest.fixture(scope="module")
def torch_embedder() -> Embedder:
    return Embedder(device="cpu", backend="torch")


def _copy_model(tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(MODEL_DIR, copy)
    return copy


def test_onnx_in_int8_is_the_cpu_default_and_each_file_is_made_once(
    int8: Embedder, cache: Path
) -> None:
    assert (int8.backend, int8.precision) == ("onnx", "int8")
    exported, quantized = sorted(cache.glob("*.onnx"), key=lambda f: len(f.name))
    assert quantized.name == f"{exported.stem}-int8-v{encoders.QUANTIZE_VERSION}.onnx"
    import onnx

    ops = {n.op_type for n in onnx.load(str(quantized)).graph.node}
    assert "MatMulInteger" in ops  # the weight multiplications run in int8
    # (the attention's own products, of two activations, stay in fp32)
    assert not list(cache.glob("*.tmp"))  # nothing half-written is left behind
    stamps = [f.stat().st_mtime_ns for f in (exported, quantized)]
    again = Embedder(device="cpu", cache_dir=cache)
    assert (again.backend, again.precision) == ("onnx", "int8")
    assert [f.stat().st_mtime_ns for f in (exported, quantized)] == stamps  # both reused
    assert (cache.stat().st_mode & 0o777) == 0o700


def test_int8_vectors_agree_with_fp32_and_find_the_same_neighbours(
    int8: Embedder, onnx: Embedder
) -> None:
    a, b = int8.encode(TEXTS), onnx.encode(TEXTS)
    assert a.dtype == np.float32 and a.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= encoders.MIN_INT8_COSINE
    # A text's vector depends on the text alone, not on what shares its batch.
    alone = np.stack([int8.encode([t])[0] for t in TEXTS])
    np.testing.assert_array_equal(alone, a)
    np.testing.assert_array_equal(int8.encode(TEXTS[::-1], batch_size=4)[::-1], a)
    docs = [
        "The train to Berlin leaves from platform 4 at 9:15.",
        "Sort a Python list in place with list.sort(key=...).",
        "Our quarterly revenue grew while costs went down.",
        "Bake the bread at 220 degrees for forty minutes.",
        "The firewall only allows outbound connections on port 443.",
    ]
    queries = [
        "when does my train depart",
        "how to order items of a list in python",
        "financial results this quarter",
        "oven temperature for a loaf",
        "which ports can leave the corporate network",
    ]
    for e in (int8, onnx):
        best = np.argmax(e.encode(queries) @ e.encode(docs).T, axis=1)
        assert best.tolist() == list(range(len(queries)))
    # Vectors stored in one precision stay searchable from the other.
    cross = np.argmax(int8.encode(queries) @ onnx.encode(docs).T, axis=1)
    assert cross.tolist() == list(range(len(queries)))


def test_int8_needs_the_onnx_runtime_on_the_cpu(tmp_path: Path) -> None:
    for device, backend in (("cpu", "torch"), ("cuda", "auto")):
        with pytest.raises(PACoreError) as err:
            load_encoder(MODEL_DIR, device, backend, tmp_path, precision="int8")  # type: ignore[arg-type]
        assert err.value.code == "embedding_backend_unavailable"
        assert "int8" in err.value.message


@pytest.mark.parametrize("failure", ["disagrees", "quantizer_fails"])
def test_an_int8_model_that_fails_its_check_is_not_kept(
    tmp_path: Path, cache: Path, onnx: Embedder, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, failure: str,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    [exported] = [f for f in cache.glob("*.onnx") if "-int8-" not in f.name]
    shutil.copy(exported, models / exported.name)  # the fp32 export, as a cache holds it
    if failure == "disagrees":
        monkeypatch.setattr(encoders, "MIN_INT8_COSINE", 1.01)
    else:
        import onnxruntime.quantization

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("unsupported operator")

        monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", broken)
    with caplog.at_level(logging.WARNING, logger="pacore.memory"):
        encoder = load_encoder(MODEL_DIR, "cpu", "auto", models)
    assert (encoder.backend, encoder.precision) == ("onnx", "fp32")
    assert "embedding in fp32" in caplog.text
    assert sorted(f.name for f in models.iterdir()) == [exported.name]  # nothing else written
    np.testing.assert_allclose(encoder.encode(TEXTS, 4), onnx.encode(TEXTS), atol=1e-6)
    with pytest.raises(PACoreError) as err:
        load_encoder(MODEL_DIR, "cpu", "auto", models, precision="int8")
    assert err.value.code == "embedding_backend_unavailable"
    assert sorted(f.name for f in models.iterdir()) == [exported.name]


def test_onnx_and_torch_give_the_same_vectors(onnx: Embedder, torch_embedder: Embedder) -> None:
    assert onnx.precision == torch_embedder.precision == "fp32"
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
        "print(e.backend, e.precision, 'torch' in sys.modules, "
        "'sentence_transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["onnx", "int8", "False", "False"]


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
