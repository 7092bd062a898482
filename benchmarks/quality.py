"""What a variant's numbers are worth: fidelity to the fp32 export and Spearman on labelled pairs.

Every variant is judged against the same reference, the fp32 export of the *original* model, so a
pruned or distilled student pays for what it lost in training as well as in quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import make_session


def encode(tokenizer: Any, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """Padded to ``seq_len`` like a device sees it; token_type_ids given whether used or not."""
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    feeds = {k: v.astype(np.int64) for k, v in enc.items()}
    feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
    return feeds


def embed(
    path: Path, tokenizer: Any, texts: list[str], seq_len: int, batch: int = 16
) -> np.ndarray:
    """Sentence embeddings (first output) of ``texts``, one thread so the figures are repeatable."""
    sess = make_session(path, threads=1)
    wanted = {i.name for i in sess.get_inputs()}
    parts = []
    for start in range(0, len(texts), batch):
        feeds = encode(tokenizer, texts[start : start + batch], seq_len)
        parts.append(sess.run(None, {k: v for k, v in feeds.items() if k in wanted})[0])
    return np.concatenate(parts).astype(np.float64)


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return np.sum(reference * candidate, axis=1) / np.maximum(norms, 1e-12)


def sts_spearman(
    path: Path, tokenizer: Any, pairs: list[tuple[str, str, float]], seq_len: int
) -> float:
    """Spearman of cos(a, b) against the gold similarity scores."""
    from edgepack.metrics import spearman

    a = embed(path, tokenizer, [p[0] for p in pairs], seq_len)
    b = embed(path, tokenizer, [p[1] for p in pairs], seq_len)
    return float(spearman(cosines(a, b), np.array([p[2] for p in pairs])))


def read_pairs(path: Path) -> list[tuple[str, str, float]]:
    from edgepack.evaldata import read_eval_data

    data = read_eval_data(path)
    return [(r["text_a"], r["text_b"], float(r["score"])) for r in data.rows]
