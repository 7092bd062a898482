"""A pruned model folder: written by the prune stage, read back by export, distil and tests.

Uneven FFN widths cannot be described by ``config.json``, so the folder carries ``pruning.json``
and is read with ``load_pruned`` (not ``from_pretrained``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from edgepack.errors import UserError, exporter_errors

RECORD = "pruning.json"


def is_pruned(folder: Path) -> bool:
    return (Path(folder) / RECORD).is_file()


def _read_record(folder: Path) -> dict[str, Any]:
    path = Path(folder) / RECORD
    if not path.is_file():
        raise UserError(f"{folder} has no {RECORD}; it is not a model written by `edgepack prune`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def load_pruned(folder: Path) -> Any:
    """The pruned model with its exact shapes: a PreTrainedModel, or a SentenceTransformer."""
    from edgepack.prune.surgery import rebuild

    folder = Path(folder)
    record = _read_record(folder)
    hf = rebuild(str(folder), record)
    if record["library"] != "sentence_transformers":
        return hf
    return _sentence_transformer(folder, hf)


def _sentence_transformer(folder: Path, hf: Any) -> Any:
    """Assemble the folder's modules around the rebuilt transformer.

    sentence-transformers' own loader would call ``from_pretrained``, which cannot express uneven
    FFN widths; its Transformer module is therefore given the rebuilt model, and every other module
    (pooling, normalisation) loads from its sub-folder as usual.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import transformer
    from sentence_transformers.util import import_from_string

    class Transformer(transformer.Transformer):  # optimum's exporter checks the class name
        def _load_model(self, *args: Any, **kwargs: Any) -> Any:
            return hf

    modules = []
    for entry in json.loads((folder / "modules.json").read_text(encoding="utf-8")):
        cls = import_from_string(entry["type"])
        if issubclass(cls, transformer.Transformer):
            cls = Transformer
        modules.append(cls.load(str(folder / entry["path"]), local_files_only=True))
    return SentenceTransformer(modules=modules, device="cpu").eval()


def export_pruned(folder: Path, out_dir: Path, task: str, library: str) -> Path:
    """Export the pruned in-memory model with optimum (no graph optimisation, eager attention)."""
    from optimum.exporters.onnx import onnx_export_from_model

    model = load_pruned(Path(folder))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with exporter_errors(f"could not export pruned model {folder}"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export_from_model(
            model, str(out_dir), task=task, library_name=library, do_validation=False
        )
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise UserError(f"optimum wrote no model.onnx into {out_dir}.")
    return path
