"""The stage cache under concurrent, failing and killed builds, with real processes.

Builds of the same model in two terminals or a CI matrix share one cache folder; these tests run
``cached()`` in separate Python processes (threads would share the pid and hide lock bugs).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgepack.artifacts import HFModel, load_record
from edgepack.cache import cached, stage_key

STAGE, SETTINGS, DIGEST = "export", {"v": 1}, "d" * 64
PARTS = 5
ARGS = json.dumps([STAGE, SETTINGS, DIGEST, PARTS])

# One build: make() logs its pid, then writes PARTS files slowly into <out>/model. With a
# "barrier" the process waits for <work>/go, so two builds call cached() at the same moment.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
from edgepack.artifacts import HFModel
from edgepack.cache import cached
from edgepack.errors import UserError

work, name, delay, barrier = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
stage, settings, digest, parts = json.loads(sys.argv[5])
recompute = len(sys.argv) > 6

def make(out):
    start = time.monotonic()
    with open(work / "runs.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    (out / "model").mkdir()
    (work / f"started-{name}").touch()
    for i in range(parts):
        (out / "model" / f"part{i}.txt").write_text(f"part {i}\n" * 1000)
        time.sleep(delay)
    with open(work / "spans.log", "a") as log:
        log.write(f"{start} {time.monotonic()}\n")
    return HFModel(out / "model", "feature-extraction", str(out / "model"), "transformers",
                   "0" * 64, "bert", 128)

if barrier == "1":
    (work / f"ready-{name}").touch()
    deadline = time.monotonic() + 30
    while not (work / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
try:
    record, hit = cached(stage, settings, digest, HFModel, make, enabled=not recompute)
except UserError as exc:
    print(f"Error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
print(json.dumps({"path": str(record.path), "source": record.source, "hit": hit}))
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def final_dir() -> Path:
    return Path(os.environ["EDGEPACK_CACHE"]) / STAGE / stage_key(STAGE, SETTINGS, DIGEST)


def temp_dirs() -> list[Path]:
    return sorted(final_dir().parent.glob(".tmp-*"))


def runs(work: Path) -> int:
    log = work / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def child(
    work: Path, name: str, delay: float, barrier: bool = False, recompute: bool = False
) -> subprocess.Popen[str]:
    # os.environ carries EDGEPACK_CACHE (monkeypatched) and PYTHONPATH to the child.
    args = [str(work), name, str(delay), "1" if barrier else "0", ARGS, *["1"] * recompute]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def assert_complete_entry() -> None:
    record = load_record(HFModel, final_dir())
    assert record.path == final_dir() / "model"
    assert record.source == str(final_dir() / "model")
    for i in range(PARTS):
        assert (record.path / f"part{i}.txt").read_text() == f"part {i}\n" * 1000
    assert temp_dirs() == []
    assert lock_files() == []  # each build removes its lock file: none pile up


def lock_files() -> list[Path]:
    return sorted(final_dir().parent.glob("*.lock"))


def test_two_concurrent_builds_make_the_entry_once_and_share_it(work: Path) -> None:
    procs = [child(work, name, 0.1, barrier=True) for name in "ab"]
    for name in "ab":
        wait_for(work / f"ready-{name}")
    (work / "go").touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    assert runs(work) == 1
    assert sorted(r["hit"] for r in results) == [False, True]
    for r in results:  # the builder's own record points into the final folder, not its temp one
        assert r["path"] == str(final_dir() / "model")
        assert r["source"] == str(final_dir() / "model")
    assert_complete_entry()


def test_a_failed_make_leaves_no_entry_and_never_touches_a_published_one(work: Path) -> None:
    seen: list[bool] = []

    def fail(out: Path) -> HFModel:
        (out / "half.txt").write_text("half")
        seen.append(final_dir().exists())  # a half-written entry is never at the final name
        raise RuntimeError("make failed")

    with pytest.raises(RuntimeError, match="make failed"):
        cached(STAGE, SETTINGS, DIGEST, HFModel, fail)
    assert seen == [False]
    assert not final_dir().exists()
    assert temp_dirs() == []

    # The lock was released: another process builds the entry at once.
    proc = child(work, "next", 0)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["hit"] is False
    assert runs(work) == 1
    assert_complete_entry()

    def interrupted(out: Path) -> HFModel:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached(STAGE, SETTINGS, DIGEST, HFModel, interrupted, enabled=False)
    assert_complete_entry()  # the published entry survives a failed rebuild


def test_a_killed_build_leaves_no_readable_entry_and_the_next_build_cleans_up(work: Path) -> None:
    proc = child(work, "killed", 0.5)
    wait_for(work / "started-killed")
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not final_dir().exists()
    assert len(temp_dirs()) == 1
    assert str(proc.pid) in temp_dirs()[0].name

    proc = child(work, "next", 0)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["hit"] is False
    assert runs(work) == 2
    assert_complete_entry()


def test_leftovers_of_dead_builds_and_older_versions_are_removed(work: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    stage_dir = final_dir().parent
    other = "f" * 32
    stale = stage_dir / f".tmp-{other}-{dead.pid}-0000"
    live = stage_dir / f".tmp-{other}-{os.getpid()}-0000"  # a build still running
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "half.txt").write_text("half")
    final_dir().mkdir()  # an older edgepack's interrupted entry: files but no artifact.json
    (final_dir() / "junk.txt").write_text("junk")
    killed_lock = stage_dir / f"{'e' * 32}.lock"  # a killed holder's lock file, free now
    killed_lock.write_text("")
    held_lock = stage_dir / f"{'c' * 32}.lock"  # another build's, held
    held = os.open(held_lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)

    proc = child(work, "next", 0)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["hit"] is False
    assert not stale.exists()
    assert (live / "half.txt").exists()
    assert not killed_lock.exists()
    assert held_lock.exists()  # never removed under a holder
    os.close(held)
    held_lock.unlink()
    live.rename(stage_dir.parent / "moved-live")  # out of the way of assert_complete_entry
    assert not (final_dir() / "junk.txt").exists()
    assert_complete_entry()


def test_builds_that_each_recompute_an_entry_take_turns(work: Path) -> None:
    """Mutual exclusion survives lock files being removed: a waiter that gets a removed file
    locks the one now at the path instead, so no two makes ever overlap."""
    procs = [child(work, name, 0.05, barrier=True, recompute=True) for name in "abcd"]
    for name in "abcd":
        wait_for(work / f"ready-{name}")
    (work / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    lines = (work / "spans.log").read_text().splitlines()
    spans = sorted(tuple(map(float, line.split())) for line in lines)
    assert len(spans) == 4
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans
    assert_complete_entry()


def test_a_stopped_lock_holder_makes_the_next_build_give_up_naming_it(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = child(work, "held", 0.2)
    wait_for(work / "started-held")
    os.kill(holder.pid, signal.SIGSTOP)  # Ctrl-Z in the other terminal
    monkeypatch.setenv("EDGEPACK_LOCK_TIMEOUT", "2")
    waiter = child(work, "waiter", 0)
    try:
        _, err = waiter.communicate(timeout=120)  # guards against the wait of old: forever
    finally:
        waiter.kill()
        os.kill(holder.pid, signal.SIGCONT)
    assert waiter.returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: gave up waiting for the export cache entry"), err
    assert f"pid {holder.pid} on {socket.gethostname()} since " in line and "stopped" in line
    assert f"kill -CONT {holder.pid}" in line and "EDGEPACK_LOCK_TIMEOUT" in line
    assert "waiting for the export cache entry" in err  # it said who it waited for meanwhile
    assert "Traceback" not in err
    assert runs(work) == 1  # the waiter never made the entry itself
    _, err = holder.communicate(timeout=60)
    assert holder.returncode == 0, err
    assert_complete_entry()


def test_a_working_holder_is_waited_for_past_the_timeout(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeout counts silence, not the holder's stage time: its heartbeat keeps a waiter."""
    holder = child(work, "held", 1.5)  # five parts: longer than the timeout
    wait_for(work / "started-held")
    monkeypatch.setenv("EDGEPACK_LOCK_TIMEOUT", "4")
    waiter = child(work, "waiter", 0)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert json.loads(out)["hit"] is True
    assert holder.wait(timeout=60) == 0
    assert runs(work) == 1
    assert_complete_entry()


@pytest.mark.parametrize("value", ["soon", "-5", "nan"])
def test_a_bad_lock_timeout_is_one_line(
    value: str, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEPACK_LOCK_TIMEOUT", value)
    proc = child(work, "bad", 0)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"EDGEPACK_LOCK_TIMEOUT={value!r} is not a number of seconds" in err


@pytest.mark.slow
def test_two_edgepack_builds_of_one_model_with_an_empty_cache_both_succeed(
    tiny_st: Path, texts_file: Path, tmp_path: Path
) -> None:
    """The reported case, end to end: two `edgepack build` processes, one shared empty cache."""
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    builds = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "edgepack.cli", "build", "--model", str(tiny_st)]
        cmd += ["--calibration", str(texts_file), "--samples", "40", "--target", "cpu"]
        cmd += ["--out", str(tmp_path / name), "--max-drop", "-1", "--quiet"]
        builds.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for build in builds:
        _, err = build.communicate(timeout=600)
        assert build.returncode == 0, err[-3000:]
    for name in ("a", "b"):
        assert (tmp_path / name / f"{tiny_st.name}-cpu.tar.gz").is_file()
    exports = [p for p in (tmp_path / "cache" / "export").iterdir() if p.is_dir()]
    assert len(exports) == 1 and (exports[0] / "artifact.json").is_file()
    first, second = (
        (tmp_path / n / f"{tiny_st.name}-cpu" / "model.onnx").read_bytes() for n in ("a", "b")
    )
    assert first == second
