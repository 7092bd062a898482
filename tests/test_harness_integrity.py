"""bench.py's bundle verification, run as the device runs it: SHA256SUMS, manifest, signature.

Every case changes a real bundle_factory bundle the way a careless copy or an attacker would and
runs the bundle's own bench.py (or run.sh) in a subprocess with a real onnxruntime session.
"""

from __future__ import annotations

import hashlib
import importlib.util
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
    return make_bundle(root, name, **kwargs)


def run_bench(bundle: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    cmd = [sys.executable, str(bundle / "bench.py"), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False
    )


def run_sh(bundle: Path, *args: str, cwd: Path | None = None):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["sh", str(bundle / "run.sh"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300, check=False)  # fmt: skip


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
    bundle = make_bundle(tmp_path)
    shutil.rmtree(bundle / "tokenizer")
    if emptied == "empty":
        (bundle / "tokenizer").mkdir()
    write_sums(bundle)  # the sums agree: only the required-files rule can refuse it
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


# --- signatures ------------------------------------------------------------------------------


def test_require_signature_needs_a_public_key(tmp_path):
    bundle = full_bundle(tmp_path)
    refused(run_bench(bundle, *QUICK, "--require-signature"), "--public-key")


def test_no_verify_cannot_be_combined_with_a_public_key(tmp_path):
    bundle = full_bundle(tmp_path)
    key = tmp_path / "pub.pem"
    key.write_text("not read\n")
    refused(run_bench(bundle, *QUICK, "--no-verify", "--public-key", str(key)), "--no-verify")


def test_public_key_without_model_signing_warns_or_refuses(tmp_path):
    """model_signing fails to import without pyopenssl; an OpenSSL package that fails to import
    first on the path makes that happen even where both are installed."""
    bundle = full_bundle(tmp_path)
    shadow = tmp_path / "shadow" / "OpenSSL"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'OpenSSL'\")\n"
    )
    env = dict(os.environ, PYTHONPATH=str(shadow.parent))
    key = tmp_path / "pub.pem"
    key.write_text("never read: model_signing is not importable\n")
    proc = run_bench(bundle, *QUICK, "--public-key", str(key), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("warning: ")
    assert "NOT checked" in proc.stderr and "pip install model-signing pyopenssl" in proc.stderr
    strict = run_bench(bundle, *QUICK, "--public-key", str(key), "--require-signature", env=env)
    refused(strict, "--require-signature", "pip install model-signing pyopenssl")


def _model_signing_missing() -> str | None:
    try:
        if importlib.util.find_spec("model_signing") is None:
            return "model_signing is not installed (pip install model-signing pyopenssl)"
        import model_signing.signing  # noqa: F401
    except ImportError as exc:
        return f"model_signing is not importable ({exc}); pip install model-signing pyopenssl"
    return None


needs_model_signing = pytest.mark.skipif(
    _model_signing_missing() is not None, reason=str(_model_signing_missing())
)


def ec_key_pair(folder: Path) -> tuple[Path, Path]:
    """An EC P-256 private key and its public key, PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "key.pem", folder / "pub.pem"
    folder.mkdir(parents=True, exist_ok=True)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return private, public


def sign_bundle(bundle: Path, private_key: Path) -> None:
    """The bundle.sig convention: every file of the folder except bundle.sig itself."""
    from model_signing import hashing, signing

    ignore = hashing.Config().set_ignored_paths(paths=["bundle.sig"], ignore_git_paths=False)
    signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(
        ignore
    ).sign(bundle, bundle / "bundle.sig")


@pytest.fixture
def signed(tmp_path):
    bundle = full_bundle(tmp_path / "b")
    private, public = ec_key_pair(tmp_path / "keys")
    sign_bundle(bundle, private)
    return bundle, public


@needs_model_signing
def test_signed_bundle_verifies_and_bundle_sig_needs_no_sums_entry(signed):
    bundle, public = signed
    assert "bundle.sig" not in (bundle / "SHA256SUMS").read_text()
    ok = run_bench(bundle, *QUICK, "--public-key", str(public), "--require-signature")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    assert run_bench(bundle, *QUICK).returncode == 0  # bundle.sig without a key: unchecked
    # run.sh passes the flags on; a relative key path is the caller's, though run.sh cds away.
    via_sh = run_sh(bundle, *QUICK, "--public-key", public.name, cwd=public.parent)
    assert via_sh.returncode == 0, via_sh.stderr
    # Signing again over a folder that already holds bundle.sig gives a signature that verifies.
    sign_bundle(bundle, public.parent / "key.pem")
    assert run_bench(bundle, *QUICK, "--public-key", str(public)).returncode == 0


@needs_model_signing
def test_signed_bundle_with_a_changed_model_is_refused_by_the_signature(signed):
    bundle, public = signed
    model = bundle / "model.onnx"
    flip_weight_byte(model)
    edit_manifest(bundle, sha256=hashlib.sha256(model.read_bytes()).hexdigest())
    write_sums(bundle)  # sums and manifest agree with the changed model; only bundle.sig does not
    assert run_bench(bundle, *QUICK).returncode == 0
    refused(run_bench(bundle, *QUICK, "--public-key", str(public)), "bundle.sig", "model.onnx")


@needs_model_signing
def test_missing_signature_is_refused_when_a_key_is_given(signed):
    bundle, public = signed
    (bundle / "bundle.sig").unlink()
    refused(run_bench(bundle, *QUICK, "--public-key", str(public)), "bundle.sig")


@needs_model_signing
def test_signature_checked_with_another_key_is_refused(signed, tmp_path):
    bundle, _ = signed
    _, other = ec_key_pair(tmp_path / "other")
    refused(run_bench(bundle, *QUICK, "--public-key", str(other)), "bundle.sig")
