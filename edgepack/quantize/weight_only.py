"""Weight-only quantization of an exported decoder: int4 (or int8) blocks, fp32 activations.

Decoders run one token at a time, so they are bound by reading weights, not by arithmetic: storing
the weights in 4 bits (onnxruntime's MatMulNBits, block 32) is what speeds them up. Every MatMul
that reads a 2-D initializer becomes one MatMulNBits; the token embedding becomes a
GatherBlockQuantized. When the embedding and the lm_head are one tied matrix (SmolLM2, Llama 3.2,
Qwen2.5), the embedding gathers from the lm_head's quantized bytes, so the vocabulary is stored
once: on SmolLM2-135M that is 17.7 MB, a fifth of the int4 file. A traced export spells the tied
head as a Transpose of the embedding, which is first given its own initializer so it is quantized
too (untying it took decode from 41 to 71 tok/s on SmolLM2). GPT-2's Conv1D layers export as Gemm
and stay fp32.

A model converted from a GGUF keeps the file's Q4_0/Q4_1/Q8_0 blocks (load/gguf_blocks.py); a
weight that is still exactly those blocks is written from them instead of quantized again
(quantize/carried.py). Q4_1's w = d * q + m is d * (q - 8) plus a per-block offset, which is
MatMulNBits (default zero point) plus a small fp32 MatMul of the input's block sums: a float zero
point would say the same in one node, but onnxruntime 1.32 runs MatMulNBits with float zero points
~65x slower (no integer kernel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import UserError
from edgepack.families.cache_layout import mark_cache_layout
from edgepack.load import Blocks
from edgepack.quantize.blockwise import SEARCH, pack, quantize_rows
from edgepack.quantize.carried import (
    carried_matmul,
    carried_weights,
    gathered_offsets,
    nbits_node,
    source_record,
)
from edgepack.quantize.weight_store import Weights, make_internal

UNTIED = "lm_head.untied_weight"
METHODS = ("search", "rtn", "awq")
# Which source blocks to carry: every matching weight, all but the vocabulary (lm_head and the
# embedding sharing it), or none.
KEEP = ("all", "layers", "off")
MS = "com.microsoft"
# Part of the weight-only cache key: bump when ``quantize_weights`` (or blockwise.py) writes a
# different graph for the same fp32 graph, settings and calibration.
WEIGHT_ONLY_VERSION = (
    4  # 2: a GGUF's blocks carried; 3: their scales stored as fp16; 4: the in-place cache mark
)


@dataclass(frozen=True)
class WeightOnlySettings:
    bits: int = 4  # 4 or 8
    # One scale per 64 weights along the input axis in the layers, per 32 in the vocabulary (the
    # lm_head, and the embedding when tied to it), which decides every next token. On SmolLM2
    # (awq): 78.2 MB, perplexity 39.40, decode +10 % over blocks of 32 everywhere (84.8 MB,
    # 37.99); blocks of 64 everywhere: 76.4 MB, 41.44, +19 %.
    block_size: int = 64
    head_block_size: int = 32
    # MatMulNBits compute type: 4 = int8 activations on CPU (VNNI/dot-product kernels); 0 = fp32.
    # Level 4 decoded 25 vs 21 tok/s on SmolLM2 with a small perplexity cost, recorded per build.
    accuracy_level: int = 4
    # "search": per-block scale search weighted by calibration activations; "rtn": max|w| / 7;
    # "awq": per-channel scales folded into the norms first (quantize/scaling.py), then "search".
    method: str = "awq"
    untie_lm_head: bool = True
    quantize_embedding: bool = True
    # A GGUF source's blocks (KEEP): on SmolLM2 "all" is 97.4 MB, perplexity 30.60 (fp32 30.53),
    # decode ~0.75x of re-quantized int4; "layers" 85.0 MB, 32.74; "off" 78.2 MB, 39.40.
    keep_source_blocks: str = "all"

    def record(self) -> dict[str, Any]:
        return asdict(self)


def check_settings(settings: WeightOnlySettings) -> None:
    if settings.bits not in (4, 8):
        raise UserError(f"weight-only bits must be 4 or 8, got {settings.bits}.")
    for block in (settings.block_size, settings.head_block_size):
        if block < 16 or block & (block - 1):
            raise UserError(f"block size must be a power of two >= 16, got {block}.")
    if settings.accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"accuracy level must be 0-4, got {settings.accuracy_level}.")
    if settings.method not in METHODS:
        raise UserError(f"weight-only method must be one of {METHODS}, got {settings.method!r}.")
    if settings.keep_source_blocks not in KEEP:
        raise UserError(
            f"keep_source_blocks must be one of {KEEP}, got {settings.keep_source_blocks!r}."
        )


def untie_lm_head(model: Any, weights: Weights) -> str | None:
    """Give the logits MatMul its own weight when it reads a Transpose of an initializer (a tied
    embedding); returns the embedding's initializer name, or None when nothing was tied. The new
    weight is a view in ``weights``, read (transposed) only when it is quantized."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    head = producer.get("logits")
    if head is None or head.op_type != "MatMul":
        return None
    transpose = producer.get(head.input[1])
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in weights:
        return None
    embedding = transpose.input[0]
    weights.transposed(UNTIED, embedding)
    head.input[1] = UNTIED
    if not any(transpose.output[0] in n.input for n in graph.node):
        graph.node.remove(transpose)
    return embedding


class _Rewrite:
    """The graph being rewritten: its fp32 initializers, and what replaces them."""

    def __init__(self, model: Any, settings: WeightOnlySettings, weights: Weights) -> None:
        # The fp32 initializers are read one at a time (weight_store.py).
        self.model, self.settings, self.arrays = model, settings, weights
        self.added: list[Any] = []
        # fp32 weight -> (bytes, scales, bits, block size, per-block offsets [K / 32, N] or ""),
        # for an embedding to share
        self.quantized: dict[str, tuple[str, str, int, int, str]] = {}
        self.carried: dict[str, Blocks] = {}
        self.block_sums: dict[str, str] = {}  # MatMul input -> its sums per block of 32
        self.prelude: list[Any] = []  # nodes over initializers only, put first in the graph

    def add(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if not any(i.name == name for i in self.added):
            self.added.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def quantize(
        self,
        name: str,
        rows: np.ndarray,
        importance: np.ndarray | None,
        flat: bool = False,
        head: bool = False,
    ) -> tuple[str, str]:
        """Adds the packed bytes ([rows, blocks, blob], or [rows, bytes] when ``flat``) and scales;
        ``head`` rows (the vocabulary) use the head's block size."""
        s = self.settings
        search = (1.0,) if s.method == "rtn" else SEARCH
        block = s.head_block_size if head else s.block_size
        codes, scales = quantize_rows(rows, s.bits, block, importance, search)
        packed = pack(codes, s.bits)
        data = self.add(f"{name}_Q{s.bits}", packed.reshape(len(rows), -1) if flat else packed)
        return data, self.add(f"{name}_scales", scales)


def _matmuls(rw: _Rewrite, importance: dict[str, np.ndarray]) -> None:
    s, nodes = rw.settings, []
    for index, node in enumerate(rw.model.graph.node):
        if node.op_type != "MatMul" or not rw.arrays.is_float_matrix(node.input[1]):
            nodes.append(node)
            continue
        if node.input[1] in rw.carried:
            nodes.extend(carried_matmul(rw, node, rw.carried[node.input[1]], index))
            continue
        k, n = rw.arrays.shape(node.input[1])
        head = "logits" in node.output
        block = s.head_block_size if head else s.block_size
        data, scales = rw.quantize(
            node.input[1], rw.arrays[node.input[1]].T, importance.get(node.input[0]), head=head
        )
        rw.quantized[node.input[1]] = (data, scales, s.bits, block, "")
        shape = (k, n, s.bits, block, s.accuracy_level)
        nodes.append(nbits_node(node, index, [data, scales], node.output[0], shape))
    del rw.model.graph.node[:]
    rw.model.graph.node.extend(nodes)


def _tied_head(rw: _Rewrite, name: str) -> str | None:
    """The quantized MatMul weight that is the embedding table ``name`` transposed, if any: an
    untied view of it, or a weight of the transposed shape with the same values."""
    shape = rw.arrays.shape(name)[::-1]
    candidates = [h for h in rw.quantized if rw.arrays.shape(h) == shape]
    for head in candidates:
        if rw.arrays.transposes.get(head) == name:
            return head
    table = rw.arrays[name] if candidates else None
    return next((h for h in candidates if np.array_equal(rw.arrays[h].T, table)), None)


def _shared_gather(
    rw: _Rewrite, node: Any, head: str, table: tuple[int, ...], attrs: dict
) -> list[Any]:
    """Gather rows straight from the head's MatMulNBits bytes [vocab, blocks, blob]: the scales
    need a trailing axis there, and the gathered blocks are flattened back to rows."""
    from onnx import helper

    data, scales, bits, block, offsets = rw.quantized[head]
    attrs = {**attrs, "bits": bits, "block_size": block}
    blocks = table[1] // block
    shape3 = rw.add(f"{node.input[0]}_scale_shape", np.array([table[0], blocks, 1]))
    width = rw.add(f"{node.input[0]}_width", np.array([table[1]]))
    scales3, gathered = f"{scales}_3d", f"{node.output[0]}_blocks"
    shape, ids = f"{gathered}_shape", node.input[1]
    return [
        helper.make_node("Reshape", [scales, shape3], [scales3], name=scales3),
        helper.make_node("Shape", [ids], [shape + "_ids"], name=shape + "_ids"),
        helper.make_node("Concat", [shape + "_ids", width], [shape], name=shape, axis=0),
        helper.make_node(
            "GatherBlockQuantized",
            [data, ids, scales3],
            [gathered + "_codes" if offsets else gathered],
            name=gathered,
            quantize_axis=2,
            **attrs,
        ),
        *(gathered_offsets(rw, offsets, ids, gathered) if offsets else []),
        helper.make_node("Reshape", [gathered, shape], list(node.output), name=node.output[0]),
    ]


def _embedding(rw: _Rewrite, tied: str | None) -> dict[str, Any]:
    """Replace the token-embedding Gather (the one reading ``input_ids``, or the table an untied
    head came from); shares the lm_head's bytes when the two are tied."""
    from onnx import helper

    s, graph = rw.settings, rw.model.graph
    index = next(
        (
            i
            for i, n in enumerate(graph.node)
            if n.op_type == "Gather"
            and n.input[0] in rw.arrays
            and (n.input[1] == "input_ids" or n.input[0] == tied)
        ),
        None,
    )
    if index is None or rw.arrays.shape(graph.node[index].input[0])[1] % s.head_block_size:
        # (padded blocks would widen the gathered rows)
        return {"embedding": None, "shared_with_lm_head": None}
    node = graph.node[index]
    head = _tied_head(rw, node.input[0])
    attrs = {"domain": MS, "bits": s.bits, "block_size": s.head_block_size, "gather_axis": 0}
    if head is not None:
        nodes = _shared_gather(rw, node, head, rw.arrays.shape(node.input[0]), attrs)
    else:
        table = rw.arrays[node.input[0]]
        data, scales = rw.quantize(node.input[0], table, None, flat=True, head=True)
        inputs = [data, node.input[1], scales]
        name = node.name or "/embedding"
        nodes = [
            helper.make_node(
                "GatherBlockQuantized",
                inputs,
                list(node.output),
                name=name,
                quantize_axis=1,
                **attrs,
            )
        ]
    del graph.node[index]
    for offset, new in enumerate(nodes):
        graph.node.insert(index + offset, new)
    return {"embedding": node.input[0], "shared_with_lm_head": head}


def _fold(
    model: Any,
    weights: Weights,
    importance: dict[str, np.ndarray],
    settings: WeightOnlySettings,
    frozen: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """AWQ-style channel scales recorded in ``weights`` (the graph computes the same function once
    they are applied); ``importance`` is updated to the scaled activations. ``frozen``
    initializers (carried source blocks) are neither scaled nor folded into."""
    from edgepack.quantize.blockwise import dequantize
    from edgepack.quantize.scaling import fold_scales

    s = settings

    def error(weight: np.ndarray, power: np.ndarray) -> float:
        codes, scales = quantize_rows(weight.T, s.bits, s.block_size, power, SEARCH[::3])
        diff = dequantize(codes, scales, s.bits, weight.shape[0]) - weight.T
        return float((np.square(diff) * power[None, :]).sum())

    return fold_scales(model, weights, importance, error, frozen=frozen)


def _store_kept(model: Any, weights: Weights) -> None:
    """The fp32 initializers the rewritten graph still reads, in its own protobuf: scaled ones
    with their scales applied, external ones read in (norm weights and the like: small)."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name in weights.factors:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
        else:
            make_internal(init, weights.folder)


def fold_channel_scales(
    model: Any,
    importance: dict[str, np.ndarray],
    settings: WeightOnlySettings,
    frozen: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """AWQ-style channel scales folded into the fp32 initializers of a loaded ``model`` (in place;
    the graph computes the same function); ``importance`` is updated to the scaled activations."""
    weights = Weights(model.graph, Path("."))
    alphas = _fold(model, weights, importance, settings, frozen)
    _store_kept(model, weights)
    return alphas


def quantize_weights(
    src: Path,
    dst: Path,
    settings: WeightOnlySettings,
    importance: dict[str, np.ndarray] | None = None,
    source: Path | None = None,
) -> dict[str, Any]:
    """Write the weight-only quantized copy of ``src`` to ``dst``; returns what was done.

    ``importance`` maps a MatMul's activation input to its mean square per channel (from
    calibration); without it every channel counts the same. ``source`` is a converted GGUF's
    folder whose blocks are carried where the weights still are them."""
    import onnx

    check_settings(settings)
    model = onnx.load(str(src), load_external_data=False)
    weights = Weights(model.graph, src.parent)
    tied = untie_lm_head(model, weights) if settings.untie_lm_head else None
    carried = carried_weights(model, weights, source, settings)
    importance = dict(importance or {})
    awq = settings.method == "awq" and importance
    alphas = _fold(model, weights, importance, settings, frozenset(carried)) if awq else {}
    rw = _Rewrite(model, settings, weights)
    rw.carried = carried
    kept = source_record(rw, source)
    _matmuls(rw, importance)
    embedding = (
        _embedding(rw, tied)
        if settings.quantize_embedding
        else {"embedding": None, "shared_with_lm_head": None}
    )
    for offset, node in enumerate(rw.prelude):
        model.graph.node.insert(offset, node)
    used = {name for n in model.graph.node for name in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    _store_kept(model, weights)
    model.graph.initializer.extend(i for i in rw.added if i.name in used)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS, 1))
    mark_cache_layout(model)
    onnx.save(model, str(dst))
    nodes = model.graph.node
    return {
        **settings.record(),
        "source_blocks": kept,
        "untied_from": tied,
        "calibrated": bool(importance),
        "channel_scaling": {"groups": len(alphas), "scaled": sum(a > 0 for a in alphas.values())},
        **embedding,
        "matmul_nbits": sum(n.op_type == "MatMulNBits" for n in nodes),
        "gather_block_quantized": sum(n.op_type == "GatherBlockQuantized" for n in nodes),
        "matmul_left_float": sum(
            n.op_type == "MatMul" and not n.input[1].endswith("_block_offsets") for n in nodes
        ),
        "block_offset_matmuls": sum(
            n.op_type == "MatMul" and n.input[1].endswith("_block_offsets") for n in nodes
        ),
    }
