"""Latency, interleaved so drift favours none, and the GEMM 'physical limit' of this CPU.

Every model of one setting (threads, seq) is loaded at once and called in rounds A B C ... A B C,
``per_round`` calls each; the figure is the median over all calls. The GEMM peak is measured the
same way on one-node ONNX graphs at the model's own linear shapes, so "fraction of peak" compares
like with like: onnxruntime's MLAS kernels, this machine, this moment.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LINEAR_OPS = ("MatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "Gemm")


@dataclass(frozen=True)
class Harness:
    threads: tuple[int, ...] = (1, 2)
    seqs: tuple[int, ...] = (32, 128)
    rounds: int = 15
    per_round: int = 5
    warmup: int = 3


def make_session(path: Path | bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleave(
    calls: dict[str, tuple[Any, dict[str, np.ndarray]]], harness: Harness
) -> dict[str, list[float]]:
    """Seconds per call for each (session, feeds), measured in interleaved rounds."""
    for sess, feeds in calls.values():
        for _ in range(harness.warmup):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(harness.rounds):
        for name, (sess, feeds) in calls.items():
            for _ in range(harness.per_round):
                start = time.perf_counter()
                sess.run(None, feeds)
                times[name].append(time.perf_counter() - start)
    return times


def measure_latency(
    models: dict[str, Path], feeds_by_seq: dict[int, dict[str, np.ndarray]], harness: Harness
) -> dict[tuple[int, int], dict[str, float]]:
    """{(threads, seq): {model: median ms}} for batch-1 feeds padded to each seq."""
    out: dict[tuple[int, int], dict[str, float]] = {}
    for threads in harness.threads:
        for seq in harness.seqs:
            calls = {}
            for name, path in models.items():
                sess = make_session(path, threads)
                wanted = {i.name for i in sess.get_inputs()}
                calls[name] = (sess, {k: v for k, v in feeds_by_seq[seq].items() if k in wanted})
            times = interleave(calls, harness)
            out[(threads, seq)] = {n: float(np.median(t)) * 1e3 for n, t in times.items()}
            del calls
    return out


# ----------------------------------------------------------------------------- model MACs
def linear_shapes(path: Path) -> Counter[tuple[int, int]]:
    """(K, N) of every linear layer: a MatMul-like node whose weight is a 2-D constant.

    The weight may be stored directly, or behind DequantizeLinear / Transpose (QDQ graphs), so the
    same count comes out of an fp32 export and its int8 versions.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def weight_shape(name: str) -> tuple[int, ...] | None:
        for _ in range(4):
            if name in dims:
                return dims[name]
            node = producer.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "Transpose", "Cast"):
                return None
            name = node.input[0]
        return None

    shapes: Counter[tuple[int, int]] = Counter()
    for node in model.graph.node:
        if node.op_type in LINEAR_OPS and len(node.input) > 1:
            shape = weight_shape(node.input[1])
            if shape is not None and len(shape) == 2:
                shapes[(int(shape[0]), int(shape[1]))] += 1
    return shapes


def linear_macs(path: Path) -> int:
    """Multiply-accumulates per token of the encoder's linear layers (attention matmuls excluded)."""
    return sum(k * n * count for (k, n), count in linear_shapes(path).items())


# ----------------------------------------------------------------------------- GEMM peak
GEMM_KINDS = ("fp32", "int8", "int8->fp32")


def _gemm_graph(kind: str, m: int, k: int, n: int, rng: np.random.Generator) -> tuple[bytes, Any]:
    """One node: fp32 MatMul, MatMulInteger (u8 x s8 -> s32) or MatMulIntegerToFloat (QDQ's fusion)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = []
    if kind == "fp32":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
        inits.append(
            numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "w")
        )
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        feed = rng.standard_normal((m, k)).astype(np.float32)
    else:
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])
        w = rng.integers(-127, 128, (k, n)).astype(np.int8)
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(3), "xz")]
        if kind == "int8":
            y = helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])
            inits.append(numpy_helper.from_array(np.int8(0), "wz"))
            node = helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"])
        else:  # per-column weight scales, as per-channel QDQ gives
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
            inits += [
                numpy_helper.from_array(np.float32(0.01), "xs"),
                numpy_helper.from_array(np.full(n, 0.001, np.float32), "ws"),
                numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
            ]
            node = helper.make_node(
                "MatMulIntegerToFloat",
                ["x", "w", "xs", "ws", "xz", "wz"],
                ["y"],
                domain="com.microsoft",
            )
        feed = rng.integers(0, 256, (m, k)).astype(np.uint8)
    graph = helper.make_graph([node], "gemm", [x], [y], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return model.SerializeToString(), {"x": feed}


@dataclass(frozen=True)
class GemmPeak:
    """GOPS (2 ops per MAC) per kind and shape, and the layer-weighted aggregate per kind."""

    threads: int
    m: int
    per_shape: dict[str, dict[tuple[int, int], float]]  # kind -> (K, N) -> GOPS
    weighted: dict[str, float]  # kind -> GOPS over the model's linear layers as a whole


def measure_gemm_peaks(
    shapes: Counter[tuple[int, int]], harness: Harness, seed: int = 0
) -> list[GemmPeak]:
    """Peak GEMM throughput at the model's linear shapes, for every (threads, seq) of the harness."""
    rng = np.random.default_rng(seed)
    peaks = []
    for threads in harness.threads:
        for m in harness.seqs:
            calls = {}
            for kind in GEMM_KINDS:
                for k, n in shapes:
                    blob, feed = _gemm_graph(kind, m, k, n, rng)
                    calls[f"{kind}|{k}|{n}"] = (make_session(blob, threads), feed)
            # GEMMs are ~100x shorter than a model call: more calls per round for a stable median.
            gemm = Harness(harness.threads, harness.seqs, harness.rounds, harness.per_round * 4)
            times = interleave(calls, gemm)
            per_shape: dict[str, dict[tuple[int, int], float]] = {k: {} for k in GEMM_KINDS}
            weighted = {}
            for kind in GEMM_KINDS:
                ops = secs = 0.0
                for (k, n), count in shapes.items():
                    t = float(np.median(times[f"{kind}|{k}|{n}"]))
                    per_shape[kind][(k, n)] = 2 * m * k * n / t / 1e9
                    ops += count * 2 * m * k * n
                    secs += count * t
                weighted[kind] = ops / secs / 1e9
            peaks.append(GemmPeak(threads, m, per_shape, weighted))
    return peaks
