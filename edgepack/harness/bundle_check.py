#!/usr/bin/env python3
"""The integrity check every bundle runs on the device, whatever its harness (bench.py for
encoders, the LLM harness for decoders), and the very check `edgepack verify` runs on the host
(edgepack/bundle/verify.py imports this file): one function decides, so a bundle the host calls
OK is one the device runs.

Shipped in every bundle beside the harness that imports it; like the harness it never imports
edgepack and needs only the standard library (model-signing only for an optional signature
check, tokenizers only for the tokenizer check), so it runs on Python 3.8+.

    python3 bundle_check.py [BUNDLE]     # the check alone: exit 0 (notes on stderr) or 2
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
SCHEMA_VERSION = 1
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
MODEL_SUFFIXES = {"onnx": ".onnx", "ort": ".ort"}  # manifest target.format.model -> model.file
MANIFEST_FILES = ("model.file", "reference.inputs", "reference.outputs")
# What run.sh and the harness need to start: bench.py imports bundle_check.py, and a decoder's
# harness also imports edgepack_decode.py (required when the manifest has "generation").
HARNESS_FILES = ("bench.py", "bundle_check.py", "run.sh")
DECODER_FILES = ("edgepack_decode.py",)
TOKENIZER_JSON = "tokenizer/tokenizer.json"
INSTALL_SIGNING = "pip install model-signing pyopenssl"
# Deepest JSON nesting read from a bundle or a user file. The deepest edgepack writes is 5
# (manifest.json); CPython's parser recurses per level and dies near 1000 with RecursionError.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# Characters Python's str.splitlines() breaks lines at besides "\n": a name holding one is read as
# two lines by some readers and one by others, so a SHA256SUMS line may hold none of them.
LINE_BREAKS = frozenset("\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text``, counted without recursion."""
    depth = deepest = 0
    for run in _NOT_BRACKET.split(_JSON_STRING.sub("", text)):
        for char in run:
            depth += 1 if char in "[{" else -1
            deepest = max(deepest, depth)
    return deepest


def parse_json(text: str, what: str) -> Any:
    """``json.loads`` that fails in one line (HarnessError) on bad or absurdly nested JSON."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise HarnessError(
            "{} nests JSON {} levels deep, more than the {} allowed; it is not a file edgepack "
            "wrote".format(what, depth, MAX_JSON_DEPTH)
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise HarnessError("{} is not valid JSON: {}".format(what, exc)) from None


def load_json(path: Path, what: str, user_file: bool = False) -> Any:
    """A JSON file of the bundle, or with ``user_file`` one the user named (a link to a regular
    file is fine there), read with ``parse_json``'s bounds; never a FIFO or a device."""
    try:
        if user_file and not stat.S_ISREG(os.stat(str(path)).st_mode):
            raise HarnessError("{} is not a regular file".format(what))
        text = (path if user_file else regular_file(path, what)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError("{} is not readable: {}".format(what, exc)) from None
    return parse_json(text, what)


def regular_file(path: Path, what: str) -> Path:
    """``path`` when it is a regular file, checked with lstat before anything opens it: a FIFO or
    a device (/dev/zero) would block or never end, and a link may point anywhere."""
    try:
        mode = os.lstat(str(path)).st_mode
    except OSError as exc:
        raise HarnessError("{} is missing: {}".format(what, exc.strerror or exc)) from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise HarnessError("{} is {}; re-copy the bundle".format(what, kind))
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(str(regular_file(path, str(path))), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_relpath(name: Any, where: str) -> str:
    """A path the bundle itself names, as a normalized relative POSIX path; refuse absolute
    paths (POSIX or Windows), any `..` component, which could reach outside the bundle, and
    control characters, which no file edgepack writes has."""
    if not isinstance(name, str) or not name.strip():
        raise HarnessError("{} names no file ({!r}); rebuild the bundle".format(where, name))
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
        or "\\" in name
    ):
        raise HarnessError("{} names {!r}, a path outside the bundle".format(where, name))
    if any(ord(char) < 32 or char in LINE_BREAKS for char in name):
        raise HarnessError("{} names {!r}, a name with a control character".format(where, name))
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
    in its name, as coreutils writes such names. Lines end at "\n" only, and a line holding a
    carriage return or another line break character is refused: readers disagree on where such
    a line ends (run.sh's `read`, `sha256sum -c` and Python's splitlines all differ).
    """
    path = bundle / SUMS
    try:
        # Bytes, then decoded: text mode would turn "\r\n" into "\n" before the check sees it.
        text = regular_file(path, SUMS).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError("SHA256SUMS is not readable: {}".format(exc)) from None
    except HarnessError:
        raise HarnessError(
            "bundle has no SHA256SUMS (or it is not a regular file); re-copy the bundle or pass "
            "--no-verify"
        ) from None
    listed = {}  # type: Dict[str, str]
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if any(char in LINE_BREAKS for char in line):
            raise HarnessError(
                "SHA256SUMS line {} holds a carriage return or line separator ({!r}); "
                "re-copy the bundle in binary mode".format(number, line[:80])
            )
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        digest, mode, name = body[:64], body[64:66], body[66:]
        if len(digest) != 64 or not set(digest) <= HEX_DIGITS or mode not in ("  ", " *"):
            raise HarnessError("SHA256SUMS line {} is malformed: {!r}".format(number, line[:80]))
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
    only vouch for whatever it points at) and anything that is neither a file nor a folder
    (a FIFO or a device would block the hashing forever). Nothing is opened here.
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
    bundle: Path,
    public_key: Optional[Path] = None,
    require_signature: bool = False,
    notes: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Refuse a bundle that is not exactly as it was built, or whose tokenizer does not give the
    build host's ids; return its manifest.

    The one check behind bench.py, the decoder harness and `edgepack verify`. Names and file
    types are checked before any file is opened, then the hashes, then the manifest's claims,
    then the tokenizer. Raises HarnessError naming the first problem. What could not be checked
    (no reference texts, no tokenizers package) is appended to ``notes`` as one line each, or
    printed on stderr when ``notes`` is None.
    """
    if not bundle.is_dir():
        raise HarnessError("{} is not a folder; is --bundle the bundle folder?".format(bundle))
    if not os.path.lexists(str(bundle / MANIFEST)):
        raise HarnessError("{} is not a bundle: it has no manifest.json".format(bundle))
    present = bundle_tree(bundle)
    listed = read_sums(bundle)
    on_disk = set(present)
    for name in sorted(listed):
        if name not in on_disk:
            raise HarnessError(
                "{} is listed in SHA256SUMS but missing; re-copy the bundle".format(name)
            )
    for name in present:
        if name not in listed and name not in (SUMS, SIGNATURE):
            raise HarnessError(
                "{} is not listed in SHA256SUMS (added after the build); remove it, write "
                "reports outside the bundle, or re-copy the bundle".format(name)
            )
    for name, digest in sorted(listed.items()):
        if sha256_file(bundle.joinpath(*name.split("/"))) != digest:
            raise HarnessError(
                "{} does not match SHA256SUMS (changed after the build); re-copy the bundle "
                "or pass --no-verify".format(name)
            )
    manifest = load_manifest(bundle)
    check_manifest(bundle, manifest, listed)
    if public_key is not None:
        verify_signature(bundle, public_key, require_signature)
    note = check_tokenizer(bundle, manifest, listed)
    if note is not None:
        if notes is None:
            print("warning: " + note, file=sys.stderr)
        else:
            notes.append(note)
    return manifest


def check_manifest(bundle: Path, manifest: Dict[str, Any], listed: Dict[str, str]) -> None:
    """The files the manifest names are the ones SHA256SUMS covers, the model is its model, and
    the files the harness needs to start are there."""
    names = {}  # type: Dict[str, str]
    for dotted in MANIFEST_FILES:
        names[dotted] = bundle_relpath(manifest_value(manifest, dotted), "manifest.json " + dotted)
        if names[dotted] not in listed:
            raise HarnessError(
                "manifest.json {} names {}, which is missing or not listed in SHA256SUMS; "
                "re-copy the bundle".format(dotted, names[dotted])
            )
    required = (MANIFEST, *HARNESS_FILES)
    if "generation" in manifest:
        required += DECODER_FILES
    for name in required:
        if name not in listed:
            raise HarnessError("{} is missing from the bundle; re-copy the bundle".format(name))
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
    size = os.lstat(str(bundle.joinpath(*model.split("/")))).st_size
    claimed = manifest_value(manifest, "model.bytes")
    if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed != size:
        raise HarnessError(
            "{} has {} bytes but manifest.json model.bytes says {!r}; re-copy the bundle or "
            "pass --no-verify".format(model, size, claimed)
        )


def runtime_max_length(manifest: Dict[str, Any]) -> Optional[int]:
    """The length edgepack_runtime.py truncates texts to (None: it does not truncate).

    The same rule as the runtime's Model: a decoder's prompt is never cut, an encoder's text is
    cut to the context or the harness sequence length; a fixed-shape model's length is that
    sequence length too.
    """
    if manifest.get("task") == "text-generation":
        return None
    generation = manifest.get("generation") or {}
    harness = manifest.get("harness") or {}
    value = (generation.get("context_length") if isinstance(generation, dict) else None) or (
        harness.get("seq_len") if isinstance(harness, dict) else None
    )
    if value is None:
        return 512
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HarnessError(
            "manifest.json harness.seq_len {!r} is not a positive integer; rebuild the "
            "bundle".format(value)
        )
    return value


def reference_texts(bundle: Path, manifest: Dict[str, Any], listed: Dict[str, str]) -> Any:
    """[(text, ids)] from the file manifest.json reference.texts names; None for a bundle built
    before edgepack recorded them."""
    reference = manifest.get("reference")
    if not isinstance(reference, dict) or "texts" not in reference:
        return None
    rel = bundle_relpath(reference["texts"], "manifest.json reference.texts")
    if rel not in listed:
        raise HarnessError(
            "manifest.json reference.texts names {}, which is missing or not listed in "
            "SHA256SUMS; re-copy the bundle".format(rel)
        )
    data = load_json(bundle.joinpath(*rel.split("/")), rel)
    rows = data.get("texts") if isinstance(data, dict) else None
    pairs = []
    for row in rows if isinstance(rows, list) else [None]:
        ids = row.get("ids") if isinstance(row, dict) else None
        text = row.get("text") if isinstance(row, dict) else None
        if (
            not isinstance(text, str)
            or not isinstance(ids, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise HarnessError(
                '{} must hold {{"texts": [{{"text": str, "ids": [int, ...]}}, ...]}}; rebuild '
                "the bundle".format(rel)
            )
        pairs.append((text, ids))
    return pairs


def check_tokenizer(bundle: Path, manifest: Dict[str, Any], listed: Dict[str, str]) -> Any:
    """Tokenize the reference texts with tokenizer/tokenizer.json as the app runtime does and
    require the build host's ids: a tokenizer.json that no longer loads, or gives other ids,
    would feed the model other tokens than it was checked with. Returns None when checked, or
    the one-line reason it was not."""
    pairs = reference_texts(bundle, manifest, listed)
    if pairs is None:
        return "no reference texts in this bundle (an older build); tokenizer not checked"
    if TOKENIZER_JSON not in listed:
        raise HarnessError(
            "the bundle has reference texts but no {}; re-copy the bundle".format(TOKENIZER_JSON)
        )
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        return (
            "{} was NOT checked: the tokenizers package is not importable ({}); the app runtime "
            "needs it too: pip install -r requirements.txt".format(TOKENIZER_JSON, one_line(exc))
        )
    path = regular_file(bundle.joinpath(*TOKENIZER_JSON.split("/")), TOKENIZER_JSON)
    max_length = runtime_max_length(manifest)
    try:
        tokenizer = Tokenizer.from_file(str(path))
        # What edgepack_runtime.py does with the file's own padding and truncation settings.
        tokenizer.no_padding()
        if max_length is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(max_length)
        got = [tokenizer.encode(text).ids for text, _ in pairs]
    except Exception as exc:  # the Rust library raises plain Exception for a corrupt file
        raise HarnessError(
            "{} does not load with tokenizers ({}); re-copy the bundle".format(
                TOKENIZER_JSON, one_line(exc, 160)
            )
        ) from None
    for number, ((_text, want), ids) in enumerate(zip(pairs, got), 1):  # noqa: B905 (3.8)
        if list(ids) != want:
            pairs_at = zip(ids, want)  # noqa: B905 (zip has no strict= on 3.8)
            at = next((i for i, (a, b) in enumerate(pairs_at) if a != b), min(len(ids), len(want)))
            raise HarnessError(
                "{} gives other token ids for reference text {} than the build host ({} ids, "
                "first difference at position {}); the app would feed the model other tokens: "
                "re-copy the bundle".format(TOKENIZER_JSON, number, len(ids), at)
            )
    return None


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
    path = bundle / MANIFEST
    if not os.path.lexists(str(path)):
        raise HarnessError("{} has no manifest.json; is --bundle the bundle folder?".format(bundle))
    manifest = load_json(path, MANIFEST)
    if not isinstance(manifest, dict):
        raise HarnessError("manifest.json must hold a JSON object; rebuild the bundle")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise HarnessError(
            "manifest.json schema version {!r} is not supported (this harness reads version "
            "{}); use the harness of the edgepack that built it".format(version, SCHEMA_VERSION)
        )
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    """`python3 bundle_check.py [BUNDLE]`: the check alone, without onnxruntime."""
    args = sys.argv[1:] if argv is None else argv
    bundle = Path(args[0] if args else os.path.dirname(os.path.abspath(__file__)))
    try:
        verify_bundle(bundle.resolve())
    except HarnessError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    print("OK: {} matches SHA256SUMS and its manifest".format(bundle))
    return 0


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    sys.exit(main())
