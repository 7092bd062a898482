"""Kotlin and Swift sources for mobile decoder bundles, and the same steps in Python.

An app on a phone has no Python: it runs the bundle's .ort decoder with onnxruntime-android
(Kotlin) or onnxruntime-objc (Swift), and must tokenize, render the chat template, sample and
detokenize itself. ``render()`` writes ``mobile/EdgepackLlm.kt`` and ``.swift`` with this bundle's
graph signature (input, cache and output names, cache type and shape, context) and chat table as
constants, plus ``mobile/tokens.txt`` (one token per line, the line number is the id) and
``mobile/merges.txt`` (one merge per line, the line number is its rank), which the sources read.

The tokenizer reproduces HF tokenizers' byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2/3): added
tokens split off leftmost-longest, optional NFC, the pre-tokenizer's regex (Isolated), bytes mapped
to GPT-2's printable characters, then the lowest-ranked adjacent pair merged until none is left
(with ``ignore_merges``, a word found whole in the vocabulary is one token). Any other tokenizer
(SentencePiece-style, WordPiece, Unigram) gets no sources and one reason in the manifest.

The sampler is edgepack_decode.choose step for step (repetition penalty, temperature, top-k,
top-p, one uniform draw on the cumulative sum) fed by SplitMix64, which both sources implement, so
``SplitMix64`` here with ``choose`` gives the apps' tokens for a seed. ``BytePairs`` and
``run_like_app`` are the Python port the tests compare with tokenizers and the bundle's runtime;
a change in the sources must be made here.

Standard library only, except the port's regex (the ``regex`` package, as ``\\p{L}`` needs) and
numpy/onnxruntime inside ``run_like_app``; never imports edgepack; Python 3.8+.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

KOTLIN_FILE, SWIFT_FILE = "mobile/EdgepackLlm.kt", "mobile/EdgepackLlm.swift"
TOKENS_FILE, MERGES_FILE = "mobile/tokens.txt", "mobile/merges.txt"
# tokenizers' ByteLevel pre-tokenizer with use_regex: GPT-2's pattern.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CACHE_TYPES = {"tensor(float)": "float", "tensor(int8)": "int8"}  # what both apps can create
MASK64 = (1 << 64) - 1


def byte_chars() -> List[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes are themselves, the others
    (controls, space, soft hyphen...) take code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


# --- what the tokenizer needs, read from tokenizer.json ----------------------------------------


def _pattern(pre: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """(its regex, "") for a byte-level pre-tokenizer, or (None, why)."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = list(steps or [])
    level = steps[-1] if steps else {}
    if level.get("type") != "ByteLevel":
        return None, "the pre-tokenizer is {}, not byte-level".format(pre.get("type"))
    if level.get("add_prefix_space"):
        return None, "the byte-level pre-tokenizer adds a prefix space, which the apps lack"
    if len(steps) == 1 and level.get("use_regex", True):
        return GPT2_PATTERN, ""
    split = steps[0] if len(steps) == 2 else {}
    regex = (split.get("pattern") or {}).get("Regex")
    ok = split.get("type") == "Split" and regex and split.get("behavior") == "Isolated"
    if not ok or split.get("invert") or level.get("use_regex", True):
        return None, "the pre-tokenizer is not one regex Split then ByteLevel"
    return str(regex), ""


def _normalizer(norm: Optional[Dict[str, Any]]) -> Tuple[Optional[bool], str]:
    """(whether NFC applies, "") or (None, why): byte-level tokenizers use none or NFC."""
    steps = (norm or {}).get("normalizers") if (norm or {}).get("type") == "Sequence" else [norm]
    kinds = [s.get("type") for s in (steps or []) if s]
    if kinds and kinds != ["NFC"]:
        return None, "the normalizer ({}) is not NFC".format(", ".join(map(str, kinds)))
    return bool(kinds), ""


def _template(post: Optional[Dict[str, Any]]) -> Tuple[Optional[Tuple[List, List]], str]:
    """(ids before, ids after the text) the post-processor adds to one text, or (None, why)."""
    steps = (post or {}).get("processors") if (post or {}).get("type") == "Sequence" else [post]
    steps = [s for s in (steps or []) if s and s.get("type") != "ByteLevel"]
    if not steps:
        return ([], []), ""
    if len(steps) > 1 or steps[0].get("type") != "TemplateProcessing":
        return None, "the post-processor is not a template"
    before, after, seen = [], [], False  # type: List[int], List[int], bool
    for item in steps[0].get("single") or []:
        if "Sequence" in item:
            seen = True
            continue
        name = item["SpecialToken"]["id"]
        (after if seen else before).extend(steps[0]["special_tokens"][name]["ids"])
    return ([int(i) for i in before], [int(i) for i in after]), ""


def _decoder(dec: Optional[Dict[str, Any]]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The decoder steps the apps run per token: single-character Replace rules, then ByteLevel
    (a token with a character outside GPT-2's byte table is its own UTF-8, as tokenizers does);
    whether a Fuse joins the tokens first. None and why for any other decoder."""
    steps = (dec or {}).get("decoders") if (dec or {}).get("type") == "Sequence" else [dec]
    kinds = [(s or {}).get("type") for s in steps or []]
    if not kinds or kinds[-1] != "ByteLevel":
        return None, "the decoder ({}) does not end in ByteLevel".format(", ".join(map(str, kinds)))
    replace = []
    for step in steps[:-1]:
        if step["type"] == "Replace" and len((step.get("pattern") or {}).get("String") or "") == 1:
            replace.append([step["pattern"]["String"], str(step.get("content", ""))])
        elif step["type"] not in ("ByteFallback", "Fuse"):
            return None, "the decoder has a {} step the apps lack".format(step["type"])
    return {"replace": replace, "fuse": "Fuse" in kinds}, ""


def _added(data: Dict[str, Any]) -> Tuple[Optional[List[Dict[str, Any]]], str]:
    added = []
    for token in data.get("added_tokens") or []:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return None, "added token {!r} needs options the apps lack".format(token["content"])
        added.append({"content": str(token["content"]), "id": int(token["id"]),
                      "special": bool(token.get("special"))})  # fmt: skip
    return added, ""


def _token_list(vocab: Dict[str, int], added: List[Dict[str, Any]]) -> Tuple[Optional[List], str]:
    """Every token by id (tokens.txt's lines), or (None, why) when the ids leave gaps or a token
    holds a line break."""
    by_id = {int(i): t for t, i in vocab.items()}
    by_id.update((a["id"], a["content"]) for a in added)
    tokens = [by_id.get(i) for i in range(len(by_id))]
    if None in tokens:
        return None, "the token ids are not 0..{} without gaps".format(len(by_id) - 1)
    broken = [t for t in tokens if "\n" in t or "\r" in t]
    if broken:
        return None, "token {!r} holds a line break; tokens.txt is one token per line".format(
            broken[0]
        )
    return tokens, ""


def tokenizer_spec(tokenizer_dir: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    """(what the byte-level BPE ports need, "") or (None, why this tokenizer is not supported)."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return None, "the bundle's tokenizer/ lacks tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        return None, "the tokenizer is {}, not byte-level BPE".format(model.get("type"))
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "the BPE model marks word pieces (prefix or suffix), which the apps lack"
    if model.get("dropout"):
        return None, "the BPE model has dropout"
    pattern, why = _pattern(data.get("pre_tokenizer") or {})
    nfc, why_norm = _normalizer(data.get("normalizer"))
    template, why_post = _template(data.get("post_processor"))
    added, why_added = _added(data)
    decoder, why_dec = _decoder(data.get("decoder"))
    for result, reason in ((pattern, why), (nfc, why_norm), (template, why_post), (added, why_added), (decoder, why_dec)):  # fmt: skip
        if result is None:
            return None, reason
    vocab = {str(t): int(i) for t, i in (model.get("vocab") or {}).items()}
    unk = vocab.get(str(model.get("unk_token"))) if model.get("unk_token") is not None else None
    if "<0x00>" in vocab and model.get("byte_fallback"):
        return None, "the vocabulary has byte-fallback tokens besides byte-level ones"
    if unk is None and any(c not in vocab for c in byte_chars()):
        return None, "the vocabulary lacks some of the 256 byte tokens and has no unknown token"
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    if any(len(m) != 2 or " " in "".join(m) for m in merges):
        return None, "a merge is not two tokens without spaces"
    tokens, why_tokens = _token_list(vocab, added)
    if tokens is None:
        return None, why_tokens
    table = frozenset(byte_chars())
    if decoder["fuse"] and any(_raw(t, decoder["replace"], table) for t in tokens):
        return None, "the decoder fuses tokens before ByteLevel and some token is not byte-level"
    return {
        "pattern": pattern,
        "nfc": nfc,
        "ignore_merges": bool(model.get("ignore_merges")),
        "unk": -1 if unk is None else unk,
        "fuse_unk": bool(model.get("fuse_unk")),
        "replace": decoder["replace"],
        "added": added,
        "before": template[0],
        "after": template[1],
        "tokens": tokens,
        "merges": [" ".join(m) for m in merges],
    }, ""


def _raw(token: str, replace: List[List[str]], table: Any) -> bool:
    """Whether the decoder takes ``token`` as its own UTF-8 (a character outside ``table``, the
    byte characters)."""
    for old, new in replace:
        token = token.replace(old, new)
    return any(c not in table for c in token)


# --- the Python port of the app-side tokenizer and sampler --------------------------------------


class BytePairs:
    """The Kotlin/Swift BytePairTokenizer, step for step (keep the three in sync)."""

    def __init__(self, token_lines: Sequence[str], merge_lines: Sequence[str], spec: Dict) -> None:
        import regex  # the port only: \p{L} classes, as the apps' Java and ICU regexes have

        self.ids = {t: i for i, t in enumerate(token_lines)}
        self.tokens = list(token_lines)
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merge_lines)}
        self.spec = spec
        self.split = regex.compile(spec["pattern"])
        self.added = sorted((a["content"] for a in spec["added"]), key=len, reverse=True)
        self.added_ids = {a["content"]: a["id"] for a in spec["added"]}
        self.special = set(a["id"] for a in spec["added"] if a["special"])
        self.chars = byte_chars()
        self.byte_of = {c: b for b, c in enumerate(self.chars)}

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = []  # type: List[int]
        for piece, is_added in self.split_added(text):
            if is_added:
                ids.append(self.added_ids[piece])
                continue
            if self.spec["nfc"]:
                piece = unicodedata.normalize("NFC", piece)
            for word in self.pre_tokenize(piece):
                ids.extend(self.word_ids("".join(self.chars[b] for b in word.encode("utf-8"))))
        if add_special_tokens:
            ids = list(self.spec["before"]) + ids + list(self.spec["after"])
        return ids

    def split_added(self, text: str) -> List[Tuple[str, bool]]:
        """Leftmost-longest added tokens as whole pieces, the text between them as the rest."""
        out, start, i = [], 0, 0  # type: List[Tuple[str, bool]], int, int
        while i < len(text):
            found = next((a for a in self.added if text.startswith(a, i)), None)
            if found is None:
                i += 1
                continue
            if i > start:
                out.append((text[start:i], False))
            out.append((found, True))
            i = start = i + len(found)
        if start < len(text):
            out.append((text[start:], False))
        return out

    def pre_tokenize(self, text: str) -> List[str]:
        words, last = [], 0
        for match in self.split.finditer(text):
            if match.start() > last:
                words.append(text[last : match.start()])
            if match.end() > match.start():
                words.append(match.group())
            last = match.end()
        if last < len(text):
            words.append(text[last:])
        return words

    def word_ids(self, word: str) -> List[int]:
        if self.spec["ignore_merges"] and word in self.ids:
            return [self.ids[word]]
        parts = list(word)
        while len(parts) > 1:
            best, at = -1, -1
            for i in range(len(parts) - 1):
                rank = self.ranks.get((parts[i], parts[i + 1]), -1)
                if rank >= 0 and (best < 0 or rank < best):
                    best, at = rank, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        ids, unknown = [], False  # type: List[int], bool
        for part in parts:
            found = self.ids.get(part)
            if found is None:  # a byte the vocabulary lacks: the unknown token, runs fused
                if not (unknown and self.spec["fuse_unk"]):
                    ids.append(self.spec["unk"])
                unknown = True
            else:
                ids.append(found)
                unknown = False
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """What one id adds to the text: nothing for a special token; else the decoder's Replace
        rules, then its characters mapped back to bytes, or its own UTF-8 when one is not in
        the table."""
        if token_id in self.special or not 0 <= token_id < len(self.tokens):
            return b""
        token = self.tokens[token_id]
        for old, new in self.spec["replace"]:
            token = token.replace(old, new)
        if any(c not in self.byte_of for c in token):
            return token.encode("utf-8")
        return bytes(self.byte_of[c] for c in token)

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def complete_utf8(data: bytes) -> int:
    """How many leading bytes of ``data`` end on a character boundary: a lead byte whose
    continuation has not come yet (and only that) is held back."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[len(data) - back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4 if byte >> 3 == 30 else 1
            return len(data) - back if need > back else len(data)
    return len(data)


class SplitMix64:
    """The apps' random numbers: SplitMix64, and a double from its top 53 bits."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_long(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def random(self) -> float:
        return (self.next_long() >> 11) * (1.0 / (1 << 53))


def run_like_app(
    bundle: Path,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    settings: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
) -> List[int]:
    """The apps' generate loop on the bundle's model: feeds built from the rendered signature
    (``signature``), the sampler fed by SplitMix64(seed); EOS (or a ``stop_ids`` token, as the
    chat's end of turn) ends it and is the last token."""
    import numpy as np
    import onnxruntime as ort

    decode = _sibling("edgepack_decode")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(
        str(bundle / manifest["model"]["file"]), providers=["CPUExecutionProvider"]
    )
    sig = signature(session, manifest)
    dtypes = {"float": np.float32, "int8": np.int8}
    past = {n: np.zeros(sig["cache_shape"], dtype=dtypes[sig["cache_type"]]) for n in sig["past"]}
    history, rng, out = list(prompt_ids), SplitMix64(seed), []  # type: List[int], Any, List[int]
    ids, start = list(prompt_ids), 0
    while len(out) < max_new_tokens:
        feeds = dict(past)
        feeds["input_ids"] = np.asarray([ids], dtype=np.int64)
        feeds["attention_mask"] = np.ones((1, start + len(ids)), dtype=np.int64)
        if sig["position_ids"]:
            feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None]
        if sig["logits_from"]:
            feeds["logits_from"] = np.asarray([len(ids) - 1], dtype=np.int64)
        values = dict(zip(sig["outputs"], session.run(sig["outputs"], feeds)))  # noqa: B905
        past = {p: values[q] for p, q in zip(sig["past"], sig["present"])}  # noqa: B905
        token = decode.choose(values["logits"][0, -1], history, rng=rng, **(settings or {}))
        out.append(token)
        history.append(token)
        if token in sig["eos"] or token in stop_ids:
            break
        start, ids = start + len(ids), [token]
    return out


# --- the generated sources -------------------------------------------------------------------


def signature(session: Any, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """What the apps feed and read, from the converted model's own session; ValueError when the
    graph is not the decoder shape the sources drive."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
    present = ["present." + n[len("past_key_values.") :] for n in past]
    for name in ("input_ids", "attention_mask", *[n for n in ("position_ids", "logits_from") if n in inputs]):  # fmt: skip
        if inputs.get(name) is None or inputs[name].type != "tensor(int64)":
            raise ValueError("the graph's {} is not an int64 input".format(name))
    extra = set(inputs) - set(past) - {"input_ids", "attention_mask", "position_ids", "logits_from"}
    if extra or not past or any(p not in outputs for p in present) or "logits" not in outputs:
        raise ValueError("the graph's inputs and outputs are not a KV-cache decoder's")
    types = set(inputs[n].type for n in past)
    if len(types) != 1 or next(iter(types)) not in CACHE_TYPES:
        raise ValueError("the KV cache is {}, not fp32 or int8".format(", ".join(sorted(types))))
    if session.get_outputs()[outputs.index("logits")].type != "tensor(float)":
        raise ValueError("the logits are not float")
    dims = [d if isinstance(d, int) else 0 for d in inputs[past[0]].shape]
    shapes = set(tuple(d if isinstance(d, int) else 0 for d in inputs[n].shape) for n in past)
    if len(dims) != 4 or len(shapes) != 1 or not dims[1] or not dims[3]:
        raise ValueError("the KV cache inputs are not one [batch, heads, positions, size] shape")
    eos = (manifest.get("generation") or {}).get("eos_token_ids") or []
    return {
        "past": past,
        "present": present,
        "outputs": ["logits", *present],
        "position_ids": "position_ids" in inputs,
        "logits_from": "logits_from" in inputs,
        "cache_type": CACHE_TYPES[next(iter(types))],
        "cache_shape": [1, dims[1], 0, dims[3]],
        "context": int((manifest.get("generation") or {}).get("context_length") or 0),
        "eos": [int(e) for e in eos],
    }


def _layer_order(name: str) -> Tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1, name)


def render(
    manifest: Dict[str, Any], session: Any, tokenizer_dir: Path, bundle_name: str
) -> Tuple[Dict[str, str], str]:
    """({bundle-relative path: text} of the two sources and their tokenizer files, "") or
    ({}, why not): a model the apps cannot tokenize or drive exactly gets no half-working code."""
    try:
        sig = signature(session, manifest)
    except ValueError as exc:
        return {}, str(exc)
    spec, why = tokenizer_spec(tokenizer_dir)
    if spec is None:
        return {}, why
    chat = (manifest.get("generation") or {}).get("chat") or {}
    end = chat.get("end_of_turn")
    values = {
        "sig": sig,
        "spec": spec,
        "chat": chat.get("table"),
        "end_of_turn": spec["tokens"].index(end) if end in spec["tokens"] else -1,
        "bundle": bundle_name,
        "manifest": manifest,
    }
    templates, encoder_templates = _sibling("mobile_llm_sources"), _sibling("mobile_sources")
    return {
        KOTLIN_FILE: templates.kotlin(values, encoder_templates),
        SWIFT_FILE: templates.swift(values, encoder_templates),
        TOKENS_FILE: "".join(t + "\n" for t in spec["tokens"]),
        MERGES_FILE: "".join(m + "\n" for m in spec["merges"]),
    }, ""


def generate_with(port: BytePairs, ids: Iterator[int]) -> str:
    """Text of the generated ids as the apps stream it: whole characters only, held bytes last."""
    held, text = b"", []  # type: bytes, List[str]
    for token in ids:
        held += port.token_bytes(token)
        cut = complete_utf8(held)
        text.append(held[:cut].decode("utf-8", errors="replace"))
        held = held[cut:]
    text.append(held.decode("utf-8", errors="replace"))
    return "".join(text)


def _sibling(name: str) -> Any:
    """A module beside this file, loaded by path: harness/ is a folder of files, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "edgepack_harness_" + name, str(Path(__file__).resolve().parent / (name + ".py"))
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore
    return module
