"""bench.py's bundle verification, run as the device runs it: SHA256SUMS, manifest, signature.

Every case changes a real bundle_factory bundle the way a careless copy or an attacker would and
runs the bundle's own bench.py (or run.sh) in a subprocess with a real onnxruntime session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_bundle, write_sums

QUICK = ("--runs", "3", "--warmup", "0", "--quiet", "--skip-check")
GNU_SHA256SUM = (
    shutil.which("sha256sum") is not None
    and "GNU" in subprocess.run(["sha256sum", "--version"], capture_output=True, text=True).stdout
)


def full_bundle(root: Path, name: str = "tiny-cpu", **kwargs) -> Path:
    """A bundle_factory bundle with the tokenizer/ folder every real bundle has."""
    bundle = make_bundle(root, name, **kwargs)
    (bundle / "tokenizer").mkdir()
    (bundle / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}\n')
    write_sums(bundle)
    return bundle


def run_bench(bundle: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    cmd = [sys.executable, str(bundle / "bench.py"), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False
    )


def run_sh(bundle: Path, *args: str):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["sh", str(bundle / "run.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def refused(proc, *words: str) -> None:
    """Exit 2 with exactly one line on stderr that names every word."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def edit_manifest(bundle: Path, **model_fields) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"].update(model_fields)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def flip_weight_byte(model: Path) -> None:
    """Change the lowest byte of the first embedding weight: still a valid, loadable model."""
    import onnx

    raw = onnx.load(str(model)).graph.initializer[0].raw_data
    data = bytearray(model.read_bytes())
    at = data.find(raw)
    assert at > 0
    data[at] ^= 0x01
    model.write_bytes(bytes(data))


# --- the manifest's own claims -----------------------------------------------------------------


def test_model_changed_with_sums_regenerated_is_refused_by_manifest_sha256(tmp_path):
    bundle = full_bundle(tmp_path)
    assert run_bench(bundle, *QUICK).returncode == 0
    flip_weight_byte(bundle / "model.onnx")
    write_sums(bundle)
    if GNU_SHA256SUM:  # the sums alone are consistent again
        assert (
            subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle).returncode == 0
        )
    refused(run_bench(bundle, *QUICK), "model.onnx", "sha256")
    refused(run_sh(bundle, *QUICK), "model.onnx", "sha256")
    assert run_bench(bundle, *QUICK, "--no-verify").returncode == 0


def test_model_bytes_must_match_the_manifest(tmp_path):
    bundle = full_bundle(tmp_path)
    edit_manifest(bundle, bytes=(bundle / "model.onnx").stat().st_size + 1)
    write_sums(bundle)
    refused(run_bench(bundle, *QUICK), "model.onnx", "bytes")


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_manifest_model_file_outside_the_bundle_is_refused(tmp_path, where):
    bundle = full_bundle(tmp_path)
    outside = tmp_path / "outside_model.onnx"
    shutil.copy2(bundle / "model.onnx", outside)
    edit_manifest(bundle, file="../outside_model.onnx" if where == "parent" else str(outside))
    write_sums(bundle)
    proc = run_bench(bundle, *QUICK)
    refused(proc, "outside_model.onnx", "model.file")
    # Not even --no-verify loads a model from outside the bundle.
    refused(run_bench(bundle, *QUICK, "--no-verify"), "outside_model.onnx", "model.file")


def test_manifest_reference_not_listed_in_sums_is_refused(tmp_path):
    bundle = full_bundle(tmp_path)
    sums = bundle / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    sums.write_text("".join(f"{line}\n" for line in lines if "outputs_fp32" not in line))
    refused(run_bench(bundle, *QUICK), "reference/outputs_fp32.npz", "not listed")


def test_model_format_must_match_the_manifest(tmp_path):
    bundle = full_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"]["format"] = {"model": "ort"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    write_sums(bundle)
    refused(run_bench(bundle, *QUICK), "model.onnx", "ort")


@pytest.mark.parametrize("emptied", ["missing", "empty"])
def test_bundle_without_tokenizer_files_is_refused(tmp_path, emptied):
    bundle = make_bundle(tmp_path)  # the factory's bundle has no tokenizer/
    if emptied == "empty":
        (bundle / "tokenizer").mkdir()
    refused(run_bench(bundle, *QUICK), "tokenizer/")


# --- links and files added after the build -------------------------------------------------------


def test_model_replaced_by_a_symlink_to_an_outside_file_is_refused(tmp_path):
    bundle = full_bundle(tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    (bundle / "model.onnx").rename(outside)
    (bundle / "model.onnx").symlink_to(outside)  # same bytes: SHA256SUMS and manifest still match
    refused(run_bench(bundle, *QUICK), "model.onnx", "symbolic link")
    refused(run_sh(bundle, *QUICK), "model.onnx", "symbolic link")


@pytest.mark.parametrize("link", ["tokenizer/vocab.txt", "tokenizer"])
def test_any_symlink_in_the_bundle_is_refused(tmp_path, link):
    bundle = full_bundle(tmp_path)
    target = tmp_path / "shared"
    target.mkdir()
    (target / "vocab.txt").write_text("[PAD]\n")
    (target / "tokenizer.json").write_text('{"version": "1.0"}\n')
    if link == "tokenizer":
        shutil.rmtree(bundle / "tokenizer")
        (bundle / "tokenizer").symlink_to(target, target_is_directory=True)
    else:
        (bundle / link).symlink_to(target / "vocab.txt")
    write_sums(bundle)  # the factory follows links, so the sums list the linked files
    refused(run_bench(bundle, *QUICK), link, "symbolic link")


@pytest.mark.parametrize("added", ["extra.txt", "reference/notes.txt", "result.json"])
def test_file_added_after_build_is_refused_by_name(tmp_path, added):
    bundle = full_bundle(tmp_path)
    (bundle / added).write_text("{}\n")
    refused(run_bench(bundle, *QUICK), added, "not listed in SHA256SUMS")
    refused(run_sh(bundle, *QUICK), added, "not listed in SHA256SUMS")
    assert run_bench(bundle, *QUICK, "--no-verify").returncode == 0


def test_running_the_harness_leaves_the_bundle_as_it_was(tmp_path):
    """No __pycache__ or report lands in the bundle, so the strict file list needs no exception:
    the script and its --cold-runs children run bench.py as __main__, which is never cached."""
    bundle = full_bundle(tmp_path)
    before = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*"))
    out = tmp_path / "r.json"
    proc = run_bench(bundle, *QUICK, "--cold-runs", "1", "--json", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")) == before
    assert run_sh(bundle, *QUICK).returncode == 0


@pytest.mark.skipif(not GNU_SHA256SUM, reason="needs GNU sha256sum to write -b style sums")
def test_sums_written_by_sha256sum_binary_mode_are_accepted(tmp_path):
    bundle = full_bundle(tmp_path)
    names = [line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()]
    sums = subprocess.run(["sha256sum", "-b", *names], cwd=bundle, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert " *model.onnx\n" in sums
    (bundle / "SHA256SUMS").write_text(sums)
    assert run_bench(bundle, *QUICK).returncode == 0
    assert run_sh(bundle, *QUICK).returncode == 0
    with open(bundle / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    refused(run_bench(bundle, *QUICK), "model.onnx", "SHA256SUMS")
