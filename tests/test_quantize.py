"""Tests for edgepack.quantize.recipe on a tiny random BERT exported with optimum (no network)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import export_tiny_bert

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepack.errors import UserError
from edgepack.quantize import QuantSettings
from edgepack.quantize.recipe import quantize_static_int8

VOCAB = 120
SEQ = 16


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_bert(tmp_path_factory.mktemp("tiny"), VOCAB)


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
    rec = quantize_static_int8(
        tiny_bert, d / "a.onnx", _batches(24, 1), QuantSettings(), d / "work_a"
    )
    return d, rec


def test_linear_matmuls_have_qdq_and_attention_stays_fp32(tiny_bert: Path, quantized) -> None:
    import onnx

    d, rec = quantized
    m = onnx.load(str(d / "a.onnx"))
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name for i in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    fed_by_dq = [
        n for n in mm if all(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    # 2 layers x (q, k, v, attn out, ffn in, ffn out) = 12 linear MatMuls, both inputs dequantized
    assert len(fed_by_dq) == 12
    assert {n.name for n in fed_by_dq} == {q["name"] for q in rec["quantized_nodes"]}
    sites = sorted(q["site"] for q in rec["quantized_nodes"])
    assert sites.count("qkv") == 6 and sites.count("ffn_out") == 2 and sites.count("ffn_in") == 2
    # activation x activation MatMuls stay fp32 and are recorded as such
    actact = [
        n
        for n in mm
        if n.input[1] not in inits
        and not (n.input[1] in prod and prod[n.input[1]].op_type == "DequantizeLinear")
    ]
    assert len(actact) == 4
    kept = {k.get("name") for k in rec["kept_fp32"]}
    assert {n.name for n in actact} <= kept
    assert rec["calibration_batches"] == 24


def test_deterministic_bytes(tiny_bert: Path, quantized) -> None:
    d, rec = quantized
    rec2 = quantize_static_int8(
        tiny_bert, d / "b.onnx", _batches(24, 1), QuantSettings(), d / "work_b"
    )
    assert (d / "a.onnx").read_bytes() == (d / "b.onnx").read_bytes()
    assert rec["output_sha256"] == rec2["output_sha256"]


def test_close_to_fp32(tiny_bert: Path, quantized) -> None:
    d, _ = quantized
    feeds = list(_batches(16, 99)())  # held-out random batches
    ref = _run(tiny_bert, feeds)
    out = _run(d / "a.onnx", feeds)
    cos = []
    for r, q in zip(ref, out, strict=True):
        r, q = r.reshape(-1), q.reshape(-1)
        cos.append(float(r @ q / (np.linalg.norm(r) * np.linalg.norm(q))))
    assert min(cos) > 0.98, cos


def test_keep_fp32_and_outlier_split_recorded(tiny_bert: Path, tmp_path: Path) -> None:
    import onnx

    first = QuantSettings()
    rec0 = quantize_static_int8(
        tiny_bert, tmp_path / "x.onnx", _batches(8, 1), first, tmp_path / "w0"
    )
    ffn_out = [q["name"] for q in rec0["quantized_nodes"] if q["site"] == "ffn_out"]
    st = QuantSettings(
        keep_fp32_nodes=tuple(ffn_out), outlier_channels=2, outlier_sites=("ffn_in",)
    )
    rec = quantize_static_int8(tiny_bert, tmp_path / "y.onnx", _batches(8, 1), st, tmp_path / "w1")
    assert {k.get("name") for k in rec["kept_fp32"]} >= set(ffn_out)
    assert not set(ffn_out) & {q["name"] for q in rec["quantized_nodes"]}
    assert len(rec["outlier_split"]) == 2 and all(
        len(x["channels"]) == 2 for x in rec["outlier_split"]
    )
    m = onnx.load(str(tmp_path / "y.onnx"))
    assert (
        sum(n.op_type == "Gather" and n.name.endswith("_outlier_gather") for n in m.graph.node) == 2
    )
    feeds = list(_batches(4, 7)())
    for r, q in zip(_run(tiny_bert, feeds), _run(tmp_path / "y.onnx", feeds), strict=True):
        assert np.isfinite(q).all() and q.shape == r.shape


@pytest.mark.parametrize(
    "bad",
    [
        {"activation_type": "int4"},
        {"weight_type": "fp8"},
        {"calibrate_method": "mse"},
        {"smooth_alpha": 1.5},
        {"smooth_sites": ("everything",)},
        {"outlier_channels": -1},
        {"activation_type": "uint8", "weight_type": "uint8"},
        {"embedding_precision": "int2"},
        {"embedding_precision": "int4", "embedding_block_size": 24},
        {"embedding_block_size": 8},
    ],
)
def test_bad_settings_raise_user_error(tiny_bert: Path, tmp_path: Path, bad: dict) -> None:
    with pytest.raises(UserError):
        quantize_static_int8(
            tiny_bert, tmp_path / "z.onnx", _batches(2, 1), QuantSettings(**bad), tmp_path / "w"
        )


def test_unknown_keep_node_and_empty_calibration(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError):
        quantize_static_int8(
            tiny_bert,
            tmp_path / "z.onnx",
            _batches(2, 1),
            QuantSettings(keep_fp32_nodes=("nope",)),
            tmp_path / "w",
        )
    with pytest.raises(UserError):
        quantize_static_int8(
            tiny_bert, tmp_path / "z.onnx", _batches(0, 1), QuantSettings(), tmp_path / "w2"
        )


def test_outlier_gather_reads_fp32_not_the_clipped_dq_copy(quantized) -> None:
    import onnx

    d, rec = quantized
    m = onnx.load(str(d / "a.onnx"))
    prod = {o: n for n in m.graph.node for o in n.output}
    gathers = [n for n in m.graph.node if n.name.endswith("_outlier_gather")]
    assert len(gathers) == 2
    for g in gathers:
        assert prod[g.input[0]].op_type != "DequantizeLinear"
        assert g.input[0] in {x["tensor"] for x in rec["outlier_split"]}
    # no orphan DequantizeLinear left behind by the rewiring
    used = {i for n in m.graph.node for i in n.input}
    assert all(o in used for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output)


@pytest.fixture(scope="module")
def fused(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("f")
    # fp32 embeddings: the bypass test below measures what the linears' activations cost alone
    st = QuantSettings(quant_format="ort_fused", embedding_precision="fp32")
    rec = quantize_static_int8(tiny_bert, d / "f.onnx", _batches(24, 1), st, d / "work_f")
    return d, rec


def test_ort_fused_emits_integer_matmuls_with_bias(tiny_bert: Path, quantized, fused) -> None:
    import onnx

    d, rec = fused
    m = onnx.load(str(d / "f.onnx"))
    onnx.checker.check_model(m)
    inits = {i.name for i in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(mm) == 12 and all(n.domain == "com.microsoft" for n in mm)
    assert rec["bias_adds_fused"] == 12 and all(
        len(n.input) == 7 and n.input[6] in inits for n in mm
    )
    assert not [
        n
        for n in m.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and not n.name.endswith("_outlier_matmul")
    ]
    assert {n.name for n in mm} == {q["name"] for q in rec["quantized_nodes"]}
    # Q, K, V share one QuantizeLinear: 4 per layer
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) == 8
    feeds = list(_batches(16, 99)())
    ref, out, qdq = (
        _run(tiny_bert, feeds),
        _run(d / "f.onnx", feeds),
        _run(quantized[0] / "a.onnx", feeds),
    )
    for r, q, a in zip(ref, out, qdq, strict=True):
        r, q, a = r.reshape(-1), q.reshape(-1), a.reshape(-1)
        assert float(r @ q / (np.linalg.norm(r) * np.linalg.norm(q))) > 0.98
        # same quantization grid as the QDQ path (only fp32 summation order differs)
        assert np.abs(q - a).max() < 0.05 * np.abs(r).max()
    rec2 = quantize_static_int8(
        tiny_bert,
        d / "f2.onnx",
        _batches(24, 1),
        QuantSettings(quant_format="ort_fused", embedding_precision="fp32"),
        d / "work_f2",
    )
    assert rec2["output_sha256"] == rec["output_sha256"]


def test_ort_fused_uint8_weights_and_attention_matmuls(tiny_bert: Path, tmp_path: Path) -> None:
    import onnx

    st = QuantSettings(
        quant_format="ort_fused", weight_type="uint8", quantize_attention_matmuls=True
    )
    rec = quantize_static_int8(tiny_bert, tmp_path / "u.onnx", _batches(8, 1), st, tmp_path / "w")
    m = onnx.load(str(tmp_path / "u.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(mm) == 16 and rec["bias_adds_fused"] == 12
    assert all(
        inits[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in mm if n.input[1] in inits
    )
    feeds = list(_batches(4, 7)())
    for r, q in zip(_run(tiny_bert, feeds), _run(tmp_path / "u.onnx", feeds), strict=True):
        r, q = r.reshape(-1), q.reshape(-1)
        assert float(r @ q / (np.linalg.norm(r) * np.linalg.norm(q))) > 0.95


@pytest.mark.parametrize(
    "qtype,reduce_range,per_channel",
    [
        ("int8", True, True),
        ("int8", False, True),
        ("int8", False, False),
        ("uint8", False, True),
        ("uint8", True, False),
    ],
)
def test_quantize_weight_grid(qtype: str, reduce_range: bool, per_channel: bool) -> None:
    from edgepack.quantize.fused import quantize_weight

    w = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    w[:, 2] = 0.0  # an all-zero column must not divide by zero
    q, scale, zp = quantize_weight(w, qtype, per_channel, reduce_range)
    lim = {
        ("int8", True): (-64, 64),
        ("int8", False): (-127, 127),
        ("uint8", True): (0, 127),
        ("uint8", False): (0, 255),
    }[(qtype, reduce_range)]
    assert q.dtype == (np.int8 if qtype == "int8" else np.uint8)
    assert q.min() >= lim[0] and q.max() <= lim[1]
    assert (zp is None) == (qtype == "int8") and scale.shape == ((8,) if per_channel else ())
    deq = (q.astype(np.float64) - (0 if zp is None else zp.astype(np.float64))) * scale
    assert np.abs(deq - w).max() <= np.max(scale) * 0.5 + 1e-6


def test_ort_fused_rejects_int8_activations_with_uint8_weights(
    tiny_bert: Path, tmp_path: Path
) -> None:
    st = QuantSettings(quant_format="ort_fused", activation_type="int8", weight_type="uint8")
    with pytest.raises(UserError):
        quantize_static_int8(tiny_bert, tmp_path / "z.onnx", _batches(2, 1), st, tmp_path / "w")
    with pytest.raises(UserError):
        quantize_static_int8(
            tiny_bert,
            tmp_path / "z.onnx",
            _batches(2, 1),
            QuantSettings(quant_format="tflite"),
            tmp_path / "w",
        )


def test_bypass_fused_activation_moves_toward_fp32(tiny_bert: Path, fused) -> None:
    import onnx

    from edgepack.quantize.fused import bypass_fused_activation

    d, rec = fused
    m = onnx.load(str(d / "f.onnx"))
    names = {q["name"] for q in rec["quantized_nodes"]}
    b = bypass_fused_activation(m, names)
    onnx.save(b, str(d / "bypassed.onnx"))
    assert not [n for n in b.graph.node if n.op_type in ("MatMulIntegerToFloat", "QuantizeLinear")]
    assert sum(n.op_type == "DequantizeLinear" for n in b.graph.node) == 12
    feeds = list(_batches(8, 5)())
    ref = _run(tiny_bert, feeds)
    err_q = [np.abs(r - q).mean() for r, q in zip(ref, _run(d / "f.onnx", feeds), strict=True)]
    err_b = [
        np.abs(r - q).mean() for r, q in zip(ref, _run(d / "bypassed.onnx", feeds), strict=True)
    ]
    assert np.mean(err_b) < np.mean(err_q)
