"""The decoder benchmark's measuring code on a tiny random Llama, so it cannot rot unnoticed.

The real run (`python -m benchmarks.llm`: the sample model, onnxruntime-genai's builder in its own
venv) is a command, not a test; this covers everything it does except building those two.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from decoder_factory import make_tiny_decoder


def test_llm_benchmark_measures_and_tables_a_tiny_decoder(tmp_path: Path) -> None:
    from benchmarks.llm import RunInfo, render
    from benchmarks.llm_build import optimum_fp32, resolve_model
    from benchmarks.llm_measure import LlmVariant, measure, session
    from edgepack.families.decoder_fidelity import perplexity_and_top1
    from edgepack.quantize import WeightOnlySettings, quantize_weights

    folder = make_tiny_decoder(tmp_path / "m", "llama")
    fp32 = optimum_fp32(folder, tmp_path / "work")
    assert optimum_fp32(folder, tmp_path / "work") == fp32  # cached, not exported again
    bundle = tmp_path / "out" / "tiny-arm64"
    bundle.mkdir(parents=True)
    quantize_weights(fp32, bundle / "model.onnx", WeightOnlySettings(bits=4))
    (bundle / "manifest.json").write_text(json.dumps({"model": {"file": "model.onnx"}}))
    assert resolve_model(tmp_path / "out") == bundle / "model.onnx"

    vocab = len((folder / "vocab.txt").read_text().split())
    rng = np.random.default_rng(0)
    streams = [rng.integers(4, vocab, 300).tolist(), rng.integers(4, vocab, 40).tolist()]
    variants = [
        LlmVariant("fp32", "optimum fp32", fp32),
        LlmVariant("edgepack:q", "edgepack int4", resolve_model(bundle)),
        LlmVariant("genai", "genai int4", None, "not built: no venv in tests"),
    ]
    rows = measure(variants, streams, streams[0][:8], new_tokens=4, rounds=2)
    fp32_row, int4_row, genai_row = rows
    # The same perplexity edgepack's build reports for the fp32 graph (256-token windows).
    reference = perplexity_and_top1(session(fp32), session(fp32), streams[0])["perplexity"]
    assert fp32_row.perplexity[0] == pytest.approx(reference, rel=1e-6)
    for row in (fp32_row, int4_row):
        assert len(row.perplexity) == 2 and all(1 < p < 10 * vocab for p in row.perplexity)
        assert row.size_mb and row.ttft_ms and row.tokens_per_s and row.peak_rss_mb
        assert row.size_mb > 0 and row.ttft_ms > 0 and row.tokens_per_s > 0
        assert 20 < row.peak_rss_mb < 300  # a tiny graph: not the test process's torch
    assert int4_row.size_mb < fp32_row.size_mb
    assert genai_row.perplexity == [] and genai_row.ttft_ms is None

    info = RunInfo("tiny", (300, 40), 1, 2, 8, 4)
    markdown = render(rows, info, "python -m benchmarks.llm", 1.0)
    lines = {line.split(" | ")[0]: line for line in markdown.splitlines() if line.startswith("| ")}
    assert lines["| optimum fp32"].count("1.00×") == 2  # TTFT and decode vs itself
    assert lines["| genai int4"].endswith("| – | not built: no venv in tests |")
    cells = [c.strip() for c in lines["| edgepack int4"].strip("| ").split(" | ")]
    assert cells[5] == cells[8] == "–"  # no genai row to compare TTFT and decode with
    assert cells[6] != "–" and cells[9] != "–"
    assert "heldout 300 tokens, distill 40 tokens" in markdown


def test_bundle_arguments_and_model_resolution(tmp_path: Path) -> None:
    from benchmarks.llm import _bundles
    from benchmarks.llm_build import resolve_model

    assert _bundles(("new=/a/b", "old=c=d")) == [("new", Path("/a/b")), ("old", Path("c=d"))]
    with pytest.raises(click.BadParameter):
        _bundles(("/just/a/path",))
    (tmp_path / "x.onnx").write_bytes(b"")
    assert resolve_model(tmp_path / "x.onnx") == tmp_path / "x.onnx"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text('{"model": {"file": "m.onnx"}}')
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path)  # two bundles: which one is meant?
    shutil.rmtree(tmp_path / "b")
    assert resolve_model(tmp_path) == tmp_path / "a" / "m.onnx"


def test_a_graph_with_a_symbolic_head_size_gets_it_from_genai_config(tmp_path: Path) -> None:
    """onnxruntime-genai's graphs declare the past's head axis symbolic ('kv_cache_dim')."""
    import onnx

    from benchmarks.llm_build import optimum_fp32
    from benchmarks.llm_measure import generate_timed, session

    fp32 = optimum_fp32(make_tiny_decoder(tmp_path / "m", "llama"), tmp_path / "work")
    model = onnx.load(str(fp32))
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            value.type.tensor_type.shape.dim[3].dim_param = "kv_cache_dim"
    path = tmp_path / "genai" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="kv_cache_dim"):
        session(path)
    config = {"model": {"decoder": {"head_size": 8}}}  # width 32 / 4 heads
    (path.parent / "genai_config.json").write_text(json.dumps(config))
    _, _, tokens = generate_timed(session(path), [5, 6, 7], 3)
    assert tokens == generate_timed(session(fp32), [5, 6, 7], 3)[2]
