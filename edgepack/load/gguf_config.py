"""What a GGUF says about its model that transformers' GGUF loader does not carry into the config.

transformers 4.57 maps the sizes and a few hyperparameters per architecture and drops the rest, so
without this the PyTorch model the build validates against (and the graph it exports) differs
from the model llama.cpp runs from the same file:

- Llama 3.x: the ``rope_freqs`` tensor (llama3 rope scaling as per-frequency divisors);
- Phi-3 / Phi-4-mini: the rotary width (``rope.dimension_count``, partial rotary), longrope's
  ``rope_factors_short/long`` tensors, original context and attention factor, the sliding window;
- Gemma 3: the attention scale (llama.cpp scales queries by the key width) and linear rope scaling;
- Qwen3: the head width (``attention.key_length``), wider than hidden / heads.

Also what the file already is (its quantization per tensor type), since its "fp32" is a
dequantized low-bit model and the build's fidelity is measured against that.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from edgepack.errors import UserError

# llama3 rope scaling as llama.cpp's converter writes it: (low, high) frequency factors and the
# original context tried when the file does not name them (Llama 3.1/3.2 use 1, 4 and 8192).
LLAMA3_FACTORS = ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0))
LLAMA3_CONTEXTS = tuple(2**k for k in range(4, 18))


def field(reader: Any, key: str) -> Any:
    """A metadata value as Python (number, string or list), or None when absent."""
    found = reader.fields.get(key)
    if found is None or not found.data:
        return None
    values = [found.parts[i] for i in found.data]
    if found.types and found.types[-1].name == "STRING":
        texts = [bytes(v).decode("utf-8") for v in values]
        return texts[0] if len(texts) == 1 and found.types[0].name != "ARRAY" else texts
    numbers = [v.tolist()[0] for v in values]
    return numbers[0] if len(numbers) == 1 and found.types[0].name != "ARRAY" else numbers


def tensor(reader: Any, name: str) -> np.ndarray | None:
    for item in reader.tensors:
        if item.name == name:
            return np.asarray(item.data, dtype=np.float32).reshape(-1)
    return None


def source_quantization(reader: Any) -> dict[str, Any]:
    """The file's declared type and the parameters held in each tensor type."""
    import gguf

    counts: Counter[str] = Counter()
    for item in reader.tensors:
        counts[item.tensor_type.name] += int(np.prod(item.shape))
    file_type = field(reader, "general.file_type")
    try:
        declared = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        declared = str(file_type)
    return {"file_type": declared, "parameters_by_type": dict(sorted(counts.items()))}


def llama3_rope(factors: np.ndarray, head_dim: int, theta: float, context: Any) -> dict[str, Any]:
    """llama3 rope parameters that reproduce ``factors`` (llama.cpp keeps only the divisors);
    UserError when none do, rather than build a model with the wrong positions."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if len(factors) != len(freqs):
        raise UserError(
            f"rope_freqs has {len(factors)} values for a head of {head_dim} ({len(freqs)} expected)."
        )
    factor = float(factors.max())
    contexts = (int(context),) if context else LLAMA3_CONTEXTS
    for low, high in LLAMA3_FACTORS:
        for original in contexts:
            wavelen = 2 * math.pi / freqs
            smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
            want = 1.0 / ((1 - smooth) / factor + smooth)
            if np.allclose(want, factors, rtol=1e-4, atol=1e-5):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise UserError(
        "the GGUF's rope_freqs are not llama3 rope scaling as edgepack knows it; build from the "
        "Hugging Face checkpoint instead."
    )


def restored(reader: Any, arch: str) -> dict[str, Any]:
    """Config values transformers leaves out, as ``from_pretrained`` keyword overrides."""
    heads = field(reader, f"{arch}.attention.head_count")
    width = field(reader, f"{arch}.embedding_length")
    key_length = field(reader, f"{arch}.attention.key_length")
    theta = field(reader, f"{arch}.rope.freq_base") or 10_000.0
    out: dict[str, Any] = {}
    if arch == "llama" and (factors := tensor(reader, "rope_freqs.weight")) is not None:
        head_dim = field(reader, "llama.rope.dimension_count") or width // heads
        original = field(reader, "llama.rope.scaling.original_context_length")
        out["rope_scaling"] = llama3_rope(factors, head_dim, theta, original)
    elif arch == "qwen3" and key_length:
        out["head_dim"] = key_length
    elif arch == "phi3":
        out.update(_phi3(reader, width // heads))
        if window := field(reader, "phi3.attention.sliding_window"):
            out["sliding_window"] = window
    elif arch == "gemma3":
        if key_length:
            out["query_pre_attn_scalar"] = key_length  # llama.cpp's scale for every size but 27B
        if field(reader, "gemma3.rope.scaling.type") == "linear":
            factor = float(field(reader, "gemma3.rope.scaling.factor") or 1.0)
            out["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return out


def _phi3(reader: Any, head_dim: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rotary = field(reader, "phi3.rope.dimension_count")
    if rotary and rotary != head_dim:
        out["partial_rotary_factor"] = rotary / head_dim
    short = tensor(reader, "rope_factors_short.weight")
    long = tensor(reader, "rope_factors_long.weight")
    if short is None or long is None:
        return out
    out["rope_scaling"] = {
        "type": "longrope",
        "short_factor": short.tolist(),
        "long_factor": long.tolist(),
    }
    context = field(reader, "phi3.context_length")
    original = field(reader, "phi3.rope.scaling.original_context_length") or context
    out["original_max_position_embeddings"] = int(original)
    # transformers derives the attention factor from the two contexts, as the converter did;
    # a file whose factor says otherwise would build a different model, so it is refused.
    scale = context / original
    derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    stated = field(reader, "phi3.rope.scaling.attn_factor")
    if stated is not None and abs(stated - derived) > 1e-4 * derived:
        raise UserError(
            f"the GGUF's longrope attention factor {stated:.6g} is not the {derived:.6g} its "
            "contexts imply; build from the Hugging Face checkpoint instead."
        )
    return out
