"""Input refused before any work, and a report that is written whole or not at all.

Each case was accepted, or failed late with a traceback, before these guards: an output path that
is a file or the filesystem root, a bundle name that leaves the output folder, NaN that switches
a gate off, a full disk while the report is written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli


def build(tiny_st: Path, texts_file: Path, out: Path | str, *extra: str) -> tuple[int, str]:
    args = ["build", "--model", str(tiny_st), "--calibration", str(texts_file), "--samples", "40"]
    args += ["--target", "cpu", "--out", str(out), "--max-drop", "-1", "--quiet", *extra]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


@pytest.mark.parametrize("where", ["a file", "the root", "the home folder"])
def test_out_is_refused_before_any_work(
    tiny_st: Path, texts_file: Path, tmp_path: Path, where: str
) -> None:
    out = {"a file": tmp_path / "f", "the root": Path("/"), "the home folder": Path.home()}[where]
    if where == "a file":
        out.write_text("not a folder\n")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    code, output = build(tiny_st, texts_file, out)
    assert code == 2, output
    assert "--out" in output and "Traceback" not in output
    assert "export" not in output  # refused before the model was even exported
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


def test_bundle_name_must_stay_one_folder(tiny_st: Path, texts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    code, output = build(tiny_st, texts_file, out, "--name", "../escape")
    assert code == 2 and "cannot name a bundle folder" in output
    assert not (tmp_path / "escape-cpu").exists() and not (tmp_path / "escape-cpu.tar.gz").exists()


def test_profile_name_must_stay_one_folder(tiny_st: Path, texts_file: Path, tmp_path: Path) -> None:
    from edgepack.profiles import targets_dir

    text = (targets_dir() / "cpu.toml").read_text()
    profile = tmp_path / "mine.toml"
    profile.write_text(text.replace('name = "cpu"', 'name = "x/../../y"', 1))
    assert 'name = "x/../../y"' in profile.read_text()
    result = CliRunner().invoke(cli, ["build", "--target", str(profile)])
    assert result.exit_code == 2
    assert "target name 'x/../../y' cannot name a bundle folder" in result.output


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--min-cosine", "nan"], "--min-cosine"),
        (["--max-drop", "nan"], "--max-drop"),
        (["--time-budget", "inf"], "--time-budget"),
        (["--prune", "-inf"], "--prune"),
    ],
)
def test_nan_and_infinity_are_refused(
    tiny_st: Path, texts_file: Path, tmp_path: Path, flags: list[str], named: str
) -> None:
    code, output = build(tiny_st, texts_file, tmp_path / "dist", *flags)
    assert code == 2
    assert named in output and "not a finite number" in output
    assert not (tmp_path / "dist").exists()


def test_nan_in_a_build_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "build.toml"
    config.write_text("min_cosine = nan\n")
    result = CliRunner().invoke(cli, ["build", "--config", str(config)])
    assert result.exit_code == 2
    assert "min_cosine must be a finite number" in result.output


def test_other_commands_refuse_nan_too(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["prune", "--prune", "nan", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "not a finite number" in result.output


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 256 KiB tmpfs, nearly filled: a real ENOSPC, not a simulated one."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
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
        os.truncate(filler, filler.stat().st_size - 8 * 4096)  # 32 KiB left: less than a report
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_while_writing_the_report_leaves_no_half_report(
    tiny_st: Path, texts_file: Path, tmp_path: Path, full_disk: Path
) -> None:
    from edgepack.bundle import Outbox, read_manifest
    from edgepack.bundle.target import BuildResult
    from edgepack.errors import UserError
    from edgepack.pipeline import finish
    from edgepack.progress import Progress

    code, output = build(tiny_st, texts_file, tmp_path / "dist")
    assert code == 0, output
    folder = tmp_path / "dist" / f"{tiny_st.name}-cpu"
    model = folder / "model.onnx"
    result = BuildResult("cpu", folder, folder.with_suffix(".tar.gz"), read_manifest(folder), model)
    with (
        pytest.raises(UserError, match=r"could not write the build report .* No space left"),
        Outbox(full_disk, force=False) as box,
    ):
        finish([result], Progress(quiet=True), box)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # nothing half-written
    shutil.rmtree(tmp_path / "dist")
