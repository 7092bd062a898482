"""Kotlin and Swift decoder sources in mobile (.ort) decoder bundles, checked without a phone.

No Android SDK, onnxruntime-android, Swift or onnxruntime-objc here, so: every cache name, type and
shape the sources declare is compared with the converted model itself; mobile_llm.py's Python
port of their steps is run (its byte-level BPE against HF tokenizers, its generate loop against
the bundle's own runtime); and where kotlinc is installed (Debian's `kotlin`), everything in the
Kotlin file but the onnxruntime calls is compiled and run on the JVM: its tokenizer against HF
tokenizers, its streamed text against tokenizers' decode, its chat rendering against the bundle
runtime's, its sampler against edgepack_decode.choose fed by the same SplitMix64 draws.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_runtime_mobile import VARIED as ENCODER_TEXTS

HARNESS = Path(__file__).resolve().parents[1] / "edgepack" / "harness"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The encoder tokenizer's texts, and what byte-level BPE adds: chat markers and special tokens
# written in the text, contractions, digit runs, runs of spaces and newlines, NFC pairs.
VARIED = [
    *ENCODER_TEXTS,
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_start|>x<|im_end|<|endoftext|>",
    "I'm sure they'll say it's 12345 or 3.14159, won't they?  Yes!!\n\n\nNo.",
    "nbsp\u00a0and \u212b vs Å    trailing   ",
    "IT'S 'S 'Ll ALL CAPS'RE",
]
# Bytes no training text has: the SmolLM2-like tokenizer encodes them as its unknown token.
UNSEEN = ["a\x04b\x06\x06c\x05", "\x04", "x \x06\x06 y\x06z"]
# Llama 3's and Qwen2's pre-tokenizer regex (a Split before ByteLevel without its own regex).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def harness(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        "edgepack_harness_" + name, HARNESS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus(unseen: bool = True) -> list[str]:
    texts = list(VARIED) + (UNSEEN if unseen else [])
    for name in ("calibration.txt", "heldout.txt"):
        texts += [t for t in (SAMPLES / name).read_text(encoding="utf-8").splitlines() if t]
    return texts


def train_tokenizer(folder: Path, style: str) -> Any:
    """A byte-level BPE trained here: as SmolLM2's (GPT-2's regex; bytes no text had are the
    unknown token, runs fused; its decoder's ByteFallback, Fuse and Replace steps), or Llama 3's
    Split regex with NFC, ignore_merges, a BOS template and non-special added tokens."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if style == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
    else:
        tok = Tokenizer(models.BPE(unk_token=specials[0], fuse_unk=True, byte_fallback=True))
    if style == "llama3":
        tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if style == "llama3" else []
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=alphabet
    )
    tok.train_from_iterator(corpus(unseen=False) * 3, trainer)
    if style == "gpt2":
        steps = [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " ")]
        tok.decoder = decoders.Sequence([*steps, decoders.ByteLevel()])
    else:  # not special: decoded through ByteLevel (é as one byte), or as itself (▁ is no byte)
        tok.add_tokens(["<tool>", "café", "x\u2581y"])
        bos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def make_bpe_decoder(folder: Path) -> Path:
    """The tiny random Llama of the decoder tests with a trained byte-level BPE tokenizer; EOS is
    the chat format's end of turn, as in ChatML instruct models."""
    from decoder_factory import make_tiny_decoder

    fast = train_tokenizer(folder.parent / "bpe-tokenizer", "gpt2")
    eos = fast.convert_tokens_to_ids("<|im_end|>")
    make_tiny_decoder(folder, "llama", eos=eos, vocab_size=len(fast))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_texts

    from edgepack.config import BuildConfig
    from edgepack.pipeline import build
    from edgepack.progress import Progress

    root = tmp_path_factory.mktemp("llm-mobile")
    model = make_bpe_decoder(root / "m")
    texts = write_texts(root / "texts.txt", 40)
    config = BuildConfig(
        model=str(model), calibration=str(texts), heldout=str(texts), target="android",
        precision="int8", out=str(root / "dist"), max_drop=0.2,
    )  # fmt: skip
    (result,) = build(config, Progress(quiet=True))
    return result.folder


def test_a_mobile_decoder_bundle_ships_kotlin_swift_and_tokenizer_files(bundle: Path) -> None:
    from edgepack.bundle import verify_bundle

    manifest = json.loads((bundle / "manifest.json").read_text())
    want = ["mobile/EdgepackLlm.kt", "mobile/EdgepackLlm.swift"]
    want += ["mobile/merges.txt", "mobile/tokens.txt"]
    assert manifest["app"]["mobile"] == want and manifest["app"]["mobile_skipped"] is None
    sums = (bundle / "SHA256SUMS").read_text()
    assert all(name in sums for name in want)
    verify_bundle(bundle)
    data = json.loads((bundle / "tokenizer" / "tokenizer.json").read_text())
    tokens = (bundle / "mobile/tokens.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(tokens) == len(data["model"]["vocab"])
    assert all(tokens[i] == t for t, i in data["model"]["vocab"].items())
    merges = (bundle / "mobile/merges.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]


def _strings(text: str) -> list[str]:
    return [json.loads('"' + s + '"') for s in re.findall(r'"((?:[^"\\]|\\.)*)"', text)]


def declared(source: str, name: str) -> str:
    found = re.search(rf"^\s*(?:const val|val|static let) {name}(?:: [^=]+)? = (.*)$", source, re.M)
    assert found, name
    return found.group(1)


@pytest.mark.parametrize("language", ["kt", "swift"])
def test_sources_declare_exactly_the_models_cache_signature(bundle: Path, language: str) -> None:
    import onnxruntime as ort

    source = (bundle / f"mobile/EdgepackLlm.{language}").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    session = ort.InferenceSession(str(bundle / "model.ort"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    names = {"kt": ("PAST_NAMES", "PRESENT_NAMES", "CACHE_TYPE", "CACHE_SHAPE", "HAS_POSITION_IDS",
                    "HAS_LOGITS_FROM", "CONTEXT", "EOS_IDS", "MODEL_FILE"),
             "swift": ("pastNames", "presentNames", "cacheType", "cacheShape", "hasPositionIds",
                       "hasLogitsFrom", "context", "eosIds", "modelFile")}[language]  # fmt: skip
    past, present = _strings(declared(source, names[0])), _strings(declared(source, names[1]))
    assert set(past) == {n for n in inputs if n.startswith("past_key_values.")}
    assert [p.replace("past_key_values.", "present.") for p in past] == present
    assert set(present) <= outputs and "logits" in outputs
    cache = inputs[past[0]]
    assert _strings(declared(source, names[2])) == [{"tensor(float)": "float"}[cache.type]]
    shape = [int(d) for d in re.findall(r"\d+", declared(source, names[3]))]
    assert shape == [1, cache.shape[1], 0, cache.shape[3]]
    assert declared(source, names[4]) == str("position_ids" in inputs).lower()
    assert declared(source, names[5]) == str("logits_from" in inputs).lower()
    assert int(declared(source, names[6])) == manifest["generation"]["context_length"]
    eos = [int(d) for d in re.findall(r"\d+", declared(source, names[7]))]
    assert eos == manifest["generation"]["eos_token_ids"]
    assert _strings(declared(source, names[8])) == ["model.ort"]
    # Every tensor name the sources feed or read is one of the model's own, or fed only when the
    # flag above (just checked against the model) says it is an input.
    fed = set(re.findall(r'"(input_ids|attention_mask|position_ids|logits_from|logits)"', source))
    guarded = {"position_ids", "logits_from"}
    assert fed - guarded <= set(inputs) | outputs and {"input_ids", "logits"} <= fed


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_bpe_port_equals_tokenizers(tmp_path: Path, style: str) -> None:
    fast = train_tokenizer(tmp_path / style, style)
    mobile_llm = harness("mobile_llm")
    spec, why = mobile_llm.tokenizer_spec(tmp_path / style)
    assert spec is not None, why
    assert spec["ignore_merges"] == (style == "llama3") and spec["nfc"] == (style == "llama3")
    port = mobile_llm.BytePairs(spec["tokens"], spec["merges"], spec)
    reference = fast.backend_tokenizer
    for text in corpus():
        for specials in (True, False):
            want = reference.encode(text, add_special_tokens=specials).ids
            assert port.encode(text, specials) == want, (text, specials)
        ids = reference.encode(text).ids
        assert port.decode(ids) == reference.decode(ids), text
    rng = np.random.default_rng(0)
    for _ in range(50):  # any ids, including ones that split a character
        ids = [int(i) for i in rng.integers(0, len(spec["tokens"]), size=12)]
        assert port.decode(ids) == reference.decode(ids), ids
        assert mobile_llm.generate_with(port, iter(ids)) == reference.decode(ids), ids


def test_port_refuses_what_it_cannot_reproduce(tmp_path: Path) -> None:
    from conftest import write_tokenizer

    mobile_llm = harness("mobile_llm")
    write_tokenizer(tmp_path / "wp")
    assert mobile_llm.tokenizer_spec(tmp_path / "wp") == (
        None,
        "the tokenizer is WordPiece, not byte-level BPE",
    )
    train_tokenizer(tmp_path / "bpe", "gpt2")
    path = tmp_path / "bpe" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True
    path.write_text(json.dumps(data))
    assert "prefix space" in mobile_llm.tokenizer_spec(tmp_path / "bpe")[1]
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    path.write_text(json.dumps(data))
    assert "not byte-level" in mobile_llm.tokenizer_spec(tmp_path / "bpe")[1]


def _runtime(bundle: Path) -> Any:
    return harness("edgepack_runtime").load(bundle)


def test_the_apps_generate_loop_gives_the_runtimes_tokens(bundle: Path) -> None:
    mobile_llm, decode = harness("mobile_llm"), harness("edgepack_decode")
    model = _runtime(bundle)
    prompt = model.chat_ids([{"role": "user", "content": "the cat was on a mat"}])
    greedy = list(model.generate_ids(prompt, 24))
    assert mobile_llm.run_like_app(bundle, prompt, 24) == greedy
    settings = {"temperature": 0.9, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.2}
    want = list(decode.sample_stream(model.session, prompt, 24, model.eos, settings,
                                     mobile_llm.SplitMix64(7)))  # fmt: skip
    got = mobile_llm.run_like_app(bundle, prompt, 24, settings, seed=7)
    assert got == want
    assert mobile_llm.run_like_app(bundle, prompt, 24, settings, seed=8) != got


def test_split_mix_matches_its_published_values() -> None:
    """SplitMix64 from seed 1234567 (the reference implementation's test vector)."""
    rng = harness("mobile_llm").SplitMix64(1234567)
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    assert [rng.next_long() for _ in range(3)] == want


# --- the Kotlin file on the JVM ------------------------------------------------------------------

KOTLIN_MAIN = r"""

fun unhex(s: String): String = String(ByteArray(s.length / 2) { s.substring(2 * it, 2 * it + 2).toInt(16).toByte() }, Charsets.UTF_8)

fun hex(s: String): String = s.toByteArray(Charsets.UTF_8).joinToString("") { String.format("%02x", it) }

fun main(args: Array<String>) {
    val tokenizer = BytePairTokenizer(java.io.File(args[0]).readLines(Charsets.UTF_8), java.io.File(args[1]).readLines(Charsets.UTF_8))
    val out = StringBuilder()
    for (line in java.io.File(args[2]).readLines()) {
        val parts = line.split("|")
        when (parts[0]) {
            "encode" -> out.append(tokenizer.encode(unhex(parts[2]), parts[1] == "1").joinToString(" "))
            "stream" -> {
                val stream = TextStream(tokenizer)
                val pieces = parts[1].split(" ").filter { it.isNotEmpty() }.map { hex(stream.add(it.toInt())) }
                out.append((pieces + hex(stream.flush())).joinToString(" "))
            }
            "chat" -> {
                val messages = parts.drop(1).chunked(2).map { ChatMessage(unhex(it[0]), unhex(it[1])) }
                out.append(try { "ok " + hex(ChatFormat.render(messages)) } catch (e: IllegalArgumentException) { "error" })
            }
            "sample" -> {
                val s = parts[1].split(" ")
                val sampling = Sampling(s[0].toDouble(), s[1].toInt(), s[2].toDouble(), s[3].toDouble(), s[4].toLong())
                val history = parts[2].split(" ").filter { it.isNotEmpty() }.map { it.toInt() }
                val logits = parts[3].split(" ").map { java.lang.Float.intBitsToFloat(it.toLong(16).toInt()) }.toFloatArray()
                val rng = SplitMix64(sampling.seed!!)
                out.append((0 until 20).map { Sampler.choose(logits, history, sampling, rng) }.joinToString(" "))
            }
        }
        out.append("\n")
    }
    print(out)
}
"""


def kotlin_without_onnxruntime(source: str) -> str:
    """The generated file minus what needs onnxruntime-android (its imports, EdgepackLlm)."""
    source = re.sub(r"^import (ai\.onnxruntime|java\.nio)\..*\n", "", source, flags=re.M)
    source = re.sub(r"\nclass EdgepackLlm\(.*?\n}\n", "\n", source, flags=re.S)
    assert "OnnxTensor" not in source and "class BytePairTokenizer" in source
    return source + KOTLIN_MAIN


def compile_kotlin(source: str, folder: Path) -> Path:
    if not shutil.which("kotlinc") or not shutil.which("java"):
        pytest.skip("kotlinc or java is not installed (apt-get install kotlin)")
    (folder / "Llm.kt").write_text(kotlin_without_onnxruntime(source), encoding="utf-8")
    jar = folder / "llm.jar"
    built = subprocess.run(
        ["kotlinc", str(folder / "Llm.kt"), "-include-runtime", "-d", str(jar)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    return jar


def run_kotlin(jar: Path, folder: Path, tokens: Path, merges: Path, lines: list[str]) -> list[str]:
    (folder / "in.txt").write_text("".join(line + "\n" for line in lines))
    ran = subprocess.run(
        ["java", "-jar", str(jar), str(tokens), str(merges), str(folder / "in.txt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran.stdout.split("\n")[:-1]


def _hex(text: str) -> str:
    return text.encode("utf-8").hex()


def test_generated_kotlin_runs_on_the_jvm_like_the_bundle(bundle: Path, tmp_path: Path) -> None:
    """One kotlinc run (it takes a minute): tokenizer, streamed text, chat rendering, sampler."""
    from tokenizers import Tokenizer

    source = (bundle / "mobile/EdgepackLlm.kt").read_text(encoding="utf-8")
    jar = compile_kotlin(source, tmp_path)
    reference = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    model = _runtime(bundle)
    texts = corpus()
    lines = [f"encode|{int(s)}|{_hex(t)}" for t in texts for s in (True, False)]
    rng = np.random.default_rng(1)
    id_rows = [reference.encode(t).ids for t in texts[:40]]
    id_rows += [
        [int(i) for i in rng.integers(0, reference.get_vocab_size(), 10)] for _ in range(40)
    ]
    lines += ["stream|" + " ".join(map(str, ids)) for ids in id_rows]
    conversations = [
        [("user", "What is the capital of France?")],
        [("system", "Be terse.\n"), ("user", "  hi  "), ("assistant", "Hello!"), ("user", "日本?")],
        [("user", "a"), ("user", "b")],
        [("assistant", "a")],
        [("tool", "x")],
    ]
    lines += [
        "chat|" + "|".join(_hex(r) + "|" + _hex(c) for r, c in conv) for conv in conversations
    ]
    cases = [(0.8, 0, 1.0, 1.0), (1.0, 40, 1.0, 1.0), (0.7, 0, 0.9, 1.3), (1.5, 20, 0.5, 1.1),
             (0.0, 0, 1.0, 1.2), (0.01, 0, 1.0, 1.0)]  # fmt: skip
    logits = rng.normal(0, 3, size=(len(cases), reference.get_vocab_size())).astype(np.float32)
    history = [int(i) for i in rng.integers(0, reference.get_vocab_size(), 30)]
    for n, (case, row) in enumerate(zip(cases, logits, strict=True)):
        bits = " ".join(format(int(b), "x") for b in row.view(np.uint32))
        lines.append(
            "sample|{} {} {} {} {}|{}|{}".format(*case, 1000 + n, " ".join(map(str, history)), bits)
        )
    got = iter(
        run_kotlin(jar, tmp_path, bundle / "mobile/tokens.txt", bundle / "mobile/merges.txt", lines)
    )

    for text in texts:
        for specials in (True, False):
            assert [int(i) for i in next(got).split()] == reference.encode(
                text, add_special_tokens=specials
            ).ids, text
    for ids in id_rows:
        pieces = [bytes.fromhex(p).decode("utf-8") for p in next(got).split(" ")]
        assert "".join(pieces) == reference.decode(ids), ids
        if "\ufffd" not in reference.decode(ids):  # never half a character in a piece
            assert not any("\ufffd" in p for p in pieces), ids
    for conv in conversations:
        line = next(got)
        messages = [{"role": r, "content": c} for r, c in conv]
        try:
            want = model.render_chat(messages)
        except Exception:
            assert line == "error", conv
        else:
            assert line == "ok " + _hex(want), conv
    decode, mobile_llm = harness("edgepack_decode"), harness("mobile_llm")
    for n, (case, row) in enumerate(zip(cases, logits, strict=True)):
        rng64 = mobile_llm.SplitMix64(1000 + n)
        settings = dict(
            zip(("temperature", "top_k", "top_p", "repetition_penalty"), case, strict=True)
        )
        want = [decode.choose(row, history, rng=rng64, **settings) for _ in range(20)]
        assert [int(i) for i in next(got).split()] == want, case


def swift_literal(text: str) -> str:
    text = re.sub(r"\\u\{([0-9a-f]+)\}", lambda m: chr(int(m.group(1), 16)), text)
    return re.sub(r"\\(.)", r"\1", text)


def test_swift_pattern_splits_text_as_the_tokenizers_regex(bundle: Path) -> None:
    """ICU's \\s lacks U+000B and U+0085, so the Swift file spells out White_Space; the regex
    module (whose \\s is White_Space, as tokenizers') must split every text the same both ways."""
    import regex

    source = (bundle / "mobile/EdgepackLlm.swift").read_text(encoding="utf-8")
    found = re.search(r'static let pattern = "((?:[^"\\]|\\.)*)"$', source, re.M)
    assert found
    swift = swift_literal(found.group(1))
    spec, _ = harness("mobile_llm").tokenizer_spec(bundle / "tokenizer")
    assert "\\s" not in swift and "White_Space" in swift and swift != spec["pattern"]
    for text in corpus():
        assert regex.findall(swift, text) == regex.findall(spec["pattern"], text), text
