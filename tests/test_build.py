"""The whole pipeline on tiny random models: every target profile, determinism, atomicity."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from bundle_factory import write_sums
from click.testing import CliRunner

from edgepack.bundle import VOLATILE_KEYS
from edgepack.bundle import verify_bundle as verify
from edgepack.cli import cli
from edgepack.profiles import list_targets


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def build_args(model: Path, texts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build",
        "--model",
        str(model),
        "--calibration",
        str(texts),
        "--samples",
        "40",
        "--out",
        str(out),
        "--min-cosine",
        "0.5",
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def matrix(tiny_st: Path, texts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    code, output = run(*build_args(tiny_st, texts_file, out, "--target", "all", "--name", "tiny"))
    assert code == 0, output
    return out


def test_all_builds_one_bundle_per_profile(matrix: Path) -> None:
    names = {p.name for p in list_targets()}
    assert {p.name for p in matrix.iterdir() if p.is_dir()} == {f"tiny-{n}" for n in names}
    assert {p.name for p in matrix.glob("*.tar.gz")} == {f"tiny-{n}.tar.gz" for n in names}


@pytest.mark.parametrize("profile", [p.name for p in list_targets()])
def test_bundle_carries_its_profile(matrix: Path, profile: str) -> None:
    folder = matrix / f"tiny-{profile}"
    manifest = json.loads((folder / "manifest.json").read_text())
    target = next(p for p in list_targets() if p.name == profile)
    assert manifest["target"]["quantization"] == target.data["quantization"]
    if target.precision == "int8":
        settings = manifest["quantization"]["settings"]
        assert settings["reduce_range"] == target.data["quantization"]["reduce_range"]
    else:
        assert manifest["quantization"] is None and manifest["model"]["precision"] == "fp32"
    if target.data["format"].get("fixed_shape"):
        assert all(isinstance(d, int) for i in manifest["io"]["inputs"] for d in i["shape"])
    assert manifest["model"]["file"] == (
        "model.ort" if target.data["format"]["model"] == "ort" else "model.onnx"
    )
    assert (folder / manifest["model"]["file"]).is_file()
    if target.data["format"].get("operator_config"):
        assert (
            "com.microsoft" in (folder / "required_operators_and_types.config").read_text()
            or "ai.onnx" in (folder / "required_operators_and_types.config").read_text()
        )
    assert verify(folder) > 5
    assert manifest["io"]["primary_output"] == "sentence_embedding"
    assert 0.5 <= manifest["fidelity"]["mean_cosine"] <= 1.0
    wanted = ("versions", "source", "heldout", "export", "reference")
    for key in wanted + (("calibration",) if target.precision == "int8" else ()):
        assert manifest[key], key
    assert manifest["export"]["max_abs_diff_vs_pytorch"] < 1e-3


def test_int8_model_has_qdq_on_the_linear_layers(matrix: Path) -> None:
    import onnx

    graph = onnx.load(str(matrix / "tiny-arm64" / "model.onnx")).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["QuantizeLinear"]
    weights = {i.name for i in graph.initializer}
    matmul_inputs = [n.input[1] for n in graph.node if n.op_type == "MatMul"]
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert (
        sum(name in dq_outputs for name in matmul_inputs) >= 2 * 4
    )  # q, k, v, out, ffn x 2 layers
    assert not any(name in weights for name in matmul_inputs if name in dq_outputs)


def test_tarball_holds_the_same_verified_bundle(matrix: Path, tmp_path: Path) -> None:
    with tarfile.open(matrix / "tiny-cpu.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    assert verify(tmp_path / "tiny-cpu") > 5


def test_rebuild_is_byte_identical(
    tiny_st: Path, texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for out in ("a", "b"):
        monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / f"cache-{out}"))  # no shared stages
        code, output = run(*build_args(tiny_st, texts_file, tmp_path / out, "--target", "cpu-vnni"))
        assert code == 0, output
    name = f"{tiny_st.name}-cpu-vnni"
    a, b = tmp_path / "a" / name, tmp_path / "b" / name
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert set(ma["resources"]["stage_peak_rss_mb"]) == set(mb["resources"]["stage_peak_rss_mb"])
    for manifest in (ma, mb):
        for key in VOLATILE_KEYS:  # when, and what the build host spent
            manifest.pop(key)
    assert ma == mb


def test_existing_output_is_refused_before_any_work(
    matrix: Path, tiny_st: Path, texts_file: Path
) -> None:
    before = (matrix / "tiny-arm64" / "manifest.json").read_text()
    code, output = run(
        *build_args(tiny_st, texts_file, matrix, "--target", "arm64", "--name", "tiny")
    )
    assert code == 2
    assert "already exists; pass --force" in output
    assert (matrix / "tiny-arm64" / "manifest.json").read_text() == before


def test_fp32_precision_builds_the_same_bundle_unquantized(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    code, output = run(
        *build_args(tiny_st, texts_file, tmp_path, "--target", "arm64", "--precision", "fp32")
    )
    assert code == 0, output
    manifest = json.loads((tmp_path / f"{tiny_st.name}-arm64" / "manifest.json").read_text())
    assert manifest["model"]["precision"] == "fp32" and manifest["quantization"] is None
    assert manifest["fidelity"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert output.strip().splitlines()[-1].endswith(f"{tiny_st.name}-arm64.tar.gz")


@pytest.mark.parametrize("kind", ["seq", "token"])
def test_classifiers_report_top1_agreement(kind: str, texts_file: Path, tmp_path: Path) -> None:
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / f"m-{kind}", head=kind)
    code, output = run(*build_args(model, texts_file, tmp_path / "out", "--target", "cpu-vnni"))
    assert code == 0, output
    manifest = json.loads((tmp_path / "out" / f"m-{kind}-cpu-vnni" / "manifest.json").read_text())
    assert manifest["io"]["primary_output"] == "logits"
    assert 0.0 <= manifest["fidelity"]["top1_agreement"] <= 1.0


def test_rebuild_from_manifest_reproduces_the_hashes(
    matrix: Path, texts_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(texts_file.parent)  # the manifest names calib.txt, found where rebuild runs
    code, output = run("rebuild", str(matrix / "tiny-cpu" / "manifest.json"))
    assert code == 0, output
    assert "reproduced every file hash" in output


def test_manifest_is_the_same_from_another_folder(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    """No path of the build machine in the manifest: the texts in two folders, one manifest."""
    manifests = []
    for where in ("a", "b"):
        texts = tmp_path / where / "calib.txt"
        texts.parent.mkdir()
        texts.write_bytes(texts_file.read_bytes())
        code, output = run(*build_args(tiny_st, texts, tmp_path / where / "out", "--target", "cpu"))
        assert code == 0, output
        manifest = (tmp_path / where / "out" / f"{tiny_st.name}-cpu" / "manifest.json").read_text()
        assert str(tmp_path / where) not in manifest
        manifests.append(json.loads(manifest))
    for manifest in manifests:
        for key in VOLATILE_KEYS:
            manifest.pop(key)
    assert manifests[0] == manifests[1]
    assert manifests[0]["build"]["config"]["calibration"] == "calib.txt"
    assert manifests[0]["calibration"]["source"] == "calib.txt"
    assert len(manifests[0]["build"]["inputs"]["calibration"]) == 64


def test_rebuild_notices_a_changed_input(
    matrix: Path, texts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import shutil

    folder = shutil.copytree(matrix / "tiny-arm64", tmp_path / "tiny-arm64")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["build"]["config"]["calibration"] == "calib.txt"
    monkeypatch.chdir(tmp_path)
    code, output = run("rebuild", str(folder))
    assert code == 2 and "calibration file calib.txt is missing" in output
    assert len(output.strip().splitlines()) == 1
    changed = tmp_path / "calib.txt"
    changed.write_text(texts_file.read_text().replace("the", "a"))
    code, output = run("rebuild", str(folder))
    assert code == 2 and f"calibration file {changed} has sha256" in output
    digest = hashlib.sha256(changed.read_bytes()).hexdigest()
    manifest["build"]["inputs"]["calibration"] = digest
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, output = run("rebuild", str(folder))
    assert code == 2 and "manifest.json does not match SHA256SUMS" in output  # verified first
    write_sums(folder)  # a consistent bundle whose recorded input no longer gives the same model
    code, output = run("rebuild", str(folder))
    assert code == 1
    assert "Rebuild differs" in output and "model.onnx" in output


def test_build_with_pruning_and_distillation_stages(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    import onnx

    args = build_args(
        tiny_st,
        texts_file,
        tmp_path,
        "--target",
        "arm64",
        "--prune",
        "0.3",
        "--distill-layers",
        "1",
        "--distill-data",
        str(texts_file),
        "--distill-seconds",
        "20",
    )
    code, output = run(*(a for a in args if a != "--quiet"))  # the summary is what is checked
    assert code == 0, output
    folder = tmp_path / f"{tiny_st.name}-arm64"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [h["stage"] for h in manifest["source"]["history"]] == ["distill", "prune"]
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert sum(n.op_type == "Softmax" for n in graph.node) == 1  # one encoder layer left
    assert manifest["export"]["max_abs_diff_vs_pytorch"] < 1e-3
    # The summary compares with the model the user started from, not only the shipped model's fp32.
    assert "arm64 vs the original model's fp32 export: size" in output


@pytest.mark.slow
def test_arm64_bundle_check_passes_on_emulated_aarch64(matrix: Path) -> None:
    from edgepack.device.emulate import emulator_available

    reason = emulator_available()
    if reason:
        pytest.skip(reason)
    code, output = run("verify", "--emulate", str(matrix / "tiny-arm64.tar.gz"))
    assert code == 0, output
    assert "aarch64 (emulated): check passed" in output


def test_build_report_has_every_target_and_its_plots(matrix: Path) -> None:
    page = (matrix / "report.html").read_text()
    md = (matrix / "report.md").read_text()
    for profile in list_targets():
        assert f"<td>{profile.name}</td>" in page
        assert f"| {profile.name} |" in md
    assert page.count("data:image/png;base64,") >= 3  # latency, size, sensitivity
    assert "accuracy search chose" in md


def test_pruning_recovered_by_distillation(tiny_st: Path, texts_file: Path, tmp_path: Path) -> None:
    code, output = run(
        *build_args(tiny_st, texts_file, tmp_path, "--target", "arm64", "--prune", "0.3",
                    "--distill-data", str(texts_file), "--distill-seconds", "15")
    )  # fmt: skip
    assert code == 0, output
    manifest = json.loads((tmp_path / f"{tiny_st.name}-arm64" / "manifest.json").read_text())
    stages = [h["stage"] for h in manifest["source"]["history"]]
    assert stages[:1] == ["prune"] and "distill" in stages
    assert manifest["export"]["max_abs_diff_vs_pytorch"] < 1e-3


@pytest.mark.parametrize("profile", [p.name for p in list_targets()])
def test_readme_names_only_files_the_bundle_has(matrix: Path, profile: str) -> None:
    """A README pointing at a script the bundle lacks (bench_android.sh was one) sends the user
    looking for nothing; and requirements.txt states the measured floor for the model's format."""
    from bundle_factory import readme_file_names

    from edgepack.bundle.requirements import ORT_FLOOR

    folder = matrix / f"tiny-{profile}"
    names = readme_file_names((folder / "README.md").read_text())
    assert {"run.sh", "bench.py", "requirements.txt", "edgepack_runtime.py"} <= names
    assert sorted(n for n in names if not (folder / n).exists()) == []
    fmt = json.loads((folder / "manifest.json").read_text())["model"]["file"].split(".")[-1]
    assert (
        f"onnxruntime>={ORT_FLOOR[('encoder', fmt)]}\n" in (folder / "requirements.txt").read_text()
    )
