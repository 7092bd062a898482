"""Kotlin and Swift starting points for mobile bundles, and the same steps in Python.

A phone app has no Python: it runs the bundle's .ort model with onnxruntime-android (Kotlin) or
onnxruntime-objc (Swift) and must tokenize itself. ``render()`` writes both sources from a
bundle's manifest and tokenizer: the model's exact input names, dtypes and shapes, its output,
labels and maximum length as constants, and a BERT WordPiece tokenizer driven by the bundle's
vocab.txt. They cannot be compiled on the build host, so this module also holds ``WordPiece``
and ``run_like_app``: a line-by-line Python port of what the Kotlin and Swift do, which the tests
compare with ``tokenizers`` and with the host's own outputs.

The tokenizer reproduces tokenizers' BertNormalizer + BertPreTokenizer + WordPiece + the
"[CLS] $A [SEP]" template: special tokens written in the text are kept whole; control and format
characters are dropped, every White_Space character splits; CJK ideographs stand alone; accents
are stripped after NFD when the model lowercases; lowercase is per code point (so no final
sigma); punctuation (ASCII, or Unicode P*) stands alone; a word is greedy longest-match-first
over the vocabulary with "##" continuations, and [UNK] whole when any part is missing or it is
over 100 characters. Known limit: tokenizers judges "punctuation" and "control" with Unicode
tables older than the phone's (or Python's), so a character assigned in recent Unicode versions
(e.g. U+2E5D, Unicode 14) can split differently.

Standard library only (numpy and onnxruntime only inside ``run_like_app``); never imports
edgepack, so it can sit in harness/ with the other device-side files; Python 3.8+.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

KOTLIN_FILE, SWIFT_FILE = "mobile/EdgepackModel.kt", "mobile/EdgepackModel.swift"
ROLES = ("input_ids", "attention_mask", "token_type_ids")
DTYPES = {"int64": ("int64", "Long"), "int32": ("int32", "Int")}
# Rust's char::is_whitespace (the Unicode White_Space property); Java's and Python's own
# whitespace tests differ from it (no-break spaces, U+001C..U+001F), so all ports use this list.
WHITE_SPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]
).union([0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip
# Unicode general categories tokenizers drops as "control" (not Cn: unassigned code points stay).
CONTROL_CATEGORIES = ("Cc", "Cf", "Co", "Cs")
PUNCTUATION_CATEGORIES = ("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po")
ASCII_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


# --- what the tokenizer needs, read from the bundle ---------------------------------------------


def read_vocab(path: Path) -> List[str]:
    """vocab.txt as the apps read it: one token per "\\n"-separated line, "\\r" trimmed."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _specials(post: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(cls, sep) of a "[CLS] $A [SEP]" post-processor, or None for any other shape."""
    if post.get("type") == "BertProcessing":
        return str(post["cls"][0]), str(post["sep"][0])
    if post.get("type") != "TemplateProcessing":
        return None
    single = post.get("single") or []
    if len(single) != 3 or "Sequence" not in single[1]:
        return None
    if "SpecialToken" not in single[0] or "SpecialToken" not in single[2]:
        return None
    return str(single[0]["SpecialToken"]["id"]), str(single[2]["SpecialToken"]["id"])


def tokenizer_spec(tokenizer_dir: Path, max_length: int) -> Tuple[Optional[Dict], str]:
    """(settings the WordPiece ports need, "") or (None, why this tokenizer is not supported)."""
    path, vocab_path = tokenizer_dir / "tokenizer.json", tokenizer_dir / "vocab.txt"
    if not path.is_file() or not vocab_path.is_file():
        return None, "the bundle's tokenizer/ lacks tokenizer.json or vocab.txt"
    data = json.loads(path.read_text(encoding="utf-8"))
    model, norm = data.get("model") or {}, data.get("normalizer") or {}
    if model.get("type") != "WordPiece" or norm.get("type") != "BertNormalizer":
        return None, "the tokenizer is {} with {}, not BERT WordPiece".format(
            model.get("type"), norm.get("type")
        )
    if (data.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
        return None, "the pre-tokenizer is not BertPreTokenizer"
    specials = _specials(data.get("post_processor") or {})
    if specials is None:
        return None, 'the post-processor is not "[CLS] $A [SEP]"'
    vocab = {token: i for i, token in enumerate(read_vocab(vocab_path))}
    if vocab != model.get("vocab"):
        return None, "vocab.txt does not match tokenizer.json's vocabulary"
    added = []
    for token in data.get("added_tokens") or []:
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip"):
            return None, "added token {!r} needs options the ports lack".format(token["content"])
        if token.get("single_word") or vocab.get(token["content"]) != token["id"]:
            return None, "added token {!r} is not a vocab.txt entry".format(token["content"])
        added.append(str(token["content"]))
    lowercase = bool(norm.get("lowercase", True))
    strip = norm.get("strip_accents")
    pad = (data.get("padding") or {}).get("pad_token") or "[PAD]"
    return {
        "lowercase": lowercase,
        "strip_accents": lowercase if strip is None else bool(strip),
        "clean_text": bool(norm.get("clean_text", True)),
        "chinese_chars": bool(norm.get("handle_chinese_chars", True)),
        "unk": str(model.get("unk_token", "[UNK]")),
        "prefix": str(model.get("continuing_subword_prefix", "##")),
        "max_chars": int(model.get("max_input_chars_per_word", 100)),
        "cls": specials[0],
        "sep": specials[1],
        "pad": pad if pad in vocab else specials[0],
        "added": sorted(added),
        "max_length": int(max_length),
    }, ""


# --- the Python port of the app-side tokenizer ---------------------------------------------------


def is_white_space(cp: int) -> bool:
    return cp in WHITE_SPACE


def is_control(cp: int) -> bool:
    if cp in (0x09, 0x0A, 0x0D):
        return False
    return unicodedata.category(chr(cp)) in CONTROL_CATEGORIES


def is_cjk(cp: int) -> bool:
    return any(low <= cp <= high for low, high in CJK_RANGES)


def is_punctuation(cp: int) -> bool:
    return chr(cp) in ASCII_PUNCTUATION or unicodedata.category(chr(cp)) in PUNCTUATION_CATEGORIES


class WordPiece:
    """The Kotlin/Swift WordPieceTokenizer, step for step (keep the three in sync)."""

    def __init__(self, vocab_lines: Sequence[str], spec: Dict[str, Any]) -> None:
        self.vocab = {}  # type: Dict[str, int]
        for i, token in enumerate(vocab_lines):
            self.vocab[token] = i  # a repeated line keeps its last index, as tokenizers does
        self.spec = spec

    def normalize(self, text: str) -> str:
        s = self.spec
        out = []
        for ch in text:
            cp = ord(ch)
            if s["clean_text"]:
                if cp == 0 or cp == 0xFFFD or is_control(cp):
                    continue
                if is_white_space(cp):
                    ch = " "
            if s["chinese_chars"] and is_cjk(cp):
                out.append(" " + ch + " ")
            else:
                out.append(ch)
        text = "".join(out)
        if s["strip_accents"]:
            nfd = unicodedata.normalize("NFD", text)
            text = "".join(c for c in nfd if unicodedata.category(c) != "Mn")
        if s["lowercase"]:
            text = "".join(c.lower() for c in text)  # per code point: no final-sigma rule
        return text

    @staticmethod
    def pre_tokenize(text: str) -> List[str]:
        words, current = [], []  # type: List[str], List[str]
        for ch in text:
            cp = ord(ch)
            if is_white_space(cp) or is_punctuation(cp):
                if current:
                    words.append("".join(current))
                    current = []
                if not is_white_space(cp):
                    words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
        return words

    def word_pieces(self, word: str) -> List[str]:
        s = self.spec
        chars = list(word)  # code points, as Kotlin's codePoints() and Swift's unicodeScalars
        if len(chars) > s["max_chars"]:
            return [s["unk"]]
        pieces, start = [], 0
        while start < len(chars):
            end, found = len(chars), None
            while start < end:
                piece = "".join(chars[start:end])
                if start > 0:
                    piece = s["prefix"] + piece
                if piece in self.vocab:
                    found = piece
                    break
                end -= 1
            if found is None:
                return [s["unk"]]
            pieces.append(found)
            start = end
        return pieces

    def split_added(self, text: str) -> List[Tuple[str, bool]]:
        """Special tokens written in the text stay whole: leftmost, then longest, match."""
        parts, start, i = [], 0, 0
        while i < len(text):
            match = ""
            for token in self.spec["added"]:
                if len(token) > len(match) and text.startswith(token, i):
                    match = token
            if match:
                if i > start:
                    parts.append((text[start:i], False))
                parts.append((match, True))
                i += len(match)
                start = i
            else:
                i += 1
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def tokenize(self, text: str) -> List[str]:
        tokens = []  # type: List[str]
        for part, special in self.split_added(text):
            if special:
                tokens.append(part)
                continue
            for word in self.pre_tokenize(self.normalize(part)):
                tokens.extend(self.word_pieces(word))
        return tokens

    def encode(self, text: str) -> Dict[str, List[int]]:
        """ids, attention_mask, token_type_ids: [CLS] tokens [SEP], cut to max_length."""
        s = self.spec
        tokens = self.tokenize(text)[: max(0, s["max_length"] - 2)]
        ids = [self.vocab[s["cls"]]] + [self.vocab[t] for t in tokens] + [self.vocab[s["sep"]]]
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "token_type_ids": [0] * len(ids),
            "special": [1] + [0] * len(tokens) + [1],
        }


def run_like_app(bundle: Path, text: str) -> Tuple[Any, Dict[str, List[int]]]:
    """What the Kotlin/Swift ``run`` does, in Python: (the primary output, the encoding).

    Inputs are built from the generated signature (names, dtypes, fixed dims) and the .ort model
    runs in onnxruntime; the output is the raw primary output of the one row.
    """
    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    sig = signature(manifest)
    spec, why = tokenizer_spec(bundle / "tokenizer", sig["max_length"])
    if spec is None:
        raise ValueError(why)
    tokenizer = WordPiece(read_vocab(bundle / "tokenizer" / "vocab.txt"), spec)
    enc = tokenizer.encode(text)
    rows, length = sig["inputs"][0]["shape"][0], sig["inputs"][0]["shape"][1]
    rows = rows if rows > 0 else 1
    length = length if length > 0 else len(enc["input_ids"])
    pad_id = tokenizer.vocab[spec["pad"]]
    feeds = {}
    for item in sig["inputs"]:
        values = enc[item["role"]]
        fill = pad_id if item["role"] == "input_ids" else 0
        row = [values[k] if k < len(values) else fill for k in range(length)]
        feeds[item["name"]] = np.array([row] * rows, dtype=np.dtype(item["dtype"]))
    session = ort.InferenceSession(
        str(bundle / manifest["model"]["file"]), providers=["CPUExecutionProvider"]
    )
    out = session.run([sig["output"]["name"]], feeds)[0]
    return out[0], enc


# --- the generated sources -------------------------------------------------------------------


def _dims(shape: Sequence[Any]) -> List[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def signature(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The model's inputs (with their role), primary output and length limit, from the manifest."""
    inputs = []
    for item in manifest["io"]["inputs"]:
        if item["name"] not in ROLES or item["dtype"] not in DTYPES:
            raise ValueError("input {name} ({dtype}) is not a tokenizer output".format(**item))
        inputs.append({**item, "role": item["name"], "shape": _dims(item["shape"])})
    primary = manifest["io"]["primary_output"]
    output = next(o for o in manifest["io"]["outputs"] if o["name"] == primary)
    max_length = int(manifest["harness"]["seq_len"])
    if inputs[0]["shape"][1] > 0:
        max_length = min(max_length, inputs[0]["shape"][1])
    return {
        "inputs": inputs,
        "output": {**output, "shape": _dims(output["shape"])},
        "max_length": max_length,
    }


def _kind(manifest: Dict[str, Any], sig: Dict[str, Any]) -> str:
    """embed, classify or tag: what the app gets from the primary output."""
    task, rank = manifest["task"], len(sig["output"]["shape"])
    if task == "feature-extraction":
        return "embed"
    return "tag" if rank == 3 else "classify"


def render(
    manifest: Dict[str, Any], tokenizer_dir: Path, bundle_name: str
) -> Tuple[Dict[str, str], str]:
    """({bundle-relative path: source} of EdgepackModel.kt and .swift, "") or ({}, why not).

    Only BERT WordPiece tokenizers (and inputs a tokenizer gives) are supported: a model whose
    text the app cannot tokenize exactly gets no half-working sources.
    """
    templates = _sibling("mobile_sources")
    try:
        sig = signature(manifest)
    except ValueError as exc:
        return {}, str(exc)
    spec, why = tokenizer_spec(tokenizer_dir, sig["max_length"])
    if spec is None:
        return {}, why
    values = {
        "sig": sig,
        "spec": spec,
        "kind": _kind(manifest, sig),
        "labels": list(manifest.get("labels") or []),
        "bundle": bundle_name,
        "manifest": manifest,
    }
    return {KOTLIN_FILE: templates.kotlin(values), SWIFT_FILE: templates.swift(values)}, ""


def _sibling(name: str) -> Any:
    """A module beside this file, loaded by path: harness/ is a folder of files, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "edgepack_harness_" + name, str(Path(__file__).resolve().parent / (name + ".py"))
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore
    return module
