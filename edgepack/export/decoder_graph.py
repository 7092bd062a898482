"""Llama-like decoders -> one fused ONNX graph written from the weights instead of traced.

Tracing (optimum) spells attention as some forty small ops per layer, with the rotary embedding,
the causal mask and the KV-cache concatenation each its own chain; onnxruntime runs that at a third
of the speed of its fused kernels on a one-token decode step. Written directly, a layer is ten
nodes: SkipSimplifiedLayerNormalization (RMSNorm plus the residual add), one MatMul for q/k/v
packed together, GroupQueryAttention (rotary, causal mask, cache append, grouped heads), the
output MatMul, a second SkipSimplifiedLayerNormalization, the gate and up MatMuls, QuickGelu
(SiLU), Mul and the down MatMul. Gate and up stay two MatMuls: packed into one (N = 2 x 1536 on
SmolLM2) plus a Split, decode was 5 % slower in MatMulNBits at one thread. Every MatMul reads a
plain 2-D initializer, so the weight-only quantizer turns each into one MatMulNBits. What differs
per architecture (Qwen3's q/k norms, Phi-3's packed weights, Gemma 3's extra norms and windows)
is a spec in families/decoder_arch.py; the layer pieces are in decoder_layers.py.

The graph keeps the bundle contract of the traced export: inputs ``input_ids``,
``attention_mask``, ``past_key_values.N.key/value`` (batch, kv heads, past length, head size);
outputs ``logits`` and ``present.N.key/value``; an empty past serves the first step. Positions
come from the attention mask (GroupQueryAttention's ``seqlens_k``), so there is no
``position_ids`` input: batches are one right-aligned sequence, as the harness and runtime feed.

One more input, ``logits_from`` (int64 [1]): logits are computed from that position of the pass
on. Generation needs only the last position's: on SmolLM2 the vocabulary projection (49,152 x
576) is a fifth of a prompt pass's work, spent on rows nobody reads. Perplexity and the device
check feed 0. (An initializer as its default would spare callers the input, but onnxruntime
then warns on every session that it cannot constant-fold it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import UserError
from edgepack.export.decoder_layers import (
    MS,
    Dims,
    Graph,
    Layer,
    attention,
    mlp,
    norm,
    norm_weight,
    rotary_tables,
)
from edgepack.families.cache_layout import mark_cache_layout
from edgepack.families.decoder_arch import ACTIVATIONS, ARCHS, DecoderArch

# Architectures whose layers the fused graph can write (families/decoder_arch.py says how each
# differs); anything else goes through optimum's traced export.
FUSED_TYPES = tuple(ARCHS)
# Rotary variants whose cos/sin tables do not depend on the sequence length (longrope only below
# its original context: past it transformers switches to the long factors).
STATIC_ROPE = (None, "default", "linear", "llama3", "yarn", "longrope")
OPSET = 17
# The IR version opset 17 needs. onnx's default is its newest (14 with onnx 1.23), which every
# onnxruntime before 1.32 refuses to load; saved as 8, the bundle's check passes from 1.23.0 on,
# where GatherBlockQuantized first takes ``bits`` (measured, tiny Llama int4 and int8).
IR_VERSION = 8
# Part of the export cache key: bump when the graph written for the same weights changes.
GRAPH_VERSION = 6  # 5: the logits_from input; 6: the in-place cache mark
TWO_GB = 2_000_000_000
LOGITS_FROM = "logits_from"


def _rope_type(config: dict[str, Any]) -> str | None:
    rope = config.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type"))


def fusable(config: dict[str, Any], context: int) -> str | None:
    """None when the fused graph can express this checkpoint, else why not (it is then traced)."""
    kind = config.get("model_type")
    if kind not in FUSED_TYPES:
        return f"model type {kind!r}"
    arch = ARCHS[kind]
    activation = config.get(arch.activation_key, "silu")
    if activation not in ACTIVATIONS:
        return f"activation {activation!r}"
    if config.get("mlp_bias"):
        return "MLP biases"
    rope = _rope_type(config)
    if rope not in STATIC_ROPE:
        return f"rope scaling {rope!r}"
    original = config.get("original_max_position_embeddings") or context
    if rope == "longrope" and context > original:
        return f"longrope past its original context ({context} > {original})"
    head = dims_of(config).head_dim
    if head % 16:
        return "a head size that is not a multiple of 16 (GroupQueryAttention needs one)"
    rotary = int(head * float(config.get("partial_rotary_factor") or 1.0))
    if rotary % 16:
        return f"{rotary} rotary channels, not a multiple of 16 (GroupQueryAttention needs one)"
    if config.get("final_logit_softcapping"):
        return "final logit softcapping"
    if config.get("use_bidirectional_attention"):
        return "bidirectional attention"
    return None


def dims_of(config: dict[str, Any]) -> Dims:
    heads = int(config["num_attention_heads"])
    return Dims(
        layers=int(config["num_hidden_layers"]),
        hidden=int(config["hidden_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        eps=float(config.get("rms_norm_eps", 1e-6)),
    )


def sliding_layers(config: dict[str, Any], layers: int) -> list[bool]:
    """Which layers attend through a sliding window: a config's ``layer_types`` names them (Gemma
    3, Qwen2/3); without it a ``sliding_window`` applies to every layer (Mistral, Phi-3)."""
    if not config.get("sliding_window") or config.get("use_sliding_window") is False:
        return [False] * layers
    types = config.get("layer_types") or ["sliding_attention"] * layers
    return [t == "sliding_attention" for t in types]


def layer_windows(config: dict[str, Any], layers: int, context: int) -> list[int]:
    """GroupQueryAttention's local_window_size per layer (-1: the whole context). Both
    transformers and onnxruntime let a token see the ``window`` positions ending at itself
    (measured: window - 1 moves a 40-token prompt's logits by up to 7 on the tests' tiny Phi-3 and
    Gemma 3)."""
    window = config.get("sliding_window") or context
    return [window if s and window < context else -1 for s in sliding_layers(config, layers)]


def _preamble(g: Graph) -> tuple[str, str]:
    """GroupQueryAttention's lengths from the mask: seqlens_k = valid tokens - 1, and the total."""
    from onnx import TensorProto

    total = g.op("ReduceSum", ["attention_mask", g.const("/axes1", np.array([1]))], keepdims=0)
    last = g.op("Sub", [total, g.const("/one", np.array(1, dtype=np.int64))])
    seqlens = g.op("Cast", [last], to=TensorProto.INT32)
    shape = g.op("Shape", ["attention_mask"])
    width = g.op("Gather", [shape, g.const("/index1", np.array(1, dtype=np.int64))], axis=0)
    return seqlens, g.op("Cast", [width], to=TensorProto.INT32)


def _io(d: Dims) -> tuple[list[Any], list[Any]]:
    from onnx import TensorProto, helper

    def tensor(name: str, shape: list[Any], kind: int = TensorProto.FLOAT) -> Any:
        return helper.make_tensor_value_info(name, kind, shape)

    inputs = [
        tensor("input_ids", ["batch_size", "sequence_length"], TensorProto.INT64),
        tensor("attention_mask", ["batch_size", "total_sequence_length"], TensorProto.INT64),
        tensor(LOGITS_FROM, [1], TensorProto.INT64),
    ]
    outputs = [tensor("logits", ["batch_size", "logits_length", d.vocab])]
    for i in range(d.layers):
        for kind in ("key", "value"):
            past = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
            inputs.append(tensor(f"past_key_values.{i}.{kind}", past))
            present = ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim]
            outputs.append(tensor(f"present.{i}.{kind}", present))
    return inputs, outputs


def _tables(g: Graph, net: Any, arch: DecoderArch, context: int) -> dict[str, tuple[str, str]]:
    """The rotary tables as constants: the global one, and the sliding layers' own if they have one."""
    modules = {"global": net.model.rotary_emb}
    if arch.local_rotary:
        modules["local"] = getattr(net.model, arch.local_rotary)
    names = {}
    for kind, module in modules.items():
        cos, sin = rotary_tables(module, context)
        names[kind] = (g.const(f"/cos_{kind}", cos), g.const(f"/sin_{kind}", sin))
    return names


def _attention_attrs(config: dict[str, Any]) -> dict[str, Any]:
    """GroupQueryAttention attributes a config may set: Gemma's query scale, logit softcapping."""
    attrs: dict[str, Any] = {}
    if config.get("query_pre_attn_scalar"):
        attrs["scale"] = float(config["query_pre_attn_scalar"]) ** -0.5
    if config.get("attn_logit_softcapping"):
        attrs["softcap"] = float(config["attn_logit_softcapping"])
    return attrs


def _embed(g: Graph, w: dict[str, np.ndarray], arch: DecoderArch, d: Dims) -> str:
    """The token lookup; Gemma's sqrt(hidden) is a Mul after it, not folded into the table, which
    the lm_head shares."""
    table = g.const("model.embed_tokens.weight", w["model.embed_tokens.weight"])
    x = g.op("Gather", [table, "input_ids"])
    if not arch.scale_embeddings:
        return x
    return g.op("Mul", [x, g.const("/embed_scale", np.array(d.hidden**0.5, dtype=np.float32))])


def build_graph(
    net: Any, config: dict[str, Any], context: int, external: Path | None = None
) -> Any:
    """The fused fp32 ModelProto of a loaded transformers causal LM (weights copied, not shared,
    or streamed to ``external``). Each norm takes the previous output plus the residual and
    hands on their sum."""
    from onnx import helper

    d, arch = dims_of(config), ARCHS[config["model_type"]]
    activation = config.get(arch.activation_key, "silu")
    w = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    g = Graph(external)
    tables = _tables(g, net, arch, context)
    lengths = _preamble(g)
    windows = layer_windows(config, d.layers, context)
    sliding = sliding_layers(config, d.layers)
    attrs = _attention_attrs(config)
    x = _embed(g, w, arch, d)
    residual: str | None = None
    for i in range(d.layers):
        local = sliding[i] and "local" in tables
        layer = Layer(i, w, lengths, tables["local" if local else "global"], windows[i])

        def weight(name: str, layer: Layer = layer) -> str:
            key = f"model.layers.{layer.index}.{name}.weight"
            return norm_weight(g, key, layer.weights[key], arch)

        h, residual = norm(g, x, residual, weight("input_layernorm"), d.eps)
        x = attention(g, d, arch, layer, h, attrs)
        if arch.attention_out_norm:
            x, _ = norm(g, x, None, weight(arch.attention_out_norm), d.eps)
        h, residual = norm(g, x, residual, weight(arch.mlp_norm), d.eps)
        x = mlp(g, arch, activation, layer, h)
        if arch.mlp_out_norm:
            x, _ = norm(g, x, None, weight(arch.mlp_out_norm), d.eps)
    final = norm_weight(g, "model.norm.weight", w["model.norm.weight"], arch)
    h, _ = norm(g, x, residual, final, d.eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    end, axis = g.const("/end", np.array([2**62])), g.const("/axis1", np.array([1]))
    h = g.op("Slice", [h, LOGITS_FROM, end, axis])
    g.op("MatMul", [h, g.const("lm_head.weight", head.T)], ["logits"])
    inputs, outputs = _io(d)
    graph = helper.make_graph(g.nodes, "edgepack-decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(
        graph, opset_imports=opsets, producer_name="edgepack", ir_version=IR_VERSION
    )


def save_model(model: Any, path: Path) -> None:
    """The graph at ``path``; a graph built with external weights (``Graph(external=...)``)
    already wrote them to ``model.onnx_data`` beside it."""
    import onnx

    mark_cache_layout(model)
    onnx.save(model, str(path))


def _weight_bytes(net: Any) -> int:
    return sum(p.numel() * 4 for p in net.parameters())


def write_fused(model_dir: Path, out: Path, context: int) -> None:
    """Load the checkpoint with transformers and write its fused graph to ``out``. The graph reads
    the loaded config, which fills what a checkpoint's config.json may leave out (Gemma 3's
    ``layer_types`` from its older ``sliding_window_pattern``)."""
    import torch

    from edgepack.families import decoder

    kind = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    net = decoder.auto_class("text-generation").from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    )
    if not hasattr(getattr(net, "model", None), "rotary_emb"):
        raise UserError(f"{model_dir}: no rotary embedding module where a {kind} has one.")
    # Past protobuf's 2 GB the weights stream to model.onnx_data as the graph is written.
    external = out.parent / (out.name + "_data") if _weight_bytes(net) >= TWO_GB else None
    save_model(build_graph(net, net.config.to_dict(), context, external), out)
