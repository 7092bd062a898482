"""Texts for calibration and held-out checks: read from .txt/.jsonl/.csv, sampled reproducibly.

Texts are read once (a few MB at most for calibration) but tokenized and fed in batches, so a
calibration run never holds more than one batch of activations per stride.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.config import BuildConfig, portable_name
from edgepack.errors import UserError
from edgepack.jsontext import parse_json

FORMATS = (".txt", ".jsonl", ".csv")
MAX_FILE_BYTES = 512 << 20
# Characters per text, checked before tokenizing: a fast tokenizer tokenizes the whole text even
# when asked to truncate (one 50 MB line took 128 s and 7.6 GB before it was refused as too long).
# The longest window of a supported model is 512 tokens (bert, roberta, ...), and natural text
# runs 4-5 characters per token. A text over 64 per token of that window fits no supported model
# unless it is mostly unbroken strings (base64, minified data), which calibrate nothing useful.
MAX_TEXT_CHARS = 64 * 512


@dataclass(frozen=True)
class TextSet:
    """Texts plus where they came from; ``sha256`` covers exactly the texts used."""

    texts: tuple[str, ...]
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.texts).encode("utf-8")).hexdigest()

    def record(self) -> dict[str, Any]:
        # The source is a path, maybe with " (not sampled)" after it: named as the build config is.
        path, space, note = self.source.partition(" (")
        source = portable_name(path) + space + note
        return {"source": source, "count": len(self.texts), "sha256": self.sha256}


def _decode(path: Path) -> str:
    try:
        # By size first: reading and then measuring would hold a 5 GB file in memory to refuse it.
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(
                f"{path} is larger than {MAX_FILE_BYTES >> 20} MB; pass a smaller file."
            )
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)  # a file that grows, or lies about its size
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise UserError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MB; pass a smaller file.")
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks binary; expected UTF-8 text.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 (byte {exc.start}); re-save it as UTF-8.") from None


def _jsonl(path: Path, content: str, text_field: str) -> list[tuple[int, str]]:
    rows = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}:{n}")
        if not isinstance(row, dict) or text_field not in row:
            raise UserError(f"{path}:{n}: no field {text_field!r} (set --text-field).")
        if not isinstance(row[text_field], str):
            raise UserError(f"{path}:{n}: field {text_field!r} is not a string.")
        rows.append((n, row[text_field].strip()))
    return rows


def _csv(path: Path, content: str, text_field: str) -> list[tuple[int, str]]:
    # csv refuses fields over 128 KiB; the length cap below gives the clearer message instead.
    old_limit = csv.field_size_limit(MAX_FILE_BYTES)
    try:
        reader = csv.DictReader(io.StringIO(content))
        header = reader.fieldnames or []
        if text_field not in header:
            raise UserError(
                f"{path}: no column {text_field!r}; columns are: {', '.join(header) or 'none'}"
                " (set --text-field)."
            )
        return [(reader.line_num, (row.get(text_field) or "").strip()) for row in reader]
    except csv.Error as exc:
        raise UserError(f"{path}: not valid CSV ({exc}).") from None
    finally:
        csv.field_size_limit(old_limit)


def _capped(path: Path, line: int, text: str, refuse_long: bool) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    if refuse_long:
        raise UserError(
            f"{path}:{line}: text is {len(text):,} characters, more than the {MAX_TEXT_CHARS:,} a "
            "text may have; split it, or pass --truncate to cut long texts."
        )
    return text[:MAX_TEXT_CHARS]


def read_texts(path: Path | str, text_field: str = "text", refuse_long: bool = False) -> TextSet:
    """Read every non-empty text of a calibration/held-out file.

    A text over ``MAX_TEXT_CHARS`` is cut to it, before any tokenizer sees it; with
    ``refuse_long`` it is a UserError naming its line instead (the build without --truncate,
    which refuses texts the model cannot see whole).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: unsupported format {suffix!r}; use one of {', '.join(FORMATS)}.")
    content = _decode(path)
    if suffix == ".txt":
        rows = [(n, line.strip()) for n, line in enumerate(content.splitlines(), 1)]
    elif suffix == ".jsonl":
        rows = _jsonl(path, content, text_field)
    else:
        rows = _csv(path, content, text_field)
    texts = [_capped(path, n, text, refuse_long) for n, text in rows if text]
    # Duplicates add nothing to calibration and would leak into the held-out split.
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise UserError(f"{path} holds no texts.")
    return TextSet(tuple(texts), str(path))


def split(texts: TextSet, samples: int, seed: int) -> tuple[TextSet, TextSet]:
    """A seeded subset of ``samples`` texts, and the rest (usable as held-out when none is given)."""
    if samples <= 0:
        raise UserError(f"--samples must be positive, got {samples}.")
    if samples > len(texts.texts):
        raise UserError(
            f"{texts.source} has {len(texts.texts)} texts, fewer than --samples {samples}."
        )
    order = list(range(len(texts.texts)))
    random.Random(seed).shuffle(order)
    chosen, rest = sorted(order[:samples]), sorted(order[samples:])
    return (
        TextSet(tuple(texts.texts[i] for i in chosen), texts.source),
        TextSet(tuple(texts.texts[i] for i in rest), texts.source + " (not sampled)"),
    )


def check_lengths(texts: TextSet, tokenizer: Any, max_length: int) -> None:
    """Refuse a text the model cannot see whole: silently cut text skews calibration ranges."""
    lengths = [len(ids) for ids in tokenizer(list(texts.texts), truncation=False)["input_ids"]]
    for n, length in enumerate(lengths):
        if length > max_length:
            raise UserError(
                f"{texts.source}: text {n + 1} of the sample has {length} tokens, more than the "
                f"model's maximum {max_length}; split it, or pass --truncate to cut long texts."
            )


def batches(
    tokenizer: Any,
    texts: TextSet,
    input_names: list[str],
    seq_len: int,
    batch_size: int = 8,
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A factory of fresh iterators of ONNX feeds, padded to ``seq_len`` like the device sees."""

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(texts.texts), batch_size):
            chunk = list(texts.texts[start : start + batch_size])
            yield encode(tokenizer, chunk, input_names, seq_len)

    return generate


def encode(
    tokenizer: Any, texts: list[str], input_names: list[str], seq_len: int
) -> dict[str, np.ndarray]:
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    feeds: dict[str, np.ndarray] = {}
    for name in input_names:
        if name in enc:
            feeds[name] = enc[name].astype(np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            raise UserError(f"the model wants input {name!r}, which the tokenizer does not give.")
    return feeds


MIN_HELDOUT = 8


DEV_TEXTS = 64  # texts the accuracy search may choose on; never the held-out ones


@dataclass(frozen=True)
class BuildTexts:
    """Every text a build uses, each set kept apart from the held-out texts the figures use."""

    calibration: TextSet  # the seeded sample int8 ranges are calibrated on
    heldout: TextSet  # only for the reported fidelity figures
    dev: TextSet  # what the accuracy search chooses on
    # Pruning fits least-squares refits, which want every text there is: the whole calibration
    # file, held-out texts excluded (sample model, budget 0.3, held-out cosine: 300 texts 0.946,
    # all 464 0.953).
    fit: TextSet


def build_texts(config: BuildConfig) -> BuildTexts:
    """Read the build's text files once and split them into the sets above."""
    # Without --truncate, a text too long to tokenize sensibly is refused like one over the
    # model's maximum (check_lengths); with it, it is cut before the tokenizer sees it.
    refuse = not config.truncate
    pool = read_texts(config.calibration, config.text_field, refuse)
    calib, rest = split(pool, config.samples, config.seed)
    heldout = read_texts(config.heldout, config.text_field, refuse) if config.heldout else rest
    if len(heldout.texts) < MIN_HELDOUT:
        raise UserError(
            f"only {len(heldout.texts)} texts left for the fidelity check (need {MIN_HELDOUT}); "
            "pass --heldout FILE or lower --samples."
        )
    overlap = set(calib.texts) & set(heldout.texts)
    if overlap:
        raise UserError(
            f"{len(overlap)} held-out texts are also calibration texts; keep them apart."
        )
    held = set(heldout.texts)
    unused = [t for t in rest.texts if t not in held]
    if len(unused) >= 16:
        dev = TextSet(tuple(unused[:DEV_TEXTS]), rest.source)
    else:  # no spare texts: choose on the calibration sample, still never on held-out text
        dev = TextSet(calib.texts[-DEV_TEXTS:], calib.source + " (calibration sample)")
    fit = TextSet(tuple(t for t in pool.texts if t not in held), calib.source)
    return BuildTexts(calib, heldout, dev, fit)
