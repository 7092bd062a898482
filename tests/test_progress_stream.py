"""Long steps say how far they have got: the decoder harness's ``--progress`` lines on stderr, the
host reading them live from a child (what ``verify --emulate`` does under qemu), and the
``Progress.advance`` line that shows them.

The streaming runs a plain host Python child (no qemu needed): the same function runs the guest.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from decoder_factory import build_tiny_decoder
from rich.console import Console

from edgepack.device.stream import run_streaming, supports_flag
from edgepack.progress import Progress, advance_text

HANG_GUARD_S = 600


@pytest.fixture(scope="module")
def decoder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("llm-progress")).folder


def _progress_lines(stderr: str) -> list[tuple[int, int]]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("progress "):
            done, total = line.split()[1].split("/")
            found.append((int(done), int(total)))
    return found


def test_the_harness_reports_each_step_on_stderr_and_keeps_stdout_json(
    decoder_bundle: Path,
) -> None:
    """One line per graph call: each prompt's forced pass and each free greedy token."""
    cmd = [sys.executable, str(decoder_bundle / "bench.py"), "--check-only"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S)
    shown = subprocess.run(
        [*cmd, "--progress"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)  # nothing but the report on stdout
    assert report["check"]["passed"] is True
    assert _progress_lines(plain.stderr) == []  # only when asked
    lines = _progress_lines(shown.stderr)
    ref = json.loads((decoder_bundle / "reference.json").read_text())
    total = len(ref["prompts"]) + sum(len(p["continuation"]) for p in ref["prompts"])
    assert {t for _, t in lines} == {total}
    assert [d for d, _ in lines] == sorted({d for d, _ in lines})  # strictly increasing
    assert lines[-1] == (total, total)
    assert json.loads(plain.stdout)["check"] == report["check"]  # progress changes no figure


def test_streaming_hands_over_progress_while_the_child_runs(decoder_bundle: Path) -> None:
    """Each progress line reaches the callback as the harness writes it: the tiny bundle's own
    bench.py, on the host Python, through the function ``verify --emulate`` runs qemu with."""
    seen: list[tuple[int, int, str]] = []
    bench = decoder_bundle / "bench.py"
    assert supports_flag(bench, "--progress")
    proc = run_streaming(
        [sys.executable, str(bench), "--check-only", "--progress"],
        None,
        HANG_GUARD_S,
        lambda done, total, what: seen.append((done, total, what)),
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["check"]["passed"] is True
    assert "progress " not in proc.stderr  # consumed, not left for the error message
    assert seen and seen[-1][0] == seen[-1][1] and "prompt 4/4" in seen[-1][2]


def test_streaming_is_live_not_read_after_the_child_exits(tmp_path: Path) -> None:
    """The child waits, after its first progress line, for a file only the callback writes: a
    reader that collected stderr at exit would leave it waiting (exit 3)."""
    go = tmp_path / "go"
    child = (
        "import os, sys, time\n"
        "sys.stderr.write('progress 1/2 first\\n'); sys.stderr.flush()\n"
        f"deadline = time.time() + {HANG_GUARD_S}\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    if time.time() > deadline: sys.exit(3)\n"
        "    time.sleep(0.05)\n"
        "sys.stderr.write('warning: a line that is not progress\\n')\n"
        "sys.stderr.write('progress 2/2 second\\n')\n"
        "print('{\"ok\": true}')\n"
    )
    seen: list[tuple[int, int, str]] = []

    def on_progress(done: int, total: int, what: str) -> None:
        seen.append((done, total, what))
        go.touch()

    proc = run_streaming([sys.executable, "-c", child], None, HANG_GUARD_S * 2, on_progress)
    assert proc.returncode == 0
    assert seen == [(1, 2, "first"), (2, 2, "second")]
    assert json.loads(proc.stdout) == {"ok": True}
    assert proc.stderr == "warning: a line that is not progress\n"


def test_a_bundle_harness_without_the_flag_is_run_without_it(tmp_path: Path) -> None:
    """A bundle built before ``--progress`` existed would refuse the flag (exit 2)."""
    old = tmp_path / "bench.py"
    old.write_text('p.add_argument("--check-only", action="store_true")\n')
    assert not supports_flag(old, "--progress")
    assert not supports_flag(tmp_path / "missing.py", "--progress")


def test_advance_renders_done_of_total_elapsed_and_remaining() -> None:
    assert advance_text(37, 128, 252.0, "positions", 620.4) == (
        "37/128 positions, 4m12s elapsed, ~10m20s left"
    )
    assert advance_text(128, 128, 3725.0, "", 0.0) == "128/128, 1h02m elapsed"  # done
    assert advance_text(1, 5, 3.0) == "1/5, 3s elapsed"  # no pace known yet: no estimate


def test_advance_prints_on_a_stage_line_off_a_terminal() -> None:
    """Off a terminal (CI logs) the spinner is invisible: the first and last advance print."""
    progress = Progress()
    out = io.StringIO()
    progress.console = Console(file=out, force_terminal=False, highlight=False)
    with progress.stage("fidelity", "3 held-out texts"):
        for done in range(1, 4):
            progress.advance(done, 3, "batches")
    text = out.getvalue()
    assert "fidelity: 1/3 batches, 0s elapsed\n" in text  # one step: no pace to go by yet
    assert "fidelity: 3/3 batches" in text
    assert "2/3" not in text  # within LOG_EVERY_S of the first: not every step floods the log


def test_the_estimate_is_the_pace_since_the_first_step() -> None:
    """Setup before the first step is not counted as a step's cost."""
    progress = Progress()
    out = io.StringIO()
    progress.console = Console(file=out, force_terminal=False, highlight=False, width=200)
    with progress.stage("check"):
        progress.advance(1, 4)
        progress._logged = -1e9  # print the next line too, though it comes at once
        progress.advance(3, 4)
    assert re.search(r"check: 3/4, \d+s elapsed, ~\d+s left", out.getvalue()), out.getvalue()


def test_the_encoder_harness_counts_its_inferences(tmp_path: Path) -> None:
    """bench.py with the emulated check's flags: the first run, the check, one timed run."""
    from test_harness_integrity import full_bundle

    bench = full_bundle(tmp_path) / "bench.py"
    assert supports_flag(bench, "--progress")
    seen: list[tuple[int, int, str]] = []
    out = tmp_path / "r.json"
    args = ["--warmup", "0", "--runs", "1", "--quiet", "--progress", "--json", str(out)]
    proc = run_streaming(
        [sys.executable, str(bench), *args],
        None,
        HANG_GUARD_S,
        lambda done, total, what: seen.append((done, total, what)),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "progress" not in proc.stderr
    assert seen == [(1, 3, "inferences"), (2, 3, "inferences"), (3, 3, "inferences")]
    assert json.loads(out.read_text())["check"]["passed"] is True


def test_each_stage_reports_its_own_peak_memory() -> None:
    """The peak is reset as a stage starts: a stage that holds 400 MB reports it, and the small
    stage after it does not inherit it (on Linux, where /proc/self/clear_refs allows the reset)."""
    import numpy as np

    from edgepack.memory import CLEAR_REFS
    from edgepack.progress import Progress

    progress = Progress(quiet=True)
    with progress.stage("big"):
        block = np.ones(50_000_000)  # 400 MB, touched
        del block
    with progress.stage("small"):
        pass
    peaks = progress.resources()["stage_peak_rss_mb"]
    assert peaks["big"] > 400
    if CLEAR_REFS.exists():
        assert peaks["small"] < peaks["big"] - 300
