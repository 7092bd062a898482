"""HFModel -> fp32 OnnxModel with optimum's exporter, checked against PyTorch on real inputs.

Sentence-transformers models are exported through optimum's sentence-transformers path so the
pooling and L2-normalisation live in the graph: the device gets the embedding, not token states.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.artifacts import HFModel, OnnxModel, sha256_file
from edgepack.cache import cached
from edgepack.errors import exporter_errors
from edgepack.families import family_of
from edgepack.folders import copy_tokenizer_files

# Part of every export cache key (encoders and decoders share ``collect_export``): bump when the
# folder written for the same model changes. ``__version__`` alone moves only at releases.
EXPORT_VERSION = 1


def io_signature(path: Path) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values: Any) -> tuple[dict[str, Any], ...]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append(
                {
                    "name": v.name,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": dims,
                }
            )
        return tuple(out)

    return describe(graph.input), describe(graph.output)


def _keep_outputs(path: Path, keep: str) -> None:
    """Drop outputs the device does not need (e.g. token states beside the sentence embedding)."""
    import onnx

    model = onnx.load(str(path))
    outputs = [o for o in model.graph.output if o.name == keep]
    if len(outputs) != len(model.graph.output):
        del model.graph.output[:]
        model.graph.output.extend(outputs)
        onnx.save(model, str(path))


def labels_of(folder: Path) -> list[str] | None:
    """Class names in id order from config.json, for metrics and the device app."""
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    id2label = config.get("id2label") or {}
    if not id2label or config.get("architectures", [""])[0].endswith("Model"):
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def optimum_export(
    model: HFModel, staging: Path, opset: int | None, task: str | None = None
) -> None:
    """optimum's exporter, offline and quiet, into ``staging``; ``task`` overrides the model's
    (decoders export ``text-generation-with-past``)."""
    from optimum.exporters.onnx import main_export

    with exporter_errors(f"could not export {model.source}"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(model.path),
            output=str(staging),
            task=task or model.task,
            library_name=model.library,
            opset=opset,
            do_validation=False,
            local_files_only=True,
            trust_remote_code=False,
        )


def export_onnx(model: HFModel, out_dir: Path, opset: int | None = None) -> OnnxModel:
    """Export with optimum; validation against PyTorch is a separate step (``validate``)."""
    from edgepack.prune import export_pruned, is_pruned

    staging = out_dir / "optimum"
    if is_pruned(model.path):
        # Uneven heads/FFN widths cannot be described by config.json: export the rebuilt module.
        export_pruned(model.path, staging, model.task, model.library)
        copy_tokenizer_files(model.path, staging)
    else:
        optimum_export(model, staging, opset)
    primary = family_of(model.model_type).primary_output(model.task, model.library)
    return collect_export(model, staging, out_dir, primary, {"source_model": model.source})


def collect_export(
    model: HFModel,
    staging: Path,
    out_dir: Path,
    primary: str,
    records: dict[str, Any],
    only_primary: bool = True,
) -> OnnxModel:
    """Move what optimum wrote in ``staging`` into the stage's folder and describe it: the graph
    (and its external weights, for models over 2 GB), the tokenizer files, its I/O signature.
    ``only_primary`` drops the outputs a device does not need (a decoder needs all of them: the
    KV cache comes back as outputs)."""
    onnx_path = out_dir / "model.onnx"
    shutil.move(str(staging / "model.onnx"), onnx_path)
    if (staging / "model.onnx_data").is_file():
        shutil.move(str(staging / "model.onnx_data"), out_dir / "model.onnx_data")
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer_dir.mkdir()
    copy_tokenizer_files(staging, tokenizer_dir)
    shutil.rmtree(staging)
    if only_primary:
        _keep_outputs(onnx_path, primary)
    inputs, outputs = io_signature(onnx_path)
    return OnnxModel(
        path=onnx_path,
        task=model.task,
        precision="fp32",
        sha256=sha256_file(onnx_path),
        inputs=inputs,
        outputs=outputs,
        primary_output=primary,
        tokenizer_dir=tokenizer_dir,
        records=records,
    )


def export_cached(model: HFModel) -> tuple[OnnxModel, bool]:
    """The export stage behind the cache: one entry per model, whoever asks (build or eval)."""
    settings = {
        "edgepack": __version__,
        "code": EXPORT_VERSION,
        "task": model.task,
        "library": model.library,
    }
    return cached("export", settings, model.digest, OnnxModel, lambda out: export_onnx(model, out))
