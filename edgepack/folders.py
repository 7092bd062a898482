"""Hugging Face model folders: which files are weights, which make the tokenizer, and how a
derived model (pruned, distilled) takes everything but the weights from the folder it came from.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from edgepack.artifacts import canonical_json, sha256_file
from edgepack.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spm.model",
)
# Not carried into a derived folder: the old weights, and the model card, which would describe
# the model it was derived from.
NOT_CARRIED = (*WEIGHT_FILES, "README.md")


def module_dirs(folder: Path) -> set[str]:
    """sentence-transformers' module sub-folders (pooling, normalisation...) named in modules.json;
    a path leading out of the folder is refused, since sentence-transformers would load it."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return set()
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{modules} is not readable JSON: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        raise UserError(f"{modules} must hold a list of modules (objects with a 'path').")
    paths = {m["path"] for m in entries if m.get("path", "") != ""}
    for path in paths:
        inside(folder, path, "modules.json")
    return {str(p) for p in paths}


def copy_support_files(src: Path, dst: Path) -> None:
    """Tokenizer, config and sentence-transformers files: everything a folder needs but weights."""
    dirs = module_dirs(src)
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or item.name in NOT_CARRIED or item.suffix == ".onnx":
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)
        elif item.is_dir() and item.name in dirs:
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Only the tokenizer: what a bundle ships beside the model."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).is_file():
            shutil.copy2(src / name, dst / name)


# Bundle and target names become folder and archive names: one path component, no leading dot
# (hidden, or '..'), characters every filesystem and shell takes without quoting.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(value: str, what: str) -> str:
    """``value`` if it can be a folder name of its own; one clear line otherwise."""
    if not NAME_PATTERN.fullmatch(value):
        raise UserError(
            f"{what} {value!r} cannot name a bundle folder: use letters, digits, '.', '_' and '-' "
            "(up to 100 characters, not starting with '.' or '-')."
        )
    return value


# What a model's content digest leaves out, and why: names starting with "." (.git, .gitattributes,
# the hub client's .cache) are version-control and download bookkeeping; README.md is the model
# card; artifact.json is edgepack's own cache record (it holds the folder's absolute path); the
# rest are copies of the model for other runtimes that no loader edgepack drives ever reads (and
# the hub's onnx/ and openvino/ folders would triple the bytes hashed). Everything else - config,
# generation config, tokenizer files, chat templates, sentence-transformers modules, weights,
# edgepack's pruning/distillation records - can change what is built, so it is in the key.
NOT_HASHED = frozenset(
    {
        "README.md",
        "artifact.json",
        "onnx",
        "openvino",
        "coreml",
        "tf_model.h5",
        "flax_model.msgpack",
        "rust_model.ot",
    }
)


def inside(folder: Path, name: object, what: str) -> Path:
    """``folder / name`` for a file name read from the model's own JSON (a shard in the index, a
    module path in modules.json, a tokenizer file in tokenizer_config.json): a relative path
    with no '..' and no drive, else one line naming the entry. Symlinks are judged by
    ``contained`` when the file is listed."""
    text = str(name)
    pure = PurePosixPath(text.replace("\\", "/"))
    if (
        not isinstance(name, str)
        or not text
        or pure.is_absolute()
        or PureWindowsPath(text).drive
        or ".." in pure.parts
    ):
        raise UserError(
            f"{folder}: {what} names {text[:120]!r}, which is not a path inside the model folder; "
            "only relative names without '..' are read."
        )
    return folder / pure


def _roots(folder: Path) -> tuple[Path, ...]:
    """Where a model's files may really live: the folder, and for a Hugging Face hub snapshot
    (``models--org--name/snapshots/<rev>``) the repository's ``blobs`` folder its symlinks
    point into."""
    real = folder.resolve()
    roots = [real]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return tuple(roots)


def contained(folder: Path, path: Path, roots: tuple[Path, ...] | None = None) -> Path:
    """``path`` resolved, when it stays inside ``folder`` (symlinks followed); one line otherwise.

    A symlink out of the folder is refused: a model unpacked from an archive could point
    ``vocab.txt`` at a private file and the bundle would ship it. Copy such files in (cp -L).
    """
    real = path.resolve()
    if not any(real == r or real.is_relative_to(r) for r in roots or _roots(folder)):
        shown = path.relative_to(folder) if path.is_relative_to(folder) else path
        raise UserError(
            f"{folder}: {shown} leads outside the model folder (to {real}); copy the file into "
            "the folder instead of linking to it."
        )
    return real


def model_files(folder: Path) -> list[tuple[str, Path]]:
    """Every file that can change a build, as (POSIX path in the folder, real path), sorted.

    Raises UserError for a file that leads out of the folder or is not a regular file (a FIFO
    named vocab.txt would hang the build).
    """
    roots = _roots(folder)
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()

    def walk(current: Path, rel: str) -> None:
        real_dir = contained(folder, current, roots)
        if real_dir in seen:  # a symlinked folder pointing back up would loop
            return
        seen.add(real_dir)
        for item in sorted(current.iterdir()):
            if item.name.startswith(".") or (not rel and item.name in NOT_HASHED):
                continue
            name = f"{rel}{item.name}"
            real = contained(folder, item, roots)
            if real.is_dir():
                walk(item, name + "/")
            elif real.is_file():
                found.append((name, real))
            else:
                raise UserError(f"{folder}: {name} is not a regular file.")

    walk(folder, "")
    return found


def folder_digest(folder: Path) -> str:
    """``content_digest`` of a whole folder (an export's tokenizer folder, say)."""
    return content_digest({name: sha256_file(real) for name, real in model_files(folder)})


def content_digest(hashes: dict[str, str]) -> str:
    """SHA-256 over every file's name and SHA-256 (``model_files``): the identity of what a
    build reads, so two folders differing in any byte a loader can see never share a cache
    entry."""
    return hashlib.sha256(canonical_json(sorted(hashes.items())).encode()).hexdigest()
