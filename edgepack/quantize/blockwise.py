"""Symmetric block quantization of weight rows, with each block's scale searched, not fixed.

Round-to-nearest with ``scale = max|w| / 7`` wastes the int4 grid's -8 and lets one outlier set
the step for 31 ordinary weights. Here each block tries a range of scales (from no clipping to
clipping the largest weights) and keeps the one with the least squared error, weighted per input
channel by how strongly calibration activations drive it (mean x², the "importance matrix" idea):
an error on a channel that carries large activations costs more output error. On SmolLM2-135M this
is what moves int4 perplexity toward fp32 at the same size and speed (benchmarks/results-llm.md).

Codes are stored offset by 2^(bits-1) (0..15 for int4), the zero point onnxruntime's
MatMulNBits and GatherBlockQuantized assume when none is given; two int4 codes per byte, low
nibble first, along the input axis.
"""

from __future__ import annotations

import numpy as np

# Divisors of max|w| tried per block, as fractions of the largest positive code (7 for int4):
# 1.0 keeps every weight in range; larger values use the -8 code and clip outliers.
SEARCH = tuple(np.linspace(0.85, 1.30, 19))
ROWS = 2048  # rows per chunk: bounds the search's temporaries to ~100 MB on a 32k-vocab head


def quantize_rows(
    weight: np.ndarray,
    bits: int,
    block: int,
    importance: np.ndarray | None = None,
    search: tuple[float, ...] = SEARCH,
) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [rows, k] -> (codes uint8 [rows, blocks, block], scales float32 [rows, blocks]).

    ``k`` is zero-padded to whole blocks; ``importance`` [k] weighs the error per input channel."""
    rows, k = weight.shape
    nblocks = -(-k // block)
    pad = nblocks * block - k
    w = np.pad(weight.astype(np.float32), ((0, 0), (0, pad))).reshape(rows, nblocks, block)
    imp = (
        np.ones(nblocks * block, np.float32) if importance is None else np.pad(importance, (0, pad))
    )
    imp = imp.astype(np.float32).reshape(1, nblocks, block)
    codes = np.empty(w.shape, np.uint8)
    scales = np.empty((rows, nblocks), np.float32)
    for start in range(0, rows, ROWS):
        part = slice(start, start + ROWS)
        codes[part], scales[part] = _search(w[part], bits, imp, search)
    return codes, scales


def _search(
    w: np.ndarray, bits: int, imp: np.ndarray, search: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Each block's best scale among ``search``. The arithmetic is float64 and every step writes
    into buffers allocated once: the build spends most of its quantize stage here (SmolLM2: 290 of
    330 s with temporaries per step, half that without; the codes and scales are bit-identical)."""
    top, bottom = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    amax = np.abs(w).max(axis=-1, keepdims=True)
    amax[amax == 0] = 1.0
    best_err = np.full(amax.shape, np.inf)
    best, scale, err = np.empty(amax.shape), np.empty(amax.shape), np.empty(amax.shape)
    better = np.empty(amax.shape, bool)
    q = np.empty(w.shape)
    for factor in search:
        np.divide(amax, np.float64(top * factor), out=scale)
        _codes(w, scale, bottom, top, q)
        q *= scale
        q -= w
        np.square(q, out=q)
        q *= imp
        q.sum(axis=-1, keepdims=True, out=err)
        np.less(err, best_err, out=better)
        np.copyto(best_err, err, where=better)
        np.copyto(best, scale, where=better)
    _codes(w, best, bottom, top, q)
    q -= bottom
    return q.astype(np.uint8), best[..., 0]


def _codes(w: np.ndarray, scale: np.ndarray, bottom: int, top: int, out: np.ndarray) -> None:
    """round(w / scale) clipped to the grid, into ``out`` (minimum/maximum: np.clip is slower)."""
    np.divide(w, scale, out=out)
    np.rint(out, out=out)
    np.maximum(out, bottom, out=out)
    np.minimum(out, top, out=out)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., block] -> bytes [..., block * bits / 8], low bits first."""
    if bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The weights the device computes with, [rows, k]: for measuring what quantizing cost."""
    values = (codes.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    return values.reshape(codes.shape[0], -1)[:, :k]
