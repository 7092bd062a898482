"""Rebuild a bundle from its manifest and say whether the result is byte-for-byte the same.

The manifest records the full build config, the source weights' digest and the tool versions, so a
rebuild on the same inputs must reproduce every file hash; anything else means an input changed.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgepack.bundle import VOLATILE_KEYS, read_manifest
from edgepack.config import BuildConfig, overlay
from edgepack.errors import UserError
from edgepack.profiles import builtin_targets
from edgepack.progress import Progress


def _config_from(manifest: dict[str, Any]) -> BuildConfig:
    recorded = dict(manifest.get("build", {}).get("config", {}))
    if not recorded:
        raise UserError("the manifest has no build.config; it cannot be rebuilt.")
    target = manifest["target"]["name"]
    if target not in builtin_targets():
        raise UserError(f"target {target!r} is not a built-in profile; rebuild with --target FILE.")
    return replace(overlay(BuildConfig(), recorded, "manifest"), target=target, force=True)


def rebuild(bundle: Path, target_file: str | None, progress: Progress) -> list[str]:
    """Build again into a temporary folder; returns the differences (empty when identical)."""
    from edgepack.pipeline import build

    folder = bundle.parent if bundle.name == "manifest.json" else bundle
    old = read_manifest(folder)
    config = (
        _config_from(old)
        if target_file is None
        else replace(
            overlay(BuildConfig(), old["build"]["config"], "manifest"),
            target=target_file,
            force=True,
        )
    )
    old_sums = (folder / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    with tempfile.TemporaryDirectory(prefix="edgepack-rebuild-") as tmp:
        (result,) = build(replace(config, out=tmp), progress)
        new = read_manifest(result.folder)
        new_sums = (result.folder / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    diffs = []
    old_files = dict(line.split("  ", 1)[::-1] for line in old_sums)
    new_files = dict(line.split("  ", 1)[::-1] for line in new_sums)
    for name in sorted(set(old_files) | set(new_files)):
        if name == "manifest.json":
            continue
        if old_files.get(name) != new_files.get(name):
            diffs.append(
                f"{name}: {old_files.get(name, 'missing')[:12]} -> {new_files.get(name, 'missing')[:12]}"
            )
    for key in sorted(set(old) | set(new)):
        if key not in VOLATILE_KEYS and old.get(key) != new.get(key):
            diffs.append(f"manifest.{key} differs")
    return diffs
