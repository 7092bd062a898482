"""What a decoder build settles before export: the flags it cannot honour are refused,
``--prune`` removes whole layers and FFN channels (prune/decoder.py) and ``--distill-data``
trains the pruned model back toward the unpruned one (distill/causal.py), each behind the cache.

Kept apart from ``decoder_build`` so the build reads as its stages; everything after this runs
on the (possibly pruned) folder unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from edgepack import __version__
from edgepack.artifacts import HFModel
from edgepack.cache import cached
from edgepack.calibration import read_texts
from edgepack.config import BuildConfig
from edgepack.errors import UserError
from edgepack.progress import Progress

# Build flags only the encoder path reads: a decoder build refuses them rather than ship a bundle
# that silently ignored them. Values are compared with BuildConfig's defaults (a config file may
# spell a default out); the message says what a decoder does instead.
ENCODER_ONLY = {
    "distill_layers": "a decoder student keeps its layers; --prune with --distill-data shrinks it",
    "samples": "decoders calibrate on the whole --calibration file",
    "eval_data": "decoders are judged by held-out perplexity, not a task metric",
    "min_cosine": "decoders are gated by --max-drop on perplexity",
    "time_budget": "the decoder accuracy search has no time budget",
    "truncate": "decoder texts are one token stream, never cut per text",
    "with_runtime": "decoder bundles do not carry wheels yet",
}


def check_decoder_flags(config: BuildConfig, model_type: str) -> None:
    """One line for each flag a decoder build cannot honour, before anything long runs."""
    from edgepack.quantize import KEEP

    default = BuildConfig()
    if config.source_blocks not in KEEP:
        raise UserError(
            f"source_blocks must be one of {', '.join(KEEP)}, got {config.source_blocks!r}."
        )
    for key, why in ENCODER_ONLY.items():
        if getattr(config, key) != getattr(default, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} is an encoder option: {why} ({model_type} is a decoder).")
    if config.distill_data and not config.prune:
        raise UserError("--distill-data on a decoder recovers a pruned model: add --prune.")
    if config.distill_seconds != default.distill_seconds and not config.distill_data:
        raise UserError("--distill-seconds needs --distill-data (the texts to distil on).")
    if config.prune:
        from edgepack.prune import DecoderPruneSettings, check_decoder_prune

        check_decoder_prune(model_type, DecoderPruneSettings(fraction=config.prune))
        if not config.calibration:
            raise UserError("--prune on a decoder needs --calibration texts to measure on.")


def pruned(config: BuildConfig, model: HFModel, ids: list[int], progress: Progress) -> HFModel:
    """The model with ``config.prune`` of its non-embedding parameters removed, behind the cache;
    everything after (export, validation, quantization, fidelity) runs on the pruned folder."""
    from edgepack.prune import DECODER_PRUNE_VERSION, DecoderPruneSettings, prune_decoder

    settings = DecoderPruneSettings(fraction=config.prune)
    key = {
        "settings": dataclasses.asdict(settings),
        "calibration": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "v": __version__,
        "code": DECODER_PRUNE_VERSION,
    }
    with progress.stage("prune", f"{config.prune:.0%} of decoder parameters outside the embedding"):
        result, hit = cached(
            "prune",
            key,
            model.digest,
            HFModel,
            lambda out: prune_decoder(model, ids, settings, out),
        )
    summary = result.history[-1]
    progress.note(
        f"prune: layers {summary['layers']}, FFN {summary['ffn']}, "
        f"{summary['removed_fraction']:.1%} of non-embedding parameters removed; calibration "
        f"perplexity {summary['calibration_perplexity_before']:.2f} -> "
        f"{summary['calibration_perplexity_after']:.2f}" + (" (cached)" if hit else "")
    )
    return result


def smaller(
    config: BuildConfig, model: HFModel, ids: list[int], tokenizer: Any, progress: Progress
) -> HFModel:
    """``pruned``, then ``distilled`` toward the unpruned model when ``--distill-data`` is set."""
    student = pruned(config, model, ids, progress)
    return (
        distilled(config, model, student, tokenizer, progress) if config.distill_data else student
    )


def distilled(
    config: BuildConfig, teacher: HFModel, student: HFModel, tokenizer: Any, progress: Progress
) -> HFModel:
    """The pruned ``student`` trained toward ``teacher`` on the distillation text, behind the
    cache (settings, text, both models' weights and the training code)."""
    from edgepack.distill import CAUSAL_DISTILL_VERSION, CausalDistillSettings, distill_decoder

    texts = read_texts(config.distill_data, config.text_field).texts
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    settings = CausalDistillSettings(time_budget=config.distill_seconds)
    key = {
        "settings": dataclasses.asdict(settings),
        "data": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "teacher": teacher.digest,
        "v": __version__,
        "code": CAUSAL_DISTILL_VERSION,
    }
    what = f"pruned student toward the unpruned model, up to {config.distill_seconds:g} s"
    with progress.stage("distill", what):
        result, hit = cached(
            "distill",
            key,
            student.digest,
            HFModel,
            lambda out: distill_decoder(teacher, student, ids, settings, out, progress),
        )
    s = result.history[-1]
    progress.note(
        f"distill: {s['steps']} steps in {s['seconds']:.0f} s; held-out perplexity "
        f"{s['heldout_perplexity_before']:.2f} -> {s['heldout_perplexity_after']:.2f} "
        f"(unpruned {s['heldout_perplexity_teacher']:.2f})" + (" (cached)" if hit else "")
    )
    return result
