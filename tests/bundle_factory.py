"""Tiny edgepack bundles built without the packaging stage, for harness and host-side tests.

The model is a mean-pooled embedding (Gather -> masked mean -> MatMul) or, with ``token_output``,
a per-token projection, written with ``onnx.helper`` so a bundle takes milliseconds to make. The
fp32 reference outputs come from numpy, so the harness check compares onnxruntime to an
independent computation.

Usage:
    bundle = make_bundle(tmp_path)                    # folder
    archive = make_tarball(bundle, tmp_path / "out")  # <name>.tar.gz, one top-level folder
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np

HARNESS = Path(__file__).resolve().parents[1] / "edgepack" / "harness"
VOCAB, HIDDEN, OUT_DIM = 50, 16, 8


def load_harness_module(name: str):
    """Import a harness script (bench, perf_test_to_json) by path: the harness is no package."""
    spec = importlib.util.spec_from_file_location(
        f"edgepack_harness_{name}", HARNESS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(token_output: bool, seed: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    proj = rng.standard_normal((HIDDEN, OUT_DIM)).astype(np.float32)
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(proj, "proj"),
    ]
    if not token_output:
        inits += [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
        ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", "sequence_length"])
        for name in ("input_ids", "attention_mask")
    ]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["tokens"])]
    if token_output:
        nodes.append(helper.make_node("MatMul", ["tokens", "proj"], ["last_hidden_state"]))
        out = helper.make_tensor_value_info(
            "last_hidden_state", TensorProto.FLOAT, ["batch_size", "sequence_length", OUT_DIM]
        )
    else:
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
            helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
            helper.make_node("Div", ["summed", "count"], ["pooled"]),
            helper.make_node("MatMul", ["pooled", "proj"], ["sentence_embedding"]),
        ]
        out = helper.make_tensor_value_info(
            "sentence_embedding", TensorProto.FLOAT, ["batch_size", OUT_DIM]
        )
    graph = helper.make_graph(nodes, "tiny", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model, emb, proj


# A word-level tokenizer small enough for the tiny model's 50-row embedding.
WORDS = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "cat", "dog", "bird", "sat", "on", "mat", "and",
    "is", "it", "red", "or", "blue", "where", "my", "order", "parcel", "track", "how", "do", "i",
)  # fmt: skip
TEXTS = ("the cat sat on the mat and the dog", "where is my order", "track it")


def make_tokenizer():
    """A real tokenizers.Tokenizer ([CLS] text [SEP]), saved with the fixed padding a
    transformers save can leave in tokenizer.json: the runtime and the check must ignore it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=12)
    return tokenizer


def reference_ids() -> list[list[int]]:
    """The ids of TEXTS, unpadded, as the runtime tokenizes them."""
    tokenizer = make_tokenizer()
    tokenizer.no_padding()
    return [tokenizer.encode(text).ids for text in TEXTS]


def _reference(token_output: bool, emb, proj, seed: int) -> tuple[dict, np.ndarray]:
    rows = reference_ids()
    ids = np.zeros((len(rows), 12), dtype=np.int64)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = row
    mask = (np.arange(12)[None, :] < np.array([len(r) for r in rows])[:, None]).astype(np.int64)
    tokens = emb[ids]
    if token_output:
        out = tokens @ proj
    else:
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out = pooled @ proj
    return {"input_ids": ids, "attention_mask": mask}, out.astype(np.float32)


def write_sums(bundle: Path) -> None:
    """(Re)write SHA256SUMS over every file but itself, sorted POSIX paths, sha256sum -c format."""
    lines = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel == "SHA256SUMS":
            continue
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    (bundle / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def make_bundle(
    root: Path,
    name: str = "tiny-cpu",
    *,
    token_output: bool = False,
    seed: int = 0,
    reference_noise: float = 0.0,
    threads: int = 2,
    seq_len: int = 16,
    texts: bool = True,
) -> Path:
    """Write a complete bundle folder ``root/name``; ``reference_noise`` breaks the check;
    ``texts=False`` leaves out reference/texts.json, as bundles built before it did."""
    import onnx

    bundle = root / name
    (bundle / "reference").mkdir(parents=True)
    (bundle / "tokenizer").mkdir()  # every real bundle ships one; the harness requires it
    make_tokenizer().save(str(bundle / "tokenizer" / "tokenizer.json"))
    if texts:  # an older bundle has none, and its tokenizer goes unchecked
        rows = [
            {"ids": ids, "text": text} for text, ids in zip(TEXTS, reference_ids(), strict=True)
        ]
        (bundle / "reference" / "texts.json").write_text(json.dumps({"texts": rows}) + "\n")
    model, emb, proj = _model(token_output, seed)
    onnx.save(model, str(bundle / "model.onnx"))
    inputs, expected = _reference(token_output, emb, proj, seed)
    if reference_noise:
        expected = expected + np.random.default_rng(7).normal(0, reference_noise, expected.shape)
        expected = expected.astype(np.float32)
    primary = "last_hidden_state" if token_output else "sentence_embedding"
    np.savez(bundle / "reference" / "inputs.npz", **inputs)
    np.savez(bundle / "reference" / "outputs_fp32.npz", **{primary: expected})
    for file in ("bench.py", "bench_env.py", "bundle_check.py", "run.sh"):
        shutil.copy2(HARNESS / file, bundle / file)
    (bundle / "run.sh").chmod(0o755)
    if (HARNESS / "README.md").exists():
        shutil.copy2(HARNESS / "README.md", bundle / "README.md")
    (bundle / "requirements.txt").write_text("onnxruntime\nnumpy\n")
    model_bytes = (bundle / "model.onnx").read_bytes()
    out_shape = ["batch_size", "sequence_length", OUT_DIM] if token_output else ["batch_size", 8]
    manifest = {
        "schema_version": 1,
        "model": {
            "file": "model.onnx",
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "bytes": len(model_bytes),
            "precision": "fp32",
        },
        "io": {
            "inputs": [
                {"name": n, "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
                for n in ("input_ids", "attention_mask")
            ],
            "outputs": [{"name": primary, "dtype": "float32", "shape": out_shape}],
            "primary_output": primary,
        },
        "harness": {
            "threads": threads,
            "seq_len": seq_len,
            "batch": 1,
            "execution_provider": "cpu",
        },
        "reference": {
            "inputs": "reference/inputs.npz",
            "outputs": "reference/outputs_fp32.npz",
            "min_cosine": 0.98,
            **({"texts": "reference/texts.json"} if texts else {}),
        },
        "target": {"name": "cpu", "format": {"model": "onnx"}},
        "edgepack_version": "0.1.0",
        "ignored_extra_key": {"anything": True},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_sums(bundle)
    return bundle


def make_tarball(bundle: Path, out_dir: Path) -> Path:
    """``<name>.tar.gz`` with the bundle folder as its single top-level entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{bundle.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname=bundle.name)
    return archive


# Names a bundle README shows as the user's own files (outputs, keys, lists), not the bundle's.
USER_FILES = {
    "result.json",
    "out.json",
    "baseline.json",
    "BASE.json",
    "a.json",
    "b.json",
    "faq.txt",
}
OPTIONAL_FILES = {"bundle.sig"}  # only in signed bundles, and the README says so
_FILE_NAME = re.compile(
    r"(?<![\w/.~-])((?:[\w-]+/)*[\w-]+\.(?:py|sh|txt|json|onnx|ort|config|npz|sig|kt|swift)"
    r"|SHA256SUMS)(?![\w/])"
)


def readme_file_names(text: str) -> set[str]:
    """The bundle files a README names (bare or folder-relative), less the user's own files."""
    return set(_FILE_NAME.findall(text)) - USER_FILES - OPTIONAL_FILES


def readme_flags(text: str) -> set[str]:
    """Every ``--flag`` a README gives a bundle script (lines naming an ``edgepack`` command, which
    runs on the build host, are left out)."""
    device = "\n".join(line for line in text.splitlines() if "`edgepack " not in line)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", device))
