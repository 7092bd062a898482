"""An int8 KV cache: GroupQueryAttention keeps past keys and values in 8 bits with calibrated
per-channel scales, a quarter of the fp32 cache's memory.

At a long context the cache, not the int4 weights, is what grows: SmolLM2-135M's fp32 cache is
94 MB at 2048 positions, more than its whole int4 model. onnxruntime's CPU GroupQueryAttention
quantizes what it appends to the cache and dequantizes what it reads back (``k_quant_type`` /
``v_quant_type`` = PER_CHANNEL, ``kv_cache_bit_width`` = 8, scales as the ``k_scale`` /
``v_scale`` inputs); the scales are static, so they are calibrated here: the largest magnitude
each (KV head, channel) of the keys (after rotary) and values reaches on the calibration text,
over 127. Only the cache is quantized: the tokens of the current pass attend to each other in
fp32, so a perplexity measured in one pass over a window would not see the cache at all, and
the fidelity of a quantized cache is measured by feeding the text in chunks
(``token_scores(..., chunk=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.families.cache_layout import mark_cache_layout
from edgepack.families.decoder import PAST_PREFIX, PRESENT_PREFIX
from edgepack.families.generate import empty_past, step_feeds, windows

KV_CACHE_TYPES = ("fp32", "int8")
# Part of the KV-cache cache key: bump when what ``quantize_kv_cache`` writes changes.
KV_CACHE_VERSION = 2  # 2: the in-place cache mark
MAX_WINDOWS = 16
MS = "com.microsoft"
# GroupQueryAttention's inputs: k_scale and v_scale are the 13th and 14th.
K_SCALE_INDEX = 12


def kv_ranges(path: Path, ids: Sequence[int], window: int) -> dict[str, np.ndarray]:
    """Largest |value| per (KV head, channel) of every ``present.*`` output over ``ids``, flat
    [kv_heads * head_size], keyed by the past input it feeds."""
    from edgepack.evaluate import session

    sess = session(path, threads=2)
    outputs = [o.name for o in sess.get_outputs() if o.name.startswith(PRESENT_PREFIX)]
    peaks: dict[str, np.ndarray] = {}
    for chunk in windows(ids, window)[:MAX_WINDOWS]:
        values = sess.run(outputs, step_feeds(sess, chunk, empty_past(sess), 0))
        for name, value in zip(outputs, values, strict=True):
            # [batch, kv heads, positions, head size] -> [kv heads, head size]
            peak = np.abs(value).max(axis=(0, 2)).reshape(-1)
            key = PAST_PREFIX + name[len(PRESENT_PREFIX) :]
            peaks[key] = np.maximum(peaks.get(key, 0.0), peak)
    return peaks


def quantize_kv_cache(src: Path, dst: Path, ranges: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write ``src`` with an int8 cache to ``dst``: every GroupQueryAttention reading a past
    input gets its scales, and the past inputs and present outputs become int8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    layers = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.input[3] not in ranges:
            continue
        scales = []
        for name in (node.input[3], node.input[4]):
            scale = np.maximum(ranges[name], 1e-6) / 127.0
            tensor = numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")
            graph.initializer.append(tensor)
            scales.append(tensor.name)
        inputs = list(node.input) + [""] * (K_SCALE_INDEX - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:K_SCALE_INDEX] + scales)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
        layers += 1
    for value in [*graph.input, *graph.output]:
        if value.name.startswith((PAST_PREFIX, PRESENT_PREFIX)):
            value.type.tensor_type.elem_type = TensorProto.INT8
    mark_cache_layout(model)
    onnx.save(model, str(dst))
    return {"kv_cache": "int8", "per_channel_scales": True, "layers": layers}
