"""Which of the fused graph's MatMul weights are a GGUF's blocks as shipped, and those blocks.

The fused exporter names each weight after its checkpoint parameter, except where it joins or
splits them: q/k/v become one ``qkv_proj`` (rows concatenated), a packed ``gate_up_proj`` becomes
``gate_proj`` and ``up_proj`` (rows split in half), and the tied lm_head is the embedding's table.
Rows concatenated or split keep their blocks whole. A weight is carried only when its blocks,
dequantized, are the graph's fp32 weight: anything that changed it since the file (pruning,
distillation, a layout this map does not know) falls back to edgepack's own quantizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepack.load import BLOCK, Blocks, SourceBlocks
from edgepack.quantize.blockwise import pack
from edgepack.quantize.weight_store import Weights

MS = "com.microsoft"

# Dequantized blocks and the graph's weight agree to this fraction of the weight's largest value:
# both are the same fp32 arithmetic, so anything wider means the weight is not the file's.
MATCH = 1e-6
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def _joined(parts: list[Blocks]) -> Blocks | None:
    """Blocks of several parameters stacked along rows (one type, no mixture)."""
    if len({(p.kind, p.codes.shape[1:]) for p in parts}) != 1:
        return None
    minimum = None if parts[0].minimum is None else np.concatenate([p.minimum for p in parts])
    return Blocks(
        parts[0].kind,
        parts[0].bits,
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        minimum,
    )


def _half(blocks: Blocks, second: bool) -> Blocks:
    rows = len(blocks.codes) // 2
    part = slice(rows, None) if second else slice(0, rows)
    minimum = None if blocks.minimum is None else blocks.minimum[part]
    return Blocks(blocks.kind, blocks.bits, blocks.codes[part], blocks.scales[part], minimum)


def lookup(source: SourceBlocks, name: str) -> Blocks | None:
    """The blocks of graph initializer ``name`` ([in, out], rows = out), or None. A tied head
    (no ``output.weight`` in the file) is the embedding's table."""
    if name in (HEAD, "lm_head.untied_weight"):
        return source.get(HEAD) or source.get(EMBEDDING)
    if not name.endswith(".weight"):
        return None
    base = name[: -len(".weight")]
    if (found := source.get(name)) is not None:
        return found
    if base.endswith("self_attn.qkv_proj"):
        stem = base[: -len("qkv_proj")]
        parts = [source.get(f"{stem}{p}_proj.weight") for p in "qkv"]
        return None if any(p is None for p in parts) else _joined(parts)  # type: ignore[misc]
    for half, second in (("gate_proj", False), ("up_proj", True)):
        if base.endswith(f"mlp.{half}"):
            packed = source.get(base[: -len(half)] + "gate_up_proj.weight")
            return None if packed is None else _half(packed, second)
    return None


def matching(blocks: Blocks, weight_kn: np.ndarray) -> bool:
    """Whether ``blocks`` dequantize to the graph's weight (stored [in, out])."""
    rows = weight_kn.T
    if blocks.codes.shape[0] != rows.shape[0] or blocks.codes[0].size != rows.shape[1]:
        return False
    scale = float(np.abs(rows).max()) or 1.0
    return bool(np.abs(blocks.dequantized() - rows).max() <= MATCH * scale)


def carried_weights(model: Any, weights: Weights, source: Path | None, settings: Any) -> dict:
    """MatMul weight -> the source blocks it still is exactly (none without a source)."""
    if source is None or settings.keep_source_blocks == "off":
        return {}
    blocks = SourceBlocks(source)
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        if "logits" in node.output and settings.keep_source_blocks == "layers":
            continue
        kept = lookup(blocks, node.input[1])
        if kept is not None and matching(kept, weights[node.input[1]]):
            found[node.input[1]] = kept
    return found


def _block_sums(rw: Any, x: str) -> tuple[list[Any], str]:
    """Nodes summing ``x`` [batch, seq, K] over each block of 32 (once per input)."""
    from onnx import helper

    if x in rw.block_sums:
        return [], rw.block_sums[x]
    shape = rw.add("/block_sums_shape", np.array([0, 0, -1, BLOCK], dtype=np.int64))
    axes = rw.add("/block_sums_axes", np.array([-1], dtype=np.int64))
    blocks, sums = f"{x}_blocks", f"{x}_block_sums"
    rw.block_sums[x] = sums
    return [
        helper.make_node("Reshape", [x, shape], [blocks], name=blocks),
        helper.make_node("ReduceSum", [blocks, axes], [sums], name=sums, keepdims=0),
    ], sums


def _carried_constants(rw: Any, name: str, blocks: Blocks) -> tuple[str, str]:
    """The fp32 scales [N, K / 32] and, for Q4_1, offsets m + 8 d [K / 32, N] as nodes over the
    file's fp16 values: onnxruntime folds them into fp32 constants when the session loads (the
    same arithmetic, the same speed), and the file stores half the bytes (112 -> 97 MB on
    SmolLM2). Returns (scales, offsets or "")."""
    from onnx import TensorProto, helper

    half = rw.add(f"{name}_scales_fp16", blocks.scales.astype(np.float16))
    scales = f"{name}_scales"
    rw.prelude.append(helper.make_node("Cast", [half], [scales], name=scales, to=TensorProto.FLOAT))
    if blocks.minimum is None:
        return scales, ""
    low = rw.add(f"{name}_block_minimums_fp16", blocks.minimum.T.astype(np.float16))
    eight = rw.add("/eight", np.array(8.0, dtype=np.float32))
    minimums, moved, scaled = f"{name}_block_minimums", f"{scales}_t", f"{scales}_t8"
    offsets = f"{name}_block_offsets"
    rw.prelude += [
        helper.make_node("Cast", [low], [minimums], name=minimums, to=TensorProto.FLOAT),
        helper.make_node("Transpose", [scales], [moved], name=moved, perm=[1, 0]),
        helper.make_node("Mul", [moved, eight], [scaled], name=scaled),
        helper.make_node("Add", [minimums, scaled], [offsets], name=offsets),
    ]
    return scales, offsets


def nbits_node(
    node: Any, index: int, weight: list[str], out: str, shape: tuple[int, int, int, int, int]
) -> Any:
    """The MatMulNBits replacing MatMul ``node`` (the ``index``-th): ``weight`` is its packed
    bytes and scales, ``shape`` is (K, N, bits, block size, accuracy level)."""
    from onnx import helper

    k, n, bits, block, level = shape
    return helper.make_node(
        "MatMulNBits",
        [node.input[0], *weight],
        [out],
        name=node.name or f"/MatMulNBits_{index}",
        domain=MS,
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=level,
    )


def carried_matmul(rw: Any, node: Any, blocks: Blocks, index: int) -> list[Any]:
    """MatMulNBits holding the source's codes and scales as they are; Q4_1's per-block offsets
    added as (x summed per block) @ offsets, in fp32."""
    from onnx import helper

    name, (k, n) = node.input[1], rw.arrays.shape(node.input[1])
    data = rw.add(f"{name}_Q{blocks.bits}", pack(blocks.codes, blocks.bits))
    scales, table = _carried_constants(rw, name, blocks)
    rw.quantized[name] = (data, scales, blocks.bits, BLOCK, table)
    out = f"{node.output[0]}_codes" if table else node.output[0]
    level = rw.settings.accuracy_level
    main = nbits_node(node, index, [data, scales], out, (k, n, blocks.bits, BLOCK, level))
    if not table:
        return [main]
    sum_nodes, sums = _block_sums(rw, node.input[0])
    added = f"{node.output[0]}_offsets"
    return [
        *sum_nodes,
        main,
        helper.make_node("MatMul", [sums, table], [added], name=added),
        helper.make_node("Add", [out, added], list(node.output), name=node.output[0]),
    ]


def gathered_offsets(rw: Any, offsets: str, ids: str, gathered: str) -> list[Any]:
    """Q4_1's per-block offsets added to the gathered blocks [batch, seq, blocks, 32] in place
    (the head's offsets are [blocks, vocab]: gathered on axis 1, moved last)."""
    from onnx import helper

    axes = rw.add("/gathered_offsets_axes", np.array([-1], dtype=np.int64))
    picked, moved, col = f"{gathered}_offsets", f"{gathered}_offsets_t", f"{gathered}_offsets_1"
    return [
        helper.make_node("Gather", [offsets, ids], [picked], name=picked, axis=1),
        helper.make_node("Transpose", [picked], [moved], name=moved, perm=[1, 2, 0]),
        helper.make_node("Unsqueeze", [moved, axes], [col], name=col),
        helper.make_node("Add", [gathered + "_codes", col], [gathered], name=gathered + "_add"),
    ]


def source_record(rw: Any, source: Path | None) -> dict[str, Any] | None:
    """Parameters carried per source type, and re-quantized per source type (with why)."""
    if source is None:
        return None
    kinds = SourceBlocks(source).kinds
    carried: dict[str, int] = {}
    requantized: dict[str, int] = {}
    for node in rw.model.graph.node:
        if node.op_type != "MatMul" or not rw.arrays.is_float_matrix(node.input[1]):
            continue
        name = node.input[1]
        size = int(np.prod(rw.arrays.shape(name)))
        if name in rw.carried:
            kind = rw.carried[name].kind
            carried[kind] = carried.get(kind, 0) + size
            continue
        kind = _source_kind(kinds, name)
        why = "changed since the file" if kind in ("Q4_0", "Q4_1", "Q8_0") else "no exact map"
        if kind in ("Q4_0", "Q4_1", "Q8_0") and "logits" in node.output:
            why = "vocabulary kept out" if rw.settings.keep_source_blocks == "layers" else why
        label = f"{kind}: {why}"
        requantized[label] = requantized.get(label, 0) + size
    return {"carried": carried, "requantized": requantized}


def _source_kind(kinds: dict[str, str], name: str) -> str:
    """The file's type of a graph weight (its first part, for joined ones), or "unknown"."""
    stem, packed = name.removesuffix(".weight"), name.rsplit(".", 2)[0] + ".gate_up_proj.weight"
    for candidate in (
        name,
        stem.replace("qkv_proj", "q_proj") + ".weight",
        packed,
        "model.embed_tokens.weight" if "lm_head" in name else name,
    ):
        if candidate in kinds:
            return kinds[candidate]
    return "unknown"
