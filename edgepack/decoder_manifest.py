"""A decoder bundle's manifest: what was built, from what, how close it stays to fp32, and what
``edgepack rebuild`` needs to build it again (the config, tool versions and build time, recorded
as the encoder manifests record them)."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel, OnnxModel
from edgepack.config import BuildConfig, portable_name, recorded_config
from edgepack.profiles import TargetProfile

# (precision, MatMulNBits accuracy level (None for fp32), KV cache type)
Setting = tuple[str, int | None, str]
NEW_TOKENS = 32  # the reference continuations' length
# Share of the reference continuations' positions where a device, fed the host's tokens, must
# pick the host's next token (harness/bench_llm.py says why teacher-forced). SmolLM2 int4 on the
# x86 build host: 0.979; the same bundle on emulated aarch64: 0.948; against the same reference,
# the fp32 model gets 0.784 and another int4 quantization of it 0.670 - so 0.9 tells "this model
# on other kernels" from "another model".
DEVICE_MIN_AGREEMENT = 0.9


def _graph_bytes(path: Path) -> int:
    """A graph's bytes with its external weights (``model.onnx_data`` past 2 GB): the graph file
    alone made a 1.2 B model's int4 bundle read 14,295x its fp32 size."""
    data = path.with_name(path.name + "_data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def setting_record(
    config: BuildConfig,
    profile: TargetProfile,
    setting: Setting,
    candidate: OnnxModel,
    fid: dict[str, Any],
) -> dict[str, Any]:
    """The weight-only setting this target asked for, where it came from, and what it cost."""
    # config.precision comes from --precision or the config file alike (samples/llm.toml sets it).
    source = "build config" if config.precision else "profile"
    if not config.precision and "precision" not in profile.section("decoder"):
        source = "default"
    return {
        "precision": setting[0],
        "precision_from": source,
        "accuracy_level": setting[1],
        "kv_cache": setting[2],
        "shipped_precision": candidate.precision,
        "perplexity": fid["perplexity"],
        "perplexity_fp32": fid["perplexity_fp32"],
        "relative_perplexity_increase": fid["relative_perplexity_increase"],
        "top1_agreement": fid["top1_agreement"],
    }


def _description(profile: TargetProfile, candidate: OnnxModel) -> str:
    """The profile's platform with what this bundle really holds: a profile's description names
    its encoder recipe (int8 QDQ), which a decoder bundle does not use."""
    platform = profile.description.split(":", 1)[0]
    record = candidate.records.get("quantization") or {}
    if candidate.precision == "fp32":
        return f"{platform}: fp32"
    block, level = record.get("block_size"), record.get("accuracy_level")
    return (
        f"{platform}: {candidate.precision} weight-only (MatMulNBits, blocks of {block}, "
        f"accuracy level {level})"
    )


def provenance(
    config: BuildConfig, profile: TargetProfile, versions: dict[str, str]
) -> dict[str, Any]:
    """What ``edgepack rebuild`` reads: the config (with this bundle's own target, so one bundle
    of a matrix rebuilds alone), the tools' versions, and when it was built, as encoders record."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    recorded = recorded_config(config)
    return {
        "built_at": now.isoformat(),
        "build": {
            "config": {**recorded["config"], "target": profile.name},
            "inputs": recorded["inputs"],
            "command": "edgepack rebuild manifest.json",
        },
        "versions": versions,
    }


def _gguf_source(model: HFModel) -> dict[str, Any]:
    """What a GGUF source already was (its quantization per tensor type): the build's fp32 is
    that model dequantized, and fidelity is measured against it."""
    from edgepack.load import GGUF_RECORD

    record = model.path / GGUF_RECORD
    return {"gguf": json.loads(record.read_text())} if record.is_file() else {}


def _pruning(model: HFModel) -> dict[str, Any]:
    """The pruning plan, when the model was pruned: what was kept, by which measure, and the
    parameter counts (the folder's decoder_pruning.json holds the kept channel indices too)."""
    from edgepack.prune import DECODER_RECORD

    path = model.path / DECODER_RECORD
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    plan = {k: v for k, v in record.items() if k not in ("kept_channels", "source")}
    plan["record_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"pruning": plan}


def _distillation(model: HFModel) -> dict[str, Any]:
    """The recovery training's summary, when the pruned model was distilled: held-out perplexity
    of teacher and student before and after, steps and time (the folder's record has the curve)."""
    from edgepack.distill import DECODER_DISTILL_RECORD

    path = model.path / DECODER_DISTILL_RECORD
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    summary = {**record["summary"], "record_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"distillation": summary}


def decoder_manifest(
    config: BuildConfig,
    model: HFModel,
    models: tuple[OnnxModel, OnnxModel],
    profile: TargetProfile,
    fid: dict[str, Any],
    validation: dict[str, Any],
    context: int,
    versions: dict[str, str],
) -> dict[str, Any]:
    """Everything but the shipped file's name, sum and size, which packaging adds after any
    format conversion. ``models`` is (fp32 export, the model shipped)."""
    fp32, candidate = models
    fmt = profile.section("format")
    return {
        "task": model.task,
        "family": "decoder",
        "source": {
            "model": model.source,
            "weights_sha256": model.weights_sha256,
            "files_sha256": model.files_sha256,
            "history": list(model.history),
            **_gguf_source(model),
        },
        **_pruning(model),
        **_distillation(model),
        "target": {
            "name": profile.name,
            "description": _description(profile, candidate),
            "format": {
                k: v
                for k, v in fmt.items()
                if k in ("model", "ort_optimization_style", "ort_target_platform")
            },
            "runtime": {"package": "onnxruntime"},
        },
        "model": {
            "precision": candidate.precision,
            "onnx_sha256": candidate.sha256,
            "onnx_bytes": candidate.path.stat().st_size,
            "fp32_bytes": _graph_bytes(fp32.path),
            "graph": fp32.records.get("graph", "traced by optimum"),
        },
        "generation": {
            "context_length": context,
            "eos_token_ids": fp32.records["eos_token_ids"],
            "new_tokens": NEW_TOKENS,
        },
        "check": {"min_agreement": DEVICE_MIN_AGREEMENT, "host_agreement": fid["host_agreement"]},
        "export_validation": validation,
        "quantization": candidate.records.get("quantization"),
        "fidelity": fid,
        "heldout": portable_name(config.heldout),
        **provenance(config, profile, versions),
    }
