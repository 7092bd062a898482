"""A build that fills the disk leaves the output folder as it was, on a real full filesystem."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs with 64 KiB free: room for folders and small files, not for a bundle."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(filler, filler.stat().st_size - 16 * 4096)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("out", ["dist", "a/b/dist"])
def test_a_full_disk_removes_the_output_folders_the_build_made(
    out: str, full_disk: Path, tiny_st: Path, texts_file: Path
) -> None:
    args = ["build", "--model", str(tiny_st), "--calibration", str(texts_file), "--samples", "40"]
    args += ["--target", "arm64", "--min-cosine", "0.5", "--out", str(full_disk / out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "No space left on device; nothing was kept." in result.output
    assert _tree(full_disk) == ["filler"]


def test_a_full_disk_leaves_an_existing_output_folder_as_it_was(
    full_disk: Path, tiny_st: Path, texts_file: Path
) -> None:
    (full_disk / "dist" / "old-bundle").mkdir(parents=True)
    (full_disk / "dist" / "old-bundle" / "model.onnx").write_bytes(b"an earlier build's")
    (full_disk / "dist" / "empty").mkdir()
    before = _tree(full_disk)
    args = ["build", "--model", str(tiny_st), "--calibration", str(texts_file), "--samples", "40"]
    args += ["--target", "arm64", "--min-cosine", "0.5", "--out", str(full_disk / "dist")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "No space left on device; nothing was kept." in result.output
    assert _tree(full_disk) == before
    assert (full_disk / "dist" / "old-bundle" / "model.onnx").read_bytes() == b"an earlier build's"
