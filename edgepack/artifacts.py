"""Frozen records passed between stages: a folder or file on disk plus what is known about it.

An artifact never holds a live torch or onnx object, so a stage's output can be cached, written to
``artifact.json`` and read back by a later run, and the manifest's provenance is just the chain of
records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", "HFModel", "OnnxModel")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """One spelling per value, so equal settings hash equal and bundles stay byte-stable."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class HFModel:
    """A Hugging Face model folder (config, weights, tokenizer) and the task it serves."""

    path: Path
    task: str
    source: str
    library: str  # "sentence_transformers" keeps pooling/normalisation; else "transformers"
    weights_sha256: str
    model_type: str
    max_length: int
    history: tuple[dict[str, Any], ...] = ()  # records of stages that changed it (prune, distill)
    # Every file a loader can read (folders.content_digest): config, tokenizer, generation
    # config, sentence-transformers modules, weights. Empty only for records made by hand.
    files_sha256: str = ""

    @property
    def digest(self) -> str:
        """The cache identity of the model: a copy differing in any file a build reads (a config
        field, the tokenizer's vocabulary order, a pooling module) is a different model."""
        parts = [self.weights_sha256, self.files_sha256, self.task, self.library, self.history]
        return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX file with its I/O signature and the figures that validated it."""

    path: Path
    task: str
    precision: str  # "fp32" | "int8"
    sha256: str
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    primary_output: str  # the output fidelity is measured on (embedding or logits)
    tokenizer_dir: Path
    records: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.sha256


def to_dict(record: HFModel | OnnxModel) -> dict[str, Any]:
    data = asdict(record)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data and f.default is not MISSING:  # a field newer than the record
            continue
        value = data[f.name]
        if f.name in ("path", "tokenizer_dir"):
            value = Path(value)
        elif f.name in ("history", "inputs", "outputs"):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def save_record(record: HFModel | OnnxModel, folder: Path) -> None:
    (folder / "artifact.json").write_text(
        json.dumps({"kind": type(record).__name__, **to_dict(record)}, indent=1, sort_keys=True)
    )


def load_record(cls: type[T], folder: Path) -> T:
    data = json.loads((folder / "artifact.json").read_text())
    data.pop("kind", None)
    return from_dict(cls, data)
