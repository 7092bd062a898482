#!/usr/bin/env python3
"""Use an edgepack bundle from an app: text in; embeddings, labels, tagged tokens or new text out.

This file is copied verbatim into every bundle, next to bench.py. It needs only onnxruntime,
numpy and Hugging Face ``tokenizers`` (all in the bundle's requirements.txt), never edgepack,
transformers or torch, and runs on Python 3.8+. It tokenizes with the bundle's own
tokenizer/tokenizer.json, so its ids equal those transformers gave the model on the build host.

In Python (the bundle folder on sys.path, or copy this file next to your code)::

    from edgepack_runtime import Model
    model = Model("/path/to/bundle")            # default: the folder this file is in
    vectors = model.embed(["where is my order?"])   # (n, d) float32; feature-extraction
    model.classify(["great phone"])             # [{"label", "score", "scores"}]; classifiers
    model.tag(["Ada lives in Paris"])           # [[{"token", "start", "end", "label", "score"}]]
    llm.chat([{"role": "user", "content": "Hi!"}])      # decoders: the reply (chat template)
    llm.generate("Once", 32, temperature=0.8, seed=1)  # greedy without temperature

From a shell, in the bundle folder (JSON on stdout)::

    python3 -m edgepack_runtime embed "where is my order?" "track a parcel"
    python3 -m edgepack_runtime search --file faq.txt "where is my order?" --top 3
    python3 /path/to/bundle/edgepack_runtime.py classify "great phone"
    python3 -m edgepack_runtime chat --message "Hi!"     # decoders; serve --port 8000 for HTTP

What each task returns:

- feature-extraction: ``embed`` gives one float32 vector per text. A sentence-transformers export
  already pools and L2-normalises (output ``sentence_embedding``); a plain encoder's
  ``last_hidden_state`` is mean-pooled over the attention mask here (``normalize=True`` adds
  L2 normalisation).
- text-classification: ``classify`` gives softmax probabilities over the manifest's labels.
- token-classification: ``tag`` gives one entry per token (special tokens left out) with its
  text, character offsets into the input, label and probability.

Batches are padded to their longest text (texts are sorted by length first, so little padding is
wasted), or to the model's fixed [batch, seq_len] when the bundle pins its input shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
TOKENIZER_FILE = PurePosixPath("tokenizer", "tokenizer.json")
DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
DEFAULT_BATCH = 32
TASK_METHODS = {
    "feature-extraction": "embed",
    "text-classification": "classify",
    "token-classification": "tag",
    "text-generation": "generate",
}


def _leave_no_bytecode(cached: Optional[str]) -> None:
    """Remove the __pycache__ entry importing this file just wrote into the bundle.

    Python writes it before this code runs; left there, it is a file SHA256SUMS does not list,
    and bench.py's integrity check would refuse the bundle from then on. Only inside a bundle
    (beside SHA256SUMS); a copy of this file in an app's own folder keeps its cache.
    """
    if not cached or not (HERE / "SHA256SUMS").is_file():
        return
    path = Path(cached)
    if path.parent.name != "__pycache__" or path.parent.parent.resolve() != HERE:
        return
    for remove in (path.unlink, path.parent.rmdir):  # the folder only when nothing else is in it
        with contextlib.suppress(OSError):
            remove()


_leave_no_bytecode(globals().get("__cached__"))


class BundleError(Exception):
    """The bundle cannot be used as asked; the message says why and what to do."""


def _load_tokenizer(bundle: Path, max_length: int) -> Any:
    path = bundle.joinpath(*TOKENIZER_FILE.parts)
    if not path.is_file():
        found = sorted(p.name for p in (bundle / "tokenizer").glob("*"))
        raise BundleError(
            "{} has no {} (it holds: {}); the runtime needs the fast tokenizer's tokenizer.json. "
            "Rebuild the bundle with a fast (Rust) tokenizer, or write one on a host with "
            "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)".format(
                bundle, TOKENIZER_FILE, ", ".join(found) or "nothing"
            )
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise BundleError(
            "the runtime needs Hugging Face tokenizers: pip install -r requirements.txt"
        ) from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises plain Exception for a corrupt file
        raise BundleError(
            "{} does not load ({}); re-copy the bundle and check it with bench.py".format(
                path, " ".join(str(exc).split())[:200]
            )
        ) from None
    padding = tokenizer.padding or {}
    # The shipped file pads every text to a fixed length; batches here pad to their longest.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer, padding.get("pad_id")


def _pad_id(tokenizer: Any, from_file: Optional[int]) -> int:
    if from_file is not None:
        return int(from_file)
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


class Model:
    """One bundle's model and tokenizer, ready for ``embed``, ``classify`` or ``tag``.

    ``threads`` sets onnxruntime's intra-op threads (default: onnxruntime's choice);
    ``providers`` its execution providers (default: CPU).
    """

    # What the methods raise, for code that holds a model but imported this file another way
    # (edgepack_serve.py is handed the model, whichever name its module was loaded under).
    Error = BundleError

    def __init__(
        self,
        bundle_dir: Any = None,
        threads: Optional[int] = None,
        providers: Optional[Sequence[str]] = None,
    ) -> None:
        self.bundle = Path(bundle_dir) if bundle_dir is not None else HERE
        try:
            with open(str(self.bundle / "manifest.json"), encoding="utf-8") as handle:
                self.manifest = json.load(handle)  # type: Dict[str, Any]
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
            raise BundleError("{} is not a readable bundle: {}".format(self.bundle, exc)) from None
        self.task = str(self.manifest.get("task", ""))
        self.primary_output = str(self.manifest.get("io", {}).get("primary_output", "logits"))
        self.labels = self.manifest.get("labels")  # type: Optional[List[str]]
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        rel = PurePosixPath(str(self.manifest["model"]["file"]))
        if rel.is_absolute() or ".." in rel.parts:
            raise BundleError("manifest.json names model file {}, outside the bundle".format(rel))
        self.session = ort.InferenceSession(
            str(self.bundle.joinpath(*rel.parts)),
            options,
            providers=list(providers or ["CPUExecutionProvider"]),
        )
        self.inputs = [(i.name, i.type, list(i.shape)) for i in self.session.get_inputs()]
        shape = self.inputs[0][2]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_len = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
        generation = self.manifest.get("generation") or {}
        self.eos = set(int(i) for i in generation.get("eos_token_ids", []))
        self.max_length = int(
            generation.get("context_length")
            or self.manifest.get("harness", {}).get("seq_len")
            or 512
        )
        if self.fixed_len:
            self.max_length = min(self.max_length, self.fixed_len)
        self.tokenizer, pad = _load_tokenizer(self.bundle, self.max_length)
        self.pad_id = _pad_id(self.tokenizer, pad)
        if self.task == "text-generation":
            # A prompt cut to the context would be continued as if it were whole, and the KV
            # cache would overflow the graph's positions; generate_ids refuses it, at its length.
            self.tokenizer.no_truncation()

    # --- tokenization and batching -------------------------------------------------------------

    def tokenize(self, texts: Iterable[str]) -> List[Any]:
        """``tokenizers.Encoding`` per text, truncated to the model's length, not padded."""
        texts = _as_list(texts)
        return self.tokenizer.encode_batch(texts) if texts else []

    def _feeds(self, encodings: Sequence[Any]) -> Dict[str, np.ndarray]:
        """Model inputs for one batch, padded to its longest text (or the fixed shape)."""
        rows = len(encodings)
        length = self.fixed_len or max(len(e.ids) for e in encodings)
        batch = max(rows, self.fixed_batch or 0)
        columns = {
            "input_ids": np.full((batch, length), self.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((batch, length), dtype=np.int64),
            "token_type_ids": np.zeros((batch, length), dtype=np.int64),
        }
        for row in range(batch):
            # Rows beyond the texts only fill a fixed batch; they repeat the first text.
            enc = encodings[row if row < rows else 0]
            n = len(enc.ids)
            columns["input_ids"][row, :n] = enc.ids
            columns["attention_mask"][row, :n] = enc.attention_mask
            columns["token_type_ids"][row, :n] = enc.type_ids
        feeds = {}
        for name, dtype, _shape in self.inputs:
            if name not in columns:
                raise BundleError(
                    "the model wants input {!r}; the runtime gives only {}".format(
                        name, ", ".join(sorted(columns))
                    )
                )
            feeds[name] = columns[name].astype(DTYPES.get(dtype, np.int64))
        return feeds

    def _batches(self, texts: Sequence[str], batch_size: int) -> Iterable[Any]:
        """(indices, encodings, outputs) per batch; similar lengths share a batch."""
        encodings = self.tokenize(texts)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        size = self.fixed_batch or max(1, int(batch_size))
        for start in range(0, len(order), size):
            index = order[start : start + size]
            chunk = [encodings[i] for i in index]
            feeds = self._feeds(chunk)
            out = self.session.run([self.primary_output], feeds)[0][: len(chunk)]
            yield index, chunk, feeds, out

    def _need(self, method: str) -> None:
        wanted = TASK_METHODS.get(self.task)
        if wanted != method:
            raise BundleError(
                "this bundle's model is {!r}: use {}() , not {}()".format(
                    self.task, wanted or "a raw session", method
                )
            )

    # --- tasks ---------------------------------------------------------------------------------

    def embed(
        self, texts: Iterable[str], batch_size: int = DEFAULT_BATCH, normalize: bool = False
    ) -> np.ndarray:
        """(n, d) float32: the model's sentence embedding, or its mean-pooled token states."""
        self._need("embed")
        texts = _as_list(texts)
        result = None  # type: Optional[np.ndarray]
        for index, _chunk, feeds, out in self._batches(texts, batch_size):
            if out.ndim == 3:
                mask = feeds["attention_mask"][: len(index), :, None].astype(np.float32)
                out = (out * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            if result is None:
                result = np.zeros((len(texts), out.shape[-1]), dtype=np.float32)
            result[index] = out
        if result is None:
            return np.zeros((0, 0), dtype=np.float32)
        if normalize:
            result /= np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12)
        return result

    def _label(self, index: int) -> str:
        if self.labels and 0 <= index < len(self.labels):
            return str(self.labels[index])
        return "LABEL_{}".format(index)

    def classify(self, texts: Iterable[str], batch_size: int = DEFAULT_BATCH) -> List[Dict]:
        """Per text: the best label, its probability and every label's probability."""
        self._need("classify")
        texts = _as_list(texts)
        results = [None] * len(texts)  # type: List[Any]
        for index, _chunk, _feeds, logits in self._batches(texts, batch_size):
            for i, probs in zip(index, _softmax(logits)):  # noqa: B905 (zip has no strict on 3.8)
                best = int(np.argmax(probs))
                results[i] = {
                    "label": self._label(best),
                    "score": float(probs[best]),
                    "scores": {self._label(k): float(p) for k, p in enumerate(probs)},
                }
        return results

    def tag(self, texts: Iterable[str], batch_size: int = DEFAULT_BATCH) -> List[List[Dict]]:
        """Per text, per token (special tokens left out): token, char offsets, label, score."""
        self._need("tag")
        texts = _as_list(texts)
        results = [None] * len(texts)  # type: List[Any]
        for index, chunk, _feeds, logits in self._batches(texts, batch_size):
            for i, enc, rows in zip(index, chunk, logits):  # noqa: B905
                probs = _softmax(rows[: len(enc.ids)])
                tokens = []
                for t, (token, (start, end)) in enumerate(zip(enc.tokens, enc.offsets)):  # noqa: B905
                    if enc.special_tokens_mask[t]:
                        continue
                    best = int(np.argmax(probs[t]))
                    tokens.append(
                        {
                            "token": token,
                            "start": int(start),
                            "end": int(end),
                            "label": self._label(best),
                            "score": float(probs[t][best]),
                        }
                    )
                results[i] = tokens
        return results

    def generate(self, prompt: str, max_new_tokens: int = 64, **options: Any) -> str:
        """The continuation of ``prompt`` (text-generation bundles), stopping at EOS.

        Greedy unless ``temperature`` > 0; ``options`` are those of ``start``."""
        return "".join(self.stream(prompt, max_new_tokens, **options))

    def stream(self, prompt: str, max_new_tokens: int = 64, **options: Any) -> Iterator[str]:
        """The same continuation as text pieces, each as soon as it is whole text."""
        return self.start(self.tokenizer.encode(prompt).ids, max_new_tokens, **options)

    def chat(
        self, messages: Sequence[Dict[str, Any]], max_new_tokens: int = 256, **options: Any
    ) -> str:
        """The assistant's reply to ``messages`` ([{"role", "content"}], roles system, user and
        assistant; the last one the user's), rendered with the model's chat template."""
        return "".join(self.chat_stream(messages, max_new_tokens, **options))

    def chat_stream(
        self, messages: Sequence[Dict[str, Any]], max_new_tokens: int = 256, **options: Any
    ) -> "Generation":
        """The reply as text pieces; the reply ends at the template's end-of-turn token too."""
        ids = self.chat_ids(messages)
        return self.start(ids, max_new_tokens, stop_ids=self.end_of_turn, **options)

    def render_chat(self, messages: Sequence[Dict[str, Any]]) -> str:
        """The prompt text the chat template gives ``messages``, with the generation prompt."""
        self._need("generate")
        chat = (self.manifest.get("generation") or {}).get("chat") or {}
        if not chat.get("table"):
            raise BundleError(
                "this bundle has no chat format ({}); use generate() with your own prompt".format(
                    chat.get("why") or "it was built before bundles carried one"
                )
            )
        return render_chat(chat["table"], messages)

    def chat_ids(self, messages: Sequence[Dict[str, Any]]) -> List[int]:
        # The template writes the special tokens (BOS too) itself, as transformers' tokenizing
        # apply_chat_template does: encoding adds none.
        return list(self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids)

    @property
    def end_of_turn(self) -> List[int]:
        chat = (self.manifest.get("generation") or {}).get("chat") or {}
        found = self.tokenizer.token_to_id(chat["end_of_turn"]) if chat.get("end_of_turn") else None
        return [int(found)] if found is not None else []

    def start(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 64,
        stop: Any = None,
        stop_ids: Sequence[int] = (),
        **sampling: Any,
    ) -> "Generation":
        """A generation after ``prompt_ids``: iterate it for text pieces; afterwards it holds
        ``text``, ``finish_reason`` ("stop" or "length"), ``prompt_tokens`` and
        ``completion_tokens``.

        ``stop`` is a string or strings that end the text (left out of it); ``stop_ids`` tokens
        that end it besides EOS. ``sampling``: ``temperature`` (0, the default, is greedy),
        ``top_k`` (0: all), ``top_p`` (1.0: all), ``repetition_penalty`` (1.0: none), ``seed``
        (the same seed gives the same tokens; none: a fresh one)."""
        stops = _stops(stop)
        ids = self.generate_ids(prompt_ids, max_new_tokens, stop_ids=stop_ids, **sampling)
        ends = self.eos | set(int(i) for i in stop_ids)
        return Generation(self.tokenizer, ids, len(prompt_ids), ends, stops)

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        **sampling: Any,
    ) -> Iterator[int]:
        """Token ids after ``prompt_ids``, with the KV cache; EOS (or a ``stop_ids`` token) ends
        it and is the last. Greedy, the path bench.py checks, unless ``sampling`` says else."""
        self._need("generate")
        settings, seed = sampling_settings(**sampling)
        if not prompt_ids:
            raise BundleError("the prompt has no tokens; a decoder needs at least one to continue")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise BundleError("max_new_tokens must be an integer, got {!r}".format(max_new_tokens))
        if max_new_tokens < 0:
            raise BundleError("max_new_tokens must be 0 or more, got {}".format(max_new_tokens))
        if len(prompt_ids) + max_new_tokens > self.max_length:
            raise BundleError(
                "a prompt of {} tokens plus {} new ones is longer than the context ({})".format(
                    len(prompt_ids), max_new_tokens, self.max_length
                )
            )
        decode = _sibling("edgepack_decode")
        ends = self.eos | set(int(i) for i in stop_ids)
        if not settings:
            return decode.greedy_stream(self.session, list(prompt_ids), max_new_tokens, ends)
        rng = np.random.default_rng(seed)
        return decode.sample_stream(
            self.session, list(prompt_ids), max_new_tokens, ends, settings, rng
        )

    def search(self, query: str, lines: Sequence[str], top: int = 5) -> List[Dict]:
        """``lines`` ranked by cosine similarity to ``query``, best first."""
        vectors = self.embed([*lines, query], normalize=True)
        scores = vectors[:-1] @ vectors[-1]
        best = np.argsort(-scores, kind="stable")[: max(0, int(top))]
        return [{"line": int(i) + 1, "score": float(scores[i]), "text": lines[i]} for i in best]


# --- text generation: sampling settings, chat rendering, streamed text ------------------------

# What each sampling setting may be; a value outside is a BundleError, not a NaN draw.
SAMPLING = {
    "temperature": (0.0, 0.0, 100.0),  # default, lowest, highest
    "top_k": (0, 0, None),
    "top_p": (1.0, 0.0, 1.0),
    "repetition_penalty": (1.0, 0.0, 100.0),
}


def sampling_settings(seed: Any = None, **given: Any) -> Any:
    """(settings for edgepack_decode.choose without the defaults, seed); BundleError on a bad one.

    Only settings that change something are returned, so none means greedy, the checked path."""
    settings = {}  # type: Dict[str, Any]
    for name, value in given.items():
        if name not in SAMPLING:
            raise BundleError(
                "unknown generation option {!r}; the options are max_new_tokens, stop, seed, "
                "{}".format(name, ", ".join(SAMPLING))
            )
        if value is None:
            continue
        default, low, high = SAMPLING[name]
        integral = isinstance(default, int)
        number = isinstance(value, int) if integral else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or value != value:
            kind = "an integer" if integral else "a number"
            raise BundleError("{} must be {}, got {!r}".format(name, kind, value))
        bad_low = value <= low if name in ("top_p", "repetition_penalty") else value < low
        if bad_low or (high is not None and value > high):
            raise BundleError(
                "{} must be {} {}{}, got {}".format(
                    name,
                    "above" if name in ("top_p", "repetition_penalty") else "at least",
                    low,
                    " and at most {}".format(high) if high is not None else "",
                    value,
                )
            )
        if value != default:
            settings[name] = value
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BundleError("seed must be an integer 0 or more, got {!r}".format(seed))
    if settings.get("temperature", 0) == 0:
        # Greedy: top-k and top-p cannot change the argmax; only the penalty can.
        settings = {k: v for k, v in settings.items() if k == "repetition_penalty"}
    return settings, seed


def render_chat(table: Dict[str, Any], messages: Sequence[Dict[str, Any]]) -> str:
    """``messages`` as the model's chat template renders them, from the bundle's table of the
    template's fixed strings (edgepack/chat_format.py says how the build made and checked it).

    The table holds conversations an app sends for a reply: an optional system message, then
    user and assistant alternating, the last one the user's. Anything else is a BundleError, as
    the table cannot say how the template would render it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise BundleError('messages must be a non-empty list of {"role", "content"} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BundleError('message {} must be an object with a string "content"'.format(i))
        if message.get("role") not in ("system", "user", "assistant"):
            raise BundleError(
                "message {} has role {!r}; the roles are system, user and assistant".format(
                    i, message.get("role")
                )
            )
    rest, out = list(messages), []  # type: List[Dict[str, Any]], List[str]
    if rest[0]["role"] == "system":
        if table.get("start_system") is None:
            raise BundleError(
                "this model's chat template takes no system message ({})".format(
                    table.get("no_system_because", "it refused one")
                )
            )
        out += [table["start_system"], _content(table, rest[0]), table["system_user"]]
        rest = rest[1:]
    else:
        out.append(table["start_user"])
    for i, message in enumerate(rest):
        want = "user" if i % 2 == 0 else "assistant"
        if message["role"] != want:
            raise BundleError(
                "message {} is {!r} where {!r} was expected: after an optional system message, "
                "user and assistant messages alternate".format(
                    i + len(messages) - len(rest), message["role"], want
                )
            )
        out.append(_content(table, message))
        if i + 1 < len(rest):
            out.append(table["user_assistant" if want == "user" else "assistant_user"])
    if not rest or rest[-1]["role"] != "user":
        raise BundleError("the last message must be the user's: the reply is the assistant's")
    out.append(table["generation"])
    return "".join(out)


def _content(table: Dict[str, Any], message: Dict[str, Any]) -> str:
    trim = (table.get("trim") or {}).get(message["role"])
    return message["content"].strip() if trim else message["content"]


def _stops(stop: Any) -> List[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise BundleError("stop must be a string or a list of strings, got {!r}".format(stop))
    return [s for s in stops if s]


class _Detokenizer:
    """Text from token ids as they come, never splitting a character.

    A byte-level or byte-fallback tokenizer spreads one character (é, 日, an emoji) over several
    tokens, and decoding them one at a time gives U+FFFD halves. Each new token is decoded with a
    few tokens before it (so spaces and word joins come out as in a whole decode) and only text
    that does not end in U+FFFD is handed out; the rest waits for the next token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0  # type: ignore

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        return self._piece(final=False)

    def flush(self) -> str:
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""


class Generation:
    """Text pieces of one generation as an iterator (see ``Model.start``)."""

    def __init__(
        self, tokenizer: Any, ids: Iterator[int], prompt_tokens: int, ends: Any, stops: List[str]
    ) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.finish_reason = None  # type: Optional[str]
        self.text = ""
        self._ids, self._ends, self._stops = ids, ends, stops
        self._detokenizer, self._held = _Detokenizer(tokenizer), ""
        self._pieces = self._run()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early (a client went away); the decode loop ends with it."""
        self._pieces.close()
        close = getattr(self._ids, "close", None)
        if close is not None:
            close()

    def _run(self) -> Iterator[str]:
        ended = False
        for token in self._ids:
            self.completion_tokens += 1
            if token in self._ends:  # counted, not shown (decode would skip a special one anyway)
                ended = True
                break
            piece, stopped = self._release(self._detokenizer.add(token))
            if piece:
                self.text += piece
                yield piece
            if stopped:
                self.finish_reason = "stop"
                return
        piece, stopped = self._release(self._detokenizer.flush())
        tail = piece if stopped else piece + self._held
        if tail:
            self.text += tail
            yield tail
        self.finish_reason = "stop" if ended or stopped else "length"

    def _release(self, piece: str) -> Any:
        """(text safe to hand out, whether a stop string was met): text that might be the start
        of a stop string is held until the next piece says."""
        text = self._held + piece
        if not self._stops:
            self._held = ""
            return text, False
        found = [text.find(s) for s in self._stops if s in text]
        if found:
            self._held = ""
            return text[: min(found)], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False


def _sibling(name: str) -> Any:
    """A harness module shipped beside this file, imported without leaving bytecode behind."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    was, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return __import__(name)
    finally:
        sys.dont_write_bytecode = was


def _as_list(texts: Any) -> List[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise BundleError("texts must be strings, got {}".format(bad[0]))
    return texts


_DEFAULT = {}  # type: Dict[str, Model]


def load(bundle_dir: Any = None) -> Model:
    """The Model of ``bundle_dir`` (default: this file's folder), loaded once per process."""
    key = str(Path(bundle_dir).resolve() if bundle_dir is not None else HERE)
    if key not in _DEFAULT:
        _DEFAULT[key] = Model(key)
    return _DEFAULT[key]


def embed(texts: Iterable[str], bundle_dir: Any = None, **options: Any) -> np.ndarray:
    return load(bundle_dir).embed(texts, **options)


def classify(texts: Iterable[str], bundle_dir: Any = None, **options: Any) -> List[Dict]:
    return load(bundle_dir).classify(texts, **options)


def tag(texts: Iterable[str], bundle_dir: Any = None, **options: Any) -> List[List[Dict]]:
    return load(bundle_dir).tag(texts, **options)


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepack_runtime",
        description="Run this edgepack bundle's model on texts; prints JSON.",
    )
    parser.add_argument("--bundle", default=str(HERE), help="bundle folder (default: this one)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    for name, what in (
        ("embed", "one vector per text (feature-extraction bundles)"),
        ("classify", "label and probabilities per text (text-classification bundles)"),
        ("tag", "label per token (token-classification bundles)"),
        ("tokenize", "token ids and tokens, as the model sees them"),
    ):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("texts", nargs="*", help="texts (or --file)")
        cmd.add_argument("--file", help="read texts from this file, one per line")
    generate = sub.add_parser("generate", help="continuation of a prompt (decoders)")
    generate.add_argument("prompt")
    _generation_flags(generate, 64)
    chat = sub.add_parser(
        "chat", help="talk to the model with its chat template: stdin lines or --message"
    )
    chat.add_argument("--message", help="one user message; print the reply and exit")
    chat.add_argument("--system", help="system prompt")
    _generation_flags(chat, 256)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP endpoint (edgepack_serve.py)")
    serve.add_argument("--host", default="127.0.0.1", help="address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    serve.add_argument(
        "--queue", type=int, default=8, help="requests waiting beyond the one running"
    )
    serve.add_argument(
        "--max-tokens", type=int, default=512, help="most new tokens a request may ask"
    )
    serve.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes")
    serve.add_argument(
        "--model-name", help="model id the API reports (default: bundle folder name)"
    )
    serve.add_argument("--log", action="store_true", help="one stderr line per request")
    search = sub.add_parser("search", help="rank the lines of a file by similarity to a query")
    search.add_argument("query")
    search.add_argument("--file", required=True, help="text file, one candidate per line")
    search.add_argument("--top", type=int, default=5)
    return parser


def _generation_flags(parser: argparse.ArgumentParser, max_new: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1: all")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1: none")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same tokens")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _generation_options(args: argparse.Namespace) -> Dict[str, Any]:
    return {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def _chat(model: Model, args: argparse.Namespace) -> int:
    """One reply (--message) or a conversation over stdin lines, each reply streamed to stdout.

    Old turns are dropped, oldest first, when the conversation no longer fits the context."""
    options = _generation_options(args)
    history = [{"role": "system", "content": args.system}] if args.system is not None else []
    lines = [args.message] if args.message is not None else None  # type: Optional[List[str]]
    interactive = lines is None and sys.stdin.isatty()
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    for line in lines if lines is not None else sys.stdin:
        text = line.rstrip("\r\n")
        if not text.strip() and lines is None:
            continue
        history.append({"role": "user", "content": text})
        reply = _fit_and_start(model, history, args.max_new_tokens, options)
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.text})
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
    return 0


def _fit_and_start(
    model: Model, history: List[Dict[str, Any]], max_new: int, options: Dict[str, Any]
) -> Generation:
    first = 1 if history and history[0]["role"] == "system" else 0
    ids = model.chat_ids(history)
    # Drop the oldest user message and its reply while the conversation is too long; the newest
    # message alone that does not fit is start()'s error to report.
    while len(ids) + max_new > model.max_length and len(history) - first >= 3:
        del history[first : first + 2]
        ids = model.chat_ids(history)
    return model.start(ids, max_new, stop_ids=model.end_of_turn, **options)


def _read_lines(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\r\n") for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError("cannot read {}: {}".format(path, exc)) from None


def _run_command(args: argparse.Namespace) -> Any:
    model = Model(args.bundle, threads=args.threads)
    if args.command == "search":
        return model.search(args.query, _read_lines(args.file), args.top)
    if args.command == "generate":
        options = _generation_options(args)
        return {
            "prompt": args.prompt,
            "text": model.generate(args.prompt, args.max_new_tokens, **options),
        }
    texts = list(args.texts) + (_read_lines(args.file) if args.file else [])
    if not texts:
        raise BundleError("give texts as arguments or --file")
    if args.command == "embed":
        vectors = model.embed(texts)
        return {"dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}
    if args.command == "tokenize":
        return [{"ids": e.ids, "tokens": e.tokens} for e in model.tokenize(texts)]
    return getattr(model, args.command)(texts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("chat", "serve"):
            model = Model(args.bundle, threads=args.threads)
            if args.command == "chat":
                return _chat(model, args)
            return _sibling("edgepack_serve").serve(model, args)
        result = _run_command(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BundleError as exc:
        print("edgepack_runtime: {}".format(exc), file=sys.stderr)
        return 2
    try:
        json.dump(result, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
