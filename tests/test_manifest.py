from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgepack.bundle.manifest import read_manifest, verify, write_manifest, write_sums
from edgepack.errors import BundleTampered, UserError


def _bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "b"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"model")
    (folder / "sub" / "x.txt").write_text("x")
    write_manifest(folder, {"model": {"file": "model.onnx"}})
    write_sums(folder)
    return folder


def test_sums_cover_every_file_sorted_and_coreutils_agrees(tmp_path: Path) -> None:
    folder = _bundle(tmp_path)
    names = [line.split("  ", 1)[1] for line in (folder / "SHA256SUMS").read_text().splitlines()]
    assert names == ["manifest.json", "model.onnx", "sub/x.txt"]
    assert verify(folder) == 3
    done = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True)
    assert done.returncode == 0


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ("change", "model.onnx was changed after build"),
        ("remove", "sub/x.txt is missing"),
        ("add", "file extra.bin is not listed"),
    ],
)
def test_tampering_is_named(tmp_path: Path, action: str, message: str) -> None:
    folder = _bundle(tmp_path)
    if action == "change":
        (folder / "model.onnx").write_bytes(b"evil!")
    elif action == "remove":
        (folder / "sub" / "x.txt").unlink()
    else:
        (folder / "extra.bin").write_bytes(b"")
    with pytest.raises(BundleTampered, match=message):
        verify(folder)


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    folder = _bundle(tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    assert read_manifest(folder)["schema_version"] == 1
    data["schema_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="schema version 99 is not supported"):
        read_manifest(folder)
