#!/usr/bin/env python3
"""Build samples/distill.txt, the distillation corpus, from Debian's WordNet data.

Why: distilling / sanity-checking the quantized all-MiniLM-L6-v2 needs a few
thousand natural English sentences that are openly licensed and reproducible
without network access. The usage examples quoted in WordNet 3.0 glosses
(``"she choked with emotion..."``) fit: short, varied, human-written, under the
permissive WordNet 3.0 license (see DISTILL_DATA_LICENSE.txt). Debian ships
them in the ``wordnet-base`` package (``apt-get install -y wordnet-base``).

Steps: read the quoted examples from data.{noun,verb,adj,adv}; strip quotes,
collapse whitespace, keep sentences of 4-60 words; dedupe case-insensitively;
drop anything also present in the other sample files (heldout.txt,
calibration.txt, sts-mini.csv) so evaluation text never leaks into training;
shuffle with random.Random(0) and keep at most MAX_SENTENCES lines. Glosses
(definitions) are not used: WordNet has ~35k usable examples, far more than
needed, and examples read like real sentences while glosses do not.

Usage: python3 samples/make_distill_corpus.py [--wordnet-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
from pathlib import Path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
SAMPLES_DIR = Path(__file__).resolve().parent
MIN_WORDS, MAX_WORDS = 4, 60
MAX_SENTENCES = 5000
SEED = 0

QUOTED = re.compile(r'"([^"]+)"')
SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Key used for dedupe/overlap checks: lowercase, single-spaced."""
    return SPACES.sub(" ", text).strip().lower()


def clean(example: str) -> str | None:
    """Tidy one quoted example; return None if it should be dropped."""
    text = SPACES.sub(" ", example.replace("`", "'")).strip(" \t'\";,")
    n_words = len(text.split())
    if not (MIN_WORDS <= n_words <= MAX_WORDS):
        return None
    if not text[0].isalnum():
        return None
    return text[0].upper() + text[1:]


def extract_examples(data_file: Path) -> list[str]:
    """Return the cleaned quoted examples from one WordNet data.* file."""
    out: list[str] = []
    with data_file.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(" ") or "|" not in line:  # license header
                continue
            gloss = line.split("|", 1)[1]
            for match in QUOTED.findall(gloss):
                sentence = clean(match)
                if sentence:
                    out.append(sentence)
    return out


def excluded_keys(samples_dir: Path) -> set[str]:
    """Normalized lines of the held-out/eval files that must not leak in."""
    keys: set[str] = set()
    for name in ("heldout.txt", "calibration.txt"):
        path = samples_dir / name
        if path.exists():
            keys.update(normalize(line) for line in path.read_text("utf-8").splitlines())
    sts = samples_dir / "sts-mini.csv"
    if sts.exists():
        with sts.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                keys.add(normalize(row["text_a"]))
                keys.add(normalize(row["text_b"]))
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR)
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR / "distill.txt")
    args = parser.parse_args(argv)

    files = [args.wordnet_dir / name for name in POS_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(
            "WordNet data files not found: " + ", ".join(missing) + "\n"
            "Install them with: apt-get update && apt-get install -y wordnet-base\n"
            "or pass --wordnet-dir pointing at a directory with data.noun etc."
        )

    skip = excluded_keys(SAMPLES_DIR)
    seen: set[str] = set()
    sentences: list[str] = []
    for data_file in files:
        for sentence in extract_examples(data_file):
            key = normalize(sentence)
            if key in seen or key in skip:
                continue
            seen.add(key)
            sentences.append(sentence)

    random.Random(SEED).shuffle(sentences)
    sentences = sentences[:MAX_SENTENCES]
    args.out.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    print(f"wrote {len(sentences)} sentences to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
