"""The int8 recipe's knobs and their checks, apart from the code that runs the recipe.

The graph helpers read these settings too, so they live in a module of their own that imports
nothing of the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepack.errors import UserError

# Recorded in every int8 model and manifest: a change to the recipe that changes its output must
# change this name, so bundles say which recipe made them.
RECIPE = "smoothquant-linear-qdq/v3"
_ACT_TYPES = ("uint8", "int8")
_WEIGHT_TYPES = ("int8", "uint8")
_METHODS = ("minmax", "entropy", "percentile")
_SITES = ("qkv", "attn_out", "ffn_in", "ffn_out", "other")
_FORMATS = ("qdq", "ort_fused")
EMBEDDING_BITS = {"int8": 8, "int4": 4, "fp32": 0}


@dataclass(frozen=True)
class QuantSettings:
    """Recipe knobs. Numbers below: all-MiniLM-L6-v2, held-out mean/min cosine of the sentence
    embedding to fp32 (363 texts), latency ratios vs fp32 on an AVX2 (no VNNI) EPYC, 1 thread,
    seq 128, interleaved medians (lat-lab notes in the report of 2026-11-28)."""

    activation_type: str = "uint8"  # "uint8" | "int8"; uint8 asymmetric fits post-GELU (>= -0.17)
    # "int8" | "uint8". int8 symmetric per column runs MLAS's u8s8 kernel; uint8 weights run the
    # u8u8 kernel (only with quant_format="ort_fused"): best fidelity (0.9987 / min 0.9930, no
    # saturation) but that kernel is 12-17% slower per GEMM on AVX2 (gemm_peak.py), ratio 0.75-0.81.
    weight_type: str = "int8"
    # Per output column weight scales. Per-tensor: 0.9941 / min 0.9722 and no faster (the scale is
    # applied in the GEMM's output pass either way: per-column and scalar kernels time the same).
    per_channel: bool = True
    # 7-bit int8 weights ([-64, 64]). AVX2 without VNNI computes u8*s8 pairs with vpmaddubsw, which
    # saturates int16; measured 0.9971 / min 0.9885 (full range) -> 0.9979 / min 0.9899 (7-bit),
    # same kernel and speed. On VNNI / ARM dot-product CPUs (no saturation) profiles set False.
    reduce_range: bool = True
    calibrate_method: str = (
        "minmax"  # "minmax" | "entropy" | "percentile"; min-max measured best here
    )
    # SmoothQuant migration strength a in [0, 1]; 0 disables smoothing. BERT-style encoders have a few
    # outlier channels (LayerNorm outputs up to 30x the median channel, post-GELU up to 16x); per-tensor
    # activation scales waste most of the 8 bits on them unless they are moved into the weights.
    smooth_alpha: float = 0.5
    # Which linear-MatMul input groups get smoothed (structural roles found in the graph). Measured on
    # MiniLM with the outlier split: none 0.9909 / min 0.9522, ffn_in 0.9967 / 0.9796, ffn_in + qkv
    # 0.9979 / 0.9899 (reduce_range). Smoothing ffn_out HURTS (0.9779: the post-GELU negative tail
    # -0.17/s_j blows up the range) -> split it instead. Each smoothed input costs one Mul over the
    # activation (the LayerNorm outputs also feed residual Adds, so 1/s cannot be folded into them):
    # 12 Muls ~2% of int8 time. Folding 1/s into a per-channel QuantizeLinear scale (same int8
    # values) is not a way out: onnxruntime's per-axis QuantizeLinear took 1005 us vs 23 us for
    # Mul + per-tensor QuantizeLinear at [1, 128, 384] (ORT 1.32, 1 thread).
    smooth_sites: tuple[str, ...] = ("qkv", "ffn_in")
    # LLM.int8()-style outlier split: the k input channels with the largest calibrated |x| of each
    # linear in `outlier_sites` are computed by a small fp32 MatMul on the gathered (fp32) columns;
    # their weight rows are zeroed in the int8 MatMul, so the per-tensor activation range excludes
    # them. Sites that are split are not smoothed. Measured: 4 ffn_out channels 0.9952 / min 0.977
    # while the Gather read the clipped Q->DQ copy ; reading the fp32 tensor instead: 0.9971 / 0.9885. Cost: Gather + [S,k]x[k,N] MatMul + Add per layer, ~1.5% of int8 time.
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
    # "qdq": portable QuantizeLinear/DequantizeLinear graph (NNAPI/XNNPACK/QNN take it, and the
    # accuracy search edits it); onnxruntime's CPU EP fuses each DQ->MatMul into
    # MatMulIntegerToFloat but leaves every bias Add separate. "ort_fused": emit QuantizeLinear ->
    # com.microsoft MatMulIntegerToFloat with the bias in the kernel (36 Adds fewer on MiniLM; the
    # GELU then fuses to Gelu instead of BiasGelu); onnxruntime CPU EP only (x86 and ARM).
    # Same fidelity. MiniLM, AVX512-VNNI EPYC, 1 thread, interleaved: ort_fused 0.396x fp32 at
    # seq 32 and 128, qdq 0.422x / 0.410x; the cpu-vnni profile chooses ort_fused.
    quant_format: str = "qdq"
    # Weight-only embedding tables (word, position, token type Gathers): "int8" per row with
    # standard ops, "int4" blocks through com.microsoft GatherBlockQuantized (onnxruntime CPU EP
    # only), "fp32" keeps them. The word table is 47 of the 59 MB of an int8 MiniLM bundle; the
    # accuracy search can put any table back to fp32.
    embedding_precision: str = "int8"
    embedding_block_size: int = 32  # values per 4-bit scale (a power of 2 >= 16)


def check_quant_settings(s: QuantSettings) -> None:
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
    if s.quant_format not in _FORMATS:
        raise UserError(f"quant_format must be one of {_FORMATS}, got {s.quant_format!r}")
    if s.embedding_precision not in EMBEDDING_BITS:
        raise UserError(
            f"embedding_precision must be one of {tuple(EMBEDDING_BITS)}, got {s.embedding_precision!r}"
        )
    b = s.embedding_block_size
    if b < 16 or b & (b - 1):
        raise UserError(f"embedding_block_size must be a power of 2 >= 16, got {b}")
    if s.max_calibration_batches is not None and s.max_calibration_batches < 1:
        raise UserError("max_calibration_batches must be >= 1 or None")
    if s.quant_format == "qdq" and s.activation_type == "uint8" and s.weight_type == "uint8":
        raise UserError(
            "uint8 activations with uint8 weights is not supported by onnxruntime's CPU kernels"
            " in QDQ form; use weight_type='int8' or quant_format='ort_fused'"
        )
    if s.quant_format == "ort_fused" and s.activation_type == "int8" and s.weight_type == "uint8":
        raise UserError(
            "onnxruntime has no MatMulIntegerToFloat for int8 activations with uint8 weights;"
            " use weight_type='int8' or activation_type='uint8'"
        )
