"""edgepack eval and the metrics behind it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.cli import cli
from edgepack.metrics import macro_f1, rankdata, spearman, token_f1


def test_metrics_against_hand_computed_values() -> None:
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 fp0 fn1 -> 2/3
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1])) == pytest.approx(2 / 3)
    # outside tag 0: tp=1 (the 2), fp=1 (pred 3 where gold 0), fn=1 (gold 1 missed)
    assert token_f1(np.array([2, 3, 0]), np.array([2, 0, 1]), outside=0) == pytest.approx(0.5)


def _sts(path: Path) -> Path:
    rows = [
        ("the cat runs", "a cat runs", 4.5),
        ("the dog reads", "the dog reads a book", 3.0),
        ("red sun", "blue moon", 0.5),
        ("good school", "bad school", 2.0),
        ("new phone", "old phone", 1.5),
    ]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text_a", "text_b", "score"])
        writer.writerows(rows)
    return path


def test_eval_a_model_folder_on_sts_and_against_a_reference(tiny_st: Path, tmp_path: Path) -> None:
    data = _sts(tmp_path / "sts.csv")
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(tiny_st),
            "--data",
            str(data),
            "--reference",
            str(tiny_st),
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kind"] == "similarity" and report["model"]["metric"] == "spearman"
    assert -1.0 <= report["model"]["value"] <= 1.0
    assert report["drop"] == 0.0 and report["fidelity"]["mean_cosine"] == pytest.approx(1.0)
    # Progress on stderr (mixed into the output here): each model's batches counted, k/N.
    assert result.output.count("evaluate: 1/1 batches of 32 texts, ") == 2, result.output
    assert result.output.count("evaluate: 1/1 batches of outputs, ") == 2


def test_eval_a_classifier_bundle(texts_file: Path, tmp_path: Path) -> None:
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "clf", head="seq")
    build = CliRunner().invoke(
        cli,
        [
            "build",
            "--model",
            str(model),
            "--calibration",
            str(texts_file),
            "--samples",
            "30",
            "--target",
            "cpu-vnni",
            "--out",
            str(tmp_path / "d"),
            "--min-cosine",
            "0.5",
        ],
    )
    assert build.exit_code == 0, build.output
    data = tmp_path / "labels.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"text": t, "label": i % 3})
            for i, t in enumerate(texts_file.read_text().splitlines()[:20])
        )
    )
    result = CliRunner().invoke(
        cli, ["eval", str(tmp_path / "d" / "clf-cpu-vnni.tar.gz"), "--data", str(data)]
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "macro-F1" in result.output


def test_unlabelled_data_needs_a_reference(tiny_st: Path, texts_file: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", str(tiny_st), "--data", str(texts_file)])
    assert result.exit_code == 2 and "pass --reference" in result.output
