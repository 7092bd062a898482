"""Hugging Face model folders: which files are weights, which make the tokenizer, and how a
derived model (pruned, distilled) takes everything but the weights from the folder it came from.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

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
    """sentence-transformers' module sub-folders (pooling, normalisation...) named in modules.json."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return set()
    entries = json.loads(modules.read_text(encoding="utf-8"))
    return {str(m.get("path", "")) for m in entries if m.get("path")}


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
