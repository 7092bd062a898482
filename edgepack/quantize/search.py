"""Accuracy-aware int8: meet ``max_drop`` on a dev set, keeping the best model found whatever happens.

The search is ordered from cheap and speed-preserving to costly:
1. the default recipe;
2. other calibration methods (percentile, entropy), each a full re-quantization;
3. fp32 fallback of single linear layers and embedding tables, ranked by measured sensitivity. A
   layer is "kept fp32" by removing the Quantize/Dequantize pair on its activation input in the int8
   graph (its weight stays int8-stored); an embedding table by putting the fp32 table of the
   unquantized model back under its Gathers. Ranking costs one dev-set evaluation each, not one
   re-quantization.

Unlike tools that stop at the first passing model or keep nothing when none passes, every candidate
is scored and the best is always returned, with the whole log for the manifest. The search is
deterministic; the time budget can only cut it short (recorded as ``stopped_by_budget``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.evaluate import fidelity_rows, run_onnx
from edgepack.families import encoder
from edgepack.metrics import cosine_rows
from edgepack.quantize.embed import restore_fp32_embeddings
from edgepack.quantize.graph import drop_dead_nodes

if TYPE_CHECKING:
    from edgepack.progress import Advance

Feeds = dict[str, np.ndarray]
CALIBRATION_ALTERNATIVES = ("percentile", "entropy")
# Layers are ranked on the first dev batches only (one pass per layer); every candidate model is
# then judged on the whole dev set.
RANKING_BATCHES = 2


def bypass_activation_qdq(model: Any, names: set[str]) -> Any:
    """A copy of the QDQ ``model`` where the named MatMuls read their fp32 activation directly."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    producer = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        if node.name not in names or node.op_type != "MatMul":
            continue
        dq = producer.get(node.input[0])
        q = (
            producer.get(dq.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear"
            else None
        )
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[0] = q.input[0]
    drop_dead_nodes(out.graph)
    return out


def quantized_linears(record: dict[str, Any]) -> list[str]:
    return [
        n["name"]
        for n in record.get("quantized_nodes", [])
        if n.get("site") != "attention_act_x_act"
    ]


def fallback_maker(
    record: dict[str, Any], fp32_path: Path
) -> tuple[Callable[[Any, set[str]], Any], list[str]]:
    """(bypass(model, names) -> model, candidate names): linears by node name, embeddings by table
    name (only tables found in the fp32 model, whose values the way back needs)."""
    import onnx

    bypass_linears = bypass_activation_qdq
    if record.get("quant_format") == "ort_fused":
        from edgepack.quantize.fused import bypass_fused_activation as bypass_linears
    fp32 = onnx.load(str(fp32_path)).graph.initializer
    wanted = {e["table"] for e in record.get("embeddings", [])}
    tables = {i.name: i for i in fp32 if i.name in wanted}
    embeddings = {e["table"]: e for e in record.get("embeddings", []) if e["table"] in tables}

    def bypass(model: Any, names: set[str]) -> Any:
        out = bypass_linears(model, names - set(embeddings))
        chosen = [embeddings[t] for t in sorted(names & set(embeddings))]
        return restore_fp32_embeddings(out, tables, chosen) if chosen else out

    return bypass, quantized_linears(record) + sorted(embeddings)


def search(
    fp32_path: Path,
    quantize: Callable[[Any, Path], dict[str, Any]],
    settings: Any,
    dev_feeds: list[Feeds],
    max_drop: float,
    time_budget: float,
    out_model: Path,
    work_dir: Path,
    note: Callable[[str], None] = lambda _: None,
    advance: Advance | None = None,
) -> dict[str, Any]:
    """Write the best int8 model found to ``out_model``; return the search record.

    ``quantize(settings, path) -> record`` runs the recipe; drop = 1 - mean cosine to fp32 on
    ``dev_feeds`` (texts never used for the final held-out figure). ``advance`` hears how many
    quantized linears' sensitivities are measured, the part that grows with the model.
    Long because the search's phases (candidates, ranking, greedy fallback, time budget) share its closure state and log.
    """
    import onnx

    start = time.monotonic()
    reference = run_onnx(fp32_path, dev_feeds)
    masks = encoder.masks(dev_feeds)

    ref_rows = fidelity_rows(reference, masks)

    def drop(path: Path, batches: int | None = None) -> float:
        """1 - mean cosine on the dev set (or its first ``batches`` batches, for ranking)."""
        feeds = dev_feeds[:batches] if batches else dev_feeds
        got = fidelity_rows(run_onnx(path, feeds), masks[: len(feeds)] if masks else None)
        ref = ref_rows[: len(got)]
        return float(
            1.0 - cosine_rows(ref, got).mean()
        )  # unrounded: the search compares tiny differences

    log: list[dict[str, Any]] = []
    best: dict[str, Any] = {}

    def consider(label: str, path: Path, record: dict[str, Any], extra: dict[str, Any]) -> None:
        d = drop(path)
        log.append({"candidate": label, "dev_drop": round(d, 6), **extra})
        note(f"accuracy search: {label}: dev drop {d:.4f}")
        if not best or d < best["drop"]:
            best.update(drop=d, path=path, record=record, label=label)

    def out_of_time() -> bool:
        return time.monotonic() - start > time_budget

    first = work_dir / "default.onnx"
    consider(
        "default", first, quantize(settings, first), {"calibrate_method": settings.calibrate_method}
    )
    stopped = False
    for method in CALIBRATION_ALTERNATIVES:
        if best["drop"] <= max_drop:
            break
        if method == settings.calibrate_method:
            continue
        if out_of_time():
            stopped = True
            break
        path = work_dir / f"calib-{method}.onnx"
        consider(
            f"calibration {method}",
            path,
            quantize(replace(settings, calibrate_method=method), path),
            {"calibrate_method": method},
        )
    kept: list[dict[str, Any]] = []
    # Sensitivity of every quantized linear: how much of the drop goes away with its activation in
    # fp32. Always measured (one dev pass each) for the report; used for fallback when needed.
    base_path, base_record = best["path"], best["record"]
    base = onnx.load(str(base_path))
    bypass, candidates = fallback_maker(base_record, fp32_path)
    tables = {e["table"] for e in base_record.get("embeddings", [])}

    def what(name: str) -> str:
        return "embedding table" if name in tables else "activation"

    base_drop = drop(base_path, RANKING_BATCHES)
    gains: list[tuple[float, str]] = []
    for name in candidates if not stopped else []:
        if out_of_time():
            stopped = True
            break
        trial = work_dir / "trial.onnx"
        onnx.save(bypass(base, {name}), str(trial))
        gains.append((base_drop - drop(trial, RANKING_BATCHES), name))
        if advance is not None:
            advance(len(gains), len(candidates), "linears' sensitivity measured")
    gains.sort(key=lambda g: (-g[0], g[1]))
    if best["drop"] > max_drop and not stopped:
        chosen: list[str] = []
        for gain, name in gains:
            if best["drop"] <= max_drop or out_of_time():
                stopped = stopped or out_of_time()
                break
            chosen.append(name)
            path = work_dir / f"fallback-{len(chosen)}.onnx"
            onnx.save(bypass(base, set(chosen)), str(path))
            kept.append(
                {"name": name, "reason": f"{what(name)} kept fp32: dev drop -{gain:.4f} alone"}
            )
            record = {
                **base_record,
                "kept_fp32": base_record.get("kept_fp32", []) + list(kept),
                "embeddings": [
                    e for e in base_record.get("embeddings", []) if e["table"] not in chosen
                ],
            }
            consider(f"fallback {len(chosen)} layer(s)", path, record, {"kept_fp32": list(chosen)})
    shutil.copyfile(best["path"], out_model)
    return {
        **best["record"],
        "accuracy_search": {
            "max_drop": max_drop,
            "metric": "1 - mean cosine to fp32 on dev texts",
            "dev_texts": int(sum(len(f["input_ids"]) for f in dev_feeds)),
            "chosen": best["label"],
            "dev_drop": round(best["drop"], 6),
            "met": best["drop"] <= max_drop,
            "stopped_by_budget": stopped,
            "sensitivity": [{"name": n, "dev_drop_recovered": round(g, 6)} for g, n in gains],
            "log": log,
        },
    }
