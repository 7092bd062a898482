"""``--prune`` for generative decoders: whole layers and FFN channels, the folder still loadable by
``from_pretrained``, the plan in the manifest, and one line for what a decoder build cannot do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_texts
from decoder_factory import build_fails_with as _fails_with
from decoder_factory import make_tiny_decoder, tiny_decoder_config

from edgepack.load import load_model
from edgepack.prune.decoder import (
    RECORD,
    DecoderPruneSettings,
    Sizes,
    cut_shape,
    prune_decoder,
    removed,
)


def _ids(folder: Path, texts: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return tok(texts.read_text(), add_special_tokens=False)["input_ids"]


def _pruned(tmp_path: Path, kind: str, fraction: float, **overrides: Any) -> tuple[Path, Path]:
    """(unpruned folder, pruned folder) for a 4-layer tiny decoder."""
    source = make_tiny_decoder(tmp_path / "m", kind, **_four_layers(kind), **overrides)
    texts = write_texts(tmp_path / "texts.txt", 40)
    settings = DecoderPruneSettings(fraction=fraction, multiple=16, seq_len=32)
    out = tmp_path / "pruned"
    prune_decoder(load_model(str(source)), _ids(source, texts), settings, out)
    return source, out


def _four_layers(kind: str) -> dict[str, Any]:
    """Config overrides for four layers (Qwen's per-layer attention types are listed)."""
    if kind in ("qwen2", "qwen3"):
        return {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4}
    return {"num_hidden_layers": 4}


def _non_embedding(model: Any) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_pruned_folder_loads_with_the_planned_shapes_and_budget(tmp_path: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    source, out = _pruned(tmp_path, kind, 0.3)
    record = json.loads((out / RECORD).read_text())
    before = AutoModelForCausalLM.from_pretrained(str(source))
    after = AutoModelForCausalLM.from_pretrained(str(out))
    keep, width = record["kept_layers"], len(record["kept_channels"][0])
    assert after.config.num_hidden_layers == len(keep) == len(after.model.layers)
    assert after.config.intermediate_size == width and width % 16 == 0
    for layer in after.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (width, 64)
        assert layer.mlp.down_proj.weight.shape == (64, width)
    if isinstance(getattr(after.config, "layer_types", None), list):
        assert len(after.config.layer_types) == len(keep)
    # What was removed is the fraction asked for, within one layer's or one FFN step's rounding.
    n_before, n_after = _non_embedding(before), _non_embedding(after)
    assert record["summary"]["non_embedding_params_after"] == n_after
    per_layer = n_before / 4
    step = len(keep) * 16 * 3 * 64
    assert abs((n_before - n_after) - 0.3 * n_before) <= max(per_layer, step) / 2 + 1
    assert n_after < n_before


def test_the_cut_equals_skipping_layers_and_zeroing_channels(tmp_path: Path) -> None:
    """The pruned model's logits are the unpruned model's with the dropped layers passed through
    and the dropped channels' down-projection columns zeroed, computed by hand."""
    from transformers import AutoModelForCausalLM

    source, out = _pruned(tmp_path, "llama", 0.3)
    record = json.loads((out / RECORD).read_text())
    reference = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    assert record["summary"]["layers"] != "4 -> 4" or record["summary"]["ffn"] != "128 -> 128"
    kept = dict(zip(record["kept_layers"], record["kept_channels"], strict=True))
    handles = []
    for i, layer in enumerate(reference.model.layers):
        if i not in kept:
            handles.append(
                layer.register_forward_hook(lambda _m, args, _k, _o: args[0], with_kwargs=True)
            )
            continue
        gone = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
        gone[kept[i]] = False
        with torch.no_grad():
            layer.mlp.down_proj.weight[:, gone] = 0.0
    pruned = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([_ids(source, write_texts(tmp_path / "probe.txt", 3, seed=5))[:40]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = pruned(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_a_layer_measure_other_than_the_default_drops_other_layers(tmp_path: Path) -> None:
    """Both measures run; each records its own per-layer scores."""
    source = make_tiny_decoder(tmp_path / "m", "llama", num_hidden_layers=4)
    ids = _ids(source, write_texts(tmp_path / "t.txt", 40))
    scores = {}
    for measure in ("skip_loss", "cosine"):
        settings = DecoderPruneSettings(fraction=0.3, layer_measure=measure, multiple=16)
        prune_decoder(load_model(str(source)), ids, settings, tmp_path / measure)
        scores[measure] = json.loads((tmp_path / measure / RECORD).read_text())["layer_scores"]
    assert all(len(v) == 4 for v in scores.values())
    assert scores["skip_loss"] != scores["cosine"]


def test_cut_shape_spends_the_budget_on_depth_then_width() -> None:
    s = Sizes(non_embedding=29_000, per_layer=1_000, per_channel=10, layers=30, width=100)
    assert cut_shape(s, 0.25, 1.0, 8) == (7, 96)  # 7.25 layers: 7, and 250 as 4 channels x 23
    drop, width = cut_shape(s, 0.25, 0.0, 8)
    assert drop == 0 and width % 8 == 0 and abs(removed(s, drop, width) - 7_250) <= 30 * 10 * 4
    drop, width = cut_shape(s, 0.25, 0.5, 8)
    assert drop == 4 and abs(removed(s, drop, width) - 7_250) <= 26 * 10 * 4
    # FFN channels are a third of a layer here: width alone cannot remove 60 %, layers go too.
    thin = Sizes(non_embedding=30_000, per_layer=1_000, per_channel=3, layers=30, width=100)
    drop, width = cut_shape(thin, 0.6, 0.0, 8)
    assert drop > 0 and abs(removed(thin, drop, width) - 18_000) <= 30 * 3 * 4


def _build(tmp_path: Path, **overrides: Any) -> Any:
    from edgepack.pipeline import build
    from edgepack.progress import Progress

    (result,) = build(tiny_decoder_config(tmp_path, **overrides), Progress(quiet=True))
    return result


def test_a_pruned_build_records_the_plan_and_a_rebuild_hits_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_decoder(tmp_path / "m4", "llama", num_hidden_layers=4)
    result = _build(tmp_path, model=str(model), prune=0.3)
    manifest = result.manifest
    plan = manifest["pruning"]
    assert plan["summary"]["layers"].startswith("4 -> ")
    assert len(plan["kept_layers"]) < 4 or plan["summary"]["ffn"] != "128 -> 128"
    (entry,) = manifest["source"]["history"]
    assert entry["record"] == RECORD and entry["kind"] == "decoder"
    # The fused graph was validated against PyTorch on the pruned folder.
    assert manifest["model"]["graph"] == "fused"
    assert manifest["export_validation"]
    import onnx

    graph = onnx.load(str(result.fp32_model), load_external_data=False).graph
    layers = sum(1 for node in graph.node if node.op_type == "GroupQueryAttention")
    assert layers == len(plan["kept_layers"])

    def fail(*_args: Any) -> None:
        raise AssertionError("the pruned folder should come from the cache")

    monkeypatch.setattr("edgepack.prune.prune_decoder", fail)
    again = _build(tmp_path, model=str(model), prune=0.3, force=True)
    assert again.manifest["pruning"] == plan


@pytest.mark.parametrize(
    ("kind", "flags", "words"),
    [
        ("gpt2", ["--prune", "0.25"], ("does not serve gpt2 decoders",)),
        ("llama", ["--prune", "0.25", "--calibration", ""], ("needs --calibration",)),
        ("llama", ["--distill-layers", "1"], ("--distill-layers", "encoder option")),
        ("llama", ["--distill-data", "TEXTS"], ("--distill-data", "add --prune")),
        ("llama", ["--min-cosine", "0.5"], ("--min-cosine", "encoder option")),
        ("llama", ["--with-runtime"], ("--with-runtime", "encoder option")),
    ],
)
def test_what_a_decoder_build_cannot_do_is_one_line(
    tmp_path: Path, kind: str, flags: list[str], words: tuple[str, ...]
) -> None:
    model = make_tiny_decoder(tmp_path / "m", kind)
    texts = write_texts(tmp_path / "texts.txt", 40)
    flags = [str(texts) if f == "TEXTS" else f for f in flags]
    base = ["--model", str(model), "--calibration", str(texts), "--heldout", str(texts)]
    _fails_with([*base, "--precision", "int8", *flags], tmp_path / "dist", *words)
