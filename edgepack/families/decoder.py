"""Generative decoders: causal language models (Llama, Qwen2/3, Gemma 3, Phi-3, Mistral, GPT-2).

What the stages would otherwise assume about a decoder lives here: which architectures are served,
that the one task is text generation exported with its KV cache, which transformers class loads
it, and how the exported graph's inputs are named. Greedy decoding of an exported graph is in
``edgepack.families.generate`` (numpy only, like the device harness).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.families import dims

NAME = "decoder"
GENERATIVE = True
# Architectures the decoder export and weight-only quantization are tested for (tiny random
# configs in tests/test_decoder*.py; Llama also with the real SmolLM2 sample). All but GPT-2 are
# written as the fused graph (export/decoder_graph.py, families/decoder_arch.py).
MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text", "phi3", "mistral", "gpt2")
TASKS = ("text-generation",)
CLASSIFIER_TASKS: tuple[str, ...] = ()
AUTO_CLASSES = {"text-generation": "AutoModelForCausalLM"}
PRIMARY_OUTPUT = {"text-generation": "logits"}
# optimum's task name for one merged graph that takes and returns the KV cache: an empty past
# serves the first step, so one file does prefill and decode.
EXPORT_TASK = "text-generation-with-past"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# The longest context a bundle serves (KV cache and rotary tables are sized to it): SmolLM2
# declares 8192, far past what edge devices hold.
MAX_CONTEXT = 2048
# Architecture suffixes of a checkpoint saved with a language-model head.
_LM_HEADS = ("ForCausalLM", "LMHeadModel")


def detect_task(config: dict[str, Any]) -> str:
    """``text-generation`` for a checkpoint with an LM head; otherwise the head it has, which
    ``load_model`` refuses (a decoder classifier is not served)."""
    archs = config.get("architectures") or []
    if any(a.endswith(_LM_HEADS) for a in archs):
        return "text-generation"
    heads = [a for a in archs if "For" in a]
    return f"no causal LM head ({', '.join(heads) or 'base model'})"


def primary_output(task: str, library: str) -> str:
    return PRIMARY_OUTPUT[task]


def auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def output_kind(task: str, library: str) -> str:
    return "next-token-logits"


def masks(feeds: list[dict[str, Any]]) -> list[Any] | None:
    if not feeds or "attention_mask" not in feeds[0]:
        return None
    return [f["attention_mask"] for f in feeds]


def past_name(present: str) -> str:
    """The input a ``present.N.key`` output feeds on the next step."""
    return PAST_PREFIX + present[len(PRESENT_PREFIX) :]


def context_length(config: dict[str, Any]) -> int:
    """The longest prompt plus continuation the model was trained for (GPT-2 calls it n_positions)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 2048


def profile_misfit(profile: dict[str, Any]) -> str | None:
    """Why a target profile cannot serve a decoder bundle, or None when it can.

    A decoder bundle's harness and runtime run onnxruntime's CPU provider only: its weight-only
    kernels (MatMulNBits, GatherBlockQuantized) are contrib ops the NNAPI, CoreML and XNNPACK
    providers do not take, and its KV cache grows by one position per generated token, which a
    graph pinned to [batch, seq_len] cannot hold.
    """
    harness, form = profile.get("harness", {}), profile.get("format", {})
    if form.get("fixed_shape"):
        return (
            f"it pins inputs to [{harness.get('batch', 1)}, {harness.get('seq_len')}] and a "
            "decoder's KV cache grows with every token"
        )
    provider = harness.get("execution_provider", "cpu")
    if provider != "cpu":
        return (
            f"its {provider} execution provider runs none of the decoder's weight-only kernels "
            "(MatMulNBits, GatherBlockQuantized); decoders run on the CPU provider"
        )
    return None


# The sizes a decoder's config declares, under the names its model types use (GPT-2 says n_embd,
# n_layer, n_head, n_inner), and whether null is allowed (GPT-2's n_inner null means 4 x hidden;
# no num_key_value_heads means one per head; no head_dim means hidden / heads).
DIMENSIONS = {
    "vocab": (("vocab_size",), False),
    "hidden": (("hidden_size", "n_embd"), False),
    "layers": (("num_hidden_layers", "n_layer"), False),
    "heads": (("num_attention_heads", "n_head"), False),
    "kv_heads": (("num_key_value_heads",), True),
    "head_dim": (("head_dim",), True),
    "ffn": (("intermediate_size", "n_inner"), True),
    "positions": (("max_position_embeddings", "n_positions"), False),
}
NUMBERS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")


def check_config(
    config: dict[str, Any], where: Path, weight_bytes: int, per_byte: int = dims.PARAMS_PER_BYTE
) -> None:
    """Types, head split and size of a decoder config (or a GGUF's metadata, whose quantized
    weights pack more ``per_byte``), before transformers builds anything."""
    sizes = dims.read(config, str(config.get("model_type")), where, DIMENSIONS)
    dims.positive_numbers(config, NUMBERS, where)
    if sizes["head_dim"] is None:
        dims.divisible(sizes, "hidden", "heads", "hidden_size and num_attention_heads", where)
    dims.divisible(sizes, "heads", "kv_heads", "num_attention_heads and num_key_value_heads", where)
    hidden, heads = sizes["hidden"] or 0, sizes["heads"] or 1
    head_dim = sizes["head_dim"] or hidden // heads
    kv = sizes["kv_heads"] or heads
    ffn = sizes["ffn"] or 4 * hidden
    # The token embedding, then per layer q and o (heads), k and v (kv heads) and two FFN
    # matrices (a third, SwiGLU's gate, is left out: the estimate must not overshoot GPT-2).
    per_layer = 2 * hidden * head_dim * (heads + kv) + 2 * hidden * ffn
    params = (sizes["vocab"] or 0) * hidden + (sizes["layers"] or 0) * per_layer
    dims.check_size(params, weight_bytes, where, per_byte)
