"""Running an exported decoder graph with numpy: greedy generation with its KV cache, and the
per-token log-likelihood behind perplexity.

The graph is optimum's merged ``text-generation-with-past`` export (or a weight-only quantized
copy): inputs ``input_ids``, ``attention_mask``, optionally ``position_ids``, and
``past_key_values.N.key/value``; outputs ``logits`` and ``present.N.key/value``. An empty past
(length 0) serves the first step. The device harness carries its own copy of this loop, since it
never imports edgepack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from edgepack.families.decoder import PAST_PREFIX, PRESENT_PREFIX, past_name

_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,  # an int8 KV cache (quantize/kv_cache.py)
}


def empty_past(session: Any) -> dict[str, np.ndarray]:
    """Zero-length past tensors shaped as the graph declares (batch 1, heads, 0, head size)."""
    past = {}
    for i in session.get_inputs():
        if i.name.startswith(PAST_PREFIX):
            dims = [d if isinstance(d, int) else 0 for d in i.shape]
            dims[0] = 1
            past[i.name] = np.zeros(dims, dtype=_NP.get(i.type, np.float32))
    return past


def step_feeds(
    session: Any, ids: Sequence[int], past: dict[str, np.ndarray], start: int, last: bool = False
) -> dict[str, np.ndarray]:
    """The inputs of one pass over ``ids`` after ``start`` cached positions, as the graph names
    them (``position_ids`` only where it has one)."""
    n = len(ids)
    names = {i.name for i in session.get_inputs()}
    feeds = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, start + n), dtype=np.int64),
        **past,
    }
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
    # A fused graph projects onto the vocabulary from this position on: the last one alone for
    # generation, every one for scores.
    feeds["logits_from"] = np.asarray([n - 1 if last else 0], dtype=np.int64)
    return {k: v for k, v in feeds.items() if k in names}


def step(
    session: Any, ids: Sequence[int], past: dict[str, np.ndarray], start: int, last: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward pass over ``ids`` after ``start`` cached positions: (logits [n, vocab], new
    past); with ``last``, rows that end with the last position's (a fused graph computes that
    one alone)."""
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(outputs, step_feeds(session, ids, past, start, last))
    result = dict(zip(outputs, values, strict=True))
    new_past = {past_name(k): v for k, v in result.items() if k.startswith(PRESENT_PREFIX)}
    return result["logits"][0], new_past


def greedy(
    session: Any, prompt: Sequence[int], new_tokens: int, eos: Iterable[int] = ()
) -> tuple[list[int], np.ndarray]:
    """Greedy continuation of ``prompt`` (stopping after an end-of-sequence token, as transformers'
    ``generate`` does) and the first step's logits for the prompt's last position."""
    stop = set(eos)
    logits, past = step(session, list(prompt), empty_past(session), 0, last=True)
    first = logits[-1].astype(np.float32)
    out: list[int] = []
    position = len(prompt)
    while len(out) < new_tokens:
        token = int(np.argmax(logits[-1]))
        out.append(token)
        if token in stop or len(out) == new_tokens:
            break
        logits, past = step(session, [token], past, position, last=True)
        position += 1
    return out, first


def teacher_forced(session: Any, prompt: Sequence[int], continuation: Sequence[int]) -> list[int]:
    """The graph's argmax after each token of ``prompt + continuation[:-1]``, in one pass (the
    device check's measure: see harness/bench_llm.py)."""
    if not continuation:
        return []
    logits, _ = step(session, [*prompt, *continuation[:-1]], empty_past(session), 0)
    return [int(t) for t in logits[len(prompt) - 1 :].argmax(axis=-1)]


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Non-overlapping chunks of a token stream, each scored fresh (no carried context)."""
    return [list(ids[i : i + size]) for i in range(0, len(ids), size) if len(ids[i : i + size]) > 1]


def token_scores(
    session: Any, chunk: Sequence[int], part: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each next token in ``chunk`` and the graph's argmax before it.

    With ``part``, the chunk is fed ``part`` tokens at a time on the KV cache, as generation feeds
    it: what attends to a quantized cache is then measured (in one pass, tokens attend to each
    other in the pass's own precision)."""
    ids, past, pieces = list(chunk), empty_past(session), []
    size = part or len(ids)
    for start in range(0, len(ids), size):
        logits, past = step(session, ids[start : start + size], past, start)
        pieces.append(logits)
    logits = np.concatenate(pieces)[:-1].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    target = np.asarray(chunk[1:])
    nll = log_z - logits[np.arange(len(target)), target]
    return nll, logits.argmax(axis=-1)
