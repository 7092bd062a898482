"""Graph choices the int8 recipe makes for onnxruntime's speed, checked on onnxruntime's own
optimized graph of a tiny model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgepack.quantize import QuantSettings
from edgepack.quantize.recipe import quantize_static_int8


def _optimized_ops(model: Path, tmp: Path) -> Counter:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / f"{model.stem}-optimized.onnx")
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _feeds(n: int):
    rng = np.random.default_rng(0)
    for _ in range(n):
        ids = rng.integers(5, 60, size=(2, 16)).astype(np.int64)
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}


@pytest.mark.parametrize("fmt", ["qdq", "ort_fused"])
def test_no_skip_layer_norm_fusion(tiny_bert: Path, tmp_path: Path, fmt: str) -> None:
    """onnxruntime 1.32's SkipLayerNormalization is ~5x slower than the Add, Add, LayerNormalization
    it replaces; it only fuses when the graph carries intermediate shapes, which the recipe drops.
    The control (the QDQ graph with shapes inferred) must fuse, or the test proves nothing; ONNX
    shape inference knows no com.microsoft ops, so ort_fused graphs have no control."""
    import onnx
    from optimum.exporters.onnx import main_export

    main_export(str(tiny_bert), output=str(tmp_path / "fp32"), task="feature-extraction",
                library_name="transformers", no_post_process=True, do_validation=False)  # fmt: skip
    fp32 = tmp_path / "fp32" / "model.onnx"
    out = tmp_path / "q.onnx"
    settings = QuantSettings(quant_format=fmt)
    quantize_static_int8(fp32, out, lambda: _feeds(4), settings, tmp_path / "w")
    model = onnx.load(str(out))
    assert not model.graph.value_info
    ops = _optimized_ops(out, tmp_path)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] >= 4
    if fmt != "qdq":
        return
    control = tmp_path / "with-shapes.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(model), str(control))
    assert _optimized_ops(control, tmp_path)["SkipLayerNormalization"] > 0
