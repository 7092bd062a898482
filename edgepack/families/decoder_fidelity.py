"""How far a quantized decoder is from its fp32 export, measured as users feel it.

Held-out perplexity (texts calibration never saw), next-token top-1 agreement with fp32 on the
same positions, and how long the greedy continuation of each reference prompt stays on fp32's
path. ``--max-drop`` for decoders is the allowed relative perplexity increase.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgepack.families.generate import greedy, teacher_forced, token_scores, windows

# Perplexity windows: 256 tokens, non-overlapping, each scored fresh (the notes' anchors use the
# same, so figures compare across builds and with the benchmark table).
WINDOW = 256
# Part of the fidelity cache key (decoder_build): bump when the figures measured here change.
FIDELITY_VERSION = 1


def perplexity_and_top1(
    reference: Any, candidate: Any, ids: list[int], window: int = WINDOW
) -> dict[str, float]:
    """Both sessions' perplexity over ``ids`` and how often their next-token argmax agrees."""
    nll_ref = nll_cand = 0.0
    agree = count = 0
    for chunk in windows(ids, window):
        a, top_a = token_scores(reference, chunk)
        b, top_b = token_scores(candidate, chunk)
        nll_ref += float(a.sum())
        nll_cand += float(b.sum())
        agree += int((top_a == top_b).sum())
        count += len(a)
    if not count:
        return {"tokens": 0}
    return {
        "tokens": count,
        "perplexity_fp32": math.exp(nll_ref / count),
        "perplexity": math.exp(nll_cand / count),
        "top1_agreement": agree / count,
    }


def greedy_prefix(
    candidate: Any, prompts: list[list[int]], references: list[list[int]], eos: list[int]
) -> dict[str, Any]:
    """Tokens of each prompt's greedy continuation equal to fp32's before the first difference."""
    lengths = []
    for prompt, want in zip(prompts, references, strict=True):
        got, _ = greedy(candidate, prompt, len(want), eos)
        same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        lengths.append(min(len(got), len(want)) if same is None else same)
    return {
        "greedy_prefix_tokens": lengths,
        "greedy_prefix_mean": float(np.mean(lengths)) if lengths else 0.0,
        "greedy_new_tokens": max((len(w) for w in references), default=0),
    }


def forced_agreement(
    candidate: Any, prompts: list[list[int]], continuations: list[list[int]]
) -> float:
    """Share of positions where, fed each prompt and continuation, the graph's next-token argmax
    is the continuation's token: the device check's measure (harness/bench_llm.py)."""
    agree = total = 0
    for prompt, want in zip(prompts, continuations, strict=True):
        got = teacher_forced(candidate, prompt, want)
        agree += sum(a == b for a, b in zip(got, want, strict=True))
        total += len(want)
    return agree / total if total else 1.0


def relative_increase(figures: dict[str, float]) -> float:
    """Perplexity increase over fp32 as a fraction (0.1 = 10 % higher): what --max-drop bounds."""
    return figures["perplexity"] / figures["perplexity_fp32"] - 1.0
