"""The end of a build: host latency of each bundle beside fp32, a table, and the build report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgepack.bundle import BuildResult
from edgepack.progress import Progress


def measure_latency(
    results: list[BuildResult], progress: Progress, original: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Each bundle's model beside its fp32 source (and the original model, when distillation or
    pruning changed it), interleaved on this host, one row at the shipped sequence length.

    Host numbers say how the variants compare here; the device's own numbers come from bench.py.
    """
    from edgepack.evaluate import host_latency

    latency = {}
    for r in results:
        m = r.manifest
        threads = min(int(m["harness"]["threads"]), os.cpu_count() or 1)
        ref = np.load(r.folder / "reference" / "inputs.npz")
        feeds = {k: ref[k][:1] for k in ref.files}
        models = {"model": r.folder / m["model"]["file"]}
        if m["model"]["precision"] != "fp32":
            models["fp32"] = r.fp32_model
        if original is not None:
            models["original"] = original
        with progress.stage("latency", f"{r.target}, {threads} threads, host"):
            lat = host_latency(models, feeds, threads=threads, rounds=10)
        lat.setdefault("fp32", lat["model"])
        latency[r.target] = {**lat, "threads": threads}
        if original is not None:
            latency[r.target]["original_bytes"] = original.stat().st_size
    return latency


COLUMNS = ("target", "prec", "MB", "size x", "cos", "min cos", "p50 ms", "p50 x")


def print_summary(
    results: list[BuildResult], latency: dict[str, dict[str, Any]], progress: Progress
) -> None:
    """One row per bundle, narrow enough for an 80-column terminal; ratios are against the fp32
    export of the shipped model (``size x``, ``p50 x``), and a line per target compares with the original model."""
    table = Table(title="edgepack build", padding=(0, 1), collapse_padding=True)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "target" else "right", no_wrap=True)
    for r in results:
        m, lat = r.manifest, latency[r.target]
        table.add_row(
            r.target,
            m["model"]["precision"],
            f"{m['model']['bytes'] / 1e6:.1f}",
            f"{m['model']['bytes'] / m['model']['fp32_bytes']:.2f}",
            f"{m['fidelity']['mean_cosine']:.4f}",
            f"{m['fidelity']['min_cosine']:.4f}",
            f"{lat['model']['p50_ms']:.2f}",
            f"{lat['model']['p50_ms'] / lat['fp32']['p50_ms']:.2f}",
        )
    progress.console.print(table)
    for r in results:
        lat = latency[r.target]
        if "original" in lat:
            size = r.manifest["model"]["bytes"] / lat["original_bytes"]
            speed = lat["model"]["p50_ms"] / lat["original"]["p50_ms"]
            progress.note(
                f"{r.target} vs the original model's fp32 export: size {size:.2f}x, "
                f"p50 {speed:.2f}x ({lat['original']['p50_ms']:.2f} ms)"
            )
