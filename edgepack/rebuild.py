"""Rebuild a bundle from its manifest and say whether the result is byte-for-byte the same.

The manifest records the full build config, the source weights' digest and the tool versions, so a
rebuild on the same inputs must reproduce every file hash; anything else means an input changed.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgepack.bundle import VOLATILE_KEYS, read_manifest, read_sums, verify_bundle
from edgepack.config import BuildConfig, overlay
from edgepack.errors import UserError
from edgepack.profiles import builtin_targets
from edgepack.progress import Progress


def _recorded(manifest: dict[str, Any]) -> dict[str, Any]:
    build = manifest.get("build")
    recorded = build.get("config") if isinstance(build, dict) else None
    if not recorded or not isinstance(recorded, dict):
        raise UserError("the manifest has no build.config; it cannot be rebuilt.")
    return dict(recorded)


def _config_from(manifest: dict[str, Any]) -> BuildConfig:
    recorded = _recorded(manifest)
    section = manifest.get("target")
    target = section.get("name") if isinstance(section, dict) else None
    if target not in builtin_targets():
        raise UserError(f"target {target!r} is not a built-in profile; rebuild with --target FILE.")
    return replace(overlay(BuildConfig(), recorded, "manifest"), target=target, force=True)


def _read_sums(folder: Path) -> dict[str, str]:
    """SHA256SUMS as {file: digest}, read by the bundle check's own reader; checked before the
    build, so a bad one fails in a second. A whole bundle is verified first."""
    if not (folder / "SHA256SUMS").is_file():
        raise UserError(
            f"{folder} has no SHA256SUMS beside manifest.json, so a rebuild has nothing to "
            "compare with; copy the bundle's SHA256SUMS there too."
        )
    if (folder / "bench.py").is_file():  # a bundle, not a manifest copied on its own
        verify_bundle(folder)
    return read_sums(folder)


def rebuild(bundle: Path, target_file: str | None, progress: Progress) -> list[str]:
    """Build again into a temporary folder; returns the differences (empty when identical)."""
    from edgepack.pipeline import build

    folder = bundle.parent if bundle.name == "manifest.json" else bundle
    old = read_manifest(folder)
    config = (
        _config_from(old)
        if target_file is None
        else replace(
            overlay(BuildConfig(), _recorded(old), "manifest"), target=target_file, force=True
        )
    )
    old_files = _read_sums(folder)
    with tempfile.TemporaryDirectory(prefix="edgepack-rebuild-") as tmp:
        (result,) = build(replace(config, out=tmp), progress)
        new = read_manifest(result.folder)
        new_files = _read_sums(result.folder)
    diffs = []
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
