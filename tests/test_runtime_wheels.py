"""``--with-runtime`` wheels: pip downloads the device's onnxruntime, numpy and tokenizers through
its own index."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from edgepack.bundle.wheels import download_runtime, pip_download_command
from edgepack.errors import UserError
from edgepack.profiles import list_targets, load_target

HOST_ORT = metadata.version("onnxruntime")
HOST_TOKENIZERS = metadata.version("tokenizers")


def download_or_skip(device: dict, dest: Path, version: str) -> list[str]:
    try:
        return download_runtime(device, dest, version)
    except UserError as exc:
        if "could not reach its package index" in str(exc):
            pytest.skip(f"package registry unreachable: {exc}")
        raise


@pytest.mark.slow
def test_arm64_profile_downloads_aarch64_onnxruntime_and_numpy(tmp_path: Path) -> None:
    device = load_target("arm64").section("device")
    names = download_or_skip(device, tmp_path / "wheels", HOST_ORT)
    ort = [n for n in names if n.startswith(f"onnxruntime-{HOST_ORT}-")]
    assert len(ort) == 1 and "aarch64" in ort[0] and "-cp311-" in ort[0], names
    numpy = [n for n in names if n.startswith("numpy-")]
    assert len(numpy) == 1 and "aarch64" in numpy[0], names
    # edgepack_runtime.py's tokenizer: the host's release, built for the device.
    tokenizers = [n for n in names if n.startswith(f"tokenizers-{HOST_TOKENIZERS}-")]
    assert len(tokenizers) == 1 and "aarch64" in tokenizers[0], names
    assert all(n.endswith(".whl") for n in names)
    # pip skips files already there, and the listing still names them.
    assert download_or_skip(device, tmp_path / "wheels", HOST_ORT) == names


@pytest.mark.slow
def test_unknown_onnxruntime_version_gives_pips_error_line(tmp_path: Path) -> None:
    device = load_target("arm64").section("device")
    with pytest.raises(UserError, match=r"onnxruntime==0\.0\.1 .*ERROR: ") as caught:
        download_or_skip(device, tmp_path, "0.0.1")
    assert "\n" not in str(caught.value)


def test_ios_profile_has_no_pip_wheels(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no pip_platforms") as caught:
        download_runtime(load_target("ios").section("device"), tmp_path / "w", HOST_ORT)
    assert "'ios'" in str(caught.value)
    assert not (tmp_path / "w").exists()


def test_missing_python_version_is_named(tmp_path: Path) -> None:
    device = {"os": "linux", "pip_platforms": ["manylinux_2_28_aarch64"]}
    with pytest.raises(UserError, match="python_version"):
        download_runtime(device, tmp_path, HOST_ORT)


@pytest.mark.parametrize("profile", list_targets(), ids=lambda p: p.name)
def test_every_profile_either_names_its_wheels_or_refuses(profile, tmp_path: Path) -> None:
    device = profile.section("device")
    if not device.get("pip_platforms") or "python_version" not in device:
        with pytest.raises(UserError):
            download_runtime(device, tmp_path, HOST_ORT)
        return
    cmd = pip_download_command(device["pip_platforms"], device["python_version"], tmp_path, "1.2.3")
    for tag in device["pip_platforms"]:
        assert cmd[cmd.index(tag) - 1] == "--platform"
    assert "--only-binary=:all:" in cmd and "onnxruntime==1.2.3" in cmd
    assert f"tokenizers=={HOST_TOKENIZERS}" in cmd
    # Python 3.8 devices get tokenizers' last release for 3.8, as requirements.txt says.
    old = pip_download_command(device["pip_platforms"], "3.8", tmp_path, "1.2.3")
    assert "tokenizers==0.20.3" in old
    assert not any("index" in arg for arg in cmd)  # pip's configured index, never a URL
