"""Weight-only int4/int8 of exported tiny decoders: the graph's structure, the dequantized
weights' error, and the fidelity figures (int4 on random weights leaves fp32's greedy path at once,
so int4 is judged by structure and weight error, int8 by staying on the path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from decoder_factory import VARIANTS, make_tiny_decoder, prompts_for

from edgepack.errors import UserError
from edgepack.evaluate import session
from edgepack.families.decoder_fidelity import greedy_prefix, perplexity_and_top1
from edgepack.families.generate import empty_past, greedy, step_feeds
from edgepack.load import load_model
from edgepack.quantize.blockwise import dequantize, quantize_rows
from edgepack.quantize.weight_only import UNTIED, WeightOnlySettings, quantize_weights


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edgepack.export.decoder import export_decoder

    root = tmp_path_factory.mktemp("q-llama")
    folder = make_tiny_decoder(root / "m", "llama")
    return folder, export_decoder(load_model(str(folder)), root / "x").path


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A traced graph (optimum): its tied lm_head is a runtime Transpose of the embedding."""
    from edgepack.export.decoder import export_decoder

    root = tmp_path_factory.mktemp("q-gpt2")
    folder = make_tiny_decoder(root / "m", "gpt2")
    return export_decoder(load_model(str(folder)), root / "x").path


def _ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _node(path: Path, op: str, output: str | None = None) -> Any:
    import onnx

    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == op]
    return next(n for n in nodes if output is None or output in n.output)


def test_int4_fused_graph_stores_the_tied_vocabulary_once(llama_export: tuple[Path, Path]) -> None:
    _, fp32 = llama_export
    out = fp32.with_name("int4.onnx")
    record = quantize_weights(fp32, out, WeightOnlySettings(bits=4))
    ops = _ops(out)
    # 2 layers x (qkv, o, gate, up, down) + the lm_head; no float MatMul left.
    assert ops.get("MatMulNBits") == 11 == record["matmul_nbits"]
    assert record["matmul_left_float"] == 0
    assert ops.get("GatherBlockQuantized") == 1
    assert record["shared_with_lm_head"] == "lm_head.weight"
    gather = _node(out, "GatherBlockQuantized")
    assert gather.input[0] == _node(out, "MatMulNBits", "logits").input[1]
    assert out.stat().st_size < 0.2 * fp32.stat().st_size  # 4.5 bits of 32, vocabulary once
    tokens, first = greedy(session(out), [2, 10, 11], 4, [3])
    assert np.isfinite(first).all() and 1 <= len(tokens) <= 4


def test_shared_embedding_rows_equal_the_heads_dequantized_weights(
    llama_export: tuple[Path, Path],
) -> None:
    """What the embedding gathers is exactly the lm_head's int4 weights, dequantized."""
    import onnx
    from onnx import helper, numpy_helper

    _, fp32 = llama_export
    out = fp32.with_name("int4-rows.onnx")
    quantize_weights(fp32, out, WeightOnlySettings(bits=4))
    model = onnx.load(str(out))
    gathered = _node(out, "GatherBlockQuantized").output[0]
    model.graph.output.append(helper.make_empty_tensor_value_info(gathered))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    head = _node(out, "MatMulNBits", "logits")
    codes = np.stack([inits[head.input[1]] & 15, inits[head.input[1]] >> 4], axis=-1)
    rows = dequantize(codes.reshape(*codes.shape[:2], -1), inits[head.input[2]], 4, 64)
    sess = session(model.SerializeToString())
    got = sess.run([gathered], step_feeds(sess, [5, 7], empty_past(sess), 0))[0]
    np.testing.assert_array_equal(got.reshape(2, -1), rows[[5, 7]])


def test_traced_graph_unties_then_shares_the_head(gpt2_export: Path) -> None:
    out = gpt2_export.with_name("int4.onnx")
    record = quantize_weights(gpt2_export, out, WeightOnlySettings(bits=4))
    assert record["untied_from"] == "transformer.wte.weight"
    assert record["shared_with_lm_head"] == UNTIED
    import onnx

    nodes = onnx.load(str(out)).graph.node
    assert not any(n.op_type == "Transpose" and record["untied_from"] in n.input for n in nodes)


def test_int4_without_untie_leaves_head_float(gpt2_export: Path) -> None:
    out = gpt2_export.with_name("int4-tied.onnx")
    record = quantize_weights(gpt2_export, out, WeightOnlySettings(bits=4, untie_lm_head=False))
    assert record["untied_from"] is None and record["shared_with_lm_head"] is None
    # The float head still reads the table through its Transpose: a quantized copy beside it
    # would only add bytes, so the embedding stays as it is.
    assert record["gather_block_quantized"] == 0
    assert record["matmul_left_float"] >= 1


def test_int8_stays_on_the_fp32_path(llama_export: tuple[Path, Path]) -> None:
    folder, fp32 = llama_export
    out = fp32.with_name("int8.onnx")
    record = quantize_weights(fp32, out, WeightOnlySettings(bits=8))
    assert record["matmul_nbits"] == 11 and record["gather_block_quantized"] == 1
    ref, cand = session(fp32), session(out)
    prompts = prompts_for(folder)
    references = [greedy(ref, p, 16, [3])[0] for p in prompts]
    # A random model's greedy path is chaotic (near-ties everywhere), so the path is only recorded;
    # the next-token agreement over every position is what int8 must keep (int4 is near 0.5).
    prefix = greedy_prefix(cand, prompts, references, [3])
    assert len(prefix["greedy_prefix_tokens"]) == len(prompts)
    ids = [t for p in prompts for t in p] * 6
    figures = perplexity_and_top1(ref, cand, ids, window=32)
    assert figures["top1_agreement"] > 0.9
    assert abs(figures["perplexity"] / figures["perplexity_fp32"] - 1) < 0.05


def test_int4_fidelity_is_measured_not_assumed(llama_export: tuple[Path, Path]) -> None:
    """int4 moves a random model's perplexity and agreement measurably; the fp32 graph against
    itself agrees exactly - the figures can fail both ways."""
    folder, fp32 = llama_export
    out = fp32.with_name("int4-f.onnx")
    quantize_weights(fp32, out, WeightOnlySettings(bits=4))
    ref = session(fp32)
    ids = [t for p in prompts_for(folder) for t in p] * 6
    same = perplexity_and_top1(ref, session(fp32), ids, window=32)
    assert same["top1_agreement"] == 1.0 and same["perplexity"] == same["perplexity_fp32"]
    moved = perplexity_and_top1(ref, session(out), ids, window=32)
    assert moved["top1_agreement"] < 1.0 and moved["perplexity"] != moved["perplexity_fp32"]


def test_bad_settings_are_user_errors(llama_export: tuple[Path, Path]) -> None:
    _, fp32 = llama_export
    for settings in (WeightOnlySettings(bits=3), WeightOnlySettings(block_size=48)):
        with pytest.raises(UserError, match="must be"):
            quantize_weights(fp32, fp32.with_name("bad.onnx"), settings)


def test_searched_scales_beat_round_to_nearest_where_it_counts() -> None:
    """Per block the search can only lower the importance-weighted error (max|w|/7 is one of its
    candidates), and on heavy-tailed weights it lowers it clearly."""
    rng = np.random.default_rng(0)
    weight = rng.standard_t(3, size=(64, 256)).astype(np.float32)
    importance = rng.gamma(0.5, size=256).astype(np.float32)

    def error(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        diff = dequantize(codes, scales, 4, 256) - weight
        return (np.square(diff) * importance).reshape(64, 8, 32).sum(axis=-1)

    rtn = error(*quantize_rows(weight, 4, 32, importance, (1.0,)))
    searched = error(*quantize_rows(weight, 4, 32, importance))
    assert (searched <= rtn + 1e-6).all()
    assert searched.sum() < 0.85 * rtn.sum()


@pytest.mark.parametrize("bits", [4, 8])
def test_onnxruntime_computes_with_the_weights_we_quantized(tmp_path: Path, bits: int) -> None:
    """The packing (codes offset by 2^(bits-1), low nibble first, K padded to whole blocks) is
    what MatMulNBits reads: at accuracy level 0 its output is x @ our dequantized weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weight = rng.normal(size=(80, 24)).astype(np.float32)  # K = 80: two and a half blocks
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 80])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    settings = WeightOnlySettings(bits=bits, accuracy_level=0)
    quantize_weights(tmp_path / "m.onnx", tmp_path / "q.onnx", settings)
    x = rng.normal(size=(3, 80)).astype(np.float32)
    got = session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    codes, scales = quantize_rows(weight.T, bits, settings.block_size)
    np.testing.assert_allclose(got, x @ dequantize(codes, scales, bits, 80).T, atol=1e-4)
    assert np.abs(got - x @ weight).max() > 1e-3  # and it is quantized, not the float weights


def test_channel_scales_fold_without_changing_the_fp32_function(
    llama_export: tuple[Path, Path],
) -> None:
    """The AWQ-style scales move into the RMSNorm weights and the up projections: before any
    rounding the graph computes the same logits, and some groups really were scaled."""
    import onnx

    from edgepack.quantize import activation_power
    from edgepack.quantize.weight_only import fold_channel_scales

    folder, fp32 = llama_export
    ids = [t for p in prompts_for(folder) for t in p] * 4
    importance = activation_power(fp32, ids, window=32)
    model = onnx.load(str(fp32))
    alphas = fold_channel_scales(model, importance, WeightOnlySettings())
    # 2 layers x (qkv after the input norm, gate/up after the second norm, down after up).
    assert len(alphas) == 6 and any(a > 0 for a in alphas.values())
    sess, folded = session(fp32), session(model.SerializeToString())
    feeds = {
        "input_ids": np.array([ids[:12]]),
        "attention_mask": np.ones((1, 12), np.int64),
        "logits_from": np.array([0]),
    }
    want = sess.run(["logits"], {**feeds, **empty_past(sess)})[0]
    got = folded.run(["logits"], {**feeds, **empty_past(folded)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    changed = [i.name for i in model.graph.initializer if "layernorm" in i.name]
    assert changed  # the norm weights are still there, now carrying 1/s


def test_scale_search_equals_the_plain_formula() -> None:
    """The buffered search keeps the result of the plain per-factor formula, bit for bit."""
    from edgepack.quantize.blockwise import SEARCH, quantize_rows

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((300, 200)) * rng.gamma(1.0, 1.0, 200)).astype(np.float32)
    weight[3, :64] = 0.0  # an all-zero block
    importance = rng.gamma(1.0, 1.0, 200).astype(np.float32)
    for bits in (4, 8):
        codes, scales = quantize_rows(weight, bits, 64, importance)
        w = np.pad(weight, ((0, 0), (0, 56))).reshape(300, 4, 64)
        imp = np.pad(importance, (0, 56)).reshape(1, 4, 64)
        top, bottom = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        amax = np.abs(w).max(axis=-1, keepdims=True)
        amax[amax == 0] = 1.0
        errors = []
        for factor in SEARCH:
            scale = amax / (top * factor)
            q = np.clip(np.rint(w / scale), bottom, top)
            errors.append(((np.square(q * scale - w) * imp).sum(axis=-1), scale[..., 0]))
        err = np.stack([e for e, _ in errors])
        choice = err.argmin(axis=0)[None]  # the first least error, as the search's strict <
        want = np.take_along_axis(np.stack([s for _, s in errors]), choice, axis=0)[0]
        want_codes = np.clip(np.rint(w / want[..., None]), bottom, top) - bottom
        assert np.array_equal(scales, want.astype(np.float32))
        assert np.array_equal(codes, want_codes.astype(np.uint8))


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_fused_architecture_folds_scales_exactly_and_quantizes_whole(
    tmp_path: Path, kind: str
) -> None:
    """Qwen3's q/k norms, Phi-3's split packed weights and Gemma 3's (1 + w) norms, post-norms and
    scaled embedding: the AWQ-style scales fold into the norms in front of q/k/v and gate/up and
    into up's columns (never the post-norms, whose output joins the residual, not a MatMul), the
    fp32 logits stay the same, and int4 leaves no float MatMul with the vocabulary stored once."""
    import onnx

    from edgepack.export.decoder import export_decoder
    from edgepack.quantize import activation_power
    from edgepack.quantize.weight_only import fold_channel_scales

    folder = make_tiny_decoder(tmp_path / "m", kind)
    fp32 = export_decoder(load_model(str(folder)), tmp_path / "x").path
    ids = [t for p in prompts_for(folder) for t in p] * 4
    importance = activation_power(fp32, ids, window=32)
    model = onnx.load(str(fp32))
    before = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    alphas = fold_channel_scales(model, importance, WeightOnlySettings())
    assert len(alphas) == 6 and any(a > 0 for a in alphas.values())
    after = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    moved = {n for n in before if not np.array_equal(before[n], after[n])}
    outputs_of_blocks = ("post_feedforward_layernorm",)
    if kind == "gemma3":
        outputs_of_blocks += ("post_attention_layernorm",)
    assert moved and not any(name in n for n in moved for name in outputs_of_blocks)
    sess, folded = session(fp32), session(model.SerializeToString())
    feeds = {
        "input_ids": np.array([ids[:12]]),
        "attention_mask": np.ones((1, 12), np.int64),
        "logits_from": np.array([0]),
    }
    want = sess.run(["logits"], {**feeds, **empty_past(sess)})[0]
    got = folded.run(["logits"], {**feeds, **empty_past(folded)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    out = tmp_path / "int4.onnx"
    record = quantize_weights(fp32, out, WeightOnlySettings(bits=4), importance)
    assert record["matmul_nbits"] == 11 and record["matmul_left_float"] == 0
    assert record["shared_with_lm_head"] == "lm_head.weight"
    tokens, first = greedy(session(out), prompts_for(folder)[0], 4, [3])
    assert np.isfinite(first).all() and 1 <= len(tokens) <= 4
