"""What a decoder build settles before export: the flags it cannot honour are refused, and
``--prune`` removes whole layers and FFN channels (prune/decoder.py) behind the cache.

Kept apart from ``decoder_build`` so the build reads as its stages; everything after this runs
on the (possibly pruned) folder unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from edgepack import __version__
from edgepack.artifacts import HFModel
from edgepack.cache import cached
from edgepack.config import BuildConfig
from edgepack.errors import UserError
from edgepack.progress import Progress

# Build flags only the encoder path reads: a decoder build refuses them rather than ship a bundle
# that silently ignored them. Values are compared with BuildConfig's defaults (a config file may
# spell a default out); the message says what a decoder does instead.
ENCODER_ONLY = {
    "distill_layers": "distillation is not yet for decoders",
    "distill_data": "distillation is not yet for decoders",
    "distill_seconds": "distillation is not yet for decoders",
    "samples": "decoders calibrate on the whole --calibration file",
    "eval_data": "decoders are judged by held-out perplexity, not a task metric",
    "min_cosine": "decoders are gated by --max-drop on perplexity",
    "time_budget": "the decoder accuracy search has no time budget",
    "truncate": "decoder texts are one token stream, never cut per text",
    "with_runtime": "decoder bundles do not carry wheels yet",
}


def check_decoder_flags(config: BuildConfig, model_type: str) -> None:
    """One line for each flag a decoder build cannot honour, before anything long runs."""
    default = BuildConfig()
    for key, why in ENCODER_ONLY.items():
        if getattr(config, key) != getattr(default, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} is an encoder option: {why} ({model_type} is a decoder).")
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
