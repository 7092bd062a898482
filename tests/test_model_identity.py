"""A bundle is exactly the model folder the user gave: every file a loader reads is in the key.

Before, the cache keyed a model by its weights alone: a copy of a model with another tokenizer
vocabulary order, another config field or another pooling module built from the first one's
cached export and shipped its tokenizer and graph, with exit code 0.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli
from edgepack.load import load_model


def _reorder_vocab(folder: Path) -> None:
    """The same weights with 'cat' and 'dog' swapped in the vocabulary (every tokenizer file)."""
    from transformers import BertTokenizerFast

    vocab = (folder / "vocab.txt").read_text().split("\n")
    i, j = vocab.index("cat"), vocab.index("dog")
    vocab[i], vocab[j] = vocab[j], vocab[i]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    (folder / "tokenizer.json").unlink()
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64).save_pretrained(
        folder
    )


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **changes}, indent=1))


# Each change a loader sees; none touches the weights.
CHANGES = {
    "config field": lambda f: _edit_json(f / "config.json", layer_norm_eps=1e-3),
    "vocabulary order": _reorder_vocab,
    "tokenizer_config": lambda f: _edit_json(f / "tokenizer_config.json", do_lower_case=False),
    "special_tokens_map": lambda f: _edit_json(f / "special_tokens_map.json", unk_token="[PAD]"),
    "generation_config": lambda f: _edit_json(f / "generation_config.json", eos_token_id=4),
    "chat template": lambda f: (f / "chat_template.jinja").write_text("{{ messages }}"),
    "pooling module": lambda f: _edit_json(
        f / "1_Pooling" / "config.json", pooling_mode_mean_tokens=False, pooling_mode_cls_token=True
    ),
    "sentence_bert_config": lambda f: _edit_json(f / "sentence_bert_config.json", max_seq_length=9),
    "modules.json": lambda f: (f / "modules.json").write_text(
        json.dumps(json.loads((f / "modules.json").read_text())[:2])  # no normalisation
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_file_a_loader_reads_changes_the_model_identity(
    tiny_st: Path, tmp_path: Path, change: str
) -> None:
    base = load_model(str(tiny_st))
    folder = Path(shutil.copytree(tiny_st, tmp_path / "copy"))
    assert load_model(str(folder)).digest == base.digest  # a plain copy is the same model
    CHANGES[change](folder)
    changed = load_model(str(folder))
    assert changed.weights_sha256 == base.weights_sha256
    assert changed.digest != base.digest


def test_what_no_loader_reads_leaves_the_identity_alone(tiny_st: Path, tmp_path: Path) -> None:
    """The model card, git metadata and other runtimes' copies are not part of the model."""
    base = load_model(str(tiny_st)).digest
    folder = Path(shutil.copytree(tiny_st, tmp_path / "copy"))
    (folder / "README.md").write_text("# a model card\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"not read")
    assert load_model(str(folder)).digest == base


# ---- end to end: the bundle carries the changed file ---------------------------------------------


def _build(model: Path, texts: Path, out: Path) -> None:
    args = ["build", "--model", str(model), "--calibration", str(texts), "--samples", "40"]
    args += ["--target", "cpu", "--out", str(out), "--max-drop", "-1", "--quiet"]
    args += ["--name", "m"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output


def _exports() -> set[str]:
    root = Path(os.environ["EDGEPACK_CACHE"]) / "export"
    return {p.name for p in root.iterdir() if (p / "artifact.json").is_file()}


@pytest.fixture(scope="module")
def first(tiny_st: Path, texts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One build of the base model in a cache of this module's own."""
    root = tmp_path_factory.mktemp("identity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_CACHE", str(root / "cache"))
        base = Path(shutil.copytree(tiny_st, root / "base"))
        _build(base, texts_file, root / "a")
        yield base, root / "a" / "m-cpu"


def _token_id(path: Path, token: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).token_to_id(token)


def _tokenizer_config(bundle: Path) -> dict:
    return json.loads((bundle / "tokenizer" / "tokenizer_config.json").read_text())


def _epsilons(onnx_path: Path) -> set[float]:
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    return {
        round(a.f, 6) for n in graph.node for a in n.attribute if a.name == "epsilon" and a.f > 0
    }


def _embed(bundle: Path, text: str) -> list[float]:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json"))
    enc = tok.encode(text)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": np.array([enc.ids], dtype=np.int64),
        "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
        "token_type_ids": np.array([enc.type_ids], dtype=np.int64),
    }
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0][0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize(
    "change", ["vocabulary order", "config field", "tokenizer_config", "pooling module"]
)
def test_a_changed_copy_gets_its_own_export_and_its_bundle_carries_the_change(
    first: tuple[Path, Path], texts_file: Path, tmp_path: Path, change: str
) -> None:
    base, bundle_a = first
    folder = Path(shutil.copytree(base, tmp_path / "copy"))
    CHANGES[change](folder)
    before = _exports()
    _build(folder, texts_file, tmp_path / "b")
    bundle_b = tmp_path / "b" / "m-cpu"
    assert len(_exports() - before) == 1, "the changed model reused another model's export"
    if change == "vocabulary order":  # the bundle tokenizes as the changed folder does
        files = [b / "tokenizer" / "tokenizer.json" for b in (bundle_b, bundle_a)]
        ids = [_token_id(p, "cat") for p in (folder / "tokenizer.json", *files)]
        assert ids[0] == ids[1] != ids[2]
    if change == "tokenizer_config":
        lower = [_tokenizer_config(b)["do_lower_case"] for b in (bundle_b, bundle_a)]
        assert lower == [False, True]
    if change == "config field":
        assert 0.001 in _epsilons(bundle_b / "model.onnx")
        assert 0.001 not in _epsilons(bundle_a / "model.onnx")
    if change == "pooling module":  # the CLS token's state, not the mean: another embedding
        assert _embed(bundle_b, "the cat runs") != pytest.approx(
            _embed(bundle_a, "the cat runs"), abs=1e-3
        )


@pytest.mark.slow
def test_a_decoder_copy_with_another_generation_config_ships_its_own_eos(tmp_path: Path) -> None:
    """The eos ids come from generation_config.json; the graph and weights are the same."""
    from decoder_factory import build_tiny_decoder

    first = build_tiny_decoder(tmp_path / "a", seed=5)
    assert first.manifest["generation"]["eos_token_ids"] == [3]
    copy = Path(shutil.copytree(tmp_path / "a" / "m", tmp_path / "copy"))  # the factory's folder
    _edit_json(copy / "generation_config.json", eos_token_id=[3, 7])
    second = build_tiny_decoder(tmp_path / "b", seed=5, model=str(copy))
    assert second.manifest["generation"]["eos_token_ids"] == [3, 7]
    assert second.manifest["source"]["files_sha256"] != first.manifest["source"]["files_sha256"]
