"""Exports a sentence-transformers model's transformer to ONNX, checked against torch's output.

Run as ``python -m pacore.memory.onnx_export MODEL_DIR OUT_FILE``: the Embedder starts it as a
child process, so that the serving process never imports torch. The file is written beside
``OUT_FILE`` first and renamed into place only once ONNX Runtime reproduces torch's hidden
states for a probe batch, so a cache never holds a partial or wrong export.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["EXPORT_VERSION", "export", "main"]

# Part of the cache key: bump it when the export itself changes.
EXPORT_VERSION = 1
_OPSET = 17
_TOLERANCE = 1e-3
# A padded batch, so that the check covers the attention mask as well as the weights.
_PROBES = ["how do I sort a list in python", "a short one", "Die Zugfahrt dauert drei Stunden."]


def export(model_dir: str, out_file: str) -> None:
    """Export ``model_dir``'s transformer (inputs: the tokenizer's ids, mask and, where the model
    takes them, token types; output: the last hidden state) to ``out_file``."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # Eager attention traces into plain ONNX operators that any runtime version can fuse.
    model = AutoModel.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager"
    ).eval()
    batch = tokenizer(_PROBES, padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    with torch.inference_mode():
        expected = model(**batch).last_hidden_state.numpy()

    class _Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, inputs, strict=True))).last_hidden_state

    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.onnx.export(
            _Hidden(), tuple(batch[n] for n in names), tmp, input_names=names,
            output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=_OPSET,
            dynamo=False,
        )
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = session.run(None, {n: batch[n].numpy() for n in names})[0]
        diff = float(np.abs(got - expected).max())
        if diff > _TOLERANCE:
            raise RuntimeError(f"the ONNX export differs from torch by {diff:.2e}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacore.memory.onnx_export")
    parser.add_argument("model_dir")
    parser.add_argument("out_file")
    args = parser.parse_args(argv)
    try:
        export(args.model_dir, args.out_file)
    except Exception as exc:  # noqa: BLE001 - the parent reads the reason from stderr
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
