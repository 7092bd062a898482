"""What ``edgepack eval`` scores: a shipped bundle, or a model folder exported to fp32 on the spot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepack.bundle import ARCHIVE_SUFFIXES, extract_bundle, read_manifest
from edgepack.export import export_cached, labels_of
from edgepack.load import load_model


@dataclass(frozen=True)
class Evaluable:
    """What ``edgepack eval`` needs of a bundle or a model folder, whatever it came from."""

    name: str
    model_file: Path
    tokenizer_dir: Path
    task: str
    seq_len: int
    labels: list[str] | None


def open_evaluable(spec: Path, workdir: Path) -> Evaluable:
    """A bundle (folder or .tar.gz) as shipped, or a Hugging Face model folder exported to fp32."""
    if spec.name.endswith(ARCHIVE_SUFFIXES):
        spec = extract_bundle(spec, workdir)
    if (spec / "manifest.json").is_file():
        manifest = read_manifest(spec)
        return Evaluable(
            spec.name,
            spec / manifest["model"]["file"],
            spec / "tokenizer",
            manifest["task"],
            int(manifest["harness"]["seq_len"]),
            manifest.get("labels"),
        )
    model = load_model(str(spec))
    onnx_model, _ = export_cached(model)
    return Evaluable(
        spec.name,
        onnx_model.path,
        onnx_model.tokenizer_dir,
        model.task,
        min(128, model.max_length),
        labels_of(model.path),
    )
