"""The commands after ``build`` on a decoder bundle (tiny random Llama): eval, rebuild, compare and
the build's own report and summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_texts
from decoder_factory import build_tiny_decoder, make_tiny_decoder

from edgepack.cli import cli


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """The bundle, its manifest and the build's root (texts.txt, the model folder m/, dist/).

    A stale encoder report sits in dist/ before the build, as after an earlier encoder build.
    """
    root = tmp_path_factory.mktemp("llm-commands")
    (root / "dist").mkdir()
    (root / "dist" / "report.html").write_text("<h1>edgepack build: all-MiniLM-L6-v2</h1>")
    (root / "dist" / "report-sensitivity.png").write_bytes(b"\x89PNG old encoder plot")
    result = build_tiny_decoder(root)
    return result.folder, result.manifest, root


# 1. eval


def test_eval_reports_the_perplexity_the_build_measured(built: tuple[Path, dict, Path]) -> None:
    folder, manifest, root = built
    out = root / "eval.json"
    result = CliRunner().invoke(
        cli,
        [
            *("eval", str(folder), "--data", str(root / "texts.txt")),
            *("--reference", str(root / "m"), "--json", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    fid = manifest["fidelity"]
    # The same texts and window as the build's held-out check: the same figures.
    assert report["model"]["perplexity"] == pytest.approx(fid["perplexity"], rel=1e-9)
    assert report["reference"]["perplexity"] == pytest.approx(fid["perplexity_fp32"], rel=1e-9)
    assert report["fidelity"]["top1_agreement"] == pytest.approx(fid["top1_agreement"])
    assert report["tokens"] == fid["tokens"]
    assert f"perplexity {fid['perplexity']:.2f}" in result.output
    assert re.search(r"window (\d+)/\1", result.output)  # progress reached its total


def test_eval_without_a_reference_reports_perplexity_alone(
    built: tuple[Path, dict, Path], tmp_path: Path
) -> None:
    folder, manifest, root = built
    data = tmp_path / "texts.jsonl"
    texts = (root / "texts.txt").read_text().splitlines()
    data.write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n")
    result = CliRunner().invoke(
        cli, ["eval", str(folder), "--data", str(data), "--text-field", "body"]
    )
    assert result.exit_code == 0, result.output
    assert f"perplexity {manifest['fidelity']['perplexity']:.2f}" in result.output
    assert "top-1" not in result.output


def test_eval_refuses_an_encoder_reference_for_a_decoder(
    built: tuple[Path, dict, Path], tiny_st: Path
) -> None:
    folder, _, root = built
    result = CliRunner().invoke(
        cli, ["eval", str(folder), "--data", str(root / "texts.txt"), "--reference", str(tiny_st)]
    )
    assert result.exit_code == 2
    assert "is not a generative decoder" in result.output


# 2. rebuild


def test_the_manifest_records_what_a_rebuild_needs(built: tuple[Path, dict, Path]) -> None:
    _, manifest, root = built
    assert manifest["build"]["config"]["model"] == str(root / "m")
    assert manifest["build"]["config"]["target"] == "arm64"
    assert "out" not in manifest["build"]["config"]
    assert {"edgepack", "onnxruntime", "torch", "transformers"} <= set(manifest["versions"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", manifest["built_at"])
    assert "int8 weight-only" in manifest["target"]["description"]
    assert "QDQ" not in manifest["target"]["description"]
    assert manifest["decoder"]["precision_from"] == "build config"


def test_rebuild_reproduces_every_hash(
    built: tuple[Path, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, manifest, root = built
    # Inputs are recorded by name and sha256, never by the build machine's path.
    assert manifest["heldout"] == manifest["build"]["config"]["heldout"] == "texts.txt"
    assert str(root) not in (folder / "manifest.json").read_text().replace(str(root / "m"), "")
    monkeypatch.chdir(tmp_path)  # texts.txt is found beside dist/, where the build put it
    result = CliRunner().invoke(cli, ["rebuild", str(folder)])
    assert result.exit_code == 0, result.output
    assert "reproduced every file hash" in result.output


def test_rebuild_names_a_changed_input(
    built: tuple[Path, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    folder, _, root = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (tmp_path / "texts.txt").write_text((root / "texts.txt").read_text().replace("a", "the", 5))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["rebuild", str(copy)])
    assert result.exit_code == 2
    assert f"file {tmp_path / 'texts.txt'} has sha256" in result.output
    assert "restore the original texts.txt" in result.output


@pytest.fixture(scope="module")
def android(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("llm-ort"), target="android").folder


def test_ort_conversion_varies_in_layout_only_and_rebuild_compares_outputs(
    android: Path, tmp_path: Path
) -> None:
    """onnxruntime's converter lays the flatbuffer out in a different order per process (its
    hash maps are seeded per process); the tables it holds are the same, and so are the outputs."""
    from edgepack.artifacts import sha256_file
    from edgepack.bundle.write import to_ort_format
    from edgepack.cache import cache_root
    from edgepack.rebuild import same_outputs

    manifest = json.loads((android / "manifest.json").read_text())
    source = next(
        p
        for p in cache_root().rglob("weight-only/*/model.onnx")
        if sha256_file(p) == manifest["model"]["onnx_sha256"]
    )
    shipped = (android / "model.ort").read_bytes()
    fmt = {"model": "ort", "ort_optimization_style": "Fixed", "ort_target_platform": "arm"}
    other = None
    for i in range(6):  # a conversion in a new process usually differs at once
        (tmp_path / str(i)).mkdir()
        converted, _ = to_ort_format(source, tmp_path / str(i), fmt)
        if converted.read_bytes() != shipped:
            other = converted
            break
    assert other is not None, "six conversions were byte-identical to the shipped one"
    assert same_outputs(android, android / "model.ort", other)
    result = CliRunner().invoke(cli, ["rebuild", str(android)])
    assert result.exit_code == 0, result.output
    assert "reproduced every file hash" in result.output


def test_same_outputs_tells_another_model(android: Path, tmp_path: Path) -> None:
    from edgepack.bundle.write import to_ort_format
    from edgepack.export import export_decoder_cached
    from edgepack.load import load_model
    from edgepack.rebuild import same_outputs

    other_model = load_model(str(make_tiny_decoder(tmp_path / "m2", seed=1)))
    onnx_model, _ = export_decoder_cached(other_model)
    (tmp_path / "c").mkdir()
    converted, _ = to_ort_format(onnx_model.path, tmp_path / "c", {"model": "ort"})
    assert not same_outputs(android, android / "model.ort", converted)


# 4. report and summary


def test_a_decoder_build_writes_its_own_report(built: tuple[Path, dict, Path]) -> None:
    folder, manifest, root = built
    page = (root / "dist" / "report.html").read_text()
    assert "all-MiniLM" not in page and folder.name in page
    assert f"{manifest['fidelity']['perplexity']:.2f}" in page and "tok/s" in page
    md = (root / "dist" / "report.md").read_text()
    assert "top-1 agreement" in md and manifest["built_at"] in md
    assert not (root / "dist" / "report-sensitivity.png").exists()  # the encoder's stale plot
    for name in re.findall(r"\((report-[\w-]+\.png)\)", md):
        assert (root / "dist" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_decoder_build_prints_its_summary(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "texts.txt", 40)
    model = make_tiny_decoder(tmp_path / "m")
    result = CliRunner().invoke(
        cli,
        [
            *("build", "--model", str(model), "--calibration", str(texts), "--heldout", str(texts)),
            *("--precision", "int8", "--max-drop", "0.2", "--out", str(tmp_path / "d")),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "edgepack build" in result.output and "ppl" in result.output
    assert "tok/s" in result.output and "report:" in result.output


# 5. small truths


def test_help_and_table_headers_say_what_they_mean() -> None:
    from edgepack.decoder_report import COLUMNS as DECODER
    from edgepack.summary import COLUMNS as ENCODER

    result = CliRunner().invoke(cli, ["build", "--help"], terminal_width=200)
    assert "relative perplexity increase" in " ".join(result.output.split())
    for columns in (ENCODER, DECODER):
        assert len(set(columns)) == len(columns), columns
