"""A content-addressed cache around stages, so rebuilding for another target skips export.

Key = sha256(stage name, canonical JSON of its settings, input digest). The cache is shared by
concurrent builds (two terminals, a CI matrix), so an entry is built in a private temporary folder
beside its final one and published by one atomic rename, with ``artifact.json`` written last: a
folder at the final name always holds a complete entry. A per-key lock makes a second build of the
same key wait for the first and reuse its result instead of computing it again.

The lock is flock(2) on ``<stage>/<key>.lock``: the kernel releases it when its holder dies,
however it dies, so a killed build never blocks another. The holder writes who it is into the
file and touches it every HEARTBEAT seconds; a waiter prints who it waits for, and gives up
(UserError) once the holder has shown no heartbeat for EDGEPACK_LOCK_TIMEOUT seconds, i.e. it is
stopped (Ctrl-Z, SIGSTOP) or hung: a holder that is working is waited for however long its stage
takes. The holder removes the lock file before unlocking it, so lock files do not pile up; a
waiter that then gets the removed file sees it is no longer the one at the path and locks that
one instead, which keeps one holder per key.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from edgepack.artifacts import HFModel, OnnxModel, canonical_json, load_record, save_record
from edgepack.errors import UserError

R = TypeVar("R", HFModel, OnnxModel)
TMP_PREFIX = ".tmp-"  # ".tmp-<key>-<pid>-<random>": globbed by _clean_stale, never a key (hex)
LOCK_TIMEOUT_ENV = "EDGEPACK_LOCK_TIMEOUT"
# Seconds without a heartbeat before a waiting build gives up. A working holder touches its lock
# file every HEARTBEAT seconds from a thread, which a long C call holding the GIL (serializing a
# large ONNX model takes seconds) can delay; five minutes of silence means stopped or hung, and is
# still short enough that a CI job waiting on a stopped build fails well before its own timeout.
DEFAULT_LOCK_TIMEOUT = 300.0
HEARTBEAT = 1.0
REPORT_EVERY = 30.0  # seconds between "waiting for ..." lines


def cache_root() -> Path:
    return Path(os.environ.get("EDGEPACK_CACHE") or Path.home() / ".cache" / "edgepack")


def stage_key(stage: str, settings: Any, input_digest: str) -> str:
    return hashlib.sha256(canonical_json([stage, settings, input_digest]).encode()).hexdigest()[:32]


def cached(
    stage: str,
    settings: Any,
    input_digest: str,
    cls: type[R],
    make: Callable[[Path], R],
    enabled: bool = True,
) -> tuple[R, bool]:
    """Run ``make(out_dir)`` unless an equal run finished before; returns (record, was_cached).

    ``enabled=False`` recomputes and replaces the entry. A build that finds another one making the
    same key waits, saying for whom, and returns its record as cached (see the module docstring
    for when it gives up).
    """
    key = stage_key(stage, settings, input_digest)
    stage_dir = cache_root() / stage
    final = stage_dir / key
    if enabled and (hit := _load(cls, final)) is not None:  # published entries never change
        return hit, True
    stage_dir.mkdir(parents=True, exist_ok=True)
    with _key_lock(stage_dir, key, stage):
        _clean_stale(stage_dir, key)
        if enabled and (hit := _load(cls, final)) is not None:  # made while we waited
            return hit, True
        tmp = _private(stage_dir, key)
        tmp.mkdir()
        try:
            record = _moved(make(tmp), tmp, final)
            save_record(record, tmp)  # last: only a complete entry has artifact.json
            _publish(tmp, final, stage_dir, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return record, False


def lookup(stage: str, settings: Any, input_digest: str, cls: type[R]) -> R | None:
    """The published entry ``cached`` would return, or None: for callers whose checks before the
    stage cost more than the hit (a GGUF's metadata takes seconds to parse)."""
    return _load(cls, cache_root() / stage / stage_key(stage, settings, input_digest))


def _load(cls: type[R], folder: Path) -> R | None:
    """The entry's record, or None if there is none (an entry being replaced may vanish)."""
    try:
        return load_record(cls, folder)
    except FileNotFoundError:
        return None


def _private(stage_dir: Path, key: str) -> Path:
    """A fresh name beside the entries (same filesystem, so renames are atomic)."""
    return stage_dir / f"{TMP_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"


def _publish(tmp: Path, final: Path, stage_dir: Path, key: str) -> None:
    """Rename ``tmp`` to ``final``; an older folder there (replaced, or left without
    artifact.json by an older edgepack) is first moved aside, since rename needs an empty target.
    Called under the key's lock, so nothing else publishes or moves ``final`` meanwhile."""
    old = None
    if final.exists():
        old = _private(stage_dir, key)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _moved(record: R, tmp: Path, final: Path) -> R:
    """``record`` with the paths ``make`` wrote into ``tmp`` pointing into ``final`` instead.

    Records hold absolute paths (OnnxModel.path, HFModel.path and its ``source``, which
    load_model sets to the resolved folder), so the rename would leave them dangling. Nested
    values (``records``, ``history``) are rewritten too; the resolved spelling of ``tmp`` is
    matched as well, because load_model resolves symlinks in the cache root.
    """
    prefixes = {str(tmp): str(final), str(tmp.resolve()): str(final.parent.resolve() / final.name)}

    def fix(value: Any) -> Any:
        if isinstance(value, Path):
            return Path(fix(str(value)))
        if isinstance(value, str):
            for old, new in prefixes.items():
                if value == old or value.startswith(old + os.sep):
                    return new + value[len(old) :]
            return value
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(fix(v) for v in value)
        return value

    return dataclasses.replace(
        record, **{f.name: fix(getattr(record, f.name)) for f in dataclasses.fields(record)}
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clean_stale(stage_dir: Path, key: str) -> None:
    """Remove temporary folders of builds that were killed (SIGKILL, power loss), and their lock
    files.

    Called holding ``key``'s lock, so this key's temporary folders are all stale. Another key's is
    removed only if its pid is dead *and* its lock is free: a live build in another pid namespace
    (a container sharing the cache) may look dead here, but it holds its lock.
    """
    for tmp in stage_dir.glob(TMP_PREFIX + "*"):
        other, _, rest = tmp.name[len(TMP_PREFIX) :].partition("-")
        pid = rest.split("-", 1)[0]
        if other == key:
            shutil.rmtree(tmp, ignore_errors=True)
        elif (
            pid.isdigit()
            and not _pid_alive(int(pid))
            and (fd := _try_lock(stage_dir / f"{other}.lock")) is not None
        ):
            shutil.rmtree(tmp, ignore_errors=True)
            _release(fd, stage_dir / f"{other}.lock")
    for lock in stage_dir.glob("*.lock"):  # left by killed holders; a held one stays
        if lock.stem != key and (fd := _try_lock(lock)) is not None:
            _release(fd, lock)


def lock_timeout() -> float:
    """EDGEPACK_LOCK_TIMEOUT in seconds, or the default when it is unset."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(
            f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds; give one such as 600, "
            f"or unset it for the default {DEFAULT_LOCK_TIMEOUT:.0f}."
        )
    return value


def _flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _at_path(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a holder may have removed it)."""
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _try_lock(path: Path) -> int | None:
    """The lock on ``path`` if it is free right now, else None."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if _flock(fd) and _at_path(fd, path):
        return fd
    os.close(fd)
    return None


def _release(fd: int, path: Path) -> None:
    """Remove the lock file, then unlock it (closing does): see the module docstring."""
    try:
        if _at_path(fd, path):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def _key_lock(stage_dir: Path, key: str, stage: str) -> Iterator[None]:
    """Hold ``key``'s lock, saying who holds it and touching it while the block runs."""
    path, timeout, wait = stage_dir / f"{key}.lock", lock_timeout(), None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not _flock(fd):
                wait = wait or _Wait(stage, key, timeout)
                wait.check(fd)
            if _at_path(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed by its last holder while this build waited: lock the new file
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fd, stop), daemon=True)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        beat.start()
        yield
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        _release(fd, path)


def _heartbeat(fd: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        with suppress(OSError):
            os.utime(fd)


class _Wait:
    """Waiting for another build's lock: who holds it, since when, and whether it still beats."""

    def __init__(self, stage: str, key: str, timeout: float) -> None:
        self.stage, self.key, self.timeout = stage, key, timeout
        self.start = self.beat_at = time.monotonic()
        self.beat, self.reported, self.pause = -1, -math.inf, 0.05

    def check(self, fd: int) -> None:
        """Sleep a little; print who holds the lock now and then; give up on a silent holder."""
        now = time.monotonic()
        if (mtime := os.fstat(fd).st_mtime_ns) != self.beat:
            self.beat, self.beat_at = mtime, now
        holder, pid = _describe(fd)
        if now - self.beat_at >= self.timeout:
            raise UserError(
                f"gave up waiting for the {self.stage} cache entry {self.key[:12]}: the build "
                f"holding it ({holder}) has shown no sign of progress for "
                f"{now - self.beat_at:.0f} s ({LOCK_TIMEOUT_ENV}={self.timeout:g}); resume it "
                f"(kill -CONT {pid}) or end it, then build again, or raise {LOCK_TIMEOUT_ENV}."
            )
        if now - self.reported >= REPORT_EVERY:
            self.reported = now
            print(
                f"  waiting for the {self.stage} cache entry {self.key[:12]}, which another "
                f"build is making ({holder}); waited {now - self.start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, 0.5)


def _describe(fd: int) -> tuple[str, str]:
    """("pid N on HOST since HH:MM:SS[, stopped]", "N") from what the holder wrote into its lock
    file; a holder that has not written it yet (it just took the lock) is described as such."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        pid, host, since = int(holder["pid"]), str(holder["host"]), float(holder["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not said who it is yet", "<its pid>"
    text = f"pid {pid} on {host} since {time.strftime('%H:%M:%S', time.localtime(since))}"
    if host == socket.gethostname():
        with suppress(OSError, IndexError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            text += ", stopped" if state in ("T", "t") else ""
    return text, str(pid)
