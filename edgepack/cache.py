"""A content-addressed cache around stages, so rebuilding for another target skips export.

Key = sha256(stage name, canonical JSON of its settings, input digest). The cache is shared by
concurrent builds (two terminals, a CI matrix), so an entry is built in a private temporary folder
beside its final one and published by one atomic rename, with ``artifact.json`` written last: a
folder at the final name always holds a complete entry. A per-key lock makes a second build of the
same key wait for the first and reuse its result instead of computing it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from edgepack.artifacts import HFModel, OnnxModel, canonical_json, load_record, save_record

R = TypeVar("R", HFModel, OnnxModel)
TMP_PREFIX = ".tmp-"  # ".tmp-<key>-<pid>-<random>": globbed by _clean_stale, never a key (hex)


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
    same key waits (silently: the caller shows progress) and returns its record as cached.
    """
    key = stage_key(stage, settings, input_digest)
    stage_dir = cache_root() / stage
    final = stage_dir / key
    if enabled and (hit := _load(cls, final)) is not None:  # published entries never change
        return hit, True
    stage_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(stage_dir / f"{key}.lock"):
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
    """Remove temporary folders of builds that were killed (SIGKILL, power loss).

    Called holding ``key``'s lock, so this key's temporary folders are all stale. Another key's is
    removed only if its pid is dead *and* its lock is free: a live build in another pid namespace
    (a container sharing the cache) may look dead here, but it holds its lock.
    """
    for tmp in stage_dir.glob(TMP_PREFIX + "*"):
        other, _, rest = tmp.name[len(TMP_PREFIX) :].partition("-")
        pid = rest.split("-", 1)[0]
        if other == key:
            shutil.rmtree(tmp, ignore_errors=True)
        elif pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(Timeout), FileLock(stage_dir / f"{other}.lock", timeout=0):
                shutil.rmtree(tmp, ignore_errors=True)
