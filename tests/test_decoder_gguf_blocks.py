"""A GGUF's Q4_0 / Q4_1 / Q8_0 blocks carried into the weight-only graph as they are: the graph's
MatMulNBits weights are the file's dequantized weights, and its logits are the dequantized fp32
graph's, far closer than edgepack's own int4 of those weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from decoder_factory import make_tiny_decoder, write_model_gguf

from edgepack.load import load_model
from edgepack.quantize import WeightOnlySettings, quantize_weights

# accuracy level 0: fp32 activations, so only the weights' representation differs from fp32
EXACT = WeightOnlySettings(accuracy_level=0, method="rtn")


def _graph_weights(path: Path) -> dict[str, np.ndarray]:
    """Each MatMulNBits' weight [N, K] as the graph defines it: codes, scales (a Cast of fp16
    ones when carried), default zero points, plus for Q4_1 the per-block offsets m + 8 d the
    graph computes from the stored fp16 minimums and the scales."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bits, data = attrs["bits"], inits[node.input[1]]
        name = node.input[1].removesuffix(f"_Q{bits}")
        scales = inits.get(node.input[2], inits.get(node.input[2] + "_fp16"))
        scales = scales.astype(np.float32).reshape(data.shape[:2])
        codes = data if bits == 8 else np.stack([data & 0x0F, data >> 4], -1)
        codes = codes.reshape(*data.shape[:2], -1).astype(np.float32)
        values = (codes - 2 ** (bits - 1)) * scales[..., None]
        minimums = inits.get(f"{name}_block_minimums_fp16")
        if minimums is not None:
            offsets = minimums.T.astype(np.float32) + np.float32(8) * scales
            values = values + offsets[..., None]
        out[name] = values.reshape(attrs["N"], attrs["K"])
    return out


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    from edgepack.evaluate import session
    from edgepack.families.generate import empty_past, step

    sess = session(path)
    return step(sess, ids, empty_past(sess), 0)[0]


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_carried_exactly(tmp_path: Path, quant: str) -> None:
    """A llama-architecture file (q/k rows reordered by llama.cpp and back by transformers; q/k/v
    joined in the graph; tied vocabulary shared by the lm_head and the embedding)."""
    import onnx
    from onnx import numpy_helper

    from edgepack.export.decoder import export_decoder

    folder = make_tiny_decoder(tmp_path / "m", "llama3")
    model = load_model(str(write_model_gguf(folder, "llama3", tmp_path / "m.gguf", quant)))
    fp32 = export_decoder(model, tmp_path / "x")
    carried, today = tmp_path / "carried.onnx", tmp_path / "today.onnx"
    record = quantize_weights(fp32.path, carried, EXACT, None, model.path)
    quantize_weights(fp32.path, today, EXACT, None, None)
    graph = onnx.load(str(fp32.path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    matrices = {n.input[1]: weights[n.input[1]] for n in graph.node if n.op_type == "MatMul"}
    assert record["source_blocks"]["requantized"] == {}
    assert record["source_blocks"]["carried"] == {quant: sum(v.size for v in matrices.values())}
    assert record["shared_with_lm_head"] == "lm_head.weight"
    graph = _graph_weights(carried)
    assert sorted(graph) == sorted(matrices)
    for name, weight in matrices.items():
        assert np.abs(graph[name] - weight.T).max() <= 1e-6 * np.abs(weight).max(), name
    ids = list(range(4, 40))
    reference = _logits(fp32.path, ids)
    exact = np.abs(_logits(carried, ids) - reference).max()
    requantized = np.abs(_logits(today, ids) - reference).max()
    assert exact < 1e-4 * np.abs(reference).max()
    assert exact * 100 < requantized, (exact, requantized)


def test_changed_weights_are_quantized_again(tmp_path: Path) -> None:
    """A weight that is no longer the file's (here one layer's down projection, as pruning or
    distillation would leave it) goes through edgepack's own quantizer, and the record says so;
    the vocabulary is kept out with ``keep_source_blocks="layers"``."""
    import onnx
    from onnx import numpy_helper

    from edgepack.export.decoder import export_decoder

    folder = make_tiny_decoder(tmp_path / "m", "llama3")
    model = load_model(str(write_model_gguf(folder, "llama3", tmp_path / "m.gguf", "Q4_1")))
    fp32 = export_decoder(model, tmp_path / "x")
    graph = onnx.load(str(fp32.path))
    name = "model.layers.1.mlp.down_proj.weight"
    for init in graph.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, name))
    onnx.save(graph, str(tmp_path / "changed.onnx"))
    settings: Any = WeightOnlySettings(accuracy_level=0, method="rtn", keep_source_blocks="layers")
    record = quantize_weights(
        tmp_path / "changed.onnx", tmp_path / "q.onnx", settings, None, model.path
    )
    requantized = record["source_blocks"]["requantized"]
    assert set(requantized) == {"Q4_1: changed since the file", "Q4_1: vocabulary kept out"}
    assert requantized["Q4_1: changed since the file"] == 64 * 128
    assert not any(n.startswith(name + "_block_minimums") for n in _inits(tmp_path / "q.onnx"))


def _inits(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path)).graph.initializer]


def test_a_source_blocks_value_outside_the_choices_is_one_line() -> None:
    from edgepack.config import BuildConfig
    from edgepack.decoder_before_export import check_decoder_flags
    from edgepack.errors import UserError

    with pytest.raises(UserError, match="source_blocks must be one of all, layers, off"):
        check_decoder_flags(BuildConfig(source_blocks="some"), "llama")


def test_packed_phi3_blocks_are_split_and_carried(tmp_path: Path) -> None:
    """Phi-3 packs q/k/v and gate/up in the file; the graph keeps qkv whole and splits gate_up
    into two MatMuls, each carried from its half of the packed rows."""
    from edgepack.export.decoder import export_decoder

    folder = make_tiny_decoder(tmp_path / "m", "phi3")
    model = load_model(str(write_model_gguf(folder, "phi3", tmp_path / "m.gguf", "Q8_0")))
    fp32 = export_decoder(model, tmp_path / "x")
    record = quantize_weights(fp32.path, tmp_path / "q.onnx", EXACT, None, model.path)
    assert record["source_blocks"]["requantized"] == {}
    graph = _graph_weights(tmp_path / "q.onnx")
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= set(
        graph
    )
    ids = list(range(4, 30))
    reference = _logits(fp32.path, ids)
    assert (
        np.abs(_logits(tmp_path / "q.onnx", ids) - reference).max() < 1e-4 * np.abs(reference).max()
    )
