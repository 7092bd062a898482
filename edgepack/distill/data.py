"""Training texts for distillation: plain text (soft targets only) or labelled rows (adds the hard
loss for classifiers), a seeded held-out split, and the fixed, shardable batch order.

Batch order is a seeded permutation cut into global batches, rows grouped by length; process r
of W takes every W-th row of each global batch, so the W local batches of step s together hold
exactly the examples a single process with the same global batch sees at step s. That is why a
run under ``torchrun`` and a single-process run agree.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.calibration import TextSet, read_texts
from edgepack.distill.losses import IGNORE_LABEL
from edgepack.errors import UserError
from edgepack.jsontext import parse_json

Label = int | str | None
LENGTH_WINDOW = 50  # batches per length-sorting window: long enough to group, short enough to mix


@dataclass(frozen=True)
class LabelledSet:
    """Texts with ground-truth labels (None where a row has none); ``sha256`` covers both."""

    texts: tuple[str, ...]
    labels: tuple[Label, ...]
    source: str

    @property
    def sha256(self) -> str:
        rows = json.dumps([list(self.texts), list(self.labels)], ensure_ascii=False)
        return hashlib.sha256(rows.encode("utf-8")).hexdigest()

    def record(self) -> dict[str, Any]:
        labelled = sum(label is not None for label in self.labels)
        return {
            "source": self.source,
            "count": len(self.texts),
            "labelled": labelled,
            "sha256": self.sha256,
        }


Data = TextSet | LabelledSet


def _rows(path: Path) -> list[dict[str, Any]]:
    content = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        lines = enumerate(content.splitlines(), 1)
        return [parse_json(line, f"{path}:{n}") for n, line in lines if line.strip()]
    return list(csv.DictReader(io.StringIO(content)))


def read_one(path: Path, text_field: str = "text", label_field: str = "label") -> Data:
    """``.txt`` -> TextSet; ``.jsonl``/``.csv`` with a ``label_field`` -> LabelledSet."""
    texts = read_texts(path, text_field)  # validates the file and names any problem
    if path.suffix.lower() == ".txt":
        return texts
    rows = [r for r in _rows(path) if str(r.get(text_field) or "").strip()]
    if not any(label_field in r for r in rows):
        return texts
    labels: list[Label] = []
    for r in rows:
        value = r.get(label_field)
        labels.append(None if value is None or value == "" else value)
    return LabelledSet(tuple(str(r[text_field]).strip() for r in rows), tuple(labels), str(path))


def read_data(paths: Sequence[Path], text_field: str = "text", label_field: str = "label") -> Data:
    """Several files, concatenated in the order given; labelled if any file is."""
    if not paths:
        raise UserError("give at least one --data file (.txt, .jsonl or .csv).")
    parts = [read_one(Path(p), text_field, label_field) for p in paths]
    if len(parts) == 1:
        return parts[0]
    texts = tuple(t for p in parts for t in p.texts)
    source = " + ".join(p.source for p in parts)
    if not any(isinstance(p, LabelledSet) for p in parts):
        return TextSet(texts, source)
    labels = tuple(
        label
        for p in parts
        for label in (p.labels if isinstance(p, LabelledSet) else (None,) * len(p.texts))
    )
    return LabelledSet(texts, labels, source)


def label_ids(data: Data, config: Any) -> list[int] | None:
    """Ground truth as class ids of the teacher's head: an id, or a name from its ``label2id``."""
    if not isinstance(data, LabelledSet):
        return None
    label2id = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    label2id.update({str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()})
    n = int(getattr(config, "num_labels", len(label2id)))
    ids = []
    for row, label in enumerate(data.labels, 1):
        if label is None:
            ids.append(IGNORE_LABEL)
        elif str(label) in label2id:
            ids.append(label2id[str(label)])
        elif isinstance(label, int) or str(label).lstrip("-").isdigit():
            value = int(label)
            if not 0 <= value < n:
                raise UserError(f"{data.source} row {row}: label {value} is outside 0..{n - 1}.")
            ids.append(value)
        else:
            names = ", ".join(sorted(label2id)) or "(none)"
            raise UserError(
                f"{data.source} row {row}: label {label!r} is not a teacher label; "
                f"valid labels are: {names} (or ids 0..{n - 1})."
            )
    return ids


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) index lists; held-out is ``round(n · fraction)`` rows, at least
    one when ``fraction`` > 0."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    count = max(1, round(n * fraction)) if fraction > 0 else 0
    return sorted(order[count:]), sorted(order[:count])


def epoch_batches(
    n: int,
    batch_size: int,
    world: int,
    rank: int,
    seed: int,
    epoch: int,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """This process's batches (positions into the training rows) for one epoch.

    One seeded permutation per epoch is cut into global batches (the last partial one dropped);
    process r takes every W-th row of each, so the W local batches of a step together are the
    global batch a single process sees. With ``lengths`` (tokens per row), rows are first sorted
    by length inside windows of ``LENGTH_WINDOW`` batches and the batches then shuffled: batches
    are padded to their longest row, and on short texts random batches are mostly padding
    (2.2x the real tokens on the sample corpus), so grouping roughly halves the step time.
    """
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    order = order[: n // batch_size * batch_size]
    if lengths is not None:
        window = LENGTH_WINDOW * batch_size
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: (lengths[i], i))
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if lengths is not None:
        shuffled = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in shuffled]
    return [b[rank::world] for b in batches]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Global batches per epoch (the global batch is split across processes, not repeated)."""
    return n // batch_size


def token_lengths(tokenizer: Any, texts: list[str], max_length: int) -> list[int]:
    """Tokens per text after truncation: what the length grouping of ``epoch_batches`` sorts on."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [len(row) for row in ids]


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Any]:
    """Pad to the longest text of the batch, not to ``max_length``: short texts cost less CPU."""
    return dict(
        tokenizer(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
    )
