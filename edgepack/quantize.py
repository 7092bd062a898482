"""Static int8 (QDQ) quantization of transformer-encoder ONNX exports.

Recipe ("smoothquant-linear-qdq"), measured on all-MiniLM-L6-v2 (see the lab notes in the manifest):

1. ``quant_pre_process`` (ONNX shape inference + constant folding; symbolic shape inference skipped
   because it fails on optimum's BERT graphs).
2. Only the *linear* MatMuls (second input is a 2-D initializer) are quantized. Activation x activation
   MatMuls (Q.K^T, attn.V), LayerNorm, Softmax, GELU/Erf, residual Adds and the embedding Gather stay
   fp32. MatMul outputs are not re-quantized, so onnxruntime fuses each DQ->MatMul into
   MatMulIntegerToFloat (int8 GEMM, fp32 result) instead of QLinearMatMul (8-bit output).
3. One streaming calibration pass collects per-input-channel min/max of every linear-MatMul input.
4. SmoothQuant (alpha 0.5) on the LayerNorm-fed inputs (QKV, FFN-in): per input channel j,
   s_j = max|X_j|^a / max|W_j,:|^(1-a); weight rows *= s_j, activation /= s_j via a small Mul (folded
   into a preceding Mul-by-constant when there is one).
4b. Outlier split on the post-GELU FFN-out input: the 4 largest-|x| channels go through a tiny fp32
   MatMul on gathered columns; their int8 weight rows are zeroed so the per-tensor range ignores them.
   (MiniLM held-out mean cos: plain static 0.9881 -> this recipe 0.9952.)
5. Per-tensor activation ranges of the smoothed tensors follow exactly from the per-channel stats,
   so no second calibration pass is needed for min-max.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from edgepack.errors import UserError
except ImportError:  # pragma: no cover - edgepack/errors.py is owned by another engineer

    class UserError(Exception):  # type: ignore[no-redef]
        """Fallback until edgepack.errors lands; same contract (bad user settings)."""


RECIPE = "smoothquant-linear-qdq/v1"
_ACT_TYPES = ("uint8", "int8")
_WEIGHT_TYPES = ("int8", "uint8")
_METHODS = ("minmax", "entropy", "percentile")
_SITES = ("qkv", "attn_out", "ffn_in", "ffn_out", "other")


@dataclass(frozen=True)
class QuantSettings:
    activation_type: str = "uint8"  # "uint8" | "int8"; uint8 asymmetric fits post-GELU (>= -0.17)
    weight_type: str = (
        "int8"  # "int8" | "uint8"; symmetric int8 per channel is what MLAS is fastest on
    )
    per_channel: bool = True  # per output column weight scales; per-tensor loses ~0.01 cosine
    reduce_range: bool = (
        False  # x86 AVX2 without VNNI wants True (7-bit weights avoid u8*s8 saturation)
    )
    calibrate_method: str = (
        "minmax"  # "minmax" | "entropy" | "percentile"; min-max measured best here
    )
    # SmoothQuant migration strength a in [0, 1]; 0 disables smoothing. BERT-style encoders have a few
    # outlier channels (LayerNorm outputs up to 30x the median channel, post-GELU up to 16x); per-tensor
    # activation scales waste most of the 8 bits on them unless they are moved into the weights.
    smooth_alpha: float = 0.5
    # Which linear-MatMul input groups get smoothed (structural roles found in the graph). Measured on
    # MiniLM (held-out mean cos, static baseline 0.9881): ffn_in 0.9931, +qkv 0.9940; smoothing ffn_out
    # HURTS (0.9779: the post-GELU negative tail -0.17/s_j blows up the range) -> split it instead.
    smooth_sites: tuple[str, ...] = ("qkv", "ffn_in")
    # LLM.int8()-style outlier split: the k input channels with the largest calibrated |x| of each
    # linear in `outlier_sites` are computed by a small fp32 MatMul on the gathered columns; their
    # weight rows are zeroed in the int8 MatMul, so the per-tensor activation range excludes them
    # (those channels may saturate harmlessly). Sites that are split are not smoothed.
    # Measured: smooth(qkv, ffn_in) + split 4 ffn_out channels -> 0.9952 (16 channels: 0.9948).
    outlier_channels: int = 4
    outlier_sites: tuple[str, ...] = ("ffn_out",)
    # Quantize activation x activation MatMuls (Q.K^T, attn.V) too. Off: they cost fidelity and the
    # softmax output (range [0, 1], mostly ~0) is badly served by 8-bit per-tensor scales.
    quantize_attention_matmuls: bool = False
    # Node names to keep in fp32 (e.g. picked by measured sensitivity on a dev set).
    keep_fp32_nodes: tuple[str, ...] = ()
    percentile: float = 99.999  # only for calibrate_method="percentile"
    max_calibration_batches: int | None = None  # cap on batches taken from the calibration iterator
    symmetric_activations: bool = (
        False  # zero-point fixed at 0; only sensible with activation_type="int8"
    )


def _validate(s: QuantSettings) -> None:
    if s.activation_type not in _ACT_TYPES:
        raise UserError(f"activation_type must be one of {_ACT_TYPES}, got {s.activation_type!r}")
    if s.weight_type not in _WEIGHT_TYPES:
        raise UserError(f"weight_type must be one of {_WEIGHT_TYPES}, got {s.weight_type!r}")
    if s.calibrate_method not in _METHODS:
        raise UserError(f"calibrate_method must be one of {_METHODS}, got {s.calibrate_method!r}")
    if not 0.0 <= s.smooth_alpha <= 1.0:
        raise UserError(f"smooth_alpha must be in [0, 1], got {s.smooth_alpha}")
    bad = [x for x in s.smooth_sites if x not in _SITES]
    if bad:
        raise UserError(f"unknown smooth_sites {bad}; allowed: {_SITES}")
    if not 0.0 < s.percentile <= 100.0:
        raise UserError(f"percentile must be in (0, 100], got {s.percentile}")
    if s.outlier_channels < 0:
        raise UserError("outlier_channels must be >= 0")
    bad = [x for x in s.outlier_sites if x not in _SITES]
    if bad:
        raise UserError(f"unknown outlier_sites {bad}; allowed: {_SITES}")
    if s.max_calibration_batches is not None and s.max_calibration_batches < 1:
        raise UserError("max_calibration_batches must be >= 1 or None")
    if s.activation_type == "uint8" and s.weight_type == "uint8":
        raise UserError(
            "uint8 activations with uint8 weights is not supported by onnxruntime's CPU kernels"
        )


# ----------------------------------------------------------------------------- graph analysis
@dataclass
class _Linear:
    node: Any  # onnx.NodeProto (MatMul)
    weight: str  # initializer name, shape [K, N]
    site: str  # structural role


def _gelu_fed(model: Any, tensor: str, producers: dict[str, Any]) -> bool:
    """True if `tensor` is the output of a GELU: a Gelu/FastGelu op or a Mul chain containing Erf/Tanh."""
    seen, stack = set(), [(tensor, 0)]
    while stack:
        name, depth = stack.pop()
        node = producers.get(name)
        if node is None or depth > 4 or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Gelu", "FastGelu", "BiasGelu", "Erf", "Tanh"):
            return True
        if node.op_type in ("Mul", "Add"):
            stack.extend((i, depth + 1) for i in node.input)
    return False


def _analyse(model: Any) -> tuple[list[_Linear], list[Any]]:
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    linears: list[_Linear] = []
    actact: list[Any] = []
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        w = inits.get(n.input[1])
        if w is None or len(w.dims) != 2:
            actact.append(n)
            continue
        linears.append(_Linear(n, w.name, "other"))
    # Roles: a tensor feeding >= 3 linears is the QKV input; a GELU-fed one is the FFN output dense;
    # a linear whose output feeds (after its bias Add) a GELU is the FFN input dense; a linear fed from
    # the attention context (an act x act MatMul within 3 hops) is the attention output dense.
    consumers: dict[str, int] = {}
    for lin in linears:
        consumers[lin.node.input[0]] = consumers.get(lin.node.input[0], 0) + 1
    act_outs = {o for n in actact for o in n.output}
    for lin in linears:
        x = lin.node.input[0]
        if _gelu_fed(model, x, producers):
            lin.site = "ffn_out"
            continue
        if consumers[x] >= 3:
            lin.site = "qkv"
            continue
        hop, frontier = 0, [x]
        while hop < 3 and lin.site == "other":
            nxt = []
            for t in frontier:
                if t in act_outs:
                    lin.site = "attn_out"
                p = producers.get(t)
                if p is not None and p.op_type in ("Reshape", "Transpose"):
                    nxt.append(p.input[0])
            frontier, hop = nxt, hop + 1
    consumers_of: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers_of.setdefault(i, []).append(n)
    for lin in linears:
        if lin.site != "other":
            continue
        frontier = [lin.node.output[0]]
        for _ in range(3):  # output -> (bias Add) -> (Div/Mul) -> Erf / Gelu ?
            nxt = [n for t in frontier for n in consumers_of.get(t, [])]
            if any(n.op_type in ("Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh") for n in nxt):
                lin.site = "ffn_in"
                break
            frontier = [o for n in nxt if n.op_type in ("Add", "Div", "Mul") for o in n.output]
    return linears, actact


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


# ----------------------------------------------------------------------------- smoothing surgery
def _smooth(
    model: Any,
    linears: list[_Linear],
    mins: dict[str, np.ndarray],
    maxs: dict[str, np.ndarray],
    s: QuantSettings,
) -> tuple[dict[str, str], dict[str, np.ndarray], list[dict[str, Any]]]:
    """Apply SmoothQuant in place. Returns (old input -> new input tensor, per-tensor channel scales, log)."""
    from onnx import numpy_helper as nh

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    groups: dict[str, list[_Linear]] = {}
    for lin in linears:
        groups.setdefault(lin.node.input[0], []).append(lin)
    renamed: dict[str, str] = {}
    scales: dict[str, np.ndarray] = {}
    log: list[dict[str, Any]] = []
    if s.smooth_alpha == 0.0:
        return renamed, scales, log
    all_consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            all_consumers[i] = all_consumers.get(i, 0) + 1
    for x in sorted(groups):
        lins = groups[x]
        if not any(lin.site in s.smooth_sites for lin in lins):
            continue
        ws = [nh.to_array(inits[lin.weight]) for lin in lins]
        if any(w.dtype != np.float32 or w.shape[0] != maxs[x].shape[0] for w in ws):
            continue
        if len({lin.weight for lin in lins}) != len(lins):
            continue  # a weight shared by several MatMuls: skip, scaling it twice would be wrong
        act = np.maximum(np.abs(mins[x]), np.abs(maxs[x])).astype(np.float64)
        wmax = np.max(np.stack([np.abs(w).max(1) for w in ws]), 0).astype(np.float64)
        sc = np.power(np.maximum(act, 1e-5), s.smooth_alpha) / np.power(
            np.maximum(wmax, 1e-5), 1 - s.smooth_alpha
        )
        sc = np.clip(sc, 1e-4, 1e4).astype(np.float32)
        for lin, w in zip(lins, ws, strict=True):
            inits[lin.weight].CopyFrom(
                nh.from_array((w * sc[:, None]).astype(np.float32), lin.weight)
            )
        inv = (1.0 / sc).astype(np.float32)
        prod = producers.get(x)
        const = None
        if prod is not None and prod.op_type == "Mul" and all_consumers.get(x, 0) == len(lins):
            const = next(
                (i for i in prod.input if i in inits and int(np.prod(inits[i].dims)) == 1), None
            )
        base = (lins[0].node.name or x).replace("/", "_").strip("_")
        if const is not None:  # fold 1/s into the constant of the producing Mul (free)
            new = f"{base}_smooth_folded"
            cval = float(nh.to_array(inits[const]).reshape(-1)[0])
            model.graph.initializer.append(nh.from_array((cval * inv).astype(np.float32), new))
            prod.input[list(prod.input).index(const)] = new
            how, out = "folded_into_producer_mul", x
        else:  # insert x' = x * (1/s) in front of the linears only
            new, out = f"{base}_smooth_inv_scale", f"{base}_smoothed"
            model.graph.initializer.append(nh.from_array(inv, new))
            import onnx

            mul = onnx.helper.make_node("Mul", [x, new], [out], name=f"{base}_smooth_mul")
            idx = next(i for i, n in enumerate(model.graph.node) if n is lins[0].node)
            model.graph.node.insert(idx, mul)
            for lin in lins:
                lin.node.input[0] = out
            renamed[x] = out
            how = "inserted_mul"
        scales[out] = sc
        log.append(
            {
                "tensor": x,
                "site": sorted({lin.site for lin in lins}),
                "how": how,
                "act_absmax": float(act.max()),
                "act_absmax_median": float(np.median(act)),
                "scale_min": float(sc.min()),
                "scale_max": float(sc.max()),
            }
        )
    return renamed, scales, log


def _split_outliers(
    model: Any,
    linears: list[_Linear],
    mins: dict[str, np.ndarray],
    maxs: dict[str, np.ndarray],
    s: QuantSettings,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Move the top-k |x| input channels of each selected linear to an fp32 side MatMul (in place).

    Returns {input tensor: boolean mask of channels that stay in the int8 path} and a log."""
    import onnx
    from onnx import numpy_helper as nh

    keep_mask: dict[str, np.ndarray] = {}
    log: list[dict[str, Any]] = []
    if s.outlier_channels == 0:
        return keep_mask, log
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[_Linear]] = {}
    for lin in linears:
        if lin.site in s.outlier_sites:
            groups.setdefault(lin.node.input[0], []).append(lin)
    for x in sorted(groups):
        act = np.maximum(np.abs(mins[x]), np.abs(maxs[x]))
        k = min(s.outlier_channels, act.shape[0] - 1)
        idx = np.sort(np.argsort(-act, kind="stable")[:k]).astype(np.int64)
        mask = np.ones(act.shape[0], dtype=bool)
        mask[idx] = False
        keep_mask[x] = mask
        base = (groups[x][0].node.name or x).replace("/", "_").strip("_")
        idx_name, gathered = f"{base}_outlier_idx", f"{base}_outlier_cols"
        model.graph.initializer.append(nh.from_array(idx, idx_name))
        new_nodes = [
            onnx.helper.make_node(
                "Gather", [x, idx_name], [gathered], name=f"{base}_outlier_gather", axis=-1
            )
        ]
        for lin in groups[x]:
            w = nh.to_array(inits[lin.weight])
            nb = (lin.node.name or lin.weight).replace("/", "_").strip("_")
            side_w, side_y, main_y = f"{nb}_outlier_w", f"{nb}_outlier_y", f"{nb}_int8_y"
            model.graph.initializer.append(nh.from_array(w[idx].astype(np.float32), side_w))
            w = w.copy()
            w[idx] = 0.0
            inits[lin.weight].CopyFrom(nh.from_array(w, lin.weight))
            orig_out = lin.node.output[0]
            lin.node.output[0] = main_y
            new_nodes.append(
                onnx.helper.make_node(
                    "MatMul", [gathered, side_w], [side_y], name=f"{nb}_outlier_matmul"
                )
            )
            new_nodes.append(
                onnx.helper.make_node("Add", [main_y, side_y], [orig_out], name=f"{nb}_outlier_add")
            )
        pos = (
            max(
                i for i, n in enumerate(model.graph.node) if any(n is lin.node for lin in groups[x])
            )
            + 1
        )
        for j, n in enumerate(new_nodes):
            model.graph.node.insert(pos + j, n)
        log.append(
            {
                "tensor": x,
                "site": sorted({lin.site for lin in groups[x]}),
                "channels": idx.tolist(),
                "absmax_split": float(act[idx].max()),
                "absmax_int8": float(act[mask].max()),
            }
        )
    return keep_mask, log


# ----------------------------------------------------------------------------- entry point
def _toposort(graph: Any) -> None:
    """Order nodes so each comes after its inputs' producers (the ONNX checker and tools need it).

    Graph surgery appends nodes out of order; Kahn's algorithm keeping the original order among
    ready nodes makes the result deterministic and as close to the input as possible.
    """
    import heapq

    nodes = list(graph.node)
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        deps = {produced_by[x] for x in n.input if x in produced_by and produced_by[x] != i}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise RuntimeError("quantized graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def quantize_static_int8(
    fp32_model: Path,
    out_model: Path,
    calibration: Callable[[], Iterator[dict[str, np.ndarray]]],
    settings: QuantSettings,
    work_dir: Path,
) -> dict:
    """Quantize `fp32_model` to a static int8 QDQ model at `out_model`; returns a manifest record."""
    _validate(settings)
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_model, out_model, work_dir = Path(fp32_model), Path(out_model), Path(work_dir)
    if not fp32_model.is_file():
        raise UserError(f"fp32 model not found: {fp32_model}")
    work_dir.mkdir(parents=True, exist_ok=True)
    pre = work_dir / "preprocessed.onnx"
    quant_pre_process(str(fp32_model), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    linears, actact = _analyse(model)
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
    keep_mask, split_log = _split_outliers(model, linears, mins, maxs, settings)
    smooth_lins = [lin for lin in linears if lin.node.input[0] not in keep_mask]
    renamed, scales, smooth_log = _smooth(model, smooth_lins, mins, maxs, settings)

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
        settings.per_channel,
        settings.reduce_range,
        qt[settings.weight_type],
        qt[settings.activation_type],
        tensors_range,
        to_quant,
        [],
        ["MatMul"],
        {
            "OpTypesToExcludeOutputQuantization": [
                "MatMul"
            ],  # fp32 MatMul output -> MatMulIntegerToFloat
            "ActivationSymmetric": settings.symmetric_activations,
            "WeightSymmetric": settings.weight_type == "int8",
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        },
    )
    quantizer.quantize_model()
    out_model.parent.mkdir(parents=True, exist_ok=True)
    qmodel = quantizer.model.model
    _toposort(qmodel.graph)
    qmodel.producer_name, qmodel.producer_version = "edgepack.quantize", RECIPE
    data = qmodel.SerializeToString(deterministic=True)
    out_model.write_bytes(data)

    return {
        "recipe": RECIPE,
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
        },
        "calibration_batches": nbatches,
        "quantized_nodes": [
            {"name": lin.node.name, "op_type": "MatMul", "site": lin.site}
            for lin in linears
            if lin.node.name in to_quant
        ]
        + [
            {"name": n.name, "op_type": "MatMul", "site": "attention_act_x_act"}
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
            {
                "op_type": "Gather/LayerNormalization/Softmax/GELU/Add",
                "reason": "non-linear or accuracy-critical ops stay fp32 by design",
            }
        ],
        "smoothing": smooth_log,
        "outlier_split": split_log,
        "activation_ranges": {t: [lo, hi] for t, (lo, hi) in sorted(ranges.items())},
        "output_sha256": hashlib.sha256(data).hexdigest(),
    }


__all__ = ["RECIPE", "QuantSettings", "UserError", "quantize_static_int8"]

if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(asdict(QuantSettings()), indent=1))
