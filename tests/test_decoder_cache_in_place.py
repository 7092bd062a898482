"""The KV cache written in place: graphs whose GroupQueryAttention reads the past and writes the
present directly say so in their metadata, and the harness's decode loop then binds one buffer per
cache tensor as both, copying nothing per step. What it generates must be what the copying loop
generates, on every architecture the fused graph writes, with an int8 cache, and after int4."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from decoder_factory import VARIANTS, make_tiny_decoder

from edgepack.evaluate import session
from edgepack.families.cache_layout import IN_PLACE, KEY, cache_in_place, mark_cache_layout
from edgepack.load import load_model
from edgepack.quantize.kv_cache import kv_ranges, quantize_kv_cache
from edgepack.quantize.weight_only import WeightOnlySettings, quantize_weights

HARNESS = Path(__file__).resolve().parent.parent / "edgepack" / "harness"


def _decode() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgepack_decode", HARNESS / "edgepack_decode.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decode = _decode()


def _export(root: Path, kind: str) -> Path:
    from edgepack.export.decoder import export_decoder

    folder = make_tiny_decoder(root / kind, kind, eos=None)
    return export_decoder(load_model(str(folder)), root / f"{kind}-x").path


def _copying(sess: object, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy on the step-by-step loop that feeds each step's presents back as the next past."""
    logits, past = decode.step(sess, prompt, decode.empty_past(sess), 0, last=True)
    tokens, rows, pos = [], [logits[-1]], len(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits, past = decode.step(sess, [tokens[-1]], past, pos, last=True)
        rows.append(logits[-1])
        pos += 1
    return tokens, rows


def _in_place(sess: object, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    cache = decode.Cache(sess, len(prompt) + n)
    assert cache.binding is not None  # the in-place path, not the fallback
    logits = cache.feed(prompt)
    tokens, rows = [], [logits[-1]]
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits = cache.feed([tokens[-1]])
        rows.append(logits[-1])
    return tokens, rows


def _same_generation(path: Path, n: int = 40) -> None:
    sess = session(path)
    assert decode.in_place(sess)
    for prompt in ([5, 9, 11, 7], [4] * 19):
        want, want_rows = _copying(sess, prompt, n)
        got, got_rows = _in_place(sess, prompt, n)
        assert got == want
        # The same kernels over the same positions: only the buffer's stride differs.
        assert (
            max(float(np.abs(a - b).max()) for a, b in zip(got_rows, want_rows, strict=True)) < 1e-4
        )
        assert list(decode.greedy_stream(sess, prompt, n, set())) == want


@pytest.mark.parametrize("kind", ["llama", "qwen2", *VARIANTS])
def test_fused_graphs_are_marked_and_decode_in_place_as_they_decode_by_copy(
    tmp_path: Path, kind: str
) -> None:
    # 40 new tokens cross the variants' sliding windows (16 and 24 positions).
    path = _export(tmp_path, kind)
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}.get(KEY) == IN_PLACE
    _same_generation(path)


def test_int4_and_int8_cache_graphs_keep_the_mark_and_the_tokens(tmp_path: Path) -> None:
    fp32 = _export(tmp_path, "llama")
    int4 = tmp_path / "int4.onnx"
    quantize_weights(
        fp32, int4, WeightOnlySettings(bits=4, block_size=16, head_block_size=16, method="rtn")
    )
    _same_generation(int4)
    ids = [int(i) for i in np.random.default_rng(0).integers(4, 100, 200)]
    int8 = tmp_path / "kv8.onnx"
    quantize_kv_cache(fp32, int8, kv_ranges(fp32, ids, 64))
    _same_generation(int8)


def test_a_traced_graph_is_not_marked_and_decodes_by_copy(tmp_path: Path) -> None:
    path = _export(tmp_path, "gpt2")  # optimum's traced export: the cache goes through Concat
    assert not cache_in_place(onnx.load(str(path)).graph)
    sess = session(path)
    assert not decode.in_place(sess)
    cache = decode.Cache(sess, 30)
    assert cache.binding is None
    want, _ = _copying(sess, [5, 9, 11], 20)
    assert list(decode.greedy_stream(sess, [5, 9, 11], 20, set())) == want


def test_anything_between_cache_and_attention_clears_the_mark(tmp_path: Path) -> None:
    model = onnx.load(str(_export(tmp_path, "llama")))
    assert mark_cache_layout(model)
    attention = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    past = attention.input[3]
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [past], ["copied"]))
    attention.input[3] = "copied"
    assert not mark_cache_layout(model)
    assert KEY not in {p.key for p in model.metadata_props}
    attention.input[3] = past  # back, but now the past has a second reader
    model.graph.node[0].output[0] = "unused"
    assert not cache_in_place(model.graph)
    del model.graph.node[0]
    assert mark_cache_layout(model) and [p.key for p in model.metadata_props].count(KEY) == 1


def test_the_cache_refuses_more_positions_than_it_holds(tmp_path: Path) -> None:
    cache = decode.Cache(session(_export(tmp_path, "llama")), 6)
    cache.feed([5, 9, 11, 7])
    cache.feed([8])
    cache.feed([8])
    with pytest.raises(ValueError, match="exceed the cache's 6"):
        cache.feed([8])
