"""A content-addressed cache around stages, so rebuilding for another target skips export.

Key = sha256(stage name, canonical JSON of its settings, input digest). ``artifact.json`` is
written last, so a folder without it is an interrupted run and is redone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgepack.artifacts import HFModel, OnnxModel, canonical_json, load_record, save_record

R = TypeVar("R", HFModel, OnnxModel)


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
    """Run ``make(out_dir)`` unless an equal run finished before; returns (record, was_cached)."""
    out_dir = cache_root() / stage / stage_key(stage, settings, input_digest)
    if enabled and (out_dir / "artifact.json").is_file():
        return load_record(cls, out_dir), True
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    try:
        record = make(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    save_record(record, out_dir)
    return record, False
