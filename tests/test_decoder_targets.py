"""Decoder builds shaped by the target profile: the [decoder] weight-only setting (quantized once
per distinct setting, recorded with its fidelity), and ORT-format bundles for mobile profiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import write_texts
from decoder_factory import build_tiny_decoder, make_tiny_decoder

from edgepack import decoder_build
from edgepack.bundle import verify_bundle
from edgepack.config import BuildConfig
from edgepack.errors import UserError
from edgepack.pipeline import build
from edgepack.profiles import TargetProfile, load_target, parse_profile, targets_dir
from edgepack.progress import Progress

ARM64 = (targets_dir() / "arm64.toml").read_text()
CONTRIB = (
    "GroupQueryAttention",
    "MatMulNBits",
    "GatherBlockQuantized",
    "SkipSimplifiedLayerNormalization",
)


def _variant(name: str, precision: str, level: int) -> TargetProfile:
    text = ARM64.replace('name = "arm64"', f'name = "{name}"')
    text = text.replace('precision = "int4"', f'precision = "{precision}"')
    return parse_profile(text.replace("accuracy_level = 4", f"accuracy_level = {level}"), name)


def _levels(model: Path) -> set[int]:
    import onnx

    graph = onnx.load(str(model)).graph
    return {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }


def test_the_setting_comes_from_the_profile_unless_precision_overrides() -> None:
    assert decoder_build._setting(BuildConfig(), load_target("arm64")) == ("int4", 4, "fp32")
    assert decoder_build._setting(BuildConfig(precision="int8"), load_target("ios")) == (
        "int8",
        4,
        "fp32",
    )
    assert decoder_build._setting(BuildConfig(kv_cache="int8"), load_target("arm64")) == (
        "int4",
        4,
        "int8",
    )
    # fp32 has no MatMulNBits: one setting whatever the level, and no default level to record.
    assert decoder_build._setting(BuildConfig(precision="fp32"), _variant("x", "int8", 0)) == (
        "fp32",
        None,
        "fp32",
    )
    # A fixed-shape profile has no [decoder] section: the defaults.
    assert decoder_build._setting(BuildConfig(), load_target("android-nnapi")) == (
        "int4",
        4,
        "fp32",
    )
    with pytest.raises(UserError, match=r"--precision int2 does not fit a decoder"):
        decoder_build._setting(BuildConfig(precision="int2"), load_target("arm64"))


def test_one_quantization_per_distinct_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three targets, two settings: two quantizations; each bundle ships its own setting's
    MatMulNBits level and records that setting's perplexity and top-1 agreement."""
    profiles = [_variant("l4", "int8", 4), _variant("l0", "int8", 0), _variant("l4b", "int8", 4)]
    monkeypatch.setattr(decoder_build, "resolve_targets", lambda spec: profiles)
    calls: list[tuple[str, int]] = []
    quantized = decoder_build._quantized

    def counting(fp32: Any, step: tuple[str, int, str], *rest: Any) -> Any:
        calls.append(step[:2])
        return quantized(fp32, step, *rest)

    monkeypatch.setattr(decoder_build, "_quantized", counting)
    folder = make_tiny_decoder(tmp_path / "m", "llama")
    texts = write_texts(tmp_path / "texts.txt", 40)
    config = BuildConfig(
        model=str(folder),
        calibration=str(texts),
        heldout=str(texts),
        out=str(tmp_path / "dist"),
        max_drop=0.2,
    )
    results = {r.target: r for r in build(config, Progress(quiet=True))}
    assert calls == [("int8", 4), ("int8", 0)]
    for target, level in (("l4", 4), ("l0", 0), ("l4b", 4)):
        manifest = results[target].manifest
        setting = manifest["decoder"]
        assert (setting["precision"], setting["accuracy_level"]) == ("int8", level)
        assert setting["precision_from"] == "profile"
        assert setting["perplexity"] == manifest["fidelity"]["perplexity"] > 0
        assert 0.9 < setting["top1_agreement"] <= 1.0
        assert manifest["quantization"]["accuracy_level"] == level
        assert _levels(results[target].folder / "model.onnx") == {level}
    assert results["l4"].manifest["model"]["sha256"] == results["l4b"].manifest["model"]["sha256"]
    assert results["l4"].manifest["model"]["sha256"] != results["l0"].manifest["model"]["sha256"]


@pytest.fixture(scope="module")
def android(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """int8: on random weights int4 greedy parts from fp32 at once; int8 stays on its path."""
    result = build_tiny_decoder(tmp_path_factory.mktemp("llm-android"), target="android")
    return result.folder, result.manifest


def test_a_mobile_decoder_bundle_ships_ort_format(android: tuple[Path, dict]) -> None:
    folder, manifest = android
    assert manifest["model"]["file"] == "model.ort" and not (folder / "model.onnx").exists()
    assert (folder / "model.ort").read_bytes()[4:8] == b"ORTM"  # the flatbuffer's identifier
    assert manifest["target"]["format"] == {
        "model": "ort",
        "ort_optimization_style": "Fixed",
        "ort_target_platform": "arm",
    }
    assert manifest["decoder"]["precision_from"] == "build config"
    config = (folder / "required_operators_and_types.config").read_text()
    assert manifest["model"]["operator_config"] == "required_operators_and_types.config"
    assert all(op in config for op in CONTRIB) and "model/s: model.ort" in config
    # The build ran the shipped .ort through the device check on the host: no token moved.
    lengths = [
        len(p["continuation"])
        for p in json.loads((folder / "reference.json").read_text())["prompts"]
    ]
    assert manifest["check"]["host_greedy_prefix_tokens"] == lengths
    assert verify_bundle(folder, None, False) >= 6


def test_the_ort_bundle_passes_its_harness_check(android: tuple[Path, dict]) -> None:
    folder, _ = android
    run = subprocess.run(
        [str(folder / "run.sh"), "--check-only"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert run.returncode == 0, run.stderr
    check = json.loads(run.stdout)["check"]
    ref = json.loads((folder / "reference.json").read_text())["prompts"]
    # Every token of every reference continuation (some stop early at the end-of-sequence token).
    assert check["passed"] and check["greedy_prefix_tokens"] == [
        len(p["continuation"]) for p in ref
    ]
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from edgepack_runtime import Model\n"
        "m = Model(sys.argv[1]); ref = json.load(open(sys.argv[1] + '/reference.json'))\n"
        "got = [list(m.generate_ids(p['prompt'], len(p['continuation']))) for p in ref['prompts']]\n"
        "print(json.dumps(got == [p['continuation'] for p in ref['prompts']]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and json.loads(run.stdout) is True, run.stderr
    assert verify_bundle(folder) >= 6  # the runtime left the bundle as it was


def test_the_ort_bundle_readme_and_requirements(android: tuple[Path, dict]) -> None:
    """The .ort file, converted by the host's onnxruntime, needs 1.30.0 (measured), so Python 3.11+."""
    from bundle_factory import readme_file_names

    from edgepack.bundle.requirements import ORT_FLOOR

    folder, _ = android
    text = (folder / "README.md").read_text()
    names = readme_file_names(text)
    assert "required_operators_and_types.config" in names and "model.ort" in names
    assert sorted(n for n in names if not (folder / n).exists()) == []
    assert "Python 3.11 or newer" in text
    assert (folder / "requirements.txt").read_text().splitlines()[1] == (
        f"onnxruntime>={ORT_FLOOR[('decoder', 'ort')]}"
    )
