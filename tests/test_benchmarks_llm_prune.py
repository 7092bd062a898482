"""The pruning-curve benchmark on a tiny random Llama, so it cannot rot unnoticed.

The real run (`python -m benchmarks.llm_prune`: the sample model pruned three ways, each with and
without recovery) is a command, not a test; the quick test covers its measuring and table, the
slow one its builds and what it reads from their manifests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from conftest import write_texts
from decoder_factory import make_tiny_decoder


def test_the_prune_curve_measures_each_row_against_the_fp32_teacher(tmp_path: Path) -> None:
    from benchmarks.llm_build import optimum_fp32
    from benchmarks.llm_prune import Row, measure, render, table, variants, verdict
    from edgepack.quantize import WeightOnlySettings, quantize_weights

    folder = make_tiny_decoder(tmp_path / "m", "llama")
    fp32 = optimum_fp32(folder, tmp_path / "work")
    int4, int8 = tmp_path / "int4.onnx", tmp_path / "int8.onnx"
    quantize_weights(fp32, int4, WeightOnlySettings(bits=4))
    quantize_weights(fp32, int8, WeightOnlySettings(bits=8))
    plan = variants((0.25,), 60.0)
    assert [v.label for v in plan] == ["unpruned int4", "prune 0.25", "prune 0.25 + recovery"]
    assert plan[0].flags == [] and plan[1].flags == ["--prune", "0.25"]
    assert plan[2].flags[2:] == ["--distill-data", plan[2].flags[3], "--distill-seconds", "60"]
    assert [v.label for v in variants((0.1, 0.4), 0.0)] == [
        "unpruned int4",
        "prune 0.1",
        "prune 0.4",
    ]

    rows = [Row(plan[0], model=int4), Row(plan[1], model=fp32), Row(plan[2], note="build failed")]
    vocab = len((folder / "vocab.txt").read_text().split())
    ids = np.random.default_rng(0).integers(4, vocab, 300).tolist()
    measure(rows, fp32, ids, ids[:8], new_tokens=4, rounds=2)
    base, same, failed = rows
    assert same.top1 == 1.0  # the teacher against itself
    assert same.perplexity == pytest.approx(same.extra["teacher_perplexity"])
    assert 0 < base.top1 < 1 and base.perplexity != same.perplexity  # int4 on random weights
    assert base.size_mb < same.size_mb and base.tokens_per_s > 0 and same.tokens_per_s > 0
    assert failed.perplexity is None and failed.tokens_per_s is None
    text = table(rows)
    assert text.count("\n") == 4 and "| prune 0.25 + recovery |" in text
    assert f"{same.size_mb / base.size_mb:.2f}×" in text and "100.0%" in text
    assert "No row meets every target" in verdict(rows)
    page = render(rows, "python -m benchmarks.llm_prune", 60.0)
    assert "CPU flags" in page and text in page


@pytest.mark.slow
def test_the_prune_curve_builds_bundles_and_reads_their_manifests(tmp_path: Path) -> None:
    from benchmarks.llm_prune import build, variants

    texts = write_texts(tmp_path / "texts.txt", 400)
    model = make_tiny_decoder(tmp_path / "m", "llama", num_hidden_layers=4)
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'model = "{model}"\ncalibration = "{texts}"\nheldout = "{texts}"\n'
        'precision = "int8"\nmax_drop = 100.0\n'
    )
    base, pruned, recovered = (build(v, tmp_path / "work", config) for v in variants((0.3,), 3.0))
    assert base.model and base.model.is_file() and base.shape == "" and base.note == ""
    assert pruned.shape.startswith("layers 4 -> ") and pruned.training_minutes is None
    assert recovered.training_minutes is not None and "steps" in recovered.note
    manifest = json.loads((recovered.model.parent / "manifest.json").read_text())
    assert manifest["distillation"]["seconds"] / 60 == recovered.training_minutes
