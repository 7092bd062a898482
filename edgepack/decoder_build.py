"""``build`` for a generative decoder: export (checked by greedy generation against PyTorch),
weight-only quantization, fidelity on held-out perplexity, and one bundle per target.

Kept apart from ``pipeline`` because every step differs from the encoder path: feeds are token
streams with a KV cache, quantization is weight-only, fidelity is perplexity and greedy agreement.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.artifacts import HFModel, OnnxModel
from edgepack.bundle import (
    BuildResult,
    Outbox,
    check_destination,
    check_out_root,
    package_decoder,
)
from edgepack.cache import cached
from edgepack.calibration import read_texts
from edgepack.config import BuildConfig
from edgepack.decoder_before_export import check_decoder_flags, smaller
from edgepack.decoder_manifest import (
    DEVICE_MIN_AGREEMENT,
    NEW_TOKENS,
    Setting,
    decoder_manifest,
    setting_record,
)
from edgepack.errors import UserError
from edgepack.evaluate import session
from edgepack.families import decoder
from edgepack.families.decoder_fidelity import (
    FIDELITY_VERSION,
    WINDOW,
    forced_agreement,
    greedy_prefix,
    perplexity_and_top1,
)
from edgepack.families.generate import greedy
from edgepack.profiles import TargetProfile, list_targets, resolve_targets
from edgepack.progress import Progress
from edgepack.quantize import WeightOnlySettings, derived, weight_only_stage

PRECISIONS = ("int4", "int8", "fp32")
# What a profile without a [decoder] section gets (targets/*.toml explains the choice).
DEFAULT_PRECISION, DEFAULT_ACCURACY_LEVEL = "int4", 4
DEFAULT_KV_CACHE = "fp32"
# The accuracy search's steps, smallest and fastest first: (bits, block size in the layers). On
# SmolLM2: int4 blocks of 64 at 78.2 MB and perplexity 39.40; of 32 at 84.8 MB, 37.99 and ~10 %
# slower decode; int8 at about twice the size and close to fp32.
STEPS = {"int4": (4, 64), "int4-b32": (4, 32), "int8": (8, 64)}
LADDER = tuple(STEPS)
CALIBRATION_TOKENS = 4096  # for the weight-only scale search: the activations' mean squares
PROMPTS = 4  # reference prompts: the first held-out texts, cut to PROMPT_TOKENS
PROMPT_TOKENS = 32
# Allowed relative perplexity increase when --max-drop keeps the encoders' default (0.005, a
# cosine drop): edgepack's int4 of SmolLM2-135M's dequantized weights costs 29 % (30.53 -> 39.40)
# on samples/heldout.txt, onnxruntime-genai's 32 % (40.34); the GGUF's own blocks 0.2 % (30.60).
DEFAULT_MAX_INCREASE = 0.5


def _tolerance(config: BuildConfig) -> float:
    return DEFAULT_MAX_INCREASE if config.max_drop == BuildConfig().max_drop else config.max_drop


def _calibration_ids(config: BuildConfig, tokenizer: Any) -> list[int]:
    """Calibration text as one token stream; none when the build names no calibration file."""
    if not config.calibration:
        return []
    texts = read_texts(config.calibration, config.text_field).texts
    return tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS]


def _prompts(tokenizer: Any, texts: tuple[str, ...], context: int) -> list[list[int]]:
    prompts = [tokenizer(t)["input_ids"][:PROMPT_TOKENS] for t in texts[:PROMPTS]]
    if not prompts:
        raise UserError("decoder builds need held-out texts for reference prompts (--heldout).")
    if context < PROMPT_TOKENS + NEW_TOKENS:
        raise UserError(
            f"a {PROMPT_TOKENS}-token prompt plus {NEW_TOKENS} new tokens is longer than the "
            f"model's context ({context})."
        )
    return prompts


def _targets(spec: str, progress: Progress) -> list[TargetProfile]:
    """The profiles a decoder bundle can serve: a named misfit is refused, ``all`` skips them."""
    profiles, fit = resolve_targets(spec), []
    for profile in profiles:
        reason = decoder.profile_misfit(profile.data)
        if reason is None:
            fit.append(profile)
        elif spec != "all":
            usable = [p.name for p in list_targets() if decoder.profile_misfit(p.data) is None]
            raise UserError(
                f"target {profile.name!r} cannot serve a decoder: {reason}. "
                f"Decoder targets: {', '.join(usable)}."
            )
        else:
            progress.note(f"{profile.name}: skipped, a decoder cannot use it ({reason})")
    return fit


def _setting(config: BuildConfig, profile: TargetProfile) -> Setting:
    """The weight-only setting a target asks for: ``--precision`` over its ``[decoder]`` section.

    fp32 has no MatMulNBits, so its accuracy level is None: every fp32 target is one setting.
    """
    section = profile.section("decoder")
    precision = config.precision or str(section.get("precision", DEFAULT_PRECISION))
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision} does not fit a decoder; use one of {PRECISIONS}.")
    level = int(section.get("accuracy_level", DEFAULT_ACCURACY_LEVEL))
    kv = config.kv_cache or str(section.get("kv_cache", DEFAULT_KV_CACHE))
    if precision == "fp32" and kv != "fp32":
        if config.kv_cache:
            raise UserError(
                "--kv-cache int8 goes with weight-only int4 or int8, not --precision fp32."
            )
        kv = "fp32"  # (an fp32 bundle is the unquantized reference, cache included)
    return precision, None if precision == "fp32" else level, kv


def _quantized(
    fp32: OnnxModel,
    step: Setting,
    calibration: list[int],
    window: int,
    source: Path | None = None,
    keep: str = "all",
) -> OnnxModel:
    """One step of the ladder as the weight-only stage's settings (quantize/decoder_stage.py)."""
    precision, level, kv = step
    bits, block = STEPS[precision]
    settings = WeightOnlySettings(
        bits=bits, block_size=block, accuracy_level=int(level or 0), keep_source_blocks=keep
    )
    return derived(fp32, weight_only_stage(fp32, settings, kv, calibration, window, source), True)


def _validated(fp32: OnnxModel, model: HFModel, prompts: list[list[int]]) -> dict[str, Any]:
    """The export's greedy check against PyTorch, behind the cache: it loads the checkpoint in
    PyTorch, decodes every prompt with the graph and runs one PyTorch pass over each continuation,
    and depends only on the graph, the prompts and the checkpoint. A failed check raises and is
    not kept."""
    from edgepack.export import VALIDATION_VERSION, validate_generation

    def make(out: Path) -> OnnxModel:
        record = validate_generation(fp32, model, prompts, NEW_TOKENS)
        return OnnxModel(**{**fp32.__dict__, "records": {**fp32.records, "validation": record}})

    settings = {
        "edgepack": __version__,
        "code": VALIDATION_VERSION,
        "prompts": prompts,
        "new_tokens": NEW_TOKENS,
    }
    digest = hashlib.sha256(f"{fp32.digest}:{model.digest}".encode()).hexdigest()
    validated, _ = cached("validate", settings, digest, OnnxModel, make)
    return validated.records["validation"]


def _fidelity(fp32: OnnxModel, candidate: OnnxModel, ids: list[int], window: int) -> dict[str, Any]:
    """Both graphs' perplexity and top-1 agreement on the held-out ids, behind the cache: it
    depends on nothing else, and it is most of a warm rebuild (59 of 90 s for the sample)."""

    def make(out: Path) -> OnnxModel:
        fid = perplexity_and_top1(session(fp32.path), session(candidate.path), ids, window)
        return OnnxModel(**{**candidate.__dict__, "records": {"fidelity": fid}})

    settings = {
        "edgepack": __version__,
        "code": FIDELITY_VERSION,
        "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        "window": window,
    }
    digest = hashlib.sha256(f"{fp32.digest}:{candidate.digest}".encode()).hexdigest()
    measured, _ = cached("fidelity", settings, digest, OnnxModel, make)
    return dict(measured.records["fidelity"])


def _choose(
    config: BuildConfig,
    fp32: OnnxModel,
    setting: Setting,
    data: tuple[list[int], list[int], int, Path | None],
    progress: Progress,
    steps: dict[Setting, tuple[OnnxModel, dict[str, Any]]],
) -> tuple[OnnxModel, dict[str, Any]]:
    """The accuracy search for decoders: the requested precision, else the next wider one, until
    held-out perplexity is within ``--max-drop`` (a relative increase) of fp32's.

    ``data`` is (calibration ids, held-out ids, context, the GGUF blocks' folder or None).
    ``steps`` keeps each quantized model and its perplexity for the whole build, so targets
    sharing a step never quantize or measure it twice.
    """
    calibration, heldout, context, source = data
    precision, level, kv = setting
    window = min(WINDOW, context)
    tried = []
    for step in LADDER[LADDER.index(precision) :] if precision in LADDER else (precision,):
        key = (step, None, "fp32") if step == "fp32" else (step, level, kv)
        if key not in steps:
            candidate = fp32
            if step != "fp32":
                what = f"{step} weight-only, accuracy level {level}" + (
                    "" if kv == "fp32" else f", {kv} KV cache"
                )
                with progress.stage("quantize", what):
                    candidate = _quantized(
                        fp32, key, calibration, window, source, config.source_blocks
                    )
            with progress.stage("fidelity", f"perplexity on {len(heldout)} held-out tokens"):
                fid = _fidelity(fp32, candidate, heldout, window)
            fid["relative_perplexity_increase"] = fid["perplexity"] / fid["perplexity_fp32"] - 1.0
            fid["perplexity_window"] = window
            steps[key] = candidate, fid
            progress.note(
                f"{step} (accuracy level {key[1]}): perplexity {fid['perplexity']:.2f} vs fp32 "
                f"{fid['perplexity_fp32']:.2f} ({fid['relative_perplexity_increase']:+.1%}), "
                f"top-1 agreement {fid['top1_agreement']:.3f}"
            )
        candidate, fid = steps[key]
        increase = fid["relative_perplexity_increase"]
        block = STEPS.get(step, (None, None))[1]
        tried.append({"step": step, "precision": candidate.precision, "block_size": block,
                      "perplexity": fid["perplexity"], "increase": increase})  # fmt: skip
        if increase <= _tolerance(config):
            return candidate, {**fid, "max_increase": _tolerance(config), "tried": tried}
    raise UserError(
        f"no weight-only precision keeps perplexity within --max-drop {_tolerance(config)} of "
        f"fp32's ("
        + ", ".join(f"{t['step']} {t['increase']:+.1%}" for t in tried)
        + "); raise --max-drop or use --precision fp32."
    )


def build_decoder(
    config: BuildConfig,
    model: HFModel,
    progress: Progress,
    box: Outbox,
    sign_key: Path | None = None,
    versions: dict[str, str] | None = None,
) -> list[BuildResult]:
    """One bundle per target into ``box`` (the caller publishes it after the report), quantized
    once per distinct weight-only setting among them; fails (UserError) past the perplexity
    tolerance, before writing. ``versions`` go in the manifests."""
    from transformers import AutoTokenizer

    from edgepack.bundle import chat_table
    from edgepack.export import export_decoder_cached
    from edgepack.load import display_name, has_gguf_blocks

    check_decoder_flags(config, model.model_type)
    out, name = Path(config.out), config.name or display_name(model)
    check_out_root(out)
    profiles = _targets(config.target, progress)
    for profile in profiles:
        check_destination(out, f"{name}-{profile.name}", config.force)
    settings = {profile.name: _setting(config, profile) for profile in profiles}
    tokenizer = AutoTokenizer.from_pretrained(str(model.path), local_files_only=True)
    heldout = read_texts(config.heldout or config.calibration, config.text_field)
    if config.prune:
        model = smaller(config, model, _calibration_ids(config, tokenizer), tokenizer, progress)
    with progress.stage("export", model.source):
        fp32, _ = export_decoder_cached(model)
    context = min(fp32.records["context_length"], model.max_length)
    prompts = _prompts(tokenizer, heldout.texts, context)
    texts = list(heldout.texts[:PROMPTS])  # the prompts' texts whole, for the tokenizer check
    with progress.stage("validate", f"greedy {NEW_TOKENS} tokens x {len(prompts)} vs PyTorch"):
        validation = dict(_validated(fp32, model, prompts))
    fp32_out = validation.pop("continuations")
    ids = tokenizer("\n".join(heldout.texts), add_special_tokens=False)["input_ids"]
    source = model.path if has_gguf_blocks(model.path) else None
    data = (_calibration_ids(config, tokenizer), ids, context, source)
    eos = fp32.records["eos_token_ids"]
    steps: dict[Setting, tuple[OnnxModel, dict[str, Any]]] = {}
    chosen = {}
    for setting in dict.fromkeys(settings.values()):
        candidate, fid = _choose(config, fp32, setting, data, progress, steps)
        chosen[setting] = (candidate, *_measure(candidate, fid, prompts, fp32_out, eos))
    record = {"validation": validation, "context": context, "versions": versions or {}}
    record["chat"] = chat_table(tokenizer)
    # Shipped whenever it is one text, table or not: an app with Jinja can still render it.
    template = getattr(tokenizer, "chat_template", None)
    record["chat_template"] = template if isinstance(template, str) and template else None
    texts_ids = (texts, [tokenizer(t)["input_ids"] for t in texts])
    return [
        _package(box, config, model, fp32, profile, settings[profile.name], chosen, progress,
                 name=name, record=record, texts=texts_ids, eos=eos, sign_key=sign_key)
        for profile in profiles
    ]  # fmt: skip


def _package(
    box: Outbox,
    config: BuildConfig,
    model: HFModel,
    fp32: OnnxModel,
    profile: TargetProfile,
    setting: Setting,
    chosen: dict[Setting, Any],
    progress: Progress,
    **shared: Any,
) -> BuildResult:
    """One target's bundle into ``box``; ``shared`` holds what every target's manifest and
    check take from the build (name, record, texts, eos, sign_key)."""
    candidate, fid, reference = chosen[setting]
    record = shared["record"]
    manifest = decoder_manifest(
        config,
        model,
        (fp32, candidate),
        profile,
        fid,
        record["validation"],
        record["context"],
        record["versions"],
    )
    manifest["decoder"] = setting_record(config, profile, setting, candidate, fid)
    manifest["generation"]["chat"] = record["chat"]
    manifest["resources"] = progress.resources()
    with progress.stage("package", profile.name):
        folder, tar = package_decoder(
            box,
            f"{shared['name']}-{profile.name}",
            candidate.path,
            candidate.tokenizer_dir,
            reference,
            manifest,
            shared["sign_key"],
            fmt=profile.section("format"),
            check=_host_check(reference, shared["eos"]),
            texts=shared["texts"],
            chat_template=record["chat_template"],
        )
    return BuildResult(profile.name, folder, tar, manifest, fp32.path)


def _measure(
    candidate: OnnxModel,
    fid: dict[str, Any],
    prompts: list[list[int]],
    fp32_out: list[list[int]],
    eos: list[int],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """How long greedy continuations stay on fp32's path, and the bundle's reference data."""
    cand = session(candidate.path)
    fid = {**fid, **greedy_prefix(cand, prompts, fp32_out, eos)}
    shipped = [greedy(cand, p, NEW_TOKENS, eos)[0] for p in prompts]
    fid["host_agreement"] = forced_agreement(cand, prompts, shipped)
    reference = {
        "prompts": [
            {"prompt": p, "continuation": s, "fp32_continuation": f}
            for p, s, f in zip(prompts, shipped, fp32_out, strict=True)
        ]
    }
    return fid, reference


def _host_check(reference: dict[str, Any], eos: list[int]) -> Callable[[Path], dict[str, Any]]:
    """The device check run on the build host against the file as shipped: a format conversion
    (.ort, optimized at conversion time) must not move it off the reference."""

    def check(model_file: Path) -> dict[str, Any]:
        prompts = [p["prompt"] for p in reference["prompts"]]
        want = [p["continuation"] for p in reference["prompts"]]
        sess = session(model_file)
        agreement = forced_agreement(sess, prompts, want)
        if agreement < DEVICE_MIN_AGREEMENT:
            raise UserError(
                f"{model_file.name} on this host picks the reference's next token at only "
                f"{agreement:.1%} of positions (the device check needs "
                f'{DEVICE_MIN_AGREEMENT:.0%}); build for a profile with [format] model = "onnx".'
            )
        prefix = greedy_prefix(sess, prompts, want, eos)["greedy_prefix_tokens"]
        return {"host_agreement": agreement, "host_greedy_prefix_tokens": prefix}

    return check
