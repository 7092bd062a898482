"""HFModel -> fp32 OnnxModel with optimum's exporter, checked against PyTorch on real inputs.

Sentence-transformers models are exported through optimum's sentence-transformers path so the
pooling and L2-normalisation live in the graph: the device gets the embedding, not token states.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.artifacts import HFModel, OnnxModel, sha256_file
from edgepack.errors import UserError

# Export vs PyTorch: fp32 kernels differ in summation order; 1e-3 absolute is far above that
# noise and far below any real mismatch (a wrong op or a mis-traced branch gives O(0.1)).
EXPORT_ATOL = 1e-3
PRIMARY_OUTPUT = {
    "feature-extraction": "last_hidden_state",
    "text-classification": "logits",
    "token-classification": "logits",
}
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


def _primary(model: HFModel) -> str:
    if model.library == "sentence_transformers":
        return "sentence_embedding"
    return PRIMARY_OUTPUT[model.task]


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


def torch_reference(model: HFModel, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """Run the PyTorch model on ONNX-style feeds; the yardstick for the export check."""
    import torch

    from edgepack.prune.stage import is_pruned, load_pruned

    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.inference_mode():
        if is_pruned(model.path):
            net = load_pruned(model.path)
            if model.library == "sentence_transformers":
                return net(dict(tensors))[output].numpy()
            return getattr(net(**tensors), output).numpy()
        if model.library == "sentence_transformers":
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(model.path), device="cpu", local_files_only=True)
            return st(dict(tensors))[output].numpy()
        import transformers

        cls = {
            "feature-extraction": transformers.AutoModel,
            "text-classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification,
        }[model.task]
        net = cls.from_pretrained(str(model.path), local_files_only=True).eval()
        return getattr(net(**tensors), output).numpy()


def _export_folder(model: HFModel, staging: Path, opset: int | None) -> None:
    from optimum.exporters.onnx import main_export

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(
                str(model.path),
                output=str(staging),
                task=model.task,
                library_name=model.library,
                opset=opset,
                do_validation=False,
                local_files_only=True,
                trust_remote_code=False,
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not export {model.source}: {first}") from None


def export_onnx(model: HFModel, out_dir: Path, opset: int | None = None) -> OnnxModel:
    """Export with optimum; validation against PyTorch is a separate step (``validate``)."""
    from edgepack.prune.stage import export_pruned, is_pruned

    staging = out_dir / "optimum"
    if is_pruned(model.path):
        # Uneven heads/FFN widths cannot be described by config.json: export the rebuilt module.
        export_pruned(model.path, staging, model.task, model.library)
        for name in TOKENIZER_FILES:
            if (model.path / name).is_file() and not (staging / name).is_file():
                shutil.copy2(model.path / name, staging / name)
    else:
        _export_folder(model, staging, opset)
    onnx_path = out_dir / "model.onnx"
    shutil.move(str(staging / "model.onnx"), onnx_path)
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer_dir.mkdir()
    for name in TOKENIZER_FILES:
        if (staging / name).is_file():
            shutil.copy2(staging / name, tokenizer_dir / name)
    shutil.rmtree(staging)
    primary = _primary(model)
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
        records={"source_model": model.source},
    )


def validate(onnx_model: OnnxModel, model: HFModel, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compare ONNX against PyTorch; every mismatch is collected into one message."""
    from edgepack.evaluate import run_onnx

    got = run_onnx(onnx_model.path, [feeds], threads=2)[0]
    want = torch_reference(model, feeds, onnx_model.primary_output)
    problems = []
    if got.shape != want.shape:
        problems.append(f"shape {got.shape} vs PyTorch {want.shape}")
        diff = float("inf")
    else:
        diff = float(np.max(np.abs(got.astype(np.float64) - want)))
        if not np.isfinite(diff) or diff > EXPORT_ATOL:
            problems.append(f"max abs diff {diff:.3g} > {EXPORT_ATOL}")
    if problems:
        raise UserError(
            f"ONNX export of {model.source} does not match PyTorch on "
            f"{onnx_model.primary_output!r}: " + "; ".join(problems)
        )
    return {"max_abs_diff_vs_pytorch": diff, "atol": EXPORT_ATOL, "batch": list(got.shape)}
