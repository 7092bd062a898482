"""The quantize stage: the recipe, optionally inside the accuracy-aware search, behind the cache."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.artifacts import OnnxModel, sha256_file
from edgepack.cache import cached
from edgepack.calibration import TextSet, batches
from edgepack.config import BuildConfig
from edgepack.errors import UserError
from edgepack.folders import folder_digest
from edgepack.progress import Progress
from edgepack.quantize.settings import QuantSettings

# Part of the cache key: bump when the recipe, the search or the graph rewrites under quantize/
# write a different int8 model for the same graph, calibration and settings.
QUANTIZE_VERSION = 1


def quantize_stage(
    fp32: OnnxModel,
    settings: dict[str, Any],
    calib: TextSet,
    dev: TextSet,
    tokenizer: Any,
    seq_len: int,
    config: BuildConfig,
    progress: Progress,
) -> OnnxModel:
    """Long because the cached ``make`` closure must see the stage's inputs; it is the stage's only
    logic.
    """
    from edgepack.quantize.recipe import quantize_static_int8

    try:
        qs = QuantSettings(**settings)
    except TypeError as exc:
        raise UserError(f"quantization settings not understood: {exc}") from None
    names = [i["name"] for i in fp32.inputs]
    search_on = config.max_drop >= 0
    key = {
        "settings": asdict(qs),
        "calibration": calib.sha256,
        "seq_len": seq_len,
        "v": __version__,
        "code": QUANTIZE_VERSION,
        # The calibration feeds are this tokenizer's ids: another vocabulary, another model.
        "tokenizer": folder_digest(fp32.tokenizer_dir),
        "search": [config.max_drop, config.time_budget, dev.sha256] if search_on else None,
    }

    def make(out: Path) -> OnnxModel:
        work = out / "work"

        def quantize(s: Any, path: Path) -> dict[str, Any]:
            # onnxruntime's histogram calibrators stack batches, so they need equal batch sizes.
            size = 8 if s.calibrate_method == "minmax" else 1
            feeds = batches(tokenizer, calib, names, seq_len, batch_size=size)
            return quantize_static_int8(fp32.path, path, feeds, s, work / path.stem)

        if search_on:
            from edgepack.quantize.search import search

            dev_feeds = list(batches(tokenizer, dev, names, seq_len, batch_size=16)())
            record = search(
                fp32.path,
                quantize,
                qs,
                dev_feeds,
                config.max_drop,
                config.time_budget,
                out / "model.onnx",
                work,
                progress.note,
                progress.advance,
            )
        else:
            record = quantize(qs, out / "model.onnx")
        shutil.rmtree(work, ignore_errors=True)
        return OnnxModel(
            **{
                **fp32.__dict__,
                "path": out / "model.onnx",
                "precision": "int8",
                "sha256": sha256_file(out / "model.onnx"),
                "records": {
                    "quantization": {
                        **record,
                        "settings": asdict(qs),
                        "calibration": calib.record(),
                    }
                },
            }
        )

    detail = f"{len(calib.texts)} calibration texts, seq {seq_len}"
    if search_on:
        detail += f", max drop {config.max_drop}"
    with progress.stage("quantize", detail):
        model, _ = cached("quantize", key, fp32.digest, OnnxModel, make)
    return derived(fp32, model)


def derived(fp32: OnnxModel, made: OnnxModel, keep_records: bool = False) -> OnnxModel:
    """The cached graph described by the export it was made from in *this* build: an entry made
    from another model with the same graph must not bring that model's tokenizer folder or
    records (eos ids, source) along. Only its quantization record is its own; ``keep_records``
    adds it to the export's records (weight-only) instead of replacing them (int8)."""
    own = {"quantization": made.records["quantization"]}
    records = {**fp32.records, **own} if keep_records else own
    return dataclasses.replace(
        fp32, path=made.path, precision=made.precision, sha256=made.sha256, records=records
    )
