"""Kill real builds part-way: no partial bundle is ever visible, and a rerun succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STAGES = ("load", "export", "validate", "quantize", "fidelity", "package")


def _start(model: Path, texts: Path, out: Path, cache: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "EDGEPACK_CACHE": str(cache), "COLUMNS": "200"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgepack.cli",
            "build",
            "--model",
            str(model),
            "--calibration",
            str(texts),
            "--samples",
            "40",
            "--target",
            "arm64",
            "--out",
            str(out),
            "--min-cosine",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A shell without job control starts background jobs with SIGINT ignored, and Python
        # then never raises KeyboardInterrupt; give the build a terminal's default, as Ctrl-C has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _visible(out: Path) -> list[str]:
    """Bundles in the output folder (the build report beside them is rewritten by each build)."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir() if not p.name.startswith((".", "report")))


def _kill_during(
    stage: str, how: signal.Signals, model: Path, texts: Path, out: Path, cache: Path
) -> tuple[int, str]:
    """Start a build and send ``how`` while ``stage`` runs; returns (exit code, stderr).

    Stage lines are printed when a stage ends, so the signal goes out once the stage before has
    ended; for packaging, once its private staging folder appears (packaging a tiny model takes
    well under a second, and the line of the stage before can arrive late through the pipe).
    """
    proc = _start(model, texts, out, cache)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    before = STAGES[STAGES.index(stage) - 1]

    def started() -> bool:
        if stage == "package":
            return out.exists() and any(out.glob(".edgepack-tmp-*"))
        return any(f"✓ {before}" in x for x in lines)

    while not started() and proc.poll() is None:
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.01)
    assert proc.poll() is None, f"build ended before {stage}: {''.join(lines)}"
    proc.send_signal(how)
    code = proc.wait(timeout=60)
    reader.join(timeout=10)
    return code, "".join(lines)


@pytest.mark.parametrize(
    ("how", "stage"),
    [(signal.SIGKILL, "export"), (signal.SIGINT, "quantize"), (signal.SIGKILL, "package")],
)
def test_kill_during_a_stage_leaves_no_partial_bundle(
    stage: str, how: signal.Signals, tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    for attempt in range(3):  # a signal that lands after packaging finished tests nothing here
        out, cache = tmp_path / f"dist{attempt}", tmp_path / f"cache{attempt}"
        code, seen = _kill_during(stage, how, tiny_st, texts_file, out, cache)
        if "✓ package" not in seen:
            break
    assert "✓ package" not in seen, "the signal never landed before packaging finished"
    assert code != 0
    if how == signal.SIGINT:
        assert "Interrupted" in seen
        assert "Traceback" not in seen
    assert _visible(out) == []  # neither the folder nor the tar.gz
    rerun = _start(tiny_st, texts_file, out, cache)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert _visible(out) == [f"{tiny_st.name}-arm64", f"{tiny_st.name}-arm64.tar.gz"]
    assert not list(out.glob(".edgepack-tmp-*"))  # stale temp folders were swept
    assert (
        subprocess.run(
            [sys.executable, "-m", "edgepack.cli", "verify", str(out / f"{tiny_st.name}-arm64")]
        ).returncode
        == 0
    )
