"""Fidelity and host-side latency figures, shared by the build gate and ``edgepack eval``.

Fidelity compares a model's primary output against a reference model's on the same inputs:
cosine per example (per valid token for token outputs), plus top-1 agreement for classifiers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.families import encoder
from edgepack.metrics import cosine_rows

if TYPE_CHECKING:
    from edgepack.progress import Advance


def session(path: Path | bytes, threads: int = 1, weights_folder: Path | None = None) -> Any:
    """A CPU session on a file, or on a serialized model (graphs edited in memory); such a graph
    whose weights are external data reads them from ``weights_folder``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if weights_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(weights_folder)
        )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Spinning threads fight over a shared host's cores and skew side-by-side ratios.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path, threads: int = 1) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """One session reused across calls: the primary output for one batch of feeds."""
    sess = session(path, threads)
    names = {i.name for i in sess.get_inputs()}
    return lambda feeds: sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def run_onnx(
    path: Path,
    feeds: Iterable[dict[str, np.ndarray]],
    threads: int = 1,
    advance: Advance | None = None,
) -> list[np.ndarray]:
    """The first (primary) output for each batch of feeds; a list's batches are counted to
    ``advance`` as they finish."""
    total = len(feeds) if isinstance(feeds, Sized) else 0
    sess = session(path, threads)
    names = {i.name for i in sess.get_inputs()}
    batch_dim = sess.get_inputs()[0].shape[0]
    outputs = []
    for f in feeds:
        f = {k: v for k, v in f.items() if k in names}
        rows = len(next(iter(f.values())))
        # Fixed-shape models (NNAPI/CoreML bundles) take only their own batch size.
        step = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else rows
        parts = [
            sess.run(None, {k: v[i : i + step] for k, v in f.items()})[0]
            for i in range(0, rows, step)
        ]
        outputs.append(np.concatenate(parts))
        if advance is not None and total:
            advance(len(outputs), total, "batches")
    return outputs


def _rows(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Flatten to one row per example, or per valid token for [batch, seq, dim] outputs."""
    if output.ndim == 3:
        flat = output.reshape(-1, output.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).astype(bool)]
        return flat.astype(np.float64)
    return output.reshape(output.shape[0], -1).astype(np.float64)


def fidelity_rows(outputs: list[np.ndarray], masks: list[np.ndarray] | None) -> np.ndarray:
    """All batches as one float64 matrix of rows to compare (examples, or valid tokens)."""
    masks = masks or [None] * len(outputs)  # type: ignore[list-item]
    return np.concatenate([_rows(o, m) for o, m in zip(outputs, masks, strict=True)])


def fidelity(
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
    task: str = "feature-extraction",
) -> dict[str, Any]:
    """Mean/min cosine, max abs diff and, for classifiers, top-1 agreement."""
    ref, got = fidelity_rows(reference, masks), fidelity_rows(candidate, masks)
    cos = cosine_rows(ref, got)
    result: dict[str, Any] = {
        "count": len(cos),
        "mean_cosine": round(float(np.mean(cos)), 6),
        "min_cosine": round(float(np.min(cos)), 6),
        "p05_cosine": round(float(np.percentile(cos, 5)), 6),
        "max_abs_diff": round(float(np.max(np.abs(ref - got))), 6),
    }
    if task in encoder.CLASSIFIER_TASKS:
        result["top1_agreement"] = round(float(np.mean(ref.argmax(1) == got.argmax(1))), 6)
    return result


def host_latency(
    models: dict[str, Path],
    feeds: dict[str, np.ndarray],
    threads: int,
    rounds: int = 20,
    per_round: int = 5,
) -> dict[str, dict[str, float]]:
    """Median latency per model, measured interleaved (A B A B ...) so drift favours none."""
    sessions = {}
    for name, path in models.items():
        sess = session(path, threads)
        wanted = {i.name for i in sess.get_inputs()}
        batch = {k: v for k, v in feeds.items() if k in wanted}
        for _ in range(3):
            sess.run(None, batch)
        sessions[name] = (sess, batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, (sess, batch) in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, batch)
                times[name].append((time.perf_counter() - start) * 1000)
    return {
        name: {
            "p50_ms": round(float(np.median(t)), 3),
            "p90_ms": round(float(np.percentile(t, 90)), 3),
            "runs": len(t),
            "times_ms": [round(x, 4) for x in t],
        }
        for name, t in times.items()
    }
