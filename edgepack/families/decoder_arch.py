"""What differs between the decoder architectures the fused graph is written for, one spec each.

Every architecture here is a stack of pre-norm layers with rotary grouped-query attention and a
gated MLP; they differ only in the facts below, so the graph writer (export/decoder_graph.py)
reads a spec instead of testing the model type. Values that a config states itself (rotary
fraction, rope scaling, sliding windows, softcapping, query scale) are read from the config, not
restated here.

- llama / mistral / qwen2 (Qwen2.5, SmolLM2): the plain layer; qwen2 carries q/k/v biases in the
  checkpoint, which the writer adds where it finds them.
- qwen3: q and k are RMS-normalised per head (``q_norm``/``k_norm``) before the rotary embedding.
- phi3 (Phi-3, Phi-4-mini): q/k/v packed in one ``qkv_proj`` and gate/up in one ``gate_up_proj``
  (gate first), split when written; a rotary fraction of the head (``partial_rotary_factor``).
- gemma3_text: RMSNorm scales by (1 + w); a norm after attention and after the MLP besides the one
  before each; q/k norms; GELU (tanh) gating; embeddings times sqrt(hidden); sliding-window layers
  with their own rotary base.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderArch:
    # q, k and v as one checkpoint matrix (``qkv_proj``) instead of three.
    packed_qkv: bool = False
    # gate and up as one checkpoint matrix (``gate_up_proj``, gate rows first) instead of two.
    packed_gate_up: bool = False
    # Per-head RMSNorm of q and k (``q_norm``, ``k_norm``) before the rotary embedding.
    qk_norm: bool = False
    # Added to every RMSNorm weight when it is written: Gemma's norms scale by (1 + w).
    norm_offset: float = 0.0
    # The norm in front of the MLP, and the norms applied to the attention and MLP outputs before
    # they join the residual (None: the output joins it directly).
    mlp_norm: str = "post_attention_layernorm"
    attention_out_norm: str | None = None
    mlp_out_norm: str | None = None
    # The config key naming the MLP activation, and the activations this writer spells.
    activation_key: str = "hidden_act"
    # Token embeddings multiplied by sqrt(hidden size) after the lookup.
    scale_embeddings: bool = False
    # Sliding-window layers use the model's second rotary module (another base), not the global one.
    local_rotary: str | None = None


ARCHS: dict[str, DecoderArch] = {
    "llama": DecoderArch(),
    "mistral": DecoderArch(),
    "qwen2": DecoderArch(),
    "qwen3": DecoderArch(qk_norm=True),
    "phi3": DecoderArch(packed_qkv=True, packed_gate_up=True),
    "gemma3_text": DecoderArch(
        qk_norm=True,
        norm_offset=1.0,
        mlp_norm="pre_feedforward_layernorm",
        attention_out_norm="post_attention_layernorm",
        mlp_out_norm="post_feedforward_layernorm",
        activation_key="hidden_activation",
        scale_embeddings=True,
        local_rotary="rotary_emb_local",
    ),
}
# Activation name in a config -> the onnxruntime op computing it (QuickGelu with alpha 1 is
# x * sigmoid(x), i.e. SiLU; FastGelu is GELU's tanh approximation).
ACTIVATIONS = {"silu": "QuickGelu", "gelu_pytorch_tanh": "FastGelu"}
