"""Tests for edgepack.quantize on a tiny random BERT exported with optimum (no network)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepack.quantize import QuantSettings, UserError, quantize_static_int8  # noqa: E402

VOCAB = 120
SEQ = 16


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    main_export = pytest.importorskip("optimum.exporters.onnx").main_export
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    src = tmp_path_factory.mktemp("tiny_src")
    model.save_pretrained(src)
    out = tmp_path_factory.mktemp("tiny_onnx")
    main_export(str(src), output=str(out), task="feature-extraction", library_name="transformers",
                no_post_process=True, do_validation=False)
    return out / "model.onnx"


def _batches(n: int, seed: int):
    def make():
        rng = np.random.default_rng(seed)
        for _ in range(n):
            length = int(rng.integers(4, SEQ + 1))
            ids = np.zeros((1, SEQ), dtype=np.int64)
            ids[0, :length] = rng.integers(1, VOCAB, size=length)
            mask = (ids != 0).astype(np.int64)
            yield {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return make


def _run(path: Path, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]


@pytest.fixture(scope="module")
def quantized(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("q")
    rec = quantize_static_int8(tiny_bert, d / "a.onnx", _batches(24, 1), QuantSettings(), d / "work_a")
    return d, rec


def test_linear_matmuls_have_qdq_and_attention_stays_fp32(tiny_bert: Path, quantized) -> None:
    import onnx
    d, rec = quantized
    m = onnx.load(str(d / "a.onnx"))
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name for i in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    fed_by_dq = [n for n in mm if all(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)]
    # 2 layers x (q, k, v, attn out, ffn in, ffn out) = 12 linear MatMuls, both inputs dequantized
    assert len(fed_by_dq) == 12
    assert {n.name for n in fed_by_dq} == {q["name"] for q in rec["quantized_nodes"]}
    sites = sorted(q["site"] for q in rec["quantized_nodes"])
    assert sites.count("qkv") == 6 and sites.count("ffn_out") == 2 and sites.count("ffn_in") == 2
    # activation x activation MatMuls stay fp32 and are recorded as such
    actact = [n for n in mm if n.input[1] not in inits and not (n.input[1] in prod and prod[n.input[1]].op_type == "DequantizeLinear")]
    assert len(actact) == 4
    kept = {k.get("name") for k in rec["kept_fp32"]}
    assert {n.name for n in actact} <= kept
    assert rec["calibration_batches"] == 24


def test_deterministic_bytes(tiny_bert: Path, quantized) -> None:
    d, rec = quantized
    rec2 = quantize_static_int8(tiny_bert, d / "b.onnx", _batches(24, 1), QuantSettings(), d / "work_b")
    assert (d / "a.onnx").read_bytes() == (d / "b.onnx").read_bytes()
    assert rec["output_sha256"] == rec2["output_sha256"]


def test_close_to_fp32(tiny_bert: Path, quantized) -> None:
    d, _ = quantized
    feeds = list(_batches(16, 99)())  # held-out random batches
    ref = _run(tiny_bert, feeds)
    out = _run(d / "a.onnx", feeds)
    cos = []
    for r, q in zip(ref, out):
        r, q = r.reshape(-1), q.reshape(-1)
        cos.append(float(r @ q / (np.linalg.norm(r) * np.linalg.norm(q))))
    assert min(cos) > 0.98, cos


def test_keep_fp32_and_outlier_split_recorded(tiny_bert: Path, tmp_path: Path) -> None:
    import onnx
    first = QuantSettings()
    rec0 = quantize_static_int8(tiny_bert, tmp_path / "x.onnx", _batches(8, 1), first, tmp_path / "w0")
    ffn_out = [q["name"] for q in rec0["quantized_nodes"] if q["site"] == "ffn_out"]
    st = QuantSettings(keep_fp32_nodes=tuple(ffn_out), outlier_channels=2, outlier_sites=("ffn_in",))
    rec = quantize_static_int8(tiny_bert, tmp_path / "y.onnx", _batches(8, 1), st, tmp_path / "w1")
    assert {k.get("name") for k in rec["kept_fp32"]} >= set(ffn_out)
    assert not set(ffn_out) & {q["name"] for q in rec["quantized_nodes"]}
    assert len(rec["outlier_split"]) == 2 and all(len(x["channels"]) == 2 for x in rec["outlier_split"])
    m = onnx.load(str(tmp_path / "y.onnx"))
    assert sum(n.op_type == "Gather" and n.name.endswith("_outlier_gather") for n in m.graph.node) == 2
    feeds = list(_batches(4, 7)())
    for r, q in zip(_run(tiny_bert, feeds), _run(tmp_path / "y.onnx", feeds)):
        assert np.isfinite(q).all() and q.shape == r.shape


@pytest.mark.parametrize("bad", [
    {"activation_type": "int4"}, {"weight_type": "fp8"}, {"calibrate_method": "mse"},
    {"smooth_alpha": 1.5}, {"smooth_sites": ("everything",)}, {"outlier_channels": -1},
    {"activation_type": "uint8", "weight_type": "uint8"},
])
def test_bad_settings_raise_user_error(tiny_bert: Path, tmp_path: Path, bad: dict) -> None:
    with pytest.raises(UserError):
        quantize_static_int8(tiny_bert, tmp_path / "z.onnx", _batches(2, 1), QuantSettings(**bad), tmp_path / "w")


def test_unknown_keep_node_and_empty_calibration(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError):
        quantize_static_int8(tiny_bert, tmp_path / "z.onnx", _batches(2, 1),
                             QuantSettings(keep_fp32_nodes=("nope",)), tmp_path / "w")
    with pytest.raises(UserError):
        quantize_static_int8(tiny_bert, tmp_path / "z.onnx", _batches(0, 1), QuantSettings(), tmp_path / "w2")
