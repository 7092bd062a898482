"""The export check: the ONNX graph against PyTorch on the same real inputs.

Every mismatch (shape, values) is collected into one message, so a user sees the whole problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgepack.artifacts import HFModel, OnnxModel
from edgepack.errors import UserError
from edgepack.evaluate import run_onnx
from edgepack.families import family_of
from edgepack.prune import is_pruned, load_pruned

# Export vs PyTorch: fp32 kernels differ in summation order; 1e-3 absolute is far above that
# noise and far below any real mismatch (a wrong op or a mis-traced branch gives O(0.1)).
EXPORT_ATOL = 1e-3


def torch_reference(model: HFModel, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """Run the PyTorch model on ONNX-style feeds; the yardstick for the export check."""
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.inference_mode():
        if is_pruned(model.path):
            net = load_pruned(model.path)
            if model.library == "sentence_transformers":
                return net(dict(tensors))[output].numpy()
            return getattr(net(**tensors), output).numpy()
        if model.library == "sentence_transformers":
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(model.path), device="cpu", local_files_only=True)
            return st(dict(tensors))[output].numpy()
        cls = family_of(model.model_type).auto_class(model.task)
        net = cls.from_pretrained(str(model.path), local_files_only=True).eval()
        return getattr(net(**tensors), output).numpy()


def validate(onnx_model: OnnxModel, model: HFModel, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compare ONNX against PyTorch; every mismatch is collected into one message."""
    got = run_onnx(onnx_model.path, [feeds], threads=2)[0]
    want = torch_reference(model, feeds, onnx_model.primary_output)
    problems = []
    if got.shape != want.shape:
        problems.append(f"shape {got.shape} vs PyTorch {want.shape}")
        diff = float("inf")
    else:
        diff = float(np.max(np.abs(got.astype(np.float64) - want)))
        if not np.isfinite(diff) or diff > EXPORT_ATOL:
            problems.append(f"max abs diff {diff:.3g} > {EXPORT_ATOL}")
    if problems:
        raise UserError(
            f"ONNX export of {model.source} does not match PyTorch on "
            f"{onnx_model.primary_output!r}: " + "; ".join(problems)
        )
    return {"max_abs_diff_vs_pytorch": diff, "atol": EXPORT_ATOL, "batch": list(got.shape)}
