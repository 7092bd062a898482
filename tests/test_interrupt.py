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


# A build whose Progress pauses on entering the Nth run of one stage (after touching a marker
# file) until a signal ends it: the signal then lands inside that stage however loaded the machine
# is, where waiting for a line of output races a stage that takes a fraction of a second.
PAUSING = r"""
import sys, time
from contextlib import contextmanager
from pathlib import Path
from edgepack.progress import Progress

name, nth, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
real, seen = Progress.stage, []

@contextmanager
def stage(self, stage_name, detail=""):
    if stage_name == name:
        seen.append(detail)
        if len(seen) == nth:
            marker.touch()
            time.sleep(600)
    with real(self, stage_name, detail):
        yield

Progress.stage = stage
sys.argv = ["edgepack", *sys.argv[4:]]
from edgepack.cli import main
main()
"""


def _interrupt_at(
    stage: str, nth: int, how: signal.Signals, args: list[str], cache: Path, tmp: Path
) -> tuple[int, str]:
    """Run ``edgepack build ARGS`` paused in its ``nth`` ``stage``, send ``how``; (code, stderr)."""
    marker = tmp / f"paused-{stage}-{nth}"
    env = {**os.environ, "EDGEPACK_CACHE": str(cache), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING, stage, str(nth), str(marker), "build", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600  # guards against a hang only
    while not marker.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    assert proc.poll() is None, f"build ended before its {stage} stage: {''.join(lines)}"
    proc.send_signal(how)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    return code, "".join(lines)


def _everything(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def _encoder_args(model: Path, texts: Path, out: Path) -> list[str]:
    return [
        "--model", str(model), "--calibration", str(texts), "--samples", "40",
        "--target", "arm64", "--out", str(out), "--min-cosine", "0.5",
    ]  # fmt: skip


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_measuring_latency_publishes_nothing(
    how: signal.Signals, tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    """The bundle is complete by then, but the build is not: the exit message says nothing was
    written, so nothing may be; the rerun then needs no --force."""
    out, cache = tmp_path / "dist", tmp_path / "cache"
    args = _encoder_args(tiny_st, texts_file, out)
    code, seen = _interrupt_at("latency", 1, how, args, cache, tmp_path)
    assert code == 128 + how, seen
    assert "✓ package" in seen  # the signal came after packaging
    assert "Interrupted; nothing was written to the output folder." in seen
    assert "Traceback" not in seen
    assert _everything(out) == []  # no bundle, archive, report, temporary folder or dist/ itself
    rerun = _start(tiny_st, texts_file, out, cache)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert _visible(out) == [f"{tiny_st.name}-arm64", f"{tiny_st.name}-arm64.tar.gz"]
    assert (out / "report.md").is_file()


def test_an_interrupt_between_two_decoder_bundles_publishes_neither(tmp_path: Path) -> None:
    """A matrix build stopped after its first bundle was packaged leaves none of them."""
    from conftest import write_texts
    from decoder_factory import make_tiny_decoder

    model = make_tiny_decoder(tmp_path / "llama", "llama")
    texts = write_texts(tmp_path / "texts.txt", 40)
    out, cache = tmp_path / "dist", tmp_path / "cache"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")  # a dist/ that was there stays
    args = ["--model", str(model), "--calibration", str(texts), "--heldout", str(texts)]
    args += ["--precision", "int8", "--max-drop", "0.2", "--target", "all", "--out", str(out)]
    code, seen = _interrupt_at("package", 2, signal.SIGINT, args, cache, tmp_path)
    assert code == 130, seen
    assert seen.count("✓ package") == 1  # one bundle was complete when the signal came
    assert "Interrupted; nothing was written to the output folder." in seen
    assert _everything(out) == ["mine.txt"]
    rerun = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "build", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGEPACK_CACHE": str(cache)},
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert len(rerun.stdout.split()) >= 2  # a .tar.gz per target that fits a decoder
    assert all(Path(tar).is_file() for tar in rerun.stdout.split())


def test_a_signal_during_publishing_is_raised_after_it_naming_what_was_published(
    tmp_path: Path,
) -> None:
    """The final renames run with SIGINT held: all of them happen, then the interrupt, whose
    message can name every published path. A worker thread is alive, as torch's and
    onnxruntime's are in a build: holding the signal with a thread mask let the kernel hand it to
    the worker, and the interrupt then landed between two renames."""
    from edgepack.bundle import Outbox
    from edgepack.errors import Interrupted

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()

    out = tmp_path / "dist"
    with pytest.raises(Interrupted) as raised, Outbox(out, force=False) as box:
        for name in ("m-a", "m-b"):
            with box.bundle(name) as tmp:
                (tmp / name).mkdir()
                (tmp / name / "f").write_text(name)
                (tmp / f"{name}.tar.gz").write_text("tar")
                (tmp / "work.onnx").write_text("an intermediate file")
        real = os.replace

        def replace_then_interrupt(src: str | Path, dst: str | Path) -> None:
            real(src, dst)
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C right after the first rename

        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(os, "replace", replace_then_interrupt)
                box.publish()
        finally:
            stop.set()
            worker.join()
    assert _everything(out) == ["m-a", "m-a.tar.gz", "m-b", "m-b.tar.gz"]
    assert sorted(p.name for p in raised.value.published) == _everything(out)


def test_an_interrupt_while_a_decoder_build_measures_speed_publishes_nothing(
    tmp_path: Path,
) -> None:
    """A decoder build measures host speed after packaging, as an encoder build measures
    latency: stopped there, it has published nothing either."""
    from conftest import write_texts
    from decoder_factory import make_tiny_decoder

    model = make_tiny_decoder(tmp_path / "llama", "llama")
    texts = write_texts(tmp_path / "texts.txt", 40)
    out, cache = tmp_path / "dist", tmp_path / "cache"
    args = ["--model", str(model), "--calibration", str(texts), "--heldout", str(texts)]
    args += ["--precision", "int8", "--max-drop", "0.2", "--target", "arm64", "--out", str(out)]
    code, seen = _interrupt_at("speed", 1, signal.SIGINT, args, cache, tmp_path)
    assert code == 130, seen
    assert "✓ package" in seen
    assert "Interrupted; nothing was written to the output folder." in seen
    assert _everything(out) == []
