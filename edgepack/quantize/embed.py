"""Weight-only quantization of embedding tables (the Gathers on constant 2-D fp32 tables).

On all-MiniLM-L6-v2 the word-embedding table is 47 of the 59 MB of an int8 bundle whose linears
are already int8. A Gather reads only the rows of the tokens in the input, so a quantized table
costs a few microseconds per call, not a pass over the table:

- ``bits=8``: symmetric int8 per row (scale = max|row| / 127), emitted with standard ops
  ``Gather(int8 table) -> Cast -> Mul(Gather(row scales))``, so every runtime and the ORT-format
  mobile conversion take it;
- ``bits=4``: symmetric 4-bit blocks along the row, through onnxruntime's com.microsoft
  ``GatherBlockQuantized`` (uint8 storage, two values per byte, low nibble first; onnxruntime CPU
  EP only).

A tied table (also read by a non-Gather node, e.g. an output projection ``MatMul(h, W^T)``) is
stored once: its other readers get ``DequantizeLinear(int8 table, row scales, axis=0)`` under the
table's old name. 4-bit has no standard dequantizer, so a tied table always uses 8 bits.
Everything here is deterministic (sorted by table name, numpy only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgepack.quantize.graph import drop_dead_nodes, sort_topologically

SCHEMES = {8: "int8 per row (Gather, Cast, Mul)", 4: "4-bit blocks (GatherBlockQuantized)"}


def find_embedding_gathers(model: Any) -> dict[str, list[Any]]:
    """{table initializer: the axis-0 Gathers reading it}, for constant 2-D fp32 tables."""
    inits = {i.name: i for i in model.graph.initializer}
    tables: dict[str, list[Any]] = {}
    for n in model.graph.node:
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx"):
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        t = inits.get(n.input[0])
        if t is None or axis != 0 or len(t.dims) != 2 or t.data_type != 1:  # 1 = FLOAT
            continue
        tables.setdefault(t.name, []).append(n)
    return {k: tables[k] for k in sorted(tables)}


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [V, H], fp32 scale [V]) with symmetric per-row scales (all-zero rows get scale 1)."""
    w64 = w.astype(np.float64)
    absmax = np.abs(w64).max(axis=1)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w64 / scale[:, None].astype(np.float64)), -127, 127).astype(np.int8)
    return q, scale


def quantize_blocks_4bit(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [V, H/2], fp32 scale [V, H/block]): symmetric 4-bit per block of a row.

    Values are q + 8 in [0, 15] (GatherBlockQuantized's default zero point for uint8 with 4 bits),
    q = round(x / scale) clipped to [-8, 7], scale = max|block| / 7.
    """
    v, h = w.shape
    blocks = w.astype(np.float64).reshape(v, h // block, block)
    absmax = np.abs(blocks).max(axis=2)
    scale = np.where(absmax > 0, absmax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None].astype(np.float64)), -8, 7).astype(np.int16) + 8
    q = q.reshape(v, h).astype(np.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), scale


def _bits_for(dim: int, bits: int, block: int, tied: bool) -> int:
    if bits == 4 and (tied or dim % block or dim % 2):
        return 8
    return bits


def quantize_embeddings(model: Any, bits: int, block: int, skip: set[str]) -> list[dict[str, Any]]:
    """Quantize every embedding table of ``model`` in place except the tables named in ``skip``.

    Returns one record per table. A Gather keeps its name and output, so nothing downstream moves
    and :func:`restore_fp32_embeddings` can put the fp32 Gather back.
    Long because it is one rewrite per table (int8 rows or 4-bit blocks, plus the tied readers)
    sharing the graph's maps; split up it would pass the same six names around.
    """
    import onnx
    from onnx import numpy_helper as nh

    if bits == 0:
        return []
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    records = []
    for table, gathers in find_embedding_gathers(model).items():
        if table in skip:
            continue
        readers = [n for n in g.node if table in n.input and n not in gathers]
        tied = bool(readers) or table in {o.name for o in g.output}
        w = nh.to_array(inits[table])
        use = _bits_for(w.shape[1], bits, block, tied)
        base = table.replace("/", "_").strip("_")
        new_inits, new_nodes = [], []
        if use == 8:
            q, scale = quantize_rows_int8(w)
            new_inits += [
                nh.from_array(q, f"{base}_int8"),
                nh.from_array(scale[:, None], f"{base}_row_scale"),
            ]
        else:
            packed, scale = quantize_blocks_4bit(w, block)
            new_inits += [
                nh.from_array(packed, f"{base}_uint4x2"),
                nh.from_array(scale, f"{base}_block_scale"),
            ]
        for gth in gathers:
            ids, y, nb = gth.input[1], gth.output[0], gth.name.replace("/", "_").strip("_")
            if use == 8:
                new_nodes += [
                    onnx.helper.make_node(
                        "Gather", [f"{base}_int8", ids], [f"{nb}_q"], name=f"{nb}_q", axis=0
                    ),
                    onnx.helper.make_node(
                        "Cast", [f"{nb}_q"], [f"{nb}_qf"], name=f"{nb}_cast", to=1
                    ),
                    onnx.helper.make_node(
                        "Gather",
                        [f"{base}_row_scale", ids],
                        [f"{nb}_scale"],
                        name=f"{nb}_scale",
                        axis=0,
                    ),
                    onnx.helper.make_node("Mul", [f"{nb}_qf", f"{nb}_scale"], [y], name=gth.name),
                ]
            else:
                new_nodes.append(
                    onnx.helper.make_node(
                        "GatherBlockQuantized",
                        [f"{base}_uint4x2", ids, f"{base}_block_scale"],
                        [y],
                        name=gth.name,
                        domain="com.microsoft",
                        bits=4,
                        block_size=block,
                        gather_axis=0,
                        quantize_axis=1,
                    )
                )
            g.node.remove(gth)
        if tied:
            new_inits.append(nh.from_array(scale, f"{base}_row_scale_1d"))
            new_nodes.append(
                onnx.helper.make_node(
                    "DequantizeLinear",
                    [f"{base}_int8", f"{base}_row_scale_1d"],
                    [table],
                    name=f"{base}_dequantize",
                    axis=0,
                )
            )
        g.initializer.remove(inits[table])
        g.initializer.extend(new_inits)
        g.node.extend(new_nodes)
        records.append(
            {
                "table": table,
                "gathers": [n.name for n in gathers],
                "shape": [int(d) for d in w.shape],
                "bits": use,
                "scheme": SCHEMES[use] + (f", block {block}" if use == 4 else ""),
                "tied_readers": sorted(n.name for n in readers),
                "bytes_fp32": int(w.nbytes),
                "bytes_quantized": int(sum(nh.to_array(i).nbytes for i in new_inits)),
            }
        )
    if any(r["bits"] == 4 for r in records) and not any(
        o.domain == "com.microsoft" for o in model.opset_import
    ):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    sort_topologically(g)
    return records


def restore_fp32_embeddings(
    model: Any, fp32_tables: dict[str, Any], records: list[dict[str, Any]]
) -> Any:
    """A copy of ``model`` where the tables of ``records`` are fp32 again (values from
    ``fp32_tables``, initializers of the unquantized model by name): the search's way back."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for rec in records:
        table = rec["table"]
        producer = {o: n for n in g.node for o in n.output}
        for name in rec["gathers"]:
            last = next((n for n in g.node if n.name == name), None)
            if last is None:
                continue
            ids = _ids_input(last, producer)
            pos = list(g.node).index(last)
            g.node.remove(last)
            g.node.insert(
                pos,
                onnx.helper.make_node("Gather", [table, ids], list(last.output), name=name, axis=0),
            )
        dq = producer.get(table)
        if dq is not None:
            g.node.remove(dq)
        g.initializer.append(fp32_tables[table])
    drop_dead_nodes(g)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out


def _ids_input(last: Any, producer: dict[str, Any]) -> str:
    """The indices the quantized Gather path reads: GatherBlockQuantized's second input, or the
    int8 row Gather's (first input of the final Mul)."""
    if last.op_type == "GatherBlockQuantized":
        return str(last.input[1])
    cast = producer[last.input[0]]
    return str(producer[cast.input[0]].input[1])
