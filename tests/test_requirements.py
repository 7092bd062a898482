"""A bundle's requirements.txt and README say what the device needs, and it installs.

The floors in edgepack/bundle/requirements.py were measured by running bundles' own checks under
older onnxruntime releases; these tests hold the text to them, and resolve every requirements.txt
for every (platform, Python) pair the bundles promise, with pip's configured index.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from bundle_factory import HARNESS, readme_file_names, readme_flags
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

from edgepack.bundle.decoder_readme import decoder_readme
from edgepack.bundle.requirements import (
    ORT_FLOOR,
    ORT_LAST_WHEEL,
    PYTHONS,
    min_python,
    pythons,
    requirements_text,
)
from edgepack.bundle.wheels import TOKENIZERS_PY38, UNREACHABLE
from edgepack.profiles import list_targets

HOST_TOKENIZERS = metadata.version("tokenizers")
KINDS = sorted(ORT_FLOOR)
# pip taking a source archive: a device without compilers (or Rust) cannot build it.
SDIST = re.compile(r"(?:Downloading|Using cached|already downloaded) \S+\.(?:tar\.gz|zip)\b")


def device_lines(text: str, python: str) -> list[str]:
    """The requirement lines a device with this Python installs: pip evaluates the markers with
    the interpreter it runs in, even under ``pip download --python-version`` (pypa/pip#11010),
    so a host resolving for another Python must apply them itself."""
    env = {**default_environment(), "python_version": python, "python_full_version": python + ".0"}
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out.append(f"{req.name}{req.specifier}")
    return out


@pytest.mark.parametrize(("kind", "fmt"), KINDS)
def test_requirements_state_the_measured_floor(kind: str, fmt: str) -> None:
    text = requirements_text(kind, fmt, HOST_TOKENIZERS)
    assert text.startswith(
        f"# Python {min_python(kind, fmt)}+. onnxruntime {ORT_FLOOR[(kind, fmt)]}"
    )
    for python in pythons(kind, fmt):
        lines = device_lines(text, python)
        assert f"onnxruntime>={ORT_FLOOR[(kind, fmt)]}" in lines and "numpy" in lines
        want = f"=={TOKENIZERS_PY38}" if python == "3.8" else f">={HOST_TOKENIZERS}"
        assert f"tokenizers{want}" in lines, (python, lines)
    # The host built and checked the bundle with its own onnxruntime: it must be allowed.
    assert Version(metadata.version("onnxruntime")) >= Version(ORT_FLOOR[(kind, fmt)])


def test_the_promised_pythons_follow_the_wheels() -> None:
    assert pythons("encoder", "onnx") == list(PYTHONS)  # 1.18.1 has wheels for 3.8 and 3.9
    assert min_python("decoder", "onnx") == "3.10"  # 1.23.0: after 3.8/3.9's last (1.19.2)
    assert min_python("decoder", "ort") == "3.11"  # 1.30.0: after 3.10's last (1.23.2)
    for python, last in ORT_LAST_WHEEL.items():
        for kind, fmt in KINDS:
            promised = python in pythons(kind, fmt)
            assert promised == (Version(last) >= Version(ORT_FLOOR[(kind, fmt)]))


def test_harness_readme_names_the_encoder_floor() -> None:
    text = (HARNESS / "README.md").read_text()
    assert f"onnxruntime {ORT_FLOOR[('encoder', 'onnx')]} or newer" in text
    assert f"Python {min_python('encoder', 'onnx')} or newer" in text


def _help(script: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(script), *args, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_flag_the_encoder_readme_names_is_the_harness() -> None:
    """run.sh hands every flag to bench.py (and reads --no-verify itself)."""
    flags = readme_flags((HARNESS / "README.md").read_text())
    assert {"--json", "--runs", "--public-key"} <= flags
    assert flags - readme_flags(_help(HARNESS / "bench.py")) == set()


def _decoder_manifest(fmt: str) -> dict:
    return {
        "model": {"file": f"model.{fmt}", "bytes": 1e6, "precision": "int4",
                  "operator_config": "required_operators_and_types.config" if fmt == "ort" else None},
        "target": {"name": "arm64"},
        "source": {"model": "tiny"},
        "fidelity": {"perplexity": 3.0, "perplexity_fp32": 2.9, "top1_agreement": 0.9},
        "generation": {"context_length": 64},
    }  # fmt: skip


@pytest.mark.parametrize("fmt", ["onnx", "ort"])
def test_every_flag_the_decoder_readme_names_is_real(fmt: str) -> None:
    """Flags of bench.py (bench_llm.py in the bundle) and of edgepack_runtime.py's commands."""
    text = decoder_readme("tiny-arm64", _decoder_manifest(fmt))
    assert f"Python {min_python('decoder', fmt)} or newer" in text
    flags = readme_flags(text)
    assert {"--check-only", "--prompt-tokens", "--max-new-tokens", "--public-key"} <= flags
    runtime = HARNESS / "edgepack_runtime.py"
    known = readme_flags(
        _help(HARNESS / "bench_llm.py")
        + "".join(_help(runtime, *cmd) for cmd in ((), ("generate",), ("chat",), ("serve",)))
    )
    assert flags - known == set()
    names = readme_file_names(text)
    assert {"bench.py", "run.sh", "reference.json", "edgepack_runtime.py"} <= names
    assert ("required_operators_and_types.config" in names) == (fmt == "ort")


def _resolve(
    platforms: list[str], python: str, lines: list[str], dest: Path, binary: bool = True
) -> tuple[int, str]:
    """pip download of ``lines`` for the device; ``binary=False`` lets pip consider source
    archives too, as a device's plain install does (pip then allows no dependencies)."""
    dest.mkdir(exist_ok=True)
    platform_args = [arg for tag in platforms for arg in ("--platform", tag)]
    only = ["--only-binary=:all:"] if binary else ["--no-deps"]
    (dest / "requirements.txt").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
           "--progress-bar", "off", *only, *platform_args,
           "--python-version", python, "--implementation", "cp",
           "-d", str(dest / "wheels"), "-r", str(dest / "requirements.txt")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    if done.returncode != 0 and UNREACHABLE.search(output) and not SDIST.search(output):
        pytest.skip(f"pip could not reach its package index: {output.strip().splitlines()[-1]}")
    return done.returncode, output


def _cases() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(kind, fmt, python, platforms) for each profile with wheels, each kind, each Python 3.8+;
    profiles sharing platform tags and format resolve once."""
    cases = set()
    for profile in list_targets():
        platforms = profile.section("device").get("pip_platforms")
        if not platforms:
            continue
        fmt = profile.section("format")["model"]
        for kind in ("encoder", "decoder"):
            cases |= {(kind, fmt, python, tuple(platforms)) for python in _edges(kind, fmt)}
    return sorted(cases)


def _edges(kind: str, fmt: str) -> set[str]:
    """The Pythons where a floor can be wrong: the first promised and the one before it, 3.8
    (its own tokenizers pin) and the newest (fewest releases have wheels); the ones between
    resolve like their neighbours, and each resolution is a download (~5 s on a quiet machine)."""
    promised = pythons(kind, fmt)
    first = PYTHONS.index(promised[0])
    return {*PYTHONS[max(first - 1, 0) : first + 1], "3.8", PYTHONS[-1]}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fmt", "python", "platforms"), _cases())
def test_requirements_resolve_where_promised_and_only_there(
    kind: str, fmt: str, python: str, platforms: tuple[str, ...], tmp_path: Path
) -> None:
    """Every Python the bundle promises gets wheels for all of requirements.txt; a Python it does
    not promise finds no onnxruntime new enough, so the README's minimum is the true one."""
    lines = device_lines(requirements_text(kind, fmt, HOST_TOKENIZERS), python)
    code, output = _resolve(list(platforms), python, lines, tmp_path)
    if python in pythons(kind, fmt):
        assert code == 0, output
        names = [p.name for p in (tmp_path / "wheels").glob("*.whl")]
        tag = "cp" + python.replace(".", "")
        ort = [n for n in names if n.startswith("onnxruntime-")]
        assert len(ort) == 1 and f"-{tag}-" in ort[0], names
        assert any(n.startswith(("tokenizers-", "numpy-")) for n in names), names
        # A plain `pip install -r` also weighs source archives: each line must still pick a wheel
        # (tokenizers>=0.20.3 on 3.8 took 0.21.0's, which needs Rust to build).
        code, output = _resolve(list(platforms), python, lines, tmp_path / "any", binary=False)
        assert not SDIST.search(output), output
        assert code == 0, output
    else:
        assert code != 0
        assert f"No matching distribution found for onnxruntime>={ORT_FLOOR[(kind, fmt)]}" in output
