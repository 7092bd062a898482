"""The pieces of one fused decoder layer (norms, attention, MLP), written from the checkpoint's
weights as an architecture spec (families/decoder_arch.py) describes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.families.decoder_arch import ACTIVATIONS, DecoderArch

MS = "com.microsoft"


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


# Weights at least this large go to the external data file when the graph has one.
EXTERNAL_MIN_BYTES = 1024
PAGE = 4096


class Graph:
    """Nodes and initializers under construction, with unique output names; a constant named twice
    (a shape every layer reshapes by) is stored once.

    With ``external``, every weight of a KB or more is appended to that file as it is made and the
    graph keeps only its reference: a model past protobuf's 2 GB limit is written without ever
    holding its weights in the protobuf (or twice in memory).
    """

    def __init__(self, external: Path | None = None) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._names: set[str] = set()
        self._count = 0
        self.external = external
        if external is not None:
            external.write_bytes(b"")

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self._names:
            return name
        self._names.add(name)
        array = np.ascontiguousarray(array)
        if self.external is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
            self.inits.append(self._external(name, array))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def _external(self, name: str, array: np.ndarray) -> Any:
        """A TensorProto whose data is appended (page-aligned) to the external file."""
        from onnx import TensorProto, helper

        assert self.external is not None
        with open(self.external, "ab") as handle:
            offset = -handle.tell() % PAGE
            handle.write(b"\0" * offset)
            start = handle.tell()
            handle.write(array.tobytes())
        tensor = TensorProto()
        tensor.name = name
        tensor.dims.extend(array.shape)
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.external.name),
            ("offset", str(start)),
            ("length", str(array.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

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


@dataclass(frozen=True)
class Layer:
    """One layer's place in the graph: its index, weights, and what its attention reads."""

    index: int
    weights: dict[str, np.ndarray]
    lengths: tuple[str, str]  # GroupQueryAttention's seqlens_k and total length
    rotary: tuple[str, str]  # cos and sin tables
    window: int  # GroupQueryAttention's local_window_size (-1: attends to everything)

    def w(self, name: str) -> np.ndarray:
        return self.weights[f"model.layers.{self.index}.{name}"]

    def get(self, name: str) -> np.ndarray | None:
        return self.weights.get(f"model.layers.{self.index}.{name}")


def linear(g: Graph, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
    """``x @ weight.T (+ bias)`` with the weight stored as [in, out], what MatMulNBits replaces."""
    y = g.op("MatMul", [x, g.const(name + ".weight", weight.T)])
    return y if bias is None else g.op("Add", [y, g.const(name + ".bias", bias)])


def norm_weight(g: Graph, name: str, weight: np.ndarray, arch: DecoderArch) -> str:
    """An RMSNorm weight as the graph multiplies by it: Gemma's 1 + w is folded in here, so the
    norm is onnxruntime's plain one (and the weight-only scale folding stays exact)."""
    return g.const(name, (weight + np.float32(arch.norm_offset)).astype(np.float32))


def norm(g: Graph, x: str, residual: str | None, weight: str, eps: float) -> tuple[str, str]:
    """RMSNorm of ``x + residual``; returns (normed, the sum, which is the next residual)."""
    if residual is None:
        return g.op(
            "SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1
        ), x
    out = g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], 4, domain=MS, epsilon=eps)
    return out[0], out[3]


def _qkv(layer: Layer, arch: DecoderArch) -> tuple[np.ndarray, np.ndarray | None]:
    """The q, k and v projections as one [q + k + v, hidden] matrix (and bias, when present)."""
    if arch.packed_qkv:
        return layer.w("self_attn.qkv_proj.weight"), layer.get("self_attn.qkv_proj.bias")
    parts = [f"self_attn.{p}_proj" for p in "qkv"]
    biases = [layer.get(p + ".bias") for p in parts]
    bias = None if biases[0] is None else np.concatenate(biases)
    return np.concatenate([layer.w(p + ".weight") for p in parts]), bias


def _head_norm(g: Graph, x: str, heads: int, d: Dims, weight: str) -> str:
    """RMSNorm over each head of ``x`` [batch, seq, heads x head size]."""
    per_head = g.op("Reshape", [x, g.const(f"/shape_{heads}_heads", np.array([0, 0, heads, -1]))])
    normed = g.op(
        "SimplifiedLayerNormalization", [per_head, weight], axis=-1, epsilon=d.eps, stash_type=1
    )
    return g.op("Reshape", [normed, g.const("/shape_flat", np.array([0, 0, -1]))])


def attention(
    g: Graph, d: Dims, arch: DecoderArch, layer: Layer, h: str, attrs: dict[str, Any]
) -> str:
    """One MatMul for q/k/v, GroupQueryAttention (rotary, mask, window, cache), the output MatMul.
    With q/k norms the packed projection is split so q and k can be normalised per head first."""
    i, prefix = layer.index, f"model.layers.{layer.index}.self_attn."
    qkv = linear(g, h, prefix + "qkv_proj", *_qkv(layer, arch))
    if arch.qk_norm:
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        q, k, v = g.op("Split", [qkv, g.const(f"/split_{i}", np.array(sizes))], 3, axis=-1)
        q_w = norm_weight(g, prefix + "q_norm.weight", layer.w("self_attn.q_norm.weight"), arch)
        k_w = norm_weight(g, prefix + "k_norm.weight", layer.w("self_attn.k_norm.weight"), arch)
        qkv_inputs = [_head_norm(g, q, d.heads, d, q_w), _head_norm(g, k, d.kv_heads, d, k_w), v]
    else:
        qkv_inputs = [qkv, "", ""]
    attn = g.op(
        "GroupQueryAttention",
        [
            *qkv_inputs,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            *layer.lengths,
            *layer.rotary,
        ],
        [f"/layers.{i}/attn", f"present.{i}.key", f"present.{i}.value"],
        domain=MS,
        num_heads=d.heads,
        kv_num_heads=d.kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=layer.window,
        **attrs,
    )[0]
    return linear(
        g,
        attn,
        prefix + "o_proj",
        layer.w("self_attn.o_proj.weight"),
        layer.get("self_attn.o_proj.bias"),
    )


def mlp(g: Graph, arch: DecoderArch, activation: str, layer: Layer, h: str) -> str:
    """act(gate) * up, then down. Gate and up stay two MatMuls even where the checkpoint packs
    them: packed (N = 2 x 1536 on SmolLM2) plus a Split, decode was 5 % slower in MatMulNBits."""
    prefix = f"model.layers.{layer.index}.mlp."
    if arch.packed_gate_up:
        gate_w, up_w = np.split(layer.w("mlp.gate_up_proj.weight"), 2)
    else:
        gate_w, up_w = layer.w("mlp.gate_proj.weight"), layer.w("mlp.up_proj.weight")
    gate = linear(g, h, prefix + "gate_proj", gate_w, None)
    up = linear(g, h, prefix + "up_proj", up_w, None)
    op = ACTIVATIONS[activation]
    attrs = {"alpha": 1.0} if op == "QuickGelu" else {}
    act = g.op("Mul", [g.op(op, [gate], domain=MS, **attrs), up])
    return linear(g, act, prefix + "down_proj", layer.w("mlp.down_proj.weight"), None)


def rotary_tables(module: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of every position up to ``length`` (half the rotary width), from the model's own
    rotary module so scaled variants (llama3, linear, yarn, longrope's short factors) come out as
    transformers computes them."""
    import torch

    positions = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(positions, module.inv_freq.float().cpu())
    scale = float(getattr(module, "attention_scaling", 1.0))
    return (freqs.cos() * scale).numpy(), (freqs.sin() * scale).numpy()
