"""Weight-only int4/int8 of exported tiny decoders: the graph's structure, the dequantized
weights' error, and the fidelity figures (int4 on random weights leaves fp32's greedy path at once,
so int4 is judged by structure and weight error, int8 by staying on the path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from decoder_factory import make_tiny_decoder, prompts_for

from edgepack.errors import UserError
from edgepack.evaluate import session
from edgepack.families.decoder_fidelity import greedy_prefix, perplexity_and_top1
from edgepack.families.generate import greedy
from edgepack.load import load_model
from edgepack.quantize.weight_only import WeightOnlySettings, quantize_weights


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edgepack.export.decoder import export_decoder

    root = tmp_path_factory.mktemp("q-llama")
    folder = make_tiny_decoder(root / "m", "llama")
    return folder, export_decoder(load_model(str(folder)), root / "x").path


def _ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int4_unties_and_quantizes_head_and_embedding(llama_export: tuple[Path, Path]) -> None:
    _, fp32 = llama_export
    out = fp32.with_name("int4.onnx")
    record = quantize_weights(fp32, out, WeightOnlySettings(bits=4))
    ops = _ops(out)
    # 2 layers x (q, k, v, o, gate, up, down) + the untied lm_head.
    assert ops.get("MatMulNBits") == 15 == record["matmul_nbits"]
    assert ops.get("GatherBlockQuantized") == 1 and "Gather" in ops  # shape Gathers stay
    assert record["untied_from"] == "model.embed_tokens.weight"
    import onnx

    nodes = onnx.load(str(out)).graph.node
    assert not any(n.op_type == "Transpose" and record["untied_from"] in n.input for n in nodes)
    assert out.stat().st_size < 0.7 * fp32.stat().st_size
    tokens, first = greedy(session(out), [2, 10, 11], 4, [3])
    assert np.isfinite(first).all() and 1 <= len(tokens) <= 4


def test_int4_without_untie_leaves_head_float(llama_export: tuple[Path, Path]) -> None:
    _, fp32 = llama_export
    out = fp32.with_name("int4-tied.onnx")
    record = quantize_weights(fp32, out, WeightOnlySettings(bits=4, untie_lm_head=False))
    assert record["untied_from"] is None and record["matmul_nbits"] == 14
    assert record["gather_block_quantized"] == 1  # found through input_ids


def test_int8_stays_on_the_fp32_path(llama_export: tuple[Path, Path]) -> None:
    folder, fp32 = llama_export
    out = fp32.with_name("int8.onnx")
    record = quantize_weights(fp32, out, WeightOnlySettings(bits=8))
    assert record["matmul_nbits"] == 15 and record["gather_block_quantized"] == 0
    ref, cand = session(fp32), session(out)
    prompts = prompts_for(folder)
    references = [greedy(ref, p, 16, [3])[0] for p in prompts]
    prefix = greedy_prefix(cand, prompts, references, [3])
    assert prefix["greedy_prefix_mean"] >= 8
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
