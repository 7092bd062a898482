"""Structured pruning of a generative decoder: whole layers and FFN channels, uniform widths.

The pruned model stays a plain Hugging Face folder (``from_pretrained`` reads it): every layer
keeps the same FFN width and attention, so ``config.json`` describes it and the fused graph
writer, the PyTorch validation and GGUF read it unchanged. The plan is ``decoder_pruning.json``
in the folder - not ``pruning.json``, which marks an encoder folder with uneven widths that only
``load_pruned`` reads.

``--prune F`` removes F of the parameters outside the embedding and lm_head. The split between
depth (whole layers) and width (FFN channels, the same count in every kept layer, each layer
keeping its own best channels) is measured: each depth share in ``depth_shares`` is cut and its
calibration loss taken; among those within ``prefer_depth_within`` (relative perplexity) of the
best, the one removing most layers wins, since a removed layer also removes its ~10 graph nodes
and GroupQueryAttention call per decoded token, which a removed FFN channel does not.

Which layers: two measures were compared on SmolLM2-135M (30 layers, 106.2 M non-embedding
parameters), scored on the first 1024 tokens of samples/calibration.txt, dropping 8 layers one-shot,
perplexity (PyTorch fp32) on the first 2048 tokens of samples/heldout.txt, unpruned 26.86:
  skip_loss (loss increase with the layer alone skipped): drops 5,12,13,15-19 -> 84.11 (144 s)
  cosine (1 - cos(h_in, h_out) of the residual stream):  drops 3,12-17,25     -> 100.08 (7 s)
so ``skip_loss`` is the default. At --prune 0.25 the build's calibration perplexities (24.0
unpruned) were: all-depth (8 layers) 87.4, 6 layers + FFN 1408 59.5, 4 layers + FFN 1248 52.8,
2 layers + FFN 1120 53.3, all-width (FFN 1024) 61.1: a mix wins, and 4 layers + 1248 was kept.
Held out (2048 tokens, as above) agrees: all-depth 84.11, 4 + 1248 68.57, all-width 94.07.
Shipped int4 bundle (arm64, this host): 78.2 MB -> 63.2 MB (0.81x), held-out perplexity 39.40 ->
114.01, decode 69.7 -> 77.4 tok/s (1.11x). Without distillation the loss is large, and the
per-token cost keeps the lm_head (49152 x 576, a quarter of SmolLM2's MACs), so a quarter of the
layers' weights buys about a tenth of the decode speed.

Attention is not pruned. KV-group removal (a KV head with the query heads that share it) must be
uniform over layers; SmolLM2 has 3 groups of 3 query heads, so the smallest step removes a third
of every layer's attention at once (8.8 M of 106 M parameters, 8.3 %), where FFN channels come in
steps of 32 x 3 x 576 per layer. Measured (held-out, as above): dropping each layer's weakest
group (mean |o_proj input| x its column norm) alone gives 69.61, already the 68.57 of the whole
25 % layer + FFN mix, before the remaining 17 % of the budget is spent; so it is not implemented.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel
from edgepack.errors import UserError

RECORD = "decoder_pruning.json"
SERVED = ("llama", "mistral", "qwen2", "qwen3")
# Part of the prune cache key: bump when this module writes another folder for the same inputs.
DECODER_PRUNE_VERSION = 1
LAYER_MEASURES = ("skip_loss", "cosine")  # decoder_scores says what each is


@dataclass(frozen=True)
class DecoderPruneSettings:
    fraction: float = 0.0  # of the parameters outside the embedding and lm_head
    layer_measure: str = "skip_loss"  # "skip_loss" | "cosine" (decoder_scores says what each is)
    depth_shares: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)  # of the budget, tried in turn
    prefer_depth_within: float = 0.02  # relative calibration perplexity a deeper cut may cost
    multiple: int = 32  # kept FFN width is a multiple of this (16 for tiny test models)
    seq_len: int = 256  # calibration window
    # Calibration tokens scored on (of the build's up to 4096): skip-loss runs the model once per
    # layer, so on two shared cores SmolLM2 takes ~1 min at 1024 tokens.
    tokens: int = 1024


def check_decoder_prune(model_type: str, settings: DecoderPruneSettings) -> None:
    """Refuse, in one line, what this pruner cannot do, before any weight is read."""
    if model_type not in SERVED:
        raise UserError(
            f"--prune does not serve {model_type} decoders yet (decoder pruning serves "
            f"{', '.join(SERVED)})."
        )
    if not 0.0 < settings.fraction < 1.0:
        raise UserError(f"--prune must be in (0, 1) for a decoder, got {settings.fraction}.")
    if settings.layer_measure not in LAYER_MEASURES:
        raise UserError(f"unknown layer measure {settings.layer_measure!r}; use {LAYER_MEASURES}.")
    if settings.multiple < 1 or settings.seq_len < 2:
        raise UserError("multiple must be >= 1 and seq_len >= 2.")


@dataclass(frozen=True)
class Sizes:
    """Parameter counts the budget is spent in (uniform layers, so one layer stands for all)."""

    non_embedding: int
    per_layer: int
    per_channel: int  # one FFN channel: a gate row, an up row, a down column (and their biases)
    layers: int
    width: int


def sizes(model: Any) -> Sizes:
    from edgepack.prune.decoder_scores import layers_of

    skip = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        skip.add(id(model.get_output_embeddings().weight))
    seen: dict[int, int] = {}
    for p in model.parameters():
        if id(p) not in skip:
            seen[id(p)] = p.numel()
    layers = layers_of(model)
    mlp = layers[0].mlp
    channel = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    channel += sum(1 for m in (mlp.gate_proj, mlp.up_proj) if m.bias is not None)
    return Sizes(
        non_embedding=sum(seen.values()),
        per_layer=sum(p.numel() for p in layers[0].parameters()),
        per_channel=channel,
        layers=len(layers),
        width=mlp.down_proj.in_features,
    )


def cut_shape(s: Sizes, fraction: float, depth_share: float, multiple: int) -> tuple[int, int]:
    """(layers to drop, FFN width to keep) removing ``fraction`` of the non-embedding parameters,
    ``depth_share`` of it as whole layers and the rest (with depth's rounding) as FFN channels."""
    target = fraction * s.non_embedding
    drop = min(s.layers - 1, round(depth_share * target / s.per_layer))
    # FFN channels alone may not reach the budget (attention stays): then more layers go.
    while drop < s.layers - 1 and removed(s, drop, min(multiple, s.width)) < target:
        drop += 1
    rest = target - drop * s.per_layer
    if rest <= 0:
        return drop, s.width
    kept = s.layers - drop
    width = round((s.width - rest / (kept * s.per_channel)) / multiple) * multiple
    return drop, s.width if width >= s.width else max(multiple, width)


def removed(s: Sizes, drop: int, width: int) -> int:
    return drop * s.per_layer + (s.layers - drop) * (s.width - width) * s.per_channel


def apply_cut(model: Any, keep_layers: list[int], channels: list[list[int]]) -> Any:
    """A copy of ``model`` holding only ``keep_layers``, layer j keeping FFN ``channels[j]`` (all
    lists of one length); the config says so, so ``save_pretrained`` writes a loadable folder."""
    import torch

    from edgepack.prune.decoder_scores import layers_of

    widths = {len(c) for c in channels}
    if len(widths) != 1 or len(channels) != len(keep_layers):
        raise ValueError("every kept layer must keep the same number of FFN channels")
    (width,) = widths
    out = copy.deepcopy(model)
    old = layers_of(out)
    kept = torch.nn.ModuleList([old[i] for i in keep_layers])
    for j, layer in enumerate(kept):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = j
        index = torch.tensor(channels[j], dtype=torch.long)
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            mlp._modules[name] = _rows(getattr(mlp, name), index)
        mlp.down_proj = _columns(mlp.down_proj, index)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    out.model.layers = kept
    cfg = out.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep_layers]
    if isinstance(getattr(cfg, "max_window_layers", None), int):
        cfg.max_window_layers = sum(1 for i in keep_layers if i < cfg.max_window_layers)
    cfg.num_hidden_layers = len(keep_layers)
    cfg.intermediate_size = width
    return out


def _rows(linear: Any, index: Any) -> Any:
    import torch

    new = torch.nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[index].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[index].clone()
    return new


def _columns(linear: Any, index: Any) -> Any:
    import torch

    new = torch.nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, index].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def plan_cut(
    layer_scores: list[float], channel_scores: list[Any], drop: int, width: int
) -> tuple[list[int], list[list[int]]]:
    """The ``drop`` least important layers go; each kept layer keeps its ``width`` best channels
    (in their original order)."""
    import torch

    order = sorted(range(len(layer_scores)), key=lambda i: (layer_scores[i], i))
    keep = sorted(set(range(len(layer_scores))) - set(order[:drop]))
    channels = [sorted(torch.topk(channel_scores[i], width).indices.tolist()) for i in keep]
    return keep, channels


def _choose(candidates: list[dict[str, Any]], within: float) -> int:
    """The deepest cut whose calibration perplexity is within ``within`` of the best one's."""
    best = min(c["calibration_perplexity"] for c in candidates)
    fits = [
        i for i, c in enumerate(candidates) if c["calibration_perplexity"] <= best * (1 + within)
    ]
    return max(fits, key=lambda i: (candidates[i]["layers_dropped"], -i))


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _candidates(
    net: Any, rows: Any, settings: DecoderPruneSettings, by_layer: Any, by_channel: Any
) -> tuple[list[dict[str, Any]], list[tuple[list[int], list[list[int]]]]]:
    """Each depth/width mix of the budget, cut and scored on the calibration windows."""
    from edgepack.prune.decoder_scores import mean_loss

    s = sizes(net)
    candidates: list[dict[str, Any]] = []
    cuts: list[tuple[list[int], list[list[int]]]] = []
    for share in settings.depth_shares:
        drop, width = cut_shape(s, settings.fraction, share, settings.multiple)
        if any(c["layers_dropped"] == drop and c["ffn"] == width for c in candidates):
            continue
        keep, channels = plan_cut(by_layer, by_channel, drop, width)
        loss = mean_loss(apply_cut(net, keep, channels), rows)
        candidates.append(
            {
                "depth_share": share,
                "layers_dropped": drop,
                "ffn": width,
                "removed_fraction": _round(removed(s, drop, width) / s.non_embedding),
                "calibration_perplexity": _round(math.exp(loss)),
            }
        )
        cuts.append((keep, channels))
    return candidates, cuts


def prune_decoder(
    model: HFModel, ids: list[int], settings: DecoderPruneSettings, out_dir: Path
) -> HFModel:
    """Prune ``model`` on the calibration token stream ``ids``; write a loadable folder."""
    import torch
    import transformers

    from edgepack.prune.decoder_scores import channel_scores, layer_scores, mean_loss, windows

    check_decoder_prune(model.model_type, settings)
    torch.manual_seed(0)
    net = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32)
    net.eval()
    kv = getattr(net.config, "num_key_value_heads", None)
    ids = ids[: settings.tokens]
    rows = windows(ids, settings.seq_len)
    s = sizes(net)
    base = mean_loss(net, rows)
    by_layer = layer_scores(net, rows, settings.layer_measure)
    by_channel = channel_scores(net, rows)
    candidates, cuts = _candidates(net, rows, settings, by_layer, by_channel)
    chosen = _choose(candidates, settings.prefer_depth_within)
    keep, channels = cuts[chosen]
    pruned = apply_cut(net, keep, channels)
    after = sizes(pruned).non_embedding
    summary = {
        "stage": "prune",
        "kind": "decoder",
        "fraction": settings.fraction,
        "layer_measure": settings.layer_measure,
        "layers": f"{s.layers} -> {len(keep)}",
        "ffn": f"{s.width} -> {len(channels[0])}",
        "kv_groups": "unchanged",
        "non_embedding_params_before": s.non_embedding,
        "non_embedding_params_after": after,
        "removed_fraction": _round(1 - after / s.non_embedding),
        "calibration_perplexity_before": _round(math.exp(base)),
        "calibration_perplexity_after": candidates[chosen]["calibration_perplexity"],
    }
    record = {
        "format": 1,
        "model_type": model.model_type,
        "source": model.source,
        "settings": dataclasses.asdict(settings),
        "calibration": {
            "tokens": len(ids),
            "windows": list(rows.shape),
            "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        },
        "summary": summary,
        "kept_layers": keep,
        "layer_scores": [_round(v) for v in by_layer],
        "candidates": candidates,
        "chosen": chosen,
        "attention": {"heads": net.config.num_attention_heads, "pruned": False, "kv_heads": kv},
        "kept_channels": channels,
    }
    return _save(model, pruned, record, Path(out_dir))


def _save(model: HFModel, pruned: Any, record: dict[str, Any], out_dir: Path) -> HFModel:
    """The pruned folder (the source's tokenizer and support files, the weights, the plan) as
    the record every later stage reads, with the plan's summary in its history."""
    from edgepack.folders import copy_support_files
    from edgepack.load import load_model

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    copy_support_files(model.path, out_dir)
    pruned.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    loaded = load_model(str(out_dir), task=model.task)
    ref = [h for h in loaded.history if h.get("record") == RECORD]
    summary = record["summary"]
    return dataclasses.replace(
        loaded,
        source=model.source,
        history=(*model.history, {**(ref[-1] if ref else {}), **summary}),
    )
