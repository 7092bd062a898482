"""manifest.json and SHA256SUMS: what a bundle claims to be, and the proof it still is.

SHA256SUMS uses ``sha256sum -c`` format so a device can verify a bundle with coreutils alone; the
harness and ``edgepack verify`` (``bundle/verify.py``) read the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.artifacts import sha256_file
from edgepack.errors import UserError
from edgepack.jsontext import parse_json

SCHEMA_VERSION = 1
SUMS = "SHA256SUMS"
MANIFEST = "manifest.json"
# The fields allowed to differ between two builds of the same inputs: when, and what the build
# host spent (stage seconds, peak memory).
VOLATILE_KEYS = ("built_at", "resources")


def bundle_files(folder: Path) -> list[str]:
    """Every regular file below ``folder`` except SHA256SUMS, as sorted POSIX paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != SUMS
    )


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=2, sort_keys=True)
    (folder / MANIFEST).write_text(text + "\n", encoding="utf-8")


def write_sums(folder: Path) -> None:
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in bundle_files(folder)]
    (folder / SUMS).write_text("".join(lines), encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{folder} is not a bundle: it has no {MANIFEST}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON: {exc}") from None
    data = parse_json(text, str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object.")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: manifest schema version {version!r} is not supported "
            f"(this edgepack reads version {SCHEMA_VERSION})."
        )
    return data
