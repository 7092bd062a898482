"""Llama-family decoders -> one fused ONNX graph written from the weights instead of traced.

Tracing (optimum) spells attention as some forty small ops per layer, with the rotary embedding,
the causal mask and the KV-cache concatenation each its own chain; onnxruntime runs that at a third
of the speed of its fused kernels on a one-token decode step. Written directly, a layer is ten
nodes: SkipSimplifiedLayerNormalization (RMSNorm plus the residual add), one MatMul for q/k/v
packed together, GroupQueryAttention (rotary, causal mask, cache append, grouped heads), the
output MatMul, a second SkipSimplifiedLayerNormalization, the gate and up MatMuls, QuickGelu
(SiLU), Mul and the down MatMul. Gate and up stay two MatMuls: packed into one (N = 2 x 1536 on
SmolLM2) plus a Split, decode was 5 % slower in MatMulNBits at one thread. Every MatMul reads a
plain 2-D initializer, so the weight-only quantizer turns each into one MatMulNBits.

The graph keeps the bundle contract of the traced export: inputs ``input_ids``,
``attention_mask``, ``past_key_values.N.key/value`` (batch, kv heads, past length, head size);
outputs ``logits`` and ``present.N.key/value``; an empty past serves the first step. Positions
come from the attention mask (GroupQueryAttention's ``seqlens_k``), so there is no
``position_ids`` input: batches are one right-aligned sequence, as the harness and runtime feed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import UserError

# Architectures whose layers are exactly RMSNorm -> attention -> RMSNorm -> SwiGLU MLP with rotary
# positions; anything else goes through optimum's traced export.
FUSED_TYPES = ("llama", "qwen2", "mistral")
# Rotary variants whose cos/sin tables do not depend on the sequence length.
STATIC_ROPE = (None, "default", "linear", "llama3", "yarn")
OPSET = 17
# The IR version opset 17 needs. onnx's default is its newest (14 with onnx 1.23), which every
# onnxruntime before 1.32 refuses to load; saved as 8, the bundle's check passes from 1.23.0 on,
# where GatherBlockQuantized first takes ``bits`` (measured, tiny Llama int4 and int8).
IR_VERSION = 8
# Part of the export cache key: bump when the graph written for the same weights changes.
GRAPH_VERSION = 3
MS = "com.microsoft"
TWO_GB = 2_000_000_000


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float


def fusable(config: dict[str, Any], context: int) -> str | None:
    """None when the fused graph can express this checkpoint, else why not (it is then traced)."""
    kind = config.get("model_type")
    if kind not in FUSED_TYPES:
        return f"model type {kind!r}"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    if config.get("mlp_bias"):
        return "MLP biases"
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) not in STATIC_ROPE:
        return f"rope scaling {rope.get('rope_type', rope.get('type'))!r}"
    if dims_of(config).head_dim % 16:
        return "a head size that is not a multiple of 16 (GroupQueryAttention needs one)"
    window = config.get("sliding_window")
    if window and (kind != "qwen2" or config.get("use_sliding_window")) and window < context:
        return f"sliding-window attention ({window} < context {context})"
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


class Graph:
    """Nodes and initializers under construction, with unique output names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op: str, inputs: list[str], outputs: int | list[str] = 1, **attrs: Any) -> Any:
        """Append a node; returns its output name (or names, when more than one)."""
        from onnx import helper

        domain = attrs.pop("domain", "")
        self._count += 1
        names = (
            outputs
            if isinstance(outputs, list)
            else [f"/{op}_{self._count}/out{i}" for i in range(outputs)]
        )
        self.nodes.append(
            helper.make_node(op, inputs, names, name=f"/{op}_{self._count}", domain=domain, **attrs)
        )
        return names[0] if len(names) == 1 else names


def _linear(g: Graph, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
    """``x @ weight.T (+ bias)`` with the weight stored as [in, out], what MatMulNBits replaces."""
    y = g.op("MatMul", [x, g.const(name + ".weight", weight.T)])
    return y if bias is None else g.op("Add", [y, g.const(name + ".bias", bias)])


def _rotary_tables(net: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of every position up to ``length`` (half the head size), from the model's own rotary
    module so scaled variants (llama3, linear, yarn) come out as transformers computes them."""
    import torch

    rotary = net.model.rotary_emb
    positions = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(positions, rotary.inv_freq.float().cpu())
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return (freqs.cos() * scale).numpy(), (freqs.sin() * scale).numpy()


def _preamble(g: Graph) -> tuple[str, str]:
    """GroupQueryAttention's lengths from the mask: seqlens_k = valid tokens - 1, and the total."""
    from onnx import TensorProto

    total = g.op("ReduceSum", ["attention_mask", g.const("/axes1", np.array([1]))], keepdims=0)
    last = g.op("Sub", [total, g.const("/one", np.array(1, dtype=np.int64))])
    seqlens = g.op("Cast", [last], to=TensorProto.INT32)
    shape = g.op("Shape", ["attention_mask"])
    width = g.op("Gather", [shape, g.const("/index1", np.array(1, dtype=np.int64))], axis=0)
    return seqlens, g.op("Cast", [width], to=TensorProto.INT32)


def _attention(
    g: Graph, d: Dims, i: int, h: str, w: dict[str, np.ndarray], lengths: tuple[str, str]
) -> str:
    prefix = f"model.layers.{i}.self_attn."
    parts = [prefix + p for p in ("q_proj", "k_proj", "v_proj")]
    qkv_w = np.concatenate([w[p + ".weight"] for p in parts])
    biases = [w.get(p + ".bias") for p in parts]
    qkv_b = None if biases[0] is None else np.concatenate(biases)
    qkv = _linear(g, h, prefix + "qkv_proj", qkv_w, qkv_b)
    attn = g.op(
        "GroupQueryAttention",
        [
            qkv,
            "",
            "",
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            *lengths,
            "/cos",
            "/sin",
        ],
        [f"/layers.{i}/attn", f"present.{i}.key", f"present.{i}.value"],
        domain=MS,
        num_heads=d.heads,
        kv_num_heads=d.kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=-1,
    )[0]
    return _linear(
        g, attn, prefix + "o_proj", w[prefix + "o_proj.weight"], w.get(prefix + "o_proj.bias")
    )


def _mlp(g: Graph, d: Dims, i: int, h: str, w: dict[str, np.ndarray]) -> str:
    prefix = f"model.layers.{i}.mlp."
    gate = _linear(g, h, prefix + "gate_proj", w[prefix + "gate_proj.weight"], None)
    up = _linear(g, h, prefix + "up_proj", w[prefix + "up_proj.weight"], None)
    act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS, alpha=1.0), up])
    return _linear(g, act, prefix + "down_proj", w[prefix + "down_proj.weight"], None)


def _norm(g: Graph, x: str, residual: str | None, weight: str, eps: float) -> tuple[str, str]:
    """RMSNorm of ``x + residual``; returns (normed, the sum, which is the next residual)."""
    if residual is None:
        return g.op(
            "SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1
        ), x
    out = g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], 4, domain=MS, epsilon=eps)
    return out[0], out[3]


def _io(d: Dims) -> tuple[list[Any], list[Any]]:
    from onnx import TensorProto, helper

    def tensor(name: str, shape: list[Any], kind: int = TensorProto.FLOAT) -> Any:
        return helper.make_tensor_value_info(name, kind, shape)

    inputs = [
        tensor("input_ids", ["batch_size", "sequence_length"], TensorProto.INT64),
        tensor("attention_mask", ["batch_size", "total_sequence_length"], TensorProto.INT64),
    ]
    outputs = [tensor("logits", ["batch_size", "sequence_length", d.vocab])]
    for i in range(d.layers):
        for kind in ("key", "value"):
            past = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
            inputs.append(tensor(f"past_key_values.{i}.{kind}", past))
            present = ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim]
            outputs.append(tensor(f"present.{i}.{kind}", present))
    return inputs, outputs


def build_graph(net: Any, config: dict[str, Any], context: int) -> Any:
    """The fused fp32 ModelProto of a loaded transformers causal LM (weights copied, not shared)."""
    from onnx import helper

    d = dims_of(config)
    w = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    g = Graph()
    cos, sin = _rotary_tables(net, context)
    g.const("/cos", cos)
    g.const("/sin", sin)
    lengths = _preamble(g)
    x = g.op(
        "Gather",
        [g.const("model.embed_tokens.weight", w["model.embed_tokens.weight"]), "input_ids"],
    )
    residual: str | None = None
    for i in range(d.layers):
        prefix = f"model.layers.{i}."
        h, residual = _norm(
            g,
            x,
            residual,
            g.const(prefix + "input_layernorm.weight", w[prefix + "input_layernorm.weight"]),
            d.eps,
        )
        x = _attention(g, d, i, h, w, lengths)
        ln2 = g.const(
            prefix + "post_attention_layernorm.weight",
            w[prefix + "post_attention_layernorm.weight"],
        )
        h, residual = _norm(g, x, residual, ln2, d.eps)
        x = _mlp(g, d, i, h, w)
    h, _ = _norm(g, x, residual, g.const("model.norm.weight", w["model.norm.weight"]), d.eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    g.op("MatMul", [h, g.const("lm_head.weight", head.T)], ["logits"])
    inputs, outputs = _io(d)
    graph = helper.make_graph(g.nodes, "edgepack-decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(
        graph, opset_imports=opsets, producer_name="edgepack", ir_version=IR_VERSION
    )


def save_model(model: Any, path: Path) -> None:
    """Weights go to ``model.onnx_data`` beside the graph past protobuf's 2 GB limit."""
    import onnx

    if model.ByteSize() < TWO_GB:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + "_data")


def write_fused(model_dir: Path, out: Path, context: int) -> None:
    """Load the checkpoint with transformers and write its fused graph to ``out``."""
    import torch

    from edgepack.families import decoder

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    net = decoder.auto_class("text-generation").from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    )
    if not hasattr(getattr(net, "model", None), "rotary_emb"):
        raise UserError(
            f"{model_dir}: no rotary embedding module where a {config['model_type']} has one."
        )
    save_model(build_graph(net, config, context), out)
