"""Labelled evaluation sets, recognised by their columns, and the task metric each one gives.

- ``text_a,text_b,score``  -> sentence-pair similarity, Spearman of cosine vs. score
- ``text,label``           -> classification accuracy and macro-F1
- ``tokens,tags`` (.jsonl) -> token-classification F1 (tags other than the outside tag)
- anything with only texts -> no labels: fidelity to a reference model
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.calibration import _decode, encode
from edgepack.errors import UserError
from edgepack.jsontext import parse_json
from edgepack.metrics import accuracy, cosine_rows, macro_f1, spearman, token_f1

if TYPE_CHECKING:
    from edgepack.progress import Advance

KINDS = ("similarity", "classification", "token", "texts")


@dataclass(frozen=True)
class EvalData:
    kind: str
    rows: tuple[dict[str, Any], ...]
    source: str

    def texts(self) -> list[str]:
        if self.kind == "similarity":
            return [r["text_a"] for r in self.rows] + [r["text_b"] for r in self.rows]
        if self.kind == "token":
            return [" ".join(r["tokens"]) for r in self.rows]
        return [r["text"] for r in self.rows]


def _rows(path: Path) -> list[dict[str, Any]]:
    content = _decode(path)
    if path.suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(content)))
        except csv.Error as exc:
            raise UserError(f"{path}: not valid CSV ({exc}).") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                row = parse_json(line, f"{path}:{n}")
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{n}: each line must be a JSON object.")
                rows.append(row)
        return rows
    if path.suffix == ".txt":
        return [{"text": line.strip()} for line in content.splitlines() if line.strip()]
    raise UserError(f"{path}: unsupported format {path.suffix!r}; use .csv, .jsonl or .txt.")


def read_eval_data(path: Path | str, text_field: str = "text") -> EvalData:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluation file {path} does not exist.")
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path} holds no rows.")
    keys = set(rows[0])
    try:
        if {"text_a", "text_b", "score"} <= keys:
            rows = [
                {"text_a": str(r["text_a"]), "text_b": str(r["text_b"]), "score": float(r["score"])}
                for r in rows
            ]
            return EvalData("similarity", tuple(rows), str(path))
        if {"tokens", "tags"} <= keys:
            for r in rows:
                if not isinstance(r["tokens"], list) or len(r["tokens"]) != len(r["tags"]):
                    raise UserError(f"{path}: tokens and tags must be lists of equal length.")
            return EvalData("token", tuple(rows), str(path))
        if {text_field, "label"} <= keys:
            rows = [{"text": str(r[text_field]), "label": r["label"]} for r in rows]
            return EvalData("classification", tuple(rows), str(path))
        if text_field in keys:
            return EvalData("texts", tuple({"text": str(r[text_field])} for r in rows), str(path))
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: a row is malformed ({type(exc).__name__}: {exc}).") from None
    raise UserError(
        f"{path}: columns {sorted(keys)} match no evaluation kind; use text_a,text_b,score / "
        f"{text_field},label / tokens,tags, or {text_field} alone."
    )


def _pooled(run: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Token states are mean-pooled over real tokens, so plain encoders get sentence vectors too."""
    out = run(feeds)
    if out.ndim == 3 and "attention_mask" in feeds:
        mask = feeds["attention_mask"][..., None].astype(out.dtype)
        return (out * mask).sum(1) / np.maximum(mask.sum(1), 1)
    return out


def _label_index(label: Any, names: list[str], source: str) -> int:
    if label in names:
        return names.index(label)
    try:
        return int(label)
    except (TypeError, ValueError):
        raise UserError(
            f"{source}: label {label!r} is not one of the model's labels ({', '.join(names) or 'none'})."
        ) from None


def _word_tags(logits: np.ndarray, enc: Any, rows: int) -> list[list[int]]:
    """First sub-token's prediction per word, so predictions line up with word-level tags."""
    preds = logits.argmax(-1)
    out = []
    for i in range(rows):
        seen, tags = set(), []
        for j, word in enumerate(enc.word_ids(i)):
            if word is not None and word not in seen:
                seen.add(word)
                tags.append(int(preds[i, j]))
        out.append(tags)
    return out


def score(
    data: EvalData,
    run: Any,
    tokenizer: Any,
    input_names: list[str],
    seq_len: int,
    labels: list[str] | None = None,
    advance: Advance | None = None,
) -> dict[str, Any]:
    """The task metric of one model; ``run(feeds) -> primary output`` hides which runtime it is.
    ``advance`` hears of each batch of texts run (token tagging runs as one batch).

    Long because each data kind's scoring is a few lines and reads best side by side.
    """
    if data.kind == "texts":
        raise UserError(f"{data.source} has no labels; give a reference model to compare against.")
    if data.kind == "token":
        words = [list(map(str, r["tokens"])) for r in data.rows]
        enc = tokenizer(
            words,
            is_split_into_words=True,
            padding="max_length",
            truncation=True,
            max_length=seq_len,
            return_tensors="np",
        )
        feeds = {
            n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"])
            for n in input_names
        }
        pred = _word_tags(run(feeds), enc, len(words))
        gold, got = [], []
        lookup = {name: i for i, name in enumerate(labels or [])}
        for row, tags in zip(data.rows, pred, strict=True):
            want = [lookup.get(t, t) if isinstance(t, str) else int(t) for t in row["tags"]][
                : len(tags)
            ]
            gold += want
            got += tags[: len(want)]
        outside = lookup.get("O", 0)
        return {
            "metric": "token_f1",
            "value": round(token_f1(np.array(got), np.array(gold), outside), 6),
            "count": len(data.rows),
        }
    texts = data.texts()
    parts = []
    for i in range(0, len(texts), 32):
        parts.append(_pooled(run, encode(tokenizer, texts[i : i + 32], input_names, seq_len)))
        if advance is not None:
            advance(len(parts), -(-len(texts) // 32), "batches of 32 texts")
    out = np.concatenate(parts)
    if data.kind == "similarity":
        n = len(data.rows)
        a, b = out[:n], out[n:]
        cos = cosine_rows(a, b)
        gold_scores = np.array([r["score"] for r in data.rows])
        return {"metric": "spearman", "value": round(spearman(cos, gold_scores), 6), "count": n}
    pred = out.argmax(-1)
    gold = np.array([_label_index(r["label"], labels or [], data.source) for r in data.rows])
    return {
        "metric": "accuracy",
        "value": round(accuracy(pred, gold), 6),
        "macro_f1": round(macro_f1(pred, gold), 6),
        "count": len(data.rows),
    }
