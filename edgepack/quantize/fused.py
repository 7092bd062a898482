"""``quant_format="ort_fused"``: emit onnxruntime's fused integer MatMuls directly, and undo them.

QuantizeLinear -> com.microsoft MatMulIntegerToFloat(A, B, scales, zero points, bias) is what
onnxruntime's CPU EP builds from a QDQ DQ->MatMul pair, plus the bias Add fused into the kernel
(onnxruntime leaves it separate for QDQ input). Quantization grids match onnxruntime's quantizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgepack.quantize.graph import drop_dead_nodes, find_bias_add
from edgepack.quantize.settings import QuantSettings

_QRANGE = {("uint8", False): (0, 255), ("int8", False): (-128, 127)}


def compute_activation_qparams(
    lo: float, hi: float, qtype: str, symmetric: bool
) -> tuple[float, int]:
    """(scale, zero point) as onnxruntime's quantizer computes them (range widened to include 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = _QRANGE[(qtype, False)]
    if symmetric:
        m = max(-lo, hi)
        lo, hi = -m, m
        if qtype == "int8":
            qmin, qmax = -127, 127
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    return float(np.float32(scale)), zp


def quantize_weight(
    w: np.ndarray, qtype: str, per_channel: bool, reduce_range: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q, scale, zero point or None) of a [K, N] weight; per output column when `per_channel`.

    int8 is symmetric in [-127, 127] ([-64, 64] with reduce_range, onnxruntime's 7-bit choice);
    uint8 is asymmetric in [0, 255] ([0, 127]). Scales are fp32, as the kernels use them.
    """
    axis = 0 if per_channel else None
    w64 = w.astype(np.float64)
    if qtype == "int8":
        qmax = 64 if reduce_range else 127
        absmax = np.abs(w64).max(axis=axis)
        scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        q = np.clip(np.rint(w64 / scale.astype(np.float64)), -qmax, qmax).astype(np.int8)
        return q, np.atleast_1d(scale) if per_channel else scale.reshape(()), None
    qmax = 127 if reduce_range else 255
    lo, hi = np.minimum(w64.min(axis=axis), 0.0), np.maximum(w64.max(axis=axis), 0.0)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, qmax)
    q = np.clip(np.rint(w64 / scale.astype(np.float64)) + zp, 0, qmax).astype(np.uint8)
    return q, scale.reshape(np.shape(scale)), zp.astype(np.uint8).reshape(np.shape(scale))


def emit_fused_int8(
    model: Any, nodes: list[Any], ranges: dict[str, tuple[float, float]], s: QuantSettings
) -> int:
    """Replace each MatMul in `nodes` by QuantizeLinear -> com.microsoft MatMulIntegerToFloat.

    This is what onnxruntime's QDQ fusion produces from DQ->MatMul, plus what it does not do:
    the following bias Add goes into the kernel's bias input (one pass over the output less per
    linear) and one QuantizeLinear per input tensor serves all its consumers (Q, K, V).
    Returns the number of bias Adds fused.
    Long because it is one pass over the graph that rewrites each linear in place; the per-node steps share the pass's maps.
    """
    import onnx
    from onnx import numpy_helper as nh

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    quantized_inputs: dict[str, list[str]] = {}
    quantized_weights: dict[str, list[str]] = {}
    new_inits: list[Any] = []
    fused = 0

    def quantize_input(t: str) -> list[str]:
        if t not in quantized_inputs:
            base = t.replace("/", "_").strip("_")
            scale, zp = compute_activation_qparams(
                *ranges[t], s.activation_type, s.symmetric_activations
            )
            dtype = np.uint8 if s.activation_type == "uint8" else np.int8
            names = [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"]
            new_inits.append(nh.from_array(np.array(scale, np.float32), names[1]))
            new_inits.append(nh.from_array(np.array(zp, dtype), names[2]))
            q = onnx.helper.make_node(
                "QuantizeLinear", [t, names[1], names[2]], [names[0]], name=f"{base}_QuantizeLinear"
            )
            g.node.append(q)
            quantized_inputs[t] = names
        return quantized_inputs[t]

    def quantize_const(w: str) -> list[str]:
        if w not in quantized_weights:
            q, scale, zp = quantize_weight(
                nh.to_array(inits[w]), s.weight_type, s.per_channel, s.reduce_range
            )
            names = [f"{w}_quantized", f"{w}_scale", f"{w}_zero_point" if zp is not None else ""]
            new_inits.append(nh.from_array(q, names[0]))
            new_inits.append(nh.from_array(scale, names[1]))
            if zp is not None:
                new_inits.append(nh.from_array(zp, names[2]))
            quantized_weights[w] = names
        return quantized_weights[w]

    for node in nodes:
        a = quantize_input(node.input[0])
        const = node.input[1] in inits
        b = quantize_const(node.input[1]) if const else quantize_input(node.input[1])
        inputs = [a[0], b[0], a[1], b[1], a[2], b[2]]
        out = node.output[0]
        if const:
            add = find_bias_add(model, out, int(inits[node.input[1]].dims[1]), inits)
            if add is not None:
                inputs.append(next(i for i in add.input if i != out))
                out = add.output[0]
                g.node.remove(add)
                fused += 1
        mm = onnx.helper.make_node(
            "MatMulIntegerToFloat", inputs, [out], name=node.name, domain="com.microsoft"
        )
        g.node.insert(list(g.node).index(node), mm)
        g.node.remove(node)
    g.initializer.extend(new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    drop_unused(g)
    return fused


def drop_unused(graph: Any) -> None:
    """Drop initializers and value_info entries no node reads or produces any more."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    vi = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vi)


def bypass_fused_activation(model: Any, names: set[str]) -> Any:
    """A copy of an ``ort_fused`` model where the named MatMulIntegerToFloat nodes read their fp32
    activation: DequantizeLinear(weight) -> MatMul (-> Add bias). The ort_fused twin of
    ``edgepack.quantize.search.bypass_activation_qdq`` (weights stay int8-stored; only the activation
    quantization is removed), for ranking layer sensitivity without re-quantizing."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for node in list(g.node):
        q = producer.get(node.input[0])
        if node.name not in names or node.op_type != "MatMulIntegerToFloat" or q is None:
            continue
        if q.op_type != "QuantizeLinear" or node.input[1] not in inits:
            continue
        base, y = node.name.replace("/", "_").strip("_"), node.output[0]
        dq_in = [node.input[1], node.input[3]] + (
            [node.input[5]] if node.input[5:6] != [""] else []
        )
        bias = node.input[6] if len(node.input) > 6 and node.input[6] else ""
        mm_out = f"{base}_fp32_act_y" if bias else y
        new = [
            onnx.helper.make_node(
                "DequantizeLinear", dq_in, [f"{base}_w_dq"], name=f"{base}_w_dq", axis=1
            ),
            onnx.helper.make_node("MatMul", [q.input[0], f"{base}_w_dq"], [mm_out], name=node.name),
        ]
        if bias:
            new.append(onnx.helper.make_node("Add", [mm_out, bias], [y], name=f"{base}_bias_add"))
        pos = list(g.node).index(node)
        g.node.remove(node)
        for j, n in enumerate(new):
            g.node.insert(pos + j, n)
    drop_dead_nodes(g)
    return out
