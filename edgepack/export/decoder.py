"""Decoder -> one merged fp32 ONNX graph with its KV cache, judged the way users judge it.

optimum exports ``text-generation-with-past`` as a single graph whose first step takes an empty
past. The check is greedy generation: from fixed prompts, the graph's greedy continuation must
be PyTorch's greedy continuation token for token in fp32 (checked in one forward pass per prompt),
and the first step's logits must agree closely. Every mismatch is collected into one message.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import __version__
from edgepack.artifacts import HFModel, OnnxModel
from edgepack.cache import cached
from edgepack.errors import UserError, exporter_errors
from edgepack.evaluate import session
from edgepack.export.convert import EXPORT_VERSION, collect_export, optimum_export
from edgepack.export.decoder_graph import GRAPH_VERSION, fusable, write_fused
from edgepack.families import decoder
from edgepack.families.generate import greedy
from edgepack.folders import copy_tokenizer_files

NEW_TOKENS = 32
# First-step logits, ONNX vs PyTorch in fp32: SmolLM2's logits span ~±30 and differ by ~1e-4 from
# summation order; a wrong op or mis-traced branch gives O(1). Greedy equality is the real gate.
LOGIT_ATOL = 1e-2
# Cache-key versions: bump DECODER_EXPORT_VERSION when ``export_decoder`` writes something else
# for the same checkpoint (records, staging), VALIDATION_VERSION when the greedy check changes
# what it measures or accepts.
DECODER_EXPORT_VERSION = 1
VALIDATION_VERSION = 2


def eos_ids(folder: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json (else config.json), as ``generate`` uses."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


def export_decoder(model: HFModel, out_dir: Path, opset: int | None = None) -> OnnxModel:
    """Llama-family checkpoints get the fused graph written from their weights; the rest are
    traced by optimum. The generation check is a separate step (``validate_generation``)."""
    config = json.loads((model.path / "config.json").read_text(encoding="utf-8"))
    context = min(decoder.context_length(config), decoder.MAX_CONTEXT)
    staging = out_dir / "staging"
    why_not = fusable(config, context)
    if why_not is None:
        staging.mkdir(parents=True)
        with exporter_errors(f"could not export {model.source}"):
            write_fused(model.path, staging / "model.onnx", context)
        copy_tokenizer_files(model.path, staging)
    else:
        optimum_export(model, staging, opset, decoder.EXPORT_TASK)
    records = {
        "source_model": model.source,
        "eos_token_ids": eos_ids(model.path),
        "context_length": context,
        "graph": "fused" if why_not is None else f"traced by optimum ({why_not} is not fused)",
    }
    return collect_export(model, staging, out_dir, "logits", records, only_primary=False)


def export_decoder_cached(model: HFModel) -> tuple[OnnxModel, bool]:
    settings = {
        "edgepack": __version__,
        "code": [EXPORT_VERSION, DECODER_EXPORT_VERSION],
        "task": decoder.EXPORT_TASK,
        "graph": GRAPH_VERSION,
    }
    return cached("export", settings, model.digest, OnnxModel, lambda o: export_decoder(model, o))


def torch_logits(model: HFModel, sequences: list[list[int]]) -> list[Any]:
    """PyTorch's fp32 logits at every position of each sequence: one forward pass each.

    Why not ``generate``: a greedy continuation is a sequence of argmaxes, so feeding the graph's
    own continuation back in one pass and checking PyTorch's argmax at every position proves the
    same thing (PyTorch's greedy path would be exactly these tokens) at a tenth of the cost: on
    SmolLM2 4 x 32 generated tokens took 184 s and 4 forward passes of 64 tokens 17 s on the
    same (busy) host.
    """
    import torch

    net = decoder.auto_class(model.task).from_pretrained(
        str(model.path), local_files_only=True, dtype=torch.float32
    )
    net.eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [
            net(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq)))
            .logits[0]
            .double()
            .numpy()
            for seq in sequences
        ]


def validate_generation(
    onnx_model: OnnxModel, model: HFModel, prompts: list[list[int]], new_tokens: int = NEW_TOKENS
) -> dict[str, Any]:
    """The graph's greedy continuation of each prompt must be PyTorch's greedy continuation too
    (PyTorch's argmax at every position, fed the same tokens), and its first-step logits must
    match; all mismatches in one UserError."""
    sess = session(onnx_model.path, threads=2)
    eos = onnx_model.records.get("eos_token_ids", [])
    runs = [greedy(sess, prompt, new_tokens, eos) for prompt in prompts]
    reference = torch_logits(model, [p + got for p, (got, _) in zip(prompts, runs, strict=True)])
    problems, diffs, matched = [], [], []
    for n, (prompt, (got, logits), want_logits) in enumerate(
        zip(prompts, runs, reference, strict=True)
    ):
        start = len(prompt) - 1
        want = want_logits[start : start + len(got)].argmax(axis=-1).tolist()
        diff = float(np.max(np.abs(logits.astype(np.float64) - want_logits[start])))
        diffs.append(diff)
        same = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        matched.append(len(got) if same is None else same)
        if same is not None:
            problems.append(
                f"prompt {n}: greedy tokens differ from token {same} "
                f"(ONNX {got[same : same + 8]}..., PyTorch {want[same : same + 8]}...)"
            )
        if not np.isfinite(diff) or diff > LOGIT_ATOL:
            problems.append(f"prompt {n}: first-step max |logit diff| {diff:.3g} > {LOGIT_ATOL}")
    if problems:
        raise UserError(
            f"ONNX export of {model.source} does not match PyTorch: " + "; ".join(problems)
        )
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "greedy_tokens_matched": int(sum(matched)),
        "max_abs_logit_diff_vs_pytorch": max(diffs) if diffs else 0.0,
        "atol": LOGIT_ATOL,
        "method": "teacher-forced argmax",
        # The graph's own greedy continuations: the build's fp32 reference path, not recomputed.
        "continuations": [got for got, _ in runs],
    }
