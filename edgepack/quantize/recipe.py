"""Static int8 (QDQ) quantization of transformer-encoder ONNX exports.

Recipe ("smoothquant-linear-qdq"), measured on all-MiniLM-L6-v2 (see the lab notes in the manifest):

1. ``quant_pre_process`` (ONNX shape inference + constant folding; symbolic shape inference skipped
   because it fails on optimum's BERT graphs).
2. Only the *linear* MatMuls (second input is a 2-D initializer) are quantized. Activation x activation
   MatMuls (Q.K^T, attn.V), LayerNorm, Softmax, GELU/Erf, and residual Adds stay
   fp32. MatMul outputs are not re-quantized, so onnxruntime fuses each DQ->MatMul into
   MatMulIntegerToFloat (int8 GEMM, fp32 result) instead of QLinearMatMul (8-bit output).
3. One streaming calibration pass collects per-input-channel min/max of every linear-MatMul input.
4. SmoothQuant (alpha 0.5) on the LayerNorm-fed inputs (QKV, FFN-in): per input channel j,
   s_j = max|X_j|^a / max|W_j,:|^(1-a); weight rows *= s_j, activation /= s_j via a small Mul (folded
   into a preceding Mul-by-constant when there is one).
5. Outlier split on the post-GELU FFN-out input: the 4 largest-|x| channels go through a tiny fp32
   MatMul on gathered columns; their int8 weight rows are zeroed so the per-tensor range ignores them.
   The side path reads the fp32 tensor, not the quantizer's clipped Q->DQ copy.
   (MiniLM held-out mean cos: plain static 0.9881 -> this recipe 0.9979, min 0.9899.)
6. Per-tensor activation ranges of the smoothed tensors follow exactly from the per-channel stats,
   so no second calibration pass is needed for min-max.
7. Output: QDQ (portable; onnxruntime fuses DQ->MatMul) or, with ``quant_format="ort_fused"``,
   QuantizeLinear -> MatMulIntegerToFloat with the bias Add fused (onnxruntime CPU only).
8. Embedding tables (word, position, token type) weight-only: int8 per row, or 4-bit blocks
   (``embedding_precision``); see embed.py.
9. No intermediate value_info in the output (it makes onnxruntime fuse a slower
   SkipLayerNormalization; measured in ``quantize_static_int8``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import UserError
from edgepack.quantize.embed import find_embedding_gathers, quantize_embeddings
from edgepack.quantize.fused import emit_fused_int8
from edgepack.quantize.graph import (
    apply_smoothing,
    find_linears,
    read_outliers_from_fp32,
    sort_topologically,
    split_outliers,
)
from edgepack.quantize.settings import (
    EMBEDDING_BITS,
    RECIPE,
    QuantSettings,
    check_quant_settings,
)


# ----------------------------------------------------------------------------- calibration
def _channel_stats(
    model: Any,
    tensors: list[str],
    batches: Iterator[dict[str, np.ndarray]],
    work_dir: Path,
    limit: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Streaming per-last-axis-channel min/max of `tensors`; memory is O(channels), not O(batches)."""
    import onnx
    import onnxruntime as ort

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    have = {o.name for o in aug.graph.output}
    for t in tensors:
        if t not in have:
            aug.graph.output.append(onnx.ValueInfoProto(name=t))
    path = work_dir / "calib_augmented.onnx"
    onnx.save(aug, str(path))
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )  # exact fp32 graph semantics
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    mins: dict[str, np.ndarray] = {}
    maxs: dict[str, np.ndarray] = {}
    count = 0
    for feed in batches:
        if limit is not None and count >= limit:
            break
        outs = sess.run(tensors, feed)
        for t, o in zip(tensors, outs, strict=True):
            o = np.asarray(o, dtype=np.float32).reshape(-1, o.shape[-1])
            lo, hi = o.min(0), o.max(0)
            mins[t] = lo if t not in mins else np.minimum(mins[t], lo)
            maxs[t] = hi if t not in maxs else np.maximum(maxs[t], hi)
        count += 1
    if count == 0:
        raise UserError("calibration iterator produced no batches")
    return mins, maxs, count


class _Reader:
    """CalibrationDataReader over a fresh calibration iterator (for the histogram calibrators)."""

    def __init__(self, make: Callable[[], Iterator[dict[str, np.ndarray]]], limit: int | None):
        self.make, self.limit = make, limit
        self.rewind()

    def rewind(self) -> None:
        self.it, self.n = self.make(), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.limit is not None and self.n >= self.limit:
            return None
        self.n += 1
        return next(self.it, None)


def _histogram_ranges(
    model_path: Path,
    tensors: list[str],
    s: QuantSettings,
    calibration: Callable[[], Iterator[dict[str, np.ndarray]]],
    work_dir: Path,
) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[
        s.calibrate_method
    ]
    extra: dict[str, Any] = {"max_intermediate_outputs": 16}  # flush to histograms every 16 batches
    if method == CalibrationMethod.Percentile:
        extra["percentile"] = s.percentile
    cal = create_calibrator(
        model_path,
        ["MatMul", "Mul"],
        augmented_model_path=str(work_dir / "hist_aug.onnx"),
        calibrate_method=method,
        extra_options=extra,
    )
    cal.collect_data(_Reader(calibration, s.max_calibration_batches))
    data = cal.compute_data()
    return {
        t: (float(data.data[t].range_value[0]), float(data.data[t].range_value[1])) for t in tensors
    }


def _quantize_qdq(
    model: Any, to_quant: list[str], ranges: dict[str, tuple[float, float]], s: QuantSettings
) -> Any:
    """QDQ graph via onnxruntime's quantizer with our ranges; MatMul outputs stay fp32."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    tensors_range = TensorsData(
        CalibrationMethod.MinMax,
        {
            t: TensorData(
                lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32)
            )
            for t, (lo, hi) in ranges.items()
        },
    )
    quantizer = QDQQuantizer(
        model,
        s.per_channel,
        s.reduce_range,
        qt[s.weight_type],
        qt[s.activation_type],
        tensors_range,
        to_quant,
        [],
        ["MatMul"],
        {
            # fp32 MatMul output -> onnxruntime fuses DQ->MatMul into MatMulIntegerToFloat
            "OpTypesToExcludeOutputQuantization": ["MatMul"],
            "ActivationSymmetric": s.symmetric_activations,
            "WeightSymmetric": s.weight_type == "int8",
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        },
    )
    quantizer.quantize_model()
    return quantizer.model.model


def quantize_static_int8(
    fp32_model: Path,
    out_model: Path,
    calibration: Callable[[], Iterator[dict[str, np.ndarray]]],
    settings: QuantSettings,
    work_dir: Path,
) -> dict:
    """Quantize `fp32_model` to a static int8 model (QDQ or ort_fused) at `out_model`; returns a
    manifest record.

    Long because it is the recipe's steps in order (the module docstring numbers them); each is a call, kept in one place so the order is visible.
    """
    check_quant_settings(settings)
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_model, out_model, work_dir = Path(fp32_model), Path(out_model), Path(work_dir)
    if not fp32_model.is_file():
        raise UserError(f"fp32 model not found: {fp32_model}")
    work_dir.mkdir(parents=True, exist_ok=True)
    pre = work_dir / "preprocessed.onnx"
    quant_pre_process(str(fp32_model), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    linears, actact = find_linears(model)
    if not linears:
        raise UserError("no MatMul with a constant 2-D weight found: nothing to quantize")
    keep = set(settings.keep_fp32_nodes)
    unknown = keep - {n.name for n in model.graph.node}
    if unknown:
        raise UserError(f"keep_fp32_nodes not in the graph: {sorted(unknown)}")

    inputs = sorted({lin.node.input[0] for lin in linears})
    mins, maxs, nbatches = _channel_stats(
        model, inputs, calibration(), work_dir, settings.max_calibration_batches
    )
    keep_mask, split_log = split_outliers(model, linears, mins, maxs, settings)
    smooth_lins = [lin for lin in linears if lin.node.input[0] not in keep_mask]
    renamed, scales, smooth_log = apply_smoothing(model, smooth_lins, mins, maxs, settings)

    ranges: dict[str, tuple[float, float]] = {}
    for x in inputs:
        out = renamed.get(x, x)
        inv = 1.0 / scales[out] if out in scales else np.ones_like(mins[x])
        mask = keep_mask.get(x, np.ones(mins[x].shape[0], dtype=bool))
        ranges[out] = (float((mins[x] * inv)[mask].min()), float((maxs[x] * inv)[mask].max()))
    if settings.quantize_attention_matmuls:
        attn_t = sorted({i for n in actact for i in n.input})
        a_mins, a_maxs, _ = _channel_stats(
            model, attn_t, calibration(), work_dir, settings.max_calibration_batches
        )
        ranges.update({t: (float(a_mins[t].min()), float(a_maxs[t].max())) for t in attn_t})
    if settings.calibrate_method != "minmax":
        smoothed = work_dir / "smoothed.onnx"
        onnx.save(model, str(smoothed))
        ranges.update(_histogram_ranges(smoothed, sorted(ranges), settings, calibration, work_dir))

    to_quant = [lin.node.name for lin in linears if lin.node.name not in keep]
    if settings.quantize_attention_matmuls:
        to_quant += [n.name for n in actact if n.name not in keep]
    sort_topologically(model.graph)
    if settings.quant_format == "ort_fused":
        by_name = {n.name: n for n in model.graph.node}
        fused_bias = emit_fused_int8(model, [by_name[n] for n in to_quant], ranges, settings)
        qmodel = model
    else:
        qmodel = _quantize_qdq(model, to_quant, ranges, settings)
        read_outliers_from_fp32(qmodel, split_log)
        fused_bias = 0
    skip = {t for t, gs in find_embedding_gathers(qmodel).items() if {n.name for n in gs} & keep}
    embeddings = quantize_embeddings(
        qmodel, EMBEDDING_BITS[settings.embedding_precision], settings.embedding_block_size, skip
    )
    out_model.parent.mkdir(parents=True, exist_ok=True)
    # The intermediate shapes from pre-processing let onnxruntime fuse Add+Add+LayerNormalization
    # into SkipLayerNormalization, whose kernel is ~5x slower than the three ops it replaces
    # (onnxruntime 1.32, AVX512 EPYC: 250 vs 51 us at seq 128); without them MiniLM int8 runs
    # 22.0 -> 20.0 ms at seq 128 (1 thread, interleaved). Shapes stay recomputable by any tool.
    del qmodel.graph.value_info[:]
    sort_topologically(qmodel.graph)
    qmodel.producer_name, qmodel.producer_version = "edgepack.quantize", RECIPE
    data = qmodel.SerializeToString(deterministic=True)
    out_model.write_bytes(data)
    op_type = "MatMulIntegerToFloat" if settings.quant_format == "ort_fused" else "MatMul"

    return {
        "recipe": RECIPE,
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
        },
        "calibration_batches": nbatches,
        "quant_format": settings.quant_format,
        "bias_adds_fused": fused_bias,
        "quantized_nodes": [
            {"name": lin.node.name, "op_type": op_type, "site": lin.site}
            for lin in linears
            if lin.node.name in to_quant
        ]
        + [
            {"name": n.name, "op_type": op_type, "site": "attention_act_x_act"}
            for n in actact
            if n.name in to_quant
        ],
        "kept_fp32": [{"name": n, "reason": "keep_fp32_nodes setting"} for n in sorted(keep)]
        + [
            {"name": n.name, "reason": "activation x activation MatMul (attention); not quantized"}
            for n in actact
            if n.name not in to_quant and n.name not in keep
        ]
        + [
            {"name": t, "reason": "embedding table: keep_fp32_nodes names its Gather"}
            for t in sorted(skip)
        ]
        + [
            {
                "op_type": "LayerNormalization/Softmax/GELU/Add",
                "reason": "non-linear or accuracy-critical ops stay fp32 by design",
            }
        ],
        "embeddings": embeddings,
        "smoothing": smooth_log,
        "outlier_split": split_log,
        "activation_ranges": {t: [lo, hi] for t, (lo, hi) in sorted(ranges.items())},
        "output_sha256": hashlib.sha256(data).hexdigest(),
    }


__all__ = ["quantize_static_int8"]
