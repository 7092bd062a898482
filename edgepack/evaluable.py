"""What ``edgepack eval`` scores: a shipped bundle, or a model folder exported to fp32 on the spot.

A decoder's ``seq_len`` is its context length: the longest window its perplexity is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepack.bundle import ARCHIVE_SUFFIXES, extract_bundle, read_manifest
from edgepack.export import export_cached, export_decoder_cached, labels_of
from edgepack.families import is_generative
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
    family: str = "encoder"  # or "decoder": perplexity, not a task metric


def open_evaluable(spec: Path, workdir: Path) -> Evaluable:
    """A bundle (folder or .tar.gz) as shipped, or a Hugging Face model folder exported to fp32."""
    if spec.name.endswith(ARCHIVE_SUFFIXES):
        spec = extract_bundle(spec, workdir)
    if (spec / "manifest.json").is_file():
        manifest = read_manifest(spec)
        if manifest.get("family") == "decoder":
            return Evaluable(
                spec.name,
                spec / manifest["model"]["file"],
                spec / "tokenizer",
                manifest["task"],
                int(manifest["generation"]["context_length"]),
                None,
                "decoder",
            )
        return Evaluable(
            spec.name,
            spec / manifest["model"]["file"],
            spec / "tokenizer",
            manifest["task"],
            int(manifest["harness"]["seq_len"]),
            manifest.get("labels"),
        )
    model = load_model(str(spec))
    if is_generative(model.model_type):
        fp32, _ = export_decoder_cached(model)
        context = min(int(fp32.records["context_length"]), model.max_length)
        return Evaluable(
            spec.name, fp32.path, fp32.tokenizer_dir, model.task, context, None, "decoder"
        )
    onnx_model, _ = export_cached(model)
    return Evaluable(
        spec.name,
        onnx_model.path,
        onnx_model.tokenizer_dir,
        model.task,
        min(128, model.max_length),
        labels_of(model.path),
    )
