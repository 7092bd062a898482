"""Which of the fused graph's MatMul weights are a GGUF's blocks as shipped, and those blocks.

The fused exporter names each weight after its checkpoint parameter, except where it joins or
splits them: q/k/v become one ``qkv_proj`` (rows concatenated), a packed ``gate_up_proj`` becomes
``gate_proj`` and ``up_proj`` (rows split in half), and the tied lm_head is the embedding's table.
Rows concatenated or split keep their blocks whole. A weight is carried only when its blocks,
dequantized, are the graph's fp32 weight: anything that changed it since the file (pruning,
distillation, a layout this map does not know) falls back to edgepack's own quantizer.
"""

from __future__ import annotations

import numpy as np

from edgepack.load.gguf_blocks import Blocks, SourceBlocks

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
