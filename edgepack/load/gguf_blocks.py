"""The GGUF's own quantized blocks, kept beside the converted folder so the weight-only stage can
write them into the bundle as they are instead of quantizing the dequantized weights a second time.

An already-4-bit model re-quantized to 4 bits loses twice: on SmolLM2-135M (Q4_1) edgepack's own
int4 of the dequantized weights raised held-out perplexity 27 % over the file itself. Q4_0, Q4_1 and
Q8_0 are blocks of 32 weights along a row's input axis with one fp16 scale (and, for Q4_1, one
fp16 minimum) each, which is what onnxruntime's MatMulNBits reads, so they carry over exactly.

The blocks are stored under the Hugging Face parameter name they load as, in the row order
transformers gives that parameter (it reorders a Llama GGUF's q/k rows; a row permutation keeps
blocks whole, so the same permutation is applied to the block rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Beside config.json in the converted folder: raw block rows per parameter, and their types.
BLOCKS = "gguf_blocks.npz"
BLOCK_TYPES = "gguf_blocks.json"
BLOCK = 32
# Bytes per block of 32: the fp16 scale (and minimum) first, then the codes.
LAYOUT = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


class Blocks(NamedTuple):
    """One parameter's blocks, [rows, blocks] of scales and [rows, blocks, 32] unsigned codes:
    w = scale * (code - zero), zero = 2^(bits-1) (8-bit codes are stored offset by 128, so both
    zeros are MatMulNBits' defaults), plus the block's ``minimum`` + 8 scale for Q4_1, whose
    w = d * q + m."""

    kind: str
    bits: int
    codes: np.ndarray
    scales: np.ndarray
    minimum: np.ndarray | None

    @property
    def offset(self) -> np.ndarray | None:
        """What each block adds to scale * (code - 8): m + 8 d (Q4_1), else None."""
        return None if self.minimum is None else self.minimum + np.float32(8) * self.scales

    def dequantized(self) -> np.ndarray:
        """[rows, k] as llama.cpp and transformers compute it (d * q + m for Q4_1)."""
        codes = self.codes.astype(np.float32)
        if self.minimum is None:
            values = (codes - 2 ** (self.bits - 1)) * self.scales[..., None]
        else:
            values = codes * self.scales[..., None] + self.minimum[..., None]
        return values.reshape(len(self.codes), -1)


def row_order(processor: Any, gguf_name: str, rows: int) -> np.ndarray | None:
    """The row permutation transformers' tensor processor applies to ``gguf_name``, found by
    running it over the row indices; None when it does anything but reorder rows."""
    index = np.arange(rows, dtype=np.float64)[:, None]
    out = np.asarray(processor.process(weights=index, name=gguf_name).weights)
    if out.shape != index.shape or not np.array_equal(np.sort(out[:, 0]), index[:, 0]):
        return None
    return out[:, 0].astype(np.int64)


def save_blocks(reader: Any, model: Any, arch: str, folder: Path) -> dict[str, int]:
    """Write the Q4_0/Q4_1/Q8_0 matrices of ``reader`` under their HF names into ``folder``;
    returns the parameters kept per type (the rest are left to edgepack's quantizer)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    names = get_gguf_hf_weights_map(model)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    kept: dict[str, int] = {}
    for item in reader.tensors:
        kind, hf_name = item.tensor_type.name, names.get(item.name)
        data = np.asarray(item.data)
        if hf_name is None or len(item.shape) != 2:
            continue
        kinds[hf_name] = kind  # every matrix's type, for the record of what was re-quantized
        order = row_order(processor, item.name, data.shape[0]) if kind in LAYOUT else None
        if order is None or data.ndim != 2:
            continue
        arrays[hf_name] = np.ascontiguousarray(data[order])
        kept[kind] = kept.get(kind, 0) + data.shape[0] * data.shape[1] // LAYOUT[kind] * BLOCK
    np.savez(folder / BLOCKS, **arrays)
    (folder / BLOCK_TYPES).write_text(json.dumps(kinds, indent=1, sort_keys=True) + "\n")
    return dict(sorted(kept.items()))


def decode(kind: str, raw: np.ndarray) -> Blocks:
    """Raw block rows [rows, bytes] -> codes, scales and offsets. ggml packs a 4-bit block's
    first 16 codes in the low nibbles and the last 16 in the high ones."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, LAYOUT[kind])
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(kind, 8, codes, scales, None)
    packed = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    if kind == "Q4_0":
        return Blocks(kind, 4, codes, scales, None)
    minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return Blocks(kind, 4, codes, scales, minimum)


class SourceBlocks:
    """The blocks kept beside a converted folder, read per parameter on demand."""

    def __init__(self, folder: Path) -> None:
        self.kinds: dict[str, str] = json.loads((folder / BLOCK_TYPES).read_text())
        self._file = np.load(folder / BLOCKS)

    def get(self, hf_name: str) -> Blocks | None:
        kind = self.kinds.get(hf_name)
        if kind not in LAYOUT or hf_name not in self._file.files:
            return None
        return decode(kind, self._file[hf_name])


def found(folder: Path) -> bool:
    return (folder / BLOCKS).is_file() and (folder / BLOCK_TYPES).is_file()
