"""The decoder benchmark's optional int4 algorithm rows (benchmarks/llm_algorithms.py) on a tiny
random Llama: every algorithm builds from edgepack's fused export, is cached, and measures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from decoder_factory import make_tiny_decoder


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    from edgepack.export.decoder import export_decoder
    from edgepack.load import load_model

    tmp = tmp_path_factory.mktemp("algo")
    folder = make_tiny_decoder(tmp / "m", "llama")
    fp32 = export_decoder(load_model(str(folder)), tmp / "export")
    assert fp32.records["graph"] == "fused"
    vocab = len((folder / "vocab.txt").read_text().split())
    return fp32.path, np.random.default_rng(0).integers(4, vocab, 300).tolist()


def test_algorithm_rows_build_and_measure(fused: tuple[Path, list[int]], tmp_path: Path) -> None:
    from benchmarks.llm_algorithms import ALGORITHMS, _note, build_algorithm
    from benchmarks.llm_measure import LlmVariant, measure

    src, ids = fused
    variants, records = [LlmVariant("fp32", "fp32", src)], {}
    for name in ALGORITHMS:
        start = time.perf_counter()
        path, record = build_algorithm(name, src, ids, tmp_path, window=64)
        assert time.perf_counter() - start < 10, f"{name} is too slow for this test"
        records[name] = record
        assert record["matmul_nbits"] == 11 and record["matmul_left_float"] == 0  # lm_head too
        variants.append(LlmVariant(name, name, path, _note(name, record)))
    assert records["gptq"]["calibration_tokens"] == 256  # 4 full windows of 64, tail dropped
    assert records["rtn"]["embedding"] == "int4 GatherBlockQuantized"
    assert records["hqq"]["embedding"] == records["gptq"]["embedding"] == "fp32"
    assert records["edgepack-rtn"]["shared_with_lm_head"] == "lm_head.weight"
    assert records["edgepack-rtn"]["method"] == "rtn" and not records["edgepack-rtn"]["calibrated"]
    assert records["edgepack-search"]["calibrated"]

    again, _ = build_algorithm("edgepack-rtn", src, ids, tmp_path, window=64)
    assert again == variants[4].path  # cached, not built again
    rows = measure(variants, [ids[:120], ids[120:220]], ids[:8], new_tokens=3, rounds=1, rss=False)
    fp32_ppl = rows[0].perplexity[0]
    for row in rows[1:]:
        assert row.size_mb and row.size_mb < rows[0].size_mb
        assert row.ttft_ms and row.tokens_per_s
        assert len(row.perplexity) == 2 and 1 < row.perplexity[0] < 3 * fp32_ppl
    ppl = {r.variant.key: r.perplexity[0] for r in rows}
    assert ppl["edgepack-search"] != ppl["edgepack-rtn"]  # different scales, different graph


def test_memoized_gptq_gives_onnxruntime_s_own_result(fused: tuple[Path, list[int]]) -> None:
    """Serving GPTQ's activations from one pass per window must not change a single byte."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from benchmarks.llm_algorithms import BLOCK, _memoized_gptq_sessions, _ort_config, window_feeds

    src, ids = fused
    feeds = window_feeds(src, ids, 64)

    def quantized(memo: bool) -> dict[str, bytes]:
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), block_size=BLOCK, algo_config=_ort_config("gptq", feeds)
        )
        if memo:
            with _memoized_gptq_sessions():
                quantizer.process()
        else:
            quantizer.process()
        model = quantizer.model.model
        return {i.name: i.SerializeToString() for i in model.graph.initializer}

    assert quantized(True) == quantized(False)


def test_algorithm_names() -> None:
    from benchmarks.llm_algorithms import algorithm_note, parse_algorithms

    assert parse_algorithms("rtn, gptq,,edgepack-rtn") == ("rtn", "gptq", "edgepack-rtn")
    assert parse_algorithms("") == () and algorithm_note(()) is None
    with pytest.raises(ValueError, match="awq"):
        parse_algorithms("rtn,awq")
    assert "accuracy_level 4" in (algorithm_note(("rtn",)) or "")
