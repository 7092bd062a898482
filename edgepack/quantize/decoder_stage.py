"""The decoder's quantize stage: fp32 graph -> its weight-only copy (and int8 KV cache), behind
the cache.

One cached artifact per setting, export, calibration text and GGUF source blocks, so a build over
several targets, or a rebuild, quantizes each distinct setting once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgepack.artifacts import OnnxModel, sha256_file
from edgepack.cache import cached
from edgepack.load import BLOCKS
from edgepack.quantize.importance import activation_power
from edgepack.quantize.kv_cache import KV_CACHE_VERSION, kv_ranges, quantize_kv_cache
from edgepack.quantize.weight_only import WEIGHT_ONLY_VERSION, WeightOnlySettings, quantize_weights


def weight_only_stage(
    fp32: OnnxModel,
    settings: WeightOnlySettings,
    kv: str,
    calibration: list[int],
    window: int,
    source: Path | None = None,
) -> OnnxModel:
    """The weight-only copy of ``fp32`` with a ``kv`` ("fp32" or "int8") cache; ``source`` is a
    converted GGUF's folder whose blocks are carried where the weights still are them. (The
    caller stamps it ``derived`` from ``fp32``.)"""
    key = {
        **settings.record(),
        "code": WEIGHT_ONLY_VERSION,
        "calibration": hashlib.sha256(json.dumps(calibration).encode()).hexdigest(),
        "source_blocks": None if source is None else sha256_file(source / BLOCKS),
    }
    if kv != "fp32":  # (an fp32 cache keeps the key it always had)
        key["kv_cache"] = {"type": kv, "code": KV_CACHE_VERSION}

    def make(out: Path) -> OnnxModel:
        path = out / "model.onnx"
        importance = activation_power(fp32.path, calibration, window) if calibration else None
        record = quantize_weights(fp32.path, path, settings, importance, source)
        record["calibration_tokens"] = len(calibration)
        if kv == "int8":  # scales from the quantized graph's own keys and values
            record["kv_cache"] = quantize_kv_cache(path, path, kv_ranges(path, calibration, window))
        return OnnxModel(
            **{
                **fp32.__dict__,
                "path": path,
                "precision": f"int{settings.bits}",
                "sha256": sha256_file(path),
                "records": {**fp32.records, "quantization": record},
            }
        )

    return cached("weight-only", key, fp32.digest, OnnxModel, make)[0]
