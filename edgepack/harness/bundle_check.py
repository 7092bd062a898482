#!/usr/bin/env python3
"""The integrity check every bundle runs on the device, whatever its harness (bench.py for
encoders, the LLM harness for decoders): is this folder exactly what was built?

Shipped in every bundle beside the harness that imports it; like the harness it never imports
edgepack and needs only the standard library (model-signing only for an optional signature
check), so it runs on Python 3.8+. The host applies the same rules with its own code
(edgepack/bundle/verify.py); the tests run both on the same tampered bundles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Optional


class HarnessError(Exception):
    """A problem the user can fix; printed as one line with exit code 2."""


SUMS, MANIFEST, SIGNATURE = "SHA256SUMS", "manifest.json", "bundle.sig"
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
MODEL_SUFFIXES = {"onnx": ".onnx", "ort": ".ort"}  # manifest target.format.model -> model.file
MANIFEST_FILES = ("model.file", "reference.inputs", "reference.outputs")
INSTALL_SIGNING = "pip install model-signing pyopenssl"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(str(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_relpath(name: Any, where: str) -> str:
    """A path the bundle itself names, as a normalized relative POSIX path; refuse absolute
    paths (POSIX or Windows) and any `..` component, which could reach outside the bundle."""
    if not isinstance(name, str) or not name.strip():
        raise HarnessError("{} names no file ({!r}); rebuild the bundle".format(where, name))
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise HarnessError("{} names {!r}, a path outside the bundle".format(where, name))
    rel = posix.as_posix()
    if rel == ".":
        raise HarnessError("{} names {!r}, which is not a file".format(where, name))
    return rel


def bundle_file(bundle: Path, manifest: Dict[str, Any], dotted: str) -> Path:
    """The bundle file a manifest field names; never a path outside the bundle folder."""
    rel = bundle_relpath(manifest_value(manifest, dotted), "manifest.json " + dotted)
    return bundle.joinpath(*rel.split("/"))


def unescape_sums_name(name: str) -> str:
    """Undo coreutils' escaping of a name holding a backslash or newline (line starts with \\)."""
    out, i = [], 0
    while i < len(name):
        if name[i] == "\\" and i + 1 < len(name) and name[i + 1] in "\\nr":
            out.append({"\\": "\\", "n": "\n", "r": "\r"}[name[i + 1]])
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def read_sums(bundle: Path) -> Dict[str, str]:
    """SHA256SUMS as {relative POSIX path: sha256 hex}, read the way `sha256sum -c` reads it.

    A line is `<64 hex digits>  <name>` (text mode) or `<64 hex digits> *<name>` (binary mode,
    what `sha256sum -b` writes); a line that starts with a backslash escapes `\\` and newlines
    in its name, as coreutils writes such names.
    """
    path = bundle / SUMS
    if not path.is_file():
        raise HarnessError("bundle has no SHA256SUMS; re-copy the bundle or pass --no-verify")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError("SHA256SUMS is not readable: {}".format(exc)) from None
    listed = {}  # type: Dict[str, str]
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        digest, mode, name = body[:64], body[64:66], body[66:]
        if len(digest) != 64 or not set(digest) <= HEX_DIGITS or mode not in ("  ", " *"):
            raise HarnessError("SHA256SUMS line {} is malformed: {!r}".format(number, line))
        rel = bundle_relpath(
            unescape_sums_name(name) if escaped else name, "SHA256SUMS line {}".format(number)
        )
        if rel in listed:
            raise HarnessError("SHA256SUMS lists {} twice".format(rel))
        listed[rel] = digest.lower()
    return listed


def bundle_tree(bundle: Path) -> List[str]:
    """Every regular file under the bundle, as sorted relative POSIX paths.

    Refuses symbolic links anywhere (a link can point outside the bundle, and SHA256SUMS would
    only vouch for whatever it points at) and anything that is neither a file nor a folder.
    """

    def unreadable(exc: OSError) -> None:
        raise HarnessError("cannot read the bundle folder: {}".format(exc))

    files = []
    for top, dirs, names in os.walk(str(bundle), onerror=unreadable):
        dirs.sort()
        for name in sorted(dirs + names):
            full = os.path.join(top, name)
            rel = os.path.relpath(full, str(bundle)).replace(os.sep, "/")
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise HarnessError(
                    "{} is a symbolic link; a bundle holds only regular files and folders, so "
                    "put the real file there or re-copy the bundle".format(rel)
                )
            if stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                raise HarnessError("{} is not a regular file; re-copy the bundle".format(rel))
    return sorted(files)


def model_format_suffix(manifest: Dict[str, Any]) -> Optional[str]:
    """The model file suffix the manifest's target.format.model asks for (None: not stated)."""
    target = manifest.get("target")
    fmt = target.get("format") if isinstance(target, dict) else None
    kind = fmt.get("model") if isinstance(fmt, dict) else None
    if kind is None:
        return None
    if kind not in MODEL_SUFFIXES:
        raise HarnessError(
            "manifest.json target.format.model {!r} is not one of {}; rebuild the bundle".format(
                kind, ", ".join(sorted(MODEL_SUFFIXES))
            )
        )
    return MODEL_SUFFIXES[kind]


def verify_bundle(
    bundle: Path, public_key: Optional[Path] = None, require_signature: bool = False
) -> Dict[str, Any]:
    """Refuse a bundle that is not exactly as it was built; return its manifest.

    The one check behind bench.py (run.sh adds `sha256sum -c` before it); see the module
    docstring for the list. Raises HarnessError naming the first problem.
    """
    if not bundle.is_dir():
        raise HarnessError("{} is not a folder; is --bundle the bundle folder?".format(bundle))
    present = bundle_tree(bundle)
    listed = read_sums(bundle)
    on_disk = set(present)
    for name, digest in sorted(listed.items()):
        if name not in on_disk:
            raise HarnessError(
                "{} is listed in SHA256SUMS but missing; re-copy the bundle".format(name)
            )
        if sha256_file(bundle.joinpath(*name.split("/"))) != digest:
            raise HarnessError(
                "{} does not match SHA256SUMS (changed or corrupted); re-copy the bundle "
                "or pass --no-verify".format(name)
            )
    for name in present:
        if name not in listed and name not in (SUMS, SIGNATURE):
            raise HarnessError(
                "{} is not listed in SHA256SUMS (added after the build); remove it, write "
                "reports outside the bundle, or re-copy the bundle".format(name)
            )
    manifest = load_manifest(bundle)
    names = {}  # type: Dict[str, str]
    for dotted in MANIFEST_FILES:
        names[dotted] = bundle_relpath(manifest_value(manifest, dotted), "manifest.json " + dotted)
        if names[dotted] not in listed:
            raise HarnessError(
                "manifest.json {} names {}, which is missing or not listed in SHA256SUMS; "
                "re-copy the bundle".format(dotted, names[dotted])
            )
    for required in (MANIFEST, "bench.py"):
        if required not in listed:
            raise HarnessError("{} is missing from the bundle; re-copy the bundle".format(required))
    if not any(name.startswith("tokenizer/") for name in listed):
        raise HarnessError("the bundle has no tokenizer/ files; re-copy the bundle")
    model = names["model.file"]
    suffix = model_format_suffix(manifest)
    if suffix is not None and not model.endswith(suffix):
        raise HarnessError(
            "manifest.json model.file {} is not a {} model, as target.format.model "
            "says; rebuild the bundle".format(model, suffix.lstrip("."))
        )
    if listed[model] != str(manifest_value(manifest, "model.sha256")).lower():
        raise HarnessError(
            "{} does not match manifest.json model.sha256 (changed after the build); re-copy "
            "the bundle or pass --no-verify".format(model)
        )
    size = bundle.joinpath(*model.split("/")).stat().st_size
    claimed = manifest_value(manifest, "model.bytes")
    if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed != size:
        raise HarnessError(
            "{} has {} bytes but manifest.json model.bytes says {}; re-copy the bundle or "
            "pass --no-verify".format(model, size, claimed)
        )
    if public_key is not None:
        verify_signature(bundle, public_key, require_signature)
    return manifest


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def signature_problem(exc: BaseException) -> str:
    """model_signing's mismatch message (a list of reprs with raw digests) as file names."""
    text = str(exc)
    found = [
        ("changed", re.findall(r"Hash mismatch for \\?'(.+?)\\?':", text)),
        ("added", re.findall(r"Extra files found in model '[^']*': ([^\"']+)", text)),
        ("missing", re.findall(r"Missing files in model '[^']*': ([^\"']+)", text)),
    ]
    parts = ["{} {}".format(kind, ", ".join(names)) for kind, names in found if names]
    return "files differ from the signed ones: " + "; ".join(parts) if parts else one_line(exc)


def verify_signature(bundle: Path, public_key: Path, required: bool) -> bool:
    """Check bundle.sig (OpenSSF model-signing, elliptic-curve key) against `public_key`.

    The signature covers every file of the bundle folder except bundle.sig itself. Returns False,
    after one warning line on stderr, when model_signing cannot be imported and the signature is
    not required; True when it verified.
    """
    if not public_key.is_file():
        raise HarnessError("--public-key {}: no such file".format(public_key))
    try:
        from model_signing import hashing as ms_hashing
        from model_signing import verifying as ms_verifying
    except ImportError as exc:
        reason = "model_signing is not importable ({}); install it with: {}".format(
            one_line(exc), INSTALL_SIGNING
        )
        if required:
            raise HarnessError(
                "--require-signature: cannot check {}: {}".format(SIGNATURE, reason)
            ) from None
        print("warning: {} was NOT checked: {}".format(SIGNATURE, reason), file=sys.stderr)
        return False
    signature = bundle / SIGNATURE
    if not signature.is_file():
        raise HarnessError(
            "the bundle has no {} to check with --public-key; ask for a signed bundle".format(
                SIGNATURE
            )
        )
    hashing_config = ms_hashing.Config().set_ignored_paths(
        paths=[SIGNATURE], ignore_git_paths=False
    )
    try:
        ms_verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            hashing_config
        ).verify(bundle, signature)
    except Exception as exc:  # model_signing raises ValueError and cryptography's own errors
        raise HarnessError(
            "{} does not verify with --public-key {}: {}".format(
                SIGNATURE, public_key, signature_problem(exc)
            )
        ) from None
    return True


def manifest_value(manifest: Dict[str, Any], dotted: str) -> Any:
    node = manifest  # type: Any
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise HarnessError("manifest.json has no '{}'; rebuild the bundle".format(dotted))
        node = node[key]
    return node


def load_manifest(bundle: Path) -> Dict[str, Any]:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise HarnessError("{} has no manifest.json; is --bundle the bundle folder?".format(bundle))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HarnessError("manifest.json is not valid JSON: {}".format(exc)) from None
