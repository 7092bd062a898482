"""Is this bundle exactly what was built? The one check behind `verify`, `bench` and `rebuild`.

SHA256SUMS alone proves nothing against someone who can regenerate it, so the check also holds
the files to what manifest.json says (the model's sha256 and size, the files it names, the files
a bundle must have), refuses symbolic links anywhere (a link can point outside the bundle, and a
checksum vouches only for what it points at), and, given a public key, checks the signature over
the whole folder. The device-side harness applies the same rules with its own code, since it
never imports edgepack; the tests run both on the same tampered bundles.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.artifacts import sha256_file
from edgepack.bundle.manifest import MANIFEST, SUMS, read_manifest
from edgepack.bundle.sign import SIGNATURE, verify_signature
from edgepack.errors import BundleTampered, UserError

# Files named by the manifest; each must be inside the bundle and covered by SHA256SUMS.
MANIFEST_FILES = ("model.file", "reference.inputs", "reference.outputs")
REQUIRED = (MANIFEST, "bench.py")
MODEL_SUFFIXES = {"onnx": ".onnx", "ort": ".ort"}
HEX = frozenset("0123456789abcdefABCDEF")


def verify_bundle(
    folder: Path, public_key: Path | None = None, require_signature: bool = False
) -> int:
    """Raise ``BundleTampered`` naming the first problem; return the number of files checked."""
    if require_signature and public_key is None:
        raise UserError("--require-signature needs --public-key PUB to check the signature with.")
    present = bundle_tree(folder)
    if MANIFEST not in present:
        raise UserError(f"{folder} is not a bundle: it has no {MANIFEST}.")
    listed = read_sums(folder)
    for name, digest in sorted(listed.items()):
        if name not in present:
            raise BundleTampered(f"{folder}: file {name} is missing.")
        if sha256_file(folder / name) != digest:
            raise BundleTampered(
                f"{folder}: file {name} was changed after build (checksum differs)."
            )
    for name in present:
        if name not in listed and name not in (SUMS, SIGNATURE):
            raise BundleTampered(
                f"{folder}: file {name} is not listed in {SUMS} (added after build)."
            )
    _check_manifest(folder, read_manifest(folder), listed)
    if public_key is not None:
        verify_signature(folder, public_key)
    return len(listed)


def read_sums(folder: Path) -> dict[str, str]:
    """SHA256SUMS as {path: digest}, in both forms coreutils writes (``  name`` and `` *name``)."""
    path = folder / SUMS
    if not path.is_file():
        raise BundleTampered(f"{folder} has no {SUMS}; cannot verify it.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleTampered(f"{path} is not readable: {exc}") from None
    listed: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, mode, name = line[:64], line[64:66], line[66:]
        if len(digest) != 64 or not set(digest) <= HEX or mode not in ("  ", " *") or not name:
            raise BundleTampered(f"{path}, line {n} is malformed: {line[:60]!r}")
        name = inside(name, f"{SUMS} line {n}")
        if name in listed:
            raise BundleTampered(f"{path} lists {name} twice.")
        listed[name] = digest.lower()
    return listed


def bundle_tree(folder: Path) -> set[str]:
    """Every regular file below ``folder`` as a POSIX path; links and special files refused."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a bundle folder.")
    files = set()
    for top, dirs, names in os.walk(folder):
        for name in dirs + names:
            full = Path(top) / name
            rel = full.relative_to(folder).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise BundleTampered(
                    f"{folder}: {rel} is a symbolic link; a bundle holds only regular files."
                )
            if stat.S_ISREG(mode):
                files.add(rel)
            elif not stat.S_ISDIR(mode):
                raise BundleTampered(f"{folder}: {rel} is not a regular file.")
    return files


def inside(name: Any, where: str) -> str:
    """A relative POSIX path that stays inside the bundle, or ``BundleTampered``."""
    path = PurePosixPath(str(name))
    if not isinstance(name, str) or not name or path.is_absolute() or ".." in path.parts:
        raise BundleTampered(f"{where} names {name!r}, which is not a path inside the bundle.")
    if "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise BundleTampered(f"{where} names {name!r}, which is not a path inside the bundle.")
    return path.as_posix()


def _value(manifest: dict[str, Any], dotted: str) -> Any:
    node: Any = manifest
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise BundleTampered(f"{MANIFEST} has no {dotted!r}; rebuild the bundle.")
        node = node[key]
    return node


def _check_manifest(folder: Path, manifest: dict[str, Any], listed: dict[str, str]) -> None:
    """The files the manifest names are the ones SHA256SUMS covers, and the model is its model."""
    names = {}
    for dotted in MANIFEST_FILES:
        names[dotted] = inside(_value(manifest, dotted), f"{MANIFEST} {dotted}")
        if names[dotted] not in listed:
            raise BundleTampered(
                f"{folder}: {MANIFEST} {dotted} names {names[dotted]}, which is missing or not "
                f"listed in {SUMS}."
            )
    for required in REQUIRED:
        if required not in listed:
            raise BundleTampered(f"{folder}: {required} is missing from the bundle.")
    if not any(name.startswith("tokenizer/") for name in listed):
        raise BundleTampered(f"{folder}: the bundle has no tokenizer/ files.")
    model = names["model.file"]
    target = manifest.get("target")
    fmt = target.get("format") if isinstance(target, dict) else None
    kind = fmt.get("model") if isinstance(fmt, dict) else None
    if kind is not None and not model.endswith(MODEL_SUFFIXES.get(kind, "?")):
        raise BundleTampered(
            f"{folder}: {MANIFEST} model.file {model} does not fit target.format.model {kind!r}."
        )
    if listed[model] != str(_value(manifest, "model.sha256")).lower():
        raise BundleTampered(
            f"{folder}: {model} does not match {MANIFEST} model.sha256 (changed after build)."
        )
    size, claimed = (folder / model).stat().st_size, _value(manifest, "model.bytes")
    if isinstance(claimed, bool) or claimed != size:
        raise BundleTampered(
            f"{folder}: {model} has {size} bytes but {MANIFEST} model.bytes says {claimed}."
        )
