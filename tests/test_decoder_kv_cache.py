"""The int8 KV cache: the graph keeps past keys and values in 8 bits with calibrated per-channel
scales (a quarter of fp32's memory), generation and the device check still work, and the
fidelity stage measures what the quantized cache costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from decoder_factory import build_fails_with, build_tiny_decoder, make_tiny_decoder

from edgepack.evaluate import session
from edgepack.families.generate import empty_past, greedy, token_scores
from edgepack.load import load_model
from edgepack.quantize.kv_cache import kv_ranges, quantize_kv_cache


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.export.decoder import export_decoder

    root = tmp_path_factory.mktemp("kv")
    folder = make_tiny_decoder(root / "m", "llama")
    return export_decoder(load_model(str(folder)), root / "x").path


def _ids(n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(4, 100, n)]


def test_int8_cache_is_a_quarter_and_close_to_the_fp32_cache(exported: Path) -> None:
    ranges = kv_ranges(exported, _ids(300, 0), 64)
    assert len(ranges) == 4 and all(r.shape == (2 * 16,) and (r > 0).all() for r in ranges.values())
    out = exported.with_name("kv8.onnx")
    record = quantize_kv_cache(exported, out, ranges)
    assert record["layers"] == 2
    fp, q8 = session(exported), session(out)
    past = empty_past(q8)
    assert {v.dtype for v in past.values()} == {np.dtype(np.int8)}
    held = _ids(64, 1)
    a, top_a = token_scores(fp, held)
    b, top_b = token_scores(q8, held)
    assert not np.array_equal(a, b)  # the cache is really quantized...
    assert abs(b.mean() / a.mean() - 1) < 0.01 and (top_a == top_b).mean() > 0.9  # ...and close
    # Fed in pieces on the cache (as generation feeds it), the scores are the one-pass scores:
    # the prompt pass reads its own keys and values through the int8 cache too, so a one-pass
    # perplexity sees what the quantized cache costs.
    pieces, _ = token_scores(q8, held, part=8)
    assert np.allclose(pieces, b, atol=1e-4)
    tokens, _ = greedy(q8, [2, 10, 11], 8, [])  # step by step on the int8 cache
    assert len(tokens) == 8


def test_int8_cache_bundle_checks_on_device_and_reports_its_memory(tmp_path: Path) -> None:
    result = build_tiny_decoder(tmp_path, kv_cache="int8")
    manifest = result.manifest
    assert manifest["decoder"]["kv_cache"] == "int8"
    assert manifest["quantization"]["kv_cache"]["layers"] == 2
    folder = result.folder
    run = subprocess.run(
        [sys.executable, str(folder / "bench.py"), "--runs", "1", "--new-tokens", "4"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["check"]["passed"]
    # 2 layers x (key + value) x 2 KV heads x head size 16 x 64 positions x 1 byte.
    assert report["perf"]["kv_cache_mb_at_context"] == round(2 * 2 * 2 * 16 * 64 / 1e6, 2)
    app = subprocess.run(
        [
            sys.executable,
            str(folder / "edgepack_runtime.py"),
            "generate",
            "a b",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert app.returncode == 0, app.stderr


def test_decoder_flags_are_refused_where_they_cannot_apply(
    tmp_path: Path, tiny_bert: Path, texts_file: Path
) -> None:
    from decoder_factory import tiny_decoder_config

    config = tiny_decoder_config(tmp_path / "a")
    args = ["--model", config.model, "--calibration", config.calibration, "--target", "cpu"]
    build_fails_with(
        [*args, "--precision", "fp32", "--kv-cache", "int8"], tmp_path / "o1", "--kv-cache", "fp32"
    )
    encoder = ["--model", str(tiny_bert), "--calibration", str(texts_file), "--target", "cpu"]
    build_fails_with([*encoder, "--kv-cache", "int8"], tmp_path / "o2", "--kv-cache", "encoder")
    build_fails_with(
        [*encoder, "--source-blocks", "off"], tmp_path / "o3", "--source-blocks", "encoder"
    )
