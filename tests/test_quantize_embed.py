"""Embedding tables: weight-only int8 / 4-bit quantization, tied tables, and the search's way back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import export_tiny_bert

from edgepack.quantize import QuantSettings
from edgepack.quantize.embed import (
    quantize_blocks_4bit,
    quantize_embeddings,
    quantize_rows_int8,
    restore_fp32_embeddings,
)
from edgepack.quantize.recipe import quantize_static_int8

VOCAB, SEQ, HIDDEN = 120, 16, 32


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_bert(tmp_path_factory.mktemp("emb"), VOCAB)


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = np.zeros((2, SEQ), dtype=np.int64)
        ids[:, : int(rng.integers(4, SEQ + 1))] = rng.integers(1, VOCAB, size=1)
        ids[:, 1:] = np.where(ids[:, 1:] > 0, rng.integers(1, VOCAB, size=(2, SEQ - 1)), 0)
        mask = (ids != 0).astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return out


def _run(model, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    src = model if isinstance(model, str | Path) else model.SerializeToString()
    sess = ort.InferenceSession(
        str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _quantize(src: Path, dst: Path, **kw) -> dict:
    feeds = _feeds(12, 1)
    return quantize_static_int8(
        src, dst, lambda: iter(feeds), QuantSettings(**kw), dst.parent / (dst.stem + "_work")
    )


def _fp32_tables(model) -> list[str]:
    return [
        i.name
        for i in model.graph.initializer
        if i.data_type == 1 and len(i.dims) == 2 and min(i.dims) > 1
    ]


def test_row_and_block_grids_round_trip() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, size=(40, 64)).astype(np.float32)
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_rows_int8(w)
    assert q.dtype == np.int8 and scale.shape == (40,) and scale[3] == 1.0
    assert np.abs(q.astype(np.float32) * scale[:, None] - w).max() <= scale.max() / 2 + 1e-7
    assert np.abs(q).max() == 127
    packed, bscale = quantize_blocks_4bit(w, 16)
    assert packed.shape == (40, 32) and bscale.shape == (40, 4)
    lo, hi = (packed & 15).astype(np.int16) - 8, (packed >> 4).astype(np.int16) - 8
    back = np.empty((40, 64), np.float32)
    back[:, 0::2], back[:, 1::2] = lo, hi
    back = (back.reshape(40, 4, 16) * bscale[..., None]).reshape(40, 64)
    assert np.abs(back - w).max() <= bscale.max() / 2 + 1e-7


@pytest.mark.parametrize("bits", [8, 4])
def test_untied_tables_round_trip_and_are_recorded(
    tiny_export: Path, tmp_path: Path, bits: int
) -> None:
    import onnx

    rec = _quantize(
        tiny_export,
        tmp_path / "q.onnx",
        embedding_precision={8: "int8", 4: "int4"}[bits],
        embedding_block_size=16,
    )
    m = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(m)
    tables = {e["table"]: e for e in rec["embeddings"]}
    assert len(tables) == 3  # word, position, token type
    assert all(
        e["bits"] == bits and e["bytes_quantized"] < e["bytes_fp32"] / (3 if bits == 8 else 4)
        for e in tables.values()
    )
    assert not set(tables) & {i.name for i in m.graph.initializer}, "fp32 tables must be gone"
    producer = {o: n for n in m.graph.node for o in n.output}
    ops = [
        producer[o].op_type for g in (e["gathers"] for e in tables.values()) for o in _outs(m, g)
    ]
    assert ops == (["GatherBlockQuantized"] if bits == 4 else ["Mul"]) * 3
    feeds = _feeds(6, 7)
    plain = _quantize(tiny_export, tmp_path / "plain.onnx", embedding_precision="fp32")
    assert plain["embeddings"] == []
    for r, q, p in zip(
        _run(tiny_export, feeds),
        _run(tmp_path / "q.onnx", feeds),
        _run(tmp_path / "plain.onnx", feeds),
        strict=True,
    ):
        assert _cos(r, q) > (0.99 if bits == 8 else 0.95)
        if bits == 8:  # int8 rows: a drop of the order of 1e-5 on this random model
            assert 1 - _cos(r, q) < 1e-4 and _cos(r, p) >= _cos(r, q) - 1e-6
    # deterministic bytes
    _quantize(
        tiny_export,
        tmp_path / "again.onnx",
        embedding_precision={8: "int8", 4: "int4"}[bits],
        embedding_block_size=16,
    )
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()


def _outs(model, names: list[str]) -> list[str]:
    """Outputs of the nodes now named as the original Gathers (the quantized path keeps them)."""
    return [o for n in model.graph.node if n.name in names for o in n.output]


def _tied_graph(vocab: int = 64, hidden: int = 32):
    """ids -> Gather(E) -> MatMul(W) + b -> MatMul(Transpose(E)): an output projection tied to E."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(3)
    e = rng.normal(0, 0.5, size=(vocab, hidden)).astype(np.float32)
    w = rng.normal(0, 0.2, size=(hidden, hidden)).astype(np.float32)
    nodes = [
        h.make_node("Gather", ["E", "ids"], ["x"], name="emb/Gather"),
        h.make_node("MatMul", ["x", "W"], ["y"], name="dense/MatMul"),
        h.make_node("Transpose", ["E"], ["Et"], name="tied/Transpose", perm=[1, 0]),
        h.make_node("MatMul", ["y", "Et"], ["logits"], name="lm_head/MatMul"),
    ]
    graph = h.make_graph(
        nodes,
        "tied",
        [h.make_tensor_value_info("ids", T.INT64, ["b", "s"])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["b", "s", vocab])],
        [nh.from_array(e, "E"), nh.from_array(w, "W")],
    )
    return onnx.helper.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_table_is_stored_once_and_still_feeds_the_projection(bits: int) -> None:
    import onnx

    model = _tied_graph()
    feeds = [{"ids": np.array([[1, 5, 63, 0]], dtype=np.int64)}]
    ref = _run(model, feeds)[0]
    recs = quantize_embeddings(model, bits, 16, set())
    onnx.checker.check_model(model)
    assert [r["table"] for r in recs] == ["E"] and recs[0]["tied_readers"] == ["tied/Transpose"]
    assert recs[0]["bits"] == 8  # a tied table needs a standard dequantizer: 8 bits even if 4 asked
    inits = {i.name: i for i in model.graph.initializer}
    assert "E" not in inits and inits["E_int8"].data_type == onnx.TensorProto.INT8
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and dq[0].output[0] == "E" and dq[0].input[0] == "E_int8"
    got = _run(model, feeds)[0]
    assert _cos(ref, got) > 0.999 and np.argmax(got, -1).tolist() == np.argmax(ref, -1).tolist()


def test_tied_table_through_the_recipe(tmp_path: Path) -> None:
    """The recipe's pre-processing folds Transpose(E) into its own initializer (the usual shape of a
    tied head after export): the Gather's table and the projection are then quantized each."""
    import onnx

    src = tmp_path / "tied.onnx"
    onnx.save(_tied_graph(), str(src))
    feeds = [
        {"ids": np.array([[i, (i * 7) % 64, (i * 13) % 64, 2]], dtype=np.int64)}
        for i in range(1, 9)
    ]
    rec = quantize_static_int8(
        src, tmp_path / "q.onnx", lambda: iter(feeds), QuantSettings(), tmp_path / "w"
    )
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [e["table"] for e in rec["embeddings"]] == ["E"]
    assert not _fp32_tables(q), "no fp32 copy of the table may remain"
    for r, g in zip(_run(src, feeds), _run(tmp_path / "q.onnx", feeds), strict=True):
        assert _cos(r, g) > 0.99


def test_restore_puts_the_exact_fp32_table_back(tiny_export: Path, tmp_path: Path) -> None:
    import onnx

    rec = _quantize(
        tiny_export, tmp_path / "q.onnx", embedding_precision="int4", embedding_block_size=16
    )
    _quantize(tiny_export, tmp_path / "plain.onnx", embedding_precision="fp32")
    fp32 = {i.name: i for i in onnx.load(str(tiny_export)).graph.initializer}
    back = restore_fp32_embeddings(onnx.load(str(tmp_path / "q.onnx")), fp32, rec["embeddings"])
    onnx.checker.check_model(back)
    assert not [n for n in back.graph.node if n.op_type == "GatherBlockQuantized"]
    feeds = _feeds(4, 9)
    for a, b in zip(_run(back, feeds), _run(tmp_path / "plain.onnx", feeds), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_search_puts_a_sensitive_embedding_back_to_fp32(tiny_export: Path, tmp_path: Path) -> None:
    import onnx

    from edgepack.quantize.search import search

    settings = QuantSettings(embedding_precision="int4", embedding_block_size=16)
    feeds = _feeds(12, 1)

    def quantize(s, path: Path) -> dict:
        return quantize_static_int8(tiny_export, path, lambda: iter(feeds), s, tmp_path / path.stem)

    dev = _feeds(4, 11)
    rec = search(
        tiny_export, quantize, settings, dev, 0.0, 600.0, tmp_path / "best.onnx", tmp_path / "w"
    )
    tables = {e["table"] for e in quantize(settings, tmp_path / "probe.onnx")["embeddings"]}
    ranked = [s["name"] for s in rec["accuracy_search"]["sensitivity"]]
    # 4-bit tables dominate this tiny model's error (the token-type row is added to every token,
    # so its error does not average out): the most sensitive item is a table
    top = ranked[0]
    assert top in tables and set(ranked) >= tables, ranked
    log = rec["accuracy_search"]["log"]
    first = next(e for e in log if e["candidate"] == "fallback 1 layer(s)")
    assert first["kept_fp32"] == [top] and first["dev_drop"] < log[0]["dev_drop"]
    assert top not in {e["table"] for e in rec["embeddings"]}
    assert any(
        k.get("name") == top and k["reason"].startswith("embedding table") for k in rec["kept_fp32"]
    )
    best = onnx.load(str(tmp_path / "best.onnx"))
    readers = [n for n in best.graph.node if top in n.input]
    assert [n.op_type for n in readers] == ["Gather"]
    assert top in {i.name for i in best.graph.initializer}
