"""edgepack_runtime.py, the app-facing runtime in every bundle, on tiny models built by the CLI.

References are computed here without the runtime: transformers' tokenizer and torch (AutoModel
+ mean pooling or softmax) for fp32 bundles, and the bundle's own int8 graph fed by transformers'
tokenizer for int8 bundles. The runtime runs from the bundle folder, as on a device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from click.testing import CliRunner
from packaging.requirements import Requirement

from edgepack.bundle import verify_bundle
from edgepack.cli import cli

TEXTS = [
    "the quick dog runs over the lazy cat",
    "a bird",
    "Héllo wörld, naïve café!",
    "the doctor and the patient read a new book with the teacher in the old school",
    "unknownwordzzz and 日本 text",
    "",
    "[CLS] music [SEP] on the phone",
    " ".join(["battery"] * 80),  # longer than the model's 64 positions: truncated
]


def build(model: Path, texts: Path, out: Path, target: str, *extra: str) -> Path:
    args = ["build", "--model", str(model), "--calibration", str(texts), "--samples", "40"]
    args += ["--out", str(out), "--min-cosine", "0.5", "--quiet", "--target", target, *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out / f"{model.name}-{target}"


def requirements_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def runtime(bundle: Path):
    """The bundle's own edgepack_runtime.py, imported from the bundle folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"edgepack_runtime_{bundle.name}", bundle / "edgepack_runtime.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_ids(bundle: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    seq_len = json.loads((bundle / "manifest.json").read_text())["harness"]["seq_len"]
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    return [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]


def torch_outputs(model_dir: Path, bundle: Path, texts: list[str], head: str):
    """fp32 PyTorch outputs per text (one text at a time: no padding involved)."""
    import torch
    import transformers

    from edgepack.families.encoder import AUTO_CLASSES

    task = json.loads((bundle / "manifest.json").read_text())["task"]
    model = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(str(model_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    seq_len = json.loads((bundle / "manifest.json").read_text())["harness"]["seq_len"]
    outs = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, truncation=True, max_length=seq_len, return_tensors="pt")
            out = model(**enc)
            value = out.last_hidden_state.mean(dim=1) if head == "" else out.logits
            outs.append(value[0].numpy())
    return outs


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import make_tiny_model

    root = tmp_path_factory.mktemp("runtime-models")
    seq = make_tiny_model(root / "tiny-cls", head="seq", seed=1)
    config = json.loads((seq / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "neutral", "2": "positive"}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (seq / "config.json").write_text(json.dumps(config))
    return {
        "seq": seq,
        "token": make_tiny_model(root / "tiny-tag", head="token", seed=2),
    }


@pytest.fixture(scope="module")
def bundles(
    models: dict[str, Path],
    tiny_bert: Path,
    tiny_st: Path,
    texts_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runtime-bundles")
    return {
        "plain": build(tiny_bert, texts_file, out, "cpu", "--precision", "fp32"),
        "st-int8": build(tiny_st, texts_file, out, "arm64"),
        "seq": build(models["seq"], texts_file, out, "cpu", "--precision", "fp32"),
        "token": build(models["token"], texts_file, out, "cpu", "--precision", "fp32"),
    }


def test_every_bundle_carries_the_runtime_checked_by_its_sums(bundles: dict[str, Path]) -> None:
    for bundle in bundles.values():
        sums = (bundle / "SHA256SUMS").read_text()
        assert "  edgepack_runtime.py\n" in sums
        assert verify_bundle(bundle) > 5
        requirements = (bundle / "requirements.txt").read_text()
        for python, floor in (("3.8", "==0.20.3"), ("3.11", f">={tokenizers.__version__}")):
            wanted = [
                str(r.specifier)
                for r in map(Requirement, requirements_lines(requirements))
                if r.name == "tokenizers" and r.marker.evaluate({"python_version": python})
            ]
            assert wanted == [floor], (python, requirements)
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["app"]["python"] == "edgepack_runtime.py"
        assert manifest["app"]["mobile"] == []  # not an .ort bundle
        assert "edgepack_runtime" in (bundle / "README.md").read_text()


def test_the_runtime_imports_nothing_of_the_build_host(bundles: dict[str, Path]) -> None:
    bundle = bundles["st-int8"]
    code = (
        "import sys, edgepack_runtime as r; r.Model('.').embed(['a cat']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'edgepack', 'transformers', 'torch', 'optimum', 'onnx'}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=bundle, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_using_the_runtime_leaves_the_bundle_verifiable(bundles: dict[str, Path]) -> None:
    """Python caches an imported module's bytecode beside it: a file SHA256SUMS does not list."""
    bundle = bundles["seq"]
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    }
    for cmd in (
        [sys.executable, "-c", "import edgepack_runtime; edgepack_runtime.classify(['a cat'])"],
        [sys.executable, "-m", "edgepack_runtime", "classify", "a cat"],
    ):
        proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert not (bundle / "__pycache__").exists()
        assert verify_bundle(bundle) > 5
    bench = [sys.executable, str(bundle / "bench.py"), "--warmup", "0", "--runs", "2"]
    proc = subprocess.run(bench, env=env, capture_output=True, text=True, cwd=bundle.parent)
    assert proc.returncode == 0, proc.stderr


def test_tokenizer_ids_equal_transformers(bundles: dict[str, Path]) -> None:
    for bundle in bundles.values():
        model = runtime(bundle).Model(bundle)
        assert [e.ids for e in model.tokenize(TEXTS)] == hf_ids(bundle, TEXTS)


def test_int8_embed_equals_the_host_graph_on_transformers_ids(bundles: dict[str, Path]) -> None:
    """Padding to the batch's longest text instead of seq_len changes nothing measurable."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    bundle = bundles["st-int8"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=64, return_tensors="np")
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    host = session.run([manifest["io"]["primary_output"]], feeds)[0]
    got = runtime(bundle).Model(bundle).embed(TEXTS, batch_size=3)
    assert got.dtype == np.float32 and got.shape == host.shape
    assert np.abs(got - host).max() <= 1e-5


def test_plain_encoder_embed_is_the_masked_mean_of_token_states(
    bundles: dict[str, Path], tiny_bert: Path
) -> None:
    bundle = bundles["plain"]
    model = runtime(bundle).Model(bundle)
    assert model.primary_output == "last_hidden_state"
    got = model.embed(TEXTS, batch_size=4)
    want = np.stack(torch_outputs(tiny_bert, bundle, TEXTS, head=""))
    assert np.abs(got - want).max() < 1e-4
    one_by_one = np.concatenate([model.embed([t]) for t in TEXTS])
    assert np.abs(got - one_by_one).max() < 1e-5  # padding never leaks into the mean
    unit = model.embed(TEXTS[:2], normalize=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_classify_is_softmax_over_the_manifest_labels(
    bundles: dict[str, Path], models: dict[str, Path]
) -> None:
    bundle = bundles["seq"]
    got = runtime(bundle).Model(bundle).classify(TEXTS, batch_size=3)
    want = [softmax(x) for x in torch_outputs(models["seq"], bundle, TEXTS, head="seq")]
    labels = ["negative", "neutral", "positive"]
    for result, probs in zip(got, want, strict=True):
        assert result["label"] == labels[int(np.argmax(probs))]
        assert abs(result["score"] - probs.max()) < 1e-4
        assert list(result["scores"]) == labels
        assert np.abs(np.array(list(result["scores"].values())) - probs).max() < 1e-4


def test_tag_gives_each_token_its_label_and_character_offsets(
    bundles: dict[str, Path], models: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    bundle = bundles["token"]
    got = runtime(bundle).Model(bundle).tag(TEXTS, batch_size=3)
    want = torch_outputs(models["token"], bundle, TEXTS, head="token")
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    for text, tags, logits in zip(TEXTS, got, want, strict=True):
        enc = tok(text, truncation=True, max_length=64, return_offsets_mapping=True)
        keep = list(range(1, len(enc["input_ids"]) - 1))  # all but the template's [CLS], [SEP]
        assert [t["token"] for t in tags] == [enc.tokens()[i] for i in keep]
        assert [(t["start"], t["end"]) for t in tags] == [enc["offset_mapping"][i] for i in keep]
        probs = softmax(logits)
        assert [t["label"] for t in tags] == [f"LABEL_{int(np.argmax(probs[i]))}" for i in keep]
        assert all(abs(t["score"] - probs[i].max()) < 1e-4 for t, i in zip(tags, keep, strict=True))
        for t in tags:
            piece = text[t["start"] : t["end"]]
            if t["token"] != "[UNK]" and piece.isascii():
                assert piece.lower() == t["token"].lower().removeprefix("##")


def test_fixed_shape_bundle_pads_to_its_shape(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    bundle = build(tiny_st, texts_file, tmp_path, "android-nnapi")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["io"]["inputs"][0]["shape"] == [1, 64]
    got = runtime(bundle).Model(bundle).embed(TEXTS)
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    session = ort.InferenceSession(str(bundle / "model.ort"), providers=["CPUExecutionProvider"])
    for text, row in zip(TEXTS, got, strict=True):
        enc = tok([text], padding="max_length", truncation=True, max_length=64, return_tensors="np")
        feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
        assert np.abs(session.run(["sentence_embedding"], feeds)[0][0] - row).max() <= 1e-5


def test_command_line_embed_and_search_print_json(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = bundles["st-int8"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "edgepack_runtime", "embed", TEXTS[0], TEXTS[1]]
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    want = runtime(bundle).Model(bundle).embed(TEXTS[:2])
    assert np.abs(np.array(data["embeddings"], dtype=np.float32) - want).max() == 0
    lines = tmp_path / "faq.txt"
    lines.write_text("the dog runs\nthe moon is bright\nthe quick dog runs over the lazy cat\n")
    search = [sys.executable, str(bundle / "edgepack_runtime.py"), "search", "--file", str(lines)]
    proc = subprocess.run(
        [*search, TEXTS[0], "--top", "2"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    ranked = json.loads(proc.stdout)
    assert ranked[0]["line"] == 3 and len(ranked) == 2
    assert ranked[0]["score"] >= ranked[1]["score"] and abs(ranked[0]["score"] - 1.0) < 1e-5


def test_wrong_task_and_missing_tokenizer_json_are_said_clearly(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    module = runtime(bundles["seq"])
    with pytest.raises(module.BundleError, match=r"'text-classification': use classify\(\)"):
        module.Model(bundles["seq"]).embed(["a cat"])
    copy = tmp_path / "copy"
    shutil.copytree(bundles["seq"], copy)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(module.BundleError, match=r"no tokenizer/tokenizer\.json .*vocab\.txt"):
        module.Model(copy)
    proc = subprocess.run(
        [sys.executable, str(copy / "edgepack_runtime.py"), "classify", "a cat"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "tokenizer.json" in proc.stderr
    assert proc.stderr.count("\n") == 1


HARNESS = Path(__file__).resolve().parents[1] / "edgepack" / "harness"


@pytest.mark.parametrize(
    "script", ["edgepack_runtime.py", "edgepack_serve.py", "mobile.py", "mobile_sources.py"]
)
def test_device_side_files_parse_as_python_38_and_import_only_device_packages(script: str) -> None:
    import ast

    source = (HARNESS / script).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    for newer in (".removeprefix(", ".removesuffix(", "strict=True", "functools.cache("):
        assert newer not in source, f"{script} uses {newer} (Python 3.9+)"
    roots = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    roots |= {
        (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "onnxruntime", "tokenizers"}, roots


def test_a_model_with_only_vocab_txt_still_gets_tokenizer_json(
    texts_file: Path, tmp_path: Path
) -> None:
    """A checkpoint without tokenizer.json (slow-tokenizer files only) still ships one.

    optimum's export writes it from the fast tokenizer (measured); the packaging stage's own
    fallback, for exports that only copy files (pruned models), is tested below.
    """
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "vocab-only")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    bundle = build(model, texts_file, tmp_path / "out", "cpu", "--precision", "fp32")
    assert (bundle / "tokenizer" / "tokenizer.json").is_file()
    rt = runtime(bundle).Model(bundle)
    assert [e.ids for e in rt.tokenize(TEXTS)] == hf_ids(bundle, TEXTS)
    assert verify_bundle(bundle) > 5


def test_packaging_writes_tokenizer_json_from_the_fast_tokenizer(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from conftest import write_tokenizer
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from edgepack.bundle.target import _tokenizer_files

    exported = tmp_path / "exported"
    write_tokenizer(exported)
    fast = AutoTokenizer.from_pretrained(str(exported))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (exported / name).unlink()
    shared = SimpleNamespace(fp32=SimpleNamespace(tokenizer_dir=exported), tokenizer=fast)
    (tmp_path / "stage").mkdir()
    folder = _tokenizer_files(shared, tmp_path / "stage")
    assert (folder / "vocab.txt").is_file() and not (exported / "tokenizer.json").exists()
    written = Tokenizer.from_file(str(folder / "tokenizer.json"))
    written.no_padding()
    for text in TEXTS[:-1]:
        assert written.encode(text).ids == fast(text)["input_ids"]


def test_import_is_fast_and_the_files_are_small(bundles: dict[str, Path]) -> None:
    bundle = bundles["st-int8"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import time; t = time.perf_counter(); import edgepack_runtime, onnxruntime, tokenizers; "
        "print(time.perf_counter() - t)"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=bundle, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 1.0, proc.stdout
    assert time.perf_counter() - start < 5.0
    assert (bundle / "edgepack_runtime.py").stat().st_size < 64_000


def test_reference_texts_are_what_the_runtime_tokenizes_and_verify_checks_them(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Every build records texts with the ids the model was fed; the runtime gives those ids
    again, `verify` says it checked them, and a tokenizer.json changed with its sums regenerated
    is refused by `verify` and by the harness."""
    rows: list[dict] = []
    for bundle in reversed(list(bundles.values())):  # "plain" last: its rows are used below
        manifest = json.loads((bundle / "manifest.json").read_text())
        rows = json.loads((bundle / manifest["reference"]["texts"]).read_text())["texts"]
        assert len(rows) == 8
        model = runtime(bundle).Model(bundle)
        assert [e.ids for e in model.tokenize([r["text"] for r in rows])] == [
            r["ids"] for r in rows
        ]
        ok = CliRunner().invoke(cli, ["verify", str(bundle)])
        assert ok.exit_code == 0 and "tokenizer gives the build's ids" in ok.output, ok.output
    copy = tmp_path / "plain"
    shutil.copytree(bundles["plain"], copy)
    path = copy / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    used = rows[0]["ids"][1]  # a token of a reference text, swapped with the next id's token
    first = next(word for word, i in vocab.items() if i == used)
    second = next(word for word, i in vocab.items() if i == used + 1)
    vocab[first], vocab[second] = vocab[second], vocab[first]  # still a valid tokenizer
    path.write_text(json.dumps(data))
    from bundle_factory import write_sums

    write_sums(copy)
    host = CliRunner().invoke(cli, ["verify", str(copy)])
    bench = [sys.executable, "-I", str(copy / "bench.py"), "--runs", "1", "--warmup", "0"]
    device = subprocess.run(bench, capture_output=True, text=True, timeout=120)
    assert host.exit_code == 2 and "gives other token ids" in host.output, host.output
    assert device.returncode == 2 and "gives other token ids" in device.stderr, device.stderr
    # The runtime itself says a corrupt tokenizer.json does not load, in one line, exit 2.
    (copy / "tokenizer" / "tokenizer.json").write_text('{"model": ')
    proc = subprocess.run([sys.executable, "-m", "edgepack_runtime", "embed", "a cat"], cwd=copy,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "tokenizer.json does not load" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
