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
from edgepack.config import BuildConfig, overlay, resolve_recorded
from edgepack.errors import UserError
from edgepack.profiles import builtin_targets
from edgepack.progress import Progress


def _recorded(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    """build.config with its input files found again on this machine (by name and sha256: the
    current folder, the bundle's folder and the two above it (the default out is dist/ beside
    the config, so a bundle sits at dist/NAME), or the installed samples)."""
    build = manifest.get("build")
    recorded = build.get("config") if isinstance(build, dict) else None
    if not recorded or not isinstance(recorded, dict):
        raise UserError("the manifest has no build.config; it cannot be rebuilt.")
    inputs = build.get("inputs")
    inputs = inputs if isinstance(inputs, dict) else {}
    return resolve_recorded(dict(recorded), inputs, [folder, folder.parent, folder.parent.parent])


def _config_from(manifest: dict[str, Any], folder: Path) -> BuildConfig:
    recorded = _recorded(manifest, folder)
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
    old_files = _read_sums(folder)  # a tampered bundle is refused before its inputs are sought
    config = (
        _config_from(old, folder)
        if target_file is None
        else replace(
            overlay(BuildConfig(), _recorded(old, folder), "manifest"),
            target=target_file,
            force=True,
        )
    )
    with tempfile.TemporaryDirectory(prefix="edgepack-rebuild-") as tmp:
        (result,) = build(replace(config, out=tmp), progress)
        new = read_manifest(result.folder)
        new_files = _read_sums(result.folder)
        same_ort = _ort_with_same_outputs(folder, result.folder, old_files, new_files)
    diffs = []
    for name in sorted(set(old_files) | set(new_files)):
        if name == "manifest.json" or name in same_ort:
            continue
        if old_files.get(name) != new_files.get(name):
            diffs.append(
                f"{name}: {old_files.get(name, 'missing')[:12]} -> {new_files.get(name, 'missing')[:12]}"
            )
    for key in sorted(set(old) | set(new)):
        if key not in VOLATILE_KEYS and _without(old.get(key), key, same_ort) != _without(
            new.get(key), key, same_ort
        ):
            diffs.append(f"manifest.{key} differs")
    for name in same_ort:
        progress.note(
            f"{name}: bit-identical outputs on the bundle's reference inputs, other bytes; "
            "onnxruntime's converter orders the file's tables differently in each process"
        )
    return diffs


def _without(value: Any, key: str, same_ort: list[str]) -> Any:
    """The manifest's model record without the sum and size of a converted file whose outputs
    matched (the converter's padding makes the same tables 8 bytes longer in some runs)."""
    if key != "model" or not same_ort or not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if k not in ("sha256", "bytes")}


def _ort_with_same_outputs(
    old: Path, new: Path, old_files: dict[str, str], new_files: dict[str, str]
) -> list[str]:
    """The .ort files whose sums differ but whose outputs match bit for bit.

    onnxruntime's ORT-format converter writes the same tables in a different order from one
    process to the next (measured: a tiny decoder converted eight times gave six sums, sizes
    127840 or 127848 bytes from padding, every table field equal), so for .ort a rebuild compares
    what the file computes.
    """
    found = []
    for name, digest in new_files.items():
        if not name.endswith(".ort") or old_files.get(name) in (None, digest):
            continue
        if (old / name).is_file() and same_outputs(old, old / name, new / name):
            found.append(name)
    return found


def same_outputs(bundle: Path, first: Path, second: Path) -> bool:
    """Whether two model files give bit-identical outputs on ``bundle``'s reference inputs: the
    decoder's prompts and continuations in one pass, or the encoder's reference/inputs.npz."""
    import numpy as np

    from edgepack.evaluate import session
    from edgepack.families.generate import empty_past, step_feeds

    manifest = read_manifest(bundle)
    sessions = [session(first), session(second)]
    if manifest.get("family") == "decoder":
        import json

        reference = json.loads((bundle / manifest["reference"]["inputs"]).read_text())
        feeds = [
            [*p["prompt"], *p["continuation"]] for p in reference["prompts"] if p["continuation"]
        ]
        runs = [
            [s.run(None, step_feeds(s, ids, empty_past(s), 0)) for ids in feeds] for s in sessions
        ]
    else:
        data = np.load(bundle / manifest["reference"]["inputs"])
        inputs = {i.name for i in sessions[0].get_inputs()}
        batch = {k: data[k] for k in data.files if k in inputs}
        runs = [[s.run(None, batch)] for s in sessions]
    return all(
        len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        for a, b in zip(*runs, strict=True)
    )
