"""The command line: exit codes and one-line messages, and a light start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_targets_lists_every_profile() -> None:
    code, output = run("targets")
    assert code == 0
    for name in ("cpu ", "cpu-vnni", "arm64", "android", "ios"):
        assert name in output
    assert "alias: mobile" in output


def test_help_and_targets_do_not_import_torch() -> None:
    code = (
        "import sys; from edgepack.cli import cli\n"
        "try:\n    cli(['targets'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "--target", "arm46"], "unknown target 'arm46'"),
        (["build", "--model", "/no/such/model"], "model path /no/such/model does not exist"),
        (["build", "--config", "/no/such.toml"], "build config /no/such.toml does not exist"),
        (["build", "--samples", "100000"], "fewer than --samples 100000"),
        (["build", "--target", "/no/such/profile.toml"], "does not exist"),
        (["verify", "/no/such/bundle"], "is not a bundle"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    code, output = run(*args, *(["--out", str(tmp_path)] if args[0] == "build" else []))
    assert code == 2
    assert message in output
    assert output.startswith("Error: ") and output.count("\n") == 1
    assert "Traceback" not in output
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_empty_calibration_file(tmp_path: Path, tiny_st: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, output = run(
        "build", "--model", str(tiny_st), "--calibration", str(empty), "--out", str(tmp_path / "d")
    )
    assert code == 2 and "holds no texts" in output


def test_debug_shows_the_traceback() -> None:
    result = CliRunner().invoke(cli, ["--debug", "build", "--target", "nope"])
    assert result.exit_code != 0
    assert result.exception is not None and "unknown target" in str(result.exception)


def test_console_script_is_installed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "build" in done.stdout
