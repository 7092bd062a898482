"""``build()``: orders the stages, wraps each in the cache, gates on fidelity, packages per target.

load -> [distill] -> [prune] -> export (validated vs PyTorch) -> quantize per distinct settings
(fidelity measured vs fp32 on held-out text) -> package per target -> summary.
Export and calibration happen once however many targets are built.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import __version__
from edgepack.artifacts import HFModel, OnnxModel, canonical_json
from edgepack.bundle import BuildResult, Outbox, Shared, Shipment, package_target, published
from edgepack.cache import cached
from edgepack.calibration import TextSet, batches, build_texts, check_lengths, encode, read_texts
from edgepack.config import BuildConfig
from edgepack.errors import ToleranceNotMet, UserError
from edgepack.families import encoder
from edgepack.folders import check_name
from edgepack.profiles import TargetProfile, resolve_targets
from edgepack.progress import Progress, quiet_libraries
from edgepack.quantize import quantize_stage


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import optimum.version
    import torch
    import transformers

    return {
        "edgepack": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimum": optimum.version.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _quant_settings(profile: TargetProfile) -> dict[str, Any]:
    q = profile.section("quantization")
    q.pop("precision", None)
    return q


def _precision(config: BuildConfig, profile: TargetProfile) -> str:
    return config.precision or profile.precision


def _seq_len(profile: TargetProfile, model: HFModel) -> int:
    return min(int(profile.section("harness")["seq_len"]), model.max_length)


def _export(
    model: HFModel, tokenizer: Any, texts: list[str], seq_len: int, progress: Progress
) -> OnnxModel:
    from edgepack.export import export_cached, validate

    with progress.stage("export", model.source):
        fp32, hit = export_cached(model)
    if "validation" not in fp32.records:
        feeds = encode(tokenizer, texts, [i["name"] for i in fp32.inputs], seq_len)
        with progress.stage("validate", "ONNX vs PyTorch"):
            record = validate(fp32, model, feeds)
        fp32 = OnnxModel(**{**fp32.__dict__, "records": {**fp32.records, "validation": record}})
    progress.note(
        f"export max |ONNX - PyTorch| = {fp32.records['validation']['max_abs_diff_vs_pytorch']:.2e}"
        + (" (cached)" if hit else "")
    )
    return fp32


def _fidelity(
    fp32: OnnxModel,
    candidate: OnnxModel,
    heldout_feeds: list[dict[str, np.ndarray]],
    reference_out: list[np.ndarray],
    progress: Progress,
) -> dict[str, Any]:
    from edgepack.evaluate import fidelity, run_onnx

    # One thread: reductions then run in a fixed order, so the figures (kept in the manifest)
    # are the same on every rebuild and every host.
    got = run_onnx(candidate.path, heldout_feeds, threads=1, advance=progress.advance)
    return fidelity(reference_out, got, encoder.masks(heldout_feeds), fp32.task)


@dataclass
class _Measured:
    """What a matrix build shares between targets, so each model is quantized and measured once."""

    references: dict[int, tuple[list[dict[str, Any]], list[Any]]] = field(default_factory=dict)
    quantized: dict[str, OnnxModel] = field(default_factory=dict)
    figures: dict[tuple[str, int], tuple[dict[str, Any], dict[str, Any] | None]] = field(
        default_factory=dict
    )


def build(
    config: BuildConfig, progress: Progress, sign_key: Path | None = None
) -> list[BuildResult]:
    """Build one bundle per target named by ``config.target``, then the summary and the report;
    all of them are published together at the end (bundle/outbox.py says why).

    ``sign_key`` signs every bundle; it is not part of the config, so no manifest names the key.
    """
    if sign_key is not None:
        from edgepack.bundle import check_sign_key

        check_sign_key(sign_key)
    with quiet_libraries():
        if (decoder := _generative(config, progress)) is not None:
            from edgepack.decoder_build import build_decoder
            from edgepack.decoder_report import finish_decoder

            with Outbox(Path(config.out), config.force) as box:
                results = build_decoder(config, decoder, progress, box, sign_key, _versions())
                finish_decoder(results, progress, box)
                moved = box.publish()
            progress.note(f"report: {Path(config.out) / 'report.md'} and report.html")
            return published(results, moved)
        if config.kv_cache or config.source_blocks != "all":
            flag = "--kv-cache" if config.kv_cache else "--source-blocks"
            raise UserError(f"{flag} is a decoder option, and this model is an encoder.")
        shared, texts, original = _prepare(config, progress)
        shared = replace(shared, sign_key=sign_key)
        profiles = resolve_targets(config.target)
        measured = _Measured()
        results = []
        out = Path(config.out)
        with Outbox(out, config.force) as box:
            for profile in profiles:
                ship = _ship(shared, texts, profile, measured, progress)
                with progress.stage("package", profile.name):
                    results.append(package_target(shared, ship, box))
            original_fp32 = _original_export(original, shared.model, progress)
            finish(results, progress, box, original_fp32)
            moved = box.publish()
    progress.note(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return published(results, moved)


def _generative(config: BuildConfig, progress: Progress) -> HFModel | None:
    """The model when it is a generative decoder, which takes its own build path."""
    from edgepack.bundle import check_out_root
    from edgepack.families import is_generative
    from edgepack.load import load_model

    # Bad flags fail before the model is read, as they do for encoders.
    if config.name:
        check_name(config.name, "--name")
    check_out_root(Path(config.out))
    resolve_targets(config.target)
    # Silent: an encoder is loaded again (cheaply) under _prepare's progress line, after its text
    # checks, so bad input still fails with one line before any progress is printed.
    model = load_model(config.model, config.task or None, config.trust_remote_code)
    if not is_generative(model.model_type):
        return None
    progress.note(f"load: {model.source} ({model.model_type} decoder)")
    return model


def _prepare(config: BuildConfig, progress: Progress) -> tuple[Shared, TextSet, HFModel]:
    """Load and check everything before the long stages, then run the model stages and export.

    Returns what every target shares, the dev texts the accuracy search chooses on, and the model
    as the user gave it (before distillation or pruning), for the summary's comparison.
    """
    from transformers import AutoTokenizer

    from edgepack.bundle import check_destination, check_out_root
    from edgepack.load import display_name, load_model

    if config.name:
        check_name(config.name, "--name")
    check_out_root(Path(config.out))
    profiles = resolve_targets(config.target)
    with progress.stage("load", config.model):
        original = load_model(config.model, config.task or None, config.trust_remote_code)
        name = config.name or display_name(original)
        for profile in profiles:
            check_destination(Path(config.out), f"{name}-{profile.name}", config.force)
        texts = build_texts(config)
        calib, heldout, dev = texts.calibration, texts.heldout, texts.dev
        tokenizer = AutoTokenizer.from_pretrained(str(original.path), local_files_only=True)
    if not config.truncate:
        check_lengths(calib, tokenizer, original.max_length)
        check_lengths(heldout, tokenizer, original.max_length)
    model = _model_stages(original, config, texts.fit, progress)
    seq_len = max(_seq_len(p, model) for p in profiles)
    fp32 = _export(model, tokenizer, list(heldout.texts[:8]), seq_len, progress)
    shared = Shared(
        name, model, fp32, calib, heldout, tokenizer, config, _versions(),
        resources=progress.resources,
    )  # fmt: skip
    return shared, dev, original


def _ship(
    shared: Shared,
    dev: TextSet,
    profile: TargetProfile,
    measured: _Measured,
    progress: Progress,
) -> Shipment:
    """The target's model (quantized when its precision says so), measured against fp32."""
    from edgepack.evaluate import run_onnx

    fp32, config, tokenizer = shared.fp32, shared.config, shared.tokenizer
    seq_len = _seq_len(profile, shared.model)
    if seq_len not in measured.references:
        names = [i["name"] for i in fp32.inputs]
        feeds = list(batches(tokenizer, shared.heldout, names, seq_len, batch_size=16)())
        measured.references[seq_len] = (feeds, run_onnx(fp32.path, feeds, threads=1))
    heldout_feeds, reference_out = measured.references[seq_len]
    precision = _precision(config, profile)
    candidate = fp32
    if precision == "int8":
        settings = _quant_settings(profile)
        key = canonical_json([settings, seq_len])
        if key not in measured.quantized:
            measured.quantized[key] = quantize_stage(
                fp32, settings, shared.calib, dev, tokenizer, seq_len, config, progress
            )
        candidate = measured.quantized[key]
    if (candidate.sha256, seq_len) not in measured.figures:
        with progress.stage("fidelity", f"{len(shared.heldout.texts)} held-out texts"):
            fid = _fidelity(fp32, candidate, heldout_feeds, reference_out, progress)
        evaluation = _task_metric(
            shared.model.path, config, fp32, candidate, tokenizer, seq_len, progress
        )
        measured.figures[(candidate.sha256, seq_len)] = (fid, evaluation)
    fid, evaluation = measured.figures[(candidate.sha256, seq_len)]
    progress.note(
        f"{precision} vs fp32: mean cosine {fid['mean_cosine']:.4f}, min {fid['min_cosine']:.4f}"
        + (f", top-1 agreement {fid['top1_agreement']:.3f}" if "top1_agreement" in fid else "")
    )
    if fid["mean_cosine"] < config.min_cosine:
        raise UserError(
            f"{precision} model's mean cosine to fp32 is {fid['mean_cosine']:.4f}, below the "
            f"gate {config.min_cosine}; lower --min-cosine or use --precision fp32."
        )
    return Shipment(profile, candidate, precision, fid, evaluation, seq_len)


def _original_export(original: HFModel, model: HFModel, progress: Progress) -> Path | None:
    """The fp32 export of the model the user started from, when distillation or pruning changed
    it: the summary then shows what those stages gained, not only what int8 did on top."""
    if original.digest == model.digest:
        return None
    from edgepack.export import export_cached

    with progress.stage("export", f"{original.source} (original, for comparison)"):
        onnx_model, _ = export_cached(original)
    return onnx_model.path


def finish(
    results: list[BuildResult], progress: Progress, box: Outbox, original: Path | None = None
) -> None:
    """Host latency beside fp32 (and the original model), the summary table, and the report,
    written into ``box`` to be published with the bundles."""
    from edgepack.report import write_report
    from edgepack.summary import measure_latency, print_summary

    latency = measure_latency(results, progress, original)
    print_summary(results, latency, progress)
    with box.report_folder() as folder:
        write_report(results, latency, dict(progress.timings), folder)


def raise_if_tolerance_missed(results: list[BuildResult]) -> None:
    """After everything is written: exit 3 when an accuracy search ended without meeting --max-drop."""
    for r in results:
        search = (r.manifest.get("quantization") or {}).get("accuracy_search") or {}
        if search.get("met") is False:
            raise ToleranceNotMet(
                f"no int8 model met --max-drop {search['max_drop']} for {r.target} (best dev drop "
                f"{search['dev_drop']:.4f}, {search['chosen']}); the best model was saved: {r.tarball}"
            )


def _task_metric(
    model_path: Path,
    config: BuildConfig,
    fp32: OnnxModel,
    candidate: OnnxModel,
    tokenizer: Any,
    seq_len: int,
    progress: Progress,
) -> dict[str, Any] | None:
    """The task metric of fp32 and the shipped model on labelled data, when the config names some."""
    if not config.eval_data:
        return None
    from edgepack.evaldata import read_eval_data, score
    from edgepack.evaluate import onnx_runner
    from edgepack.export import labels_of

    data = read_eval_data(config.eval_data, config.text_field)
    names = [i["name"] for i in fp32.inputs]
    labels = labels_of(model_path)
    figures = {}
    with progress.stage("evaluate", f"{data.kind} on {Path(data.source).name}"):
        for label, model in (("fp32", fp32), (candidate.precision, candidate)):
            figures[label] = score(data, onnx_runner(model.path), tokenizer, names, seq_len, labels)
    metric = figures["fp32"]["metric"]
    result = {
        "data": data.source,
        "kind": data.kind,
        "metric": metric,
        "fp32": figures["fp32"]["value"],
        candidate.precision: figures[candidate.precision]["value"],
        "drop": round(figures["fp32"]["value"] - figures[candidate.precision]["value"], 6),
        "count": figures["fp32"]["count"],
    }
    progress.note(
        f"{metric}: fp32 {result['fp32']:.4f}, {candidate.precision} "
        f"{result[candidate.precision]:.4f} (drop {result['drop']:+.4f})"
    )
    return result


def _model_stages(
    model: HFModel, config: BuildConfig, texts: TextSet, progress: Progress
) -> HFModel:
    """Optional model-changing stages before export.

    ``--distill-layers`` distils a shallower student first; ``--prune`` then removes structures.
    ``--prune`` with ``--distill-data`` but no ``--distill-layers`` distils the *pruned* model
    from the unpruned one afterwards: training recovers what pruning alone loses.
    """
    if config.distill_layers and not config.distill_data:
        raise UserError("--distill-layers needs --distill-data (a text file to train on).")
    if config.distill_layers:
        model = _distill(model, config, None, progress)
    if config.prune:
        from edgepack.prune import PRUNE_VERSION, PruneSettings, prune_model

        settings = PruneSettings(budget=config.prune, seed=config.seed)
        key = {
            "settings": asdict(settings),
            "texts": texts.sha256,
            "v": __version__,
            "code": PRUNE_VERSION,
        }
        unpruned = model
        with progress.stage("prune", f"{config.prune:.0%} of encoder MACs"):
            model, _ = cached(
                "prune",
                key,
                unpruned.digest,
                HFModel,
                lambda out: prune_model(unpruned, texts, settings, out),
            )
        if config.distill_data and not config.distill_layers:
            model = _distill(unpruned, config, model, progress)
    return model


def _distill(
    teacher: HFModel, config: BuildConfig, student: HFModel | None, progress: Progress
) -> HFModel:
    """A cached distillation run: a new shallower student, or training a given one."""
    from edgepack.distill import DISTILL_VERSION, DistillSettings, distill

    data = read_texts(config.distill_data, config.text_field)
    settings = DistillSettings(
        layers=config.distill_layers or 1, seed=config.seed, time_budget=config.distill_seconds
    )
    key = {
        "settings": asdict(settings),
        "data": data.sha256,
        "v": __version__,
        "code": DISTILL_VERSION,
        "student": student.digest if student else None,
    }
    what = f"{config.distill_layers} layers" if student is None else "recovering the pruned model"
    with progress.stage("distill", f"{what}, {len(data.texts)} texts"):
        model, _ = cached(
            "distill",
            key,
            teacher.digest,
            HFModel,
            lambda out: distill(
                teacher, data, settings, out, student_dir=student.path if student else None
            ),
        )
    if student is not None:  # the student's own past (the pruning) comes before this training
        model = replace(model, history=(*student.history, *model.history[-1:]))
    return model
