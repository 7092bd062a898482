"""manifest.json, SHA256SUMS and the host-side bundle check (`edgepack verify`, `bench`).

Each tampering below is one an attacker with write access (or a bad copy) can do while keeping
SHA256SUMS consistent: the check must still refuse it, naming what is wrong. The harness applies
the same rules on the device (tests/test_harness_integrity.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_bundle, make_tarball, write_sums
from click.testing import CliRunner

from edgepack.bundle import read_manifest, verify_bundle
from edgepack.bundle.manifest import write_manifest
from edgepack.cli import cli
from edgepack.errors import BundleTampered, UserError


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _save_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def flip_model_keep_sums(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-5] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    write_sums(bundle)


def remove_tokenizer(bundle: Path) -> None:
    for path in (bundle / "tokenizer").iterdir():
        path.unlink()
    (bundle / "tokenizer").rmdir()
    write_sums(bundle)


def model_outside(bundle: Path) -> None:
    (bundle.parent / "outside_model.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    manifest = _manifest(bundle)
    manifest["model"]["file"] = "../outside_model.onnx"
    _save_manifest(bundle, manifest)
    write_sums(bundle)


def model_symlink(bundle: Path) -> None:
    outside = bundle.parent / "elsewhere.onnx"
    (bundle / "model.onnx").rename(outside)
    (bundle / "model.onnx").symlink_to(outside)  # same bytes: sums and manifest still match


def add_file(bundle: Path) -> None:
    (bundle / "extra.txt").write_text("added after the build\n")


def reference_not_summed(bundle: Path) -> None:
    write_sums(bundle)
    lines = (bundle / "SHA256SUMS").read_text().splitlines()
    kept = [line for line in lines if not line.endswith("reference/outputs_fp32.npz")]
    (bundle / "SHA256SUMS").write_text("\n".join(kept) + "\n")
    (bundle / "reference" / "outputs_fp32.npz").unlink()


TAMPERING = {
    "model changed, sums regenerated": (flip_model_keep_sums, "does not match manifest.json"),
    "tokenizer removed, sums regenerated": (remove_tokenizer, "no tokenizer/ files"),
    "manifest names a file outside": (model_outside, "a path outside the bundle"),
    "model is a symlink to outside": (model_symlink, "symbolic link"),
    "file added": (add_file, "extra.txt is not listed"),
    "reference missing from sums and disk": (reference_not_summed, "reference/outputs_fp32.npz"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_verify_refuses_tampering_that_keeps_the_sums_consistent(tmp_path: Path, case: str) -> None:
    action, message = TAMPERING[case]
    bundle = make_bundle(tmp_path)
    assert verify_bundle(bundle) > 5
    action(bundle)
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_verify_of_the_archive_refuses_a_model_changed_with_sums_regenerated(
    tmp_path: Path,
) -> None:
    bundle = make_bundle(tmp_path)
    flip_model_keep_sums(bundle)
    archive = make_tarball(bundle, tmp_path / "out")
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 2
    assert "does not match manifest.json model.sha256" in result.output


def test_bench_refuses_an_added_file_before_running(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    add_file(bundle)
    args = ["bench", str(bundle), "--results", str(tmp_path / "r"), "--", "--runs", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "extra.txt is not listed" in result.output
    assert not list(tmp_path.glob("r/*.json"))  # refused before any run


def test_sums_in_binary_mode_are_accepted_as_coreutils_does(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    names.remove("SHA256SUMS")
    done = subprocess.run(["sha256sum", "-b", *names], cwd=bundle, capture_output=True, text=True)
    (bundle / "SHA256SUMS").write_text(done.stdout)
    assert " *model.onnx" in done.stdout
    assert verify_bundle(bundle) == len(names)
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True)
    assert check.returncode == 0


def test_sums_written_by_edgepack_are_what_coreutils_checks(tmp_path: Path) -> None:
    from edgepack.bundle.manifest import write_sums as edgepack_sums

    bundle = make_bundle(tmp_path)
    (bundle / "SHA256SUMS").unlink()
    edgepack_sums(bundle)
    listed = [line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()]
    assert listed == sorted(listed) and "manifest.json" in listed
    done = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True)
    assert done.returncode == 0


def test_changed_and_missing_files_are_named(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "requirements.txt").write_text("evil\n")
    with pytest.raises(BundleTampered, match=r"requirements\.txt does not match SHA256SUMS"):
        verify_bundle(bundle)
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / "tiny-cpu" / "run.sh").unlink()
    with pytest.raises(BundleTampered, match=r"run\.sh is listed in SHA256SUMS but missing"):
        verify_bundle(tmp_path / "b" / "tiny-cpu")


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    folder.mkdir()
    write_manifest(folder, {"model": {"file": "model.onnx"}})
    assert read_manifest(folder)["schema_version"] == 1
    data = json.loads((folder / "manifest.json").read_text())
    data["schema_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="schema version 99 is not supported"):
        read_manifest(folder)


# -- signed bundles ---------------------------------------------------------------------------


def _keys(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "key.pem", folder / "pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture(scope="module")
def signed(tiny_st: Path, texts_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real tiny build, signed at build time."""
    pytest.importorskip("model_signing", reason="pip install 'edgepack[sign]'")
    root = tmp_path_factory.mktemp("signed")
    private, public = _keys(root)
    out = root / "dist"
    args = ["build", "--model", str(tiny_st), "--calibration", str(texts_file), "--samples", "40"]
    args += ["--target", "cpu", "--out", str(out), "--max-drop", "-1", "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--sign-key", str(private)])
    assert result.exit_code == 0, result.output
    return out / f"{tiny_st.name}-cpu", public, root


def test_a_signed_build_verifies_with_edgepack_and_the_openssf_tool(signed) -> None:
    bundle, public, _ = signed
    assert (bundle / "bundle.sig").is_file()
    assert "bundle.sig" not in (bundle / "SHA256SUMS").read_text()
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--public-key", str(public)])
    assert result.exit_code == 0, result.output
    assert "signature verified" in result.output
    archive = bundle.with_name(bundle.name + ".tar.gz")
    result = CliRunner().invoke(cli, ["verify", str(archive), "--public-key", str(public)])
    assert result.exit_code == 0, result.output
    tool = Path(sys.executable).with_name("model_signing")  # the OpenSSF command line
    signature = bundle / "bundle.sig"
    args = ["verify", "key", "--signature", str(signature), "--public_key", str(public)]
    done = subprocess.run(
        [str(tool), *args, "--ignore-paths", str(signature), str(bundle)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "Verification succeeded" in done.stdout, done.stderr


def test_a_signed_bundle_rewritten_consistently_is_refused(signed, tmp_path: Path) -> None:
    """Model, sums and manifest all agree after the edit: only the signature can tell."""
    import shutil

    bundle, public, _ = signed
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-5] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    manifest = _manifest(copy)
    manifest["model"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    _save_manifest(copy, manifest)
    write_sums(copy)
    (copy / "SHA256SUMS").write_text(
        "".join(
            line + "\n"
            for line in (copy / "SHA256SUMS").read_text().splitlines()
            if not line.endswith("bundle.sig")
        )
    )
    assert CliRunner().invoke(cli, ["verify", str(copy)]).exit_code == 0  # sums alone pass
    result = CliRunner().invoke(cli, ["verify", str(copy), "--public-key", str(public)])
    assert result.exit_code == 2
    assert "bundle.sig does not verify" in result.output
    _, other = _keys(tmp_path)
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--public-key", str(other)])
    assert result.exit_code == 2 and "does not verify" in result.output


def test_signature_options_are_checked(signed, tmp_path: Path) -> None:
    bundle, public, _ = signed
    unsigned = make_bundle(tmp_path)
    result = CliRunner().invoke(cli, ["verify", str(unsigned), "--public-key", str(public)])
    assert result.exit_code == 2 and "not a signed bundle" in result.output
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--require-signature"])
    assert result.exit_code == 2 and "--require-signature needs --public-key" in result.output
    result = CliRunner().invoke(cli, ["build", "--sign-key", str(tmp_path / "missing.pem")])
    assert result.exit_code == 2 and "--sign-key" in result.output
    (tmp_path / "junk.pem").write_text("not a key\n")
    result = CliRunner().invoke(cli, ["build", "--sign-key", str(tmp_path / "junk.pem")])
    assert result.exit_code == 2 and "not an unencrypted PEM key" in result.output
