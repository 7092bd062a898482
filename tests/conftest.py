"""Shared fixtures: tiny random models built on the spot (no downloads), isolated cache and env."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [
    "the",
    "a",
    "an",
    "cat",
    "dog",
    "bird",
    "runs",
    "walks",
    "flies",
    "over",
    "under",
    "quick",
    "lazy",
    "bright",
    "dark",
    "sun",
    "moon",
    "city",
    "river",
    "music",
    "phone",
    "battery",
    "server",
    "network",
    "price",
    "market",
    "doctor",
    "patient",
    "school",
    "teacher",
    "book",
    "read",
    "write",
    "good",
    "bad",
    "new",
    "old",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "is",
    "was",
    "are",
    "were",
    "and",
    "or",
    "not",
    "with",
    "for",
    "to",
    "of",
    "in",
    "on",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stage cache per test session: tests never see a user's cache, but share exports."""
    os.environ["EDGEPACK_CACHE"] = str(tmp_path_factory.mktemp("edgepack-cache"))
    # The emulated aarch64 sysroot takes a minute to build: keep it across sessions.
    os.environ.setdefault(
        "EDGEPACK_SYSROOT_CACHE", str(Path.home() / ".cache" / "edgepack" / "aarch64-sysroot")
    )


def write_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizerFast

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS,
        *"abcdefghijklmnopqrstuvwxyz.,?!",
    ]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64).save_pretrained(
        folder
    )


def make_tiny_model(folder: Path, kind: str = "bert", head: str = "", seed: int = 0) -> Path:
    """A random 2-layer encoder saved like a hub checkpoint (safetensors + tokenizer)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    write_tokenizer(folder)
    vocab = len((folder / "vocab.txt").read_text().split())
    if kind == "distilbert":
        config = transformers.DistilBertConfig(
            vocab_size=vocab,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=64,
        )
    else:
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    if head == "seq":
        config.num_labels = 3
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    elif head == "token":
        config.num_labels = 5
        model = transformers.AutoModelForTokenClassification.from_config(config)
    else:
        model = transformers.AutoModel.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_sentence_transformer(folder: Path) -> Path:
    """A tiny model laid out as sentence-transformers saves one (mean pooling + normalisation)."""
    from benchmarks.tiny import write_sentence_transformer_layout

    make_tiny_model(folder)
    write_sentence_transformer_layout(folder, hidden=32, max_seq_length=64)
    return folder


def write_texts(path: Path, count: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    lines = {
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(count * 2)
    }
    path.write_text("\n".join(sorted(lines)[:count]) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny-st"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("texts") / "calib.txt", 80)


def export_tiny_bert(folder: Path, vocab: int) -> Path:
    """A random 2-layer BERT exported by optimum without post-processing: the graph the int8
    recipe's unit tests quantize."""
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).eval().save_pretrained(folder / "src")
    main_export(
        str(folder / "src"),
        output=str(folder / "onnx"),
        task="feature-extraction",
        library_name="transformers",
        no_post_process=True,
        do_validation=False,
    )
    return folder / "onnx" / "model.onnx"


SYSROOT_CACHE = Path(
    os.environ.get("EDGEPACK_SYSROOT_CACHE")
    or Path.home() / ".cache" / "edgepack" / "aarch64-sysroot"
)
# Messages from apt or pip that mean the registry is out of reach, not that edgepack is wrong.
UNREACHABLE = re.compile(
    r"resolve|unreachable|timed? ?out|failed to fetch|connection|network", re.IGNORECASE
)


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``edgepack build --target arm64`` of the real sample, as a user runs it (the output folder
    and stdout), built once for every test that reads it: the bundle tests and the runtime's."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "build", "--target", "arm64", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=2700,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="session")
def sysroot() -> Path:
    """The cached aarch64 sysroot for emulated checks, built on first use; a skip, naming what to
    install, where qemu or the package registry is out of reach."""
    from edgepack.device import emulate
    from edgepack.errors import UserError

    reason = emulate.emulator_available(SYSROOT_CACHE)
    if reason:
        pytest.skip(f"no aarch64 emulation here: {reason}")
    try:
        return emulate.ensure_sysroot(SYSROOT_CACHE)
    except UserError as exc:
        if UNREACHABLE.search(str(exc)):
            pytest.skip(f"package registry unreachable, cannot build the aarch64 sysroot: {exc}")
        raise
