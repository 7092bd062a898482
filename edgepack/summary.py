"""The end of a build: host latency of each bundle beside fp32, a table, and the build report."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from rich.table import Table

from edgepack.bundle import BuildResult
from edgepack.progress import Progress


def measure_latency(results: list[BuildResult], progress: Progress) -> dict[str, dict[str, Any]]:
    """Each bundle's model and its fp32 source, interleaved on this host (one row, seq as shipped).

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
        with progress.stage("latency", f"{r.target}, {threads} threads, host"):
            lat = host_latency(models, feeds, threads=threads, rounds=10)
        lat.setdefault("fp32", lat["model"])
        latency[r.target] = {**lat, "threads": threads}
    return latency


def print_summary(
    results: list[BuildResult], latency: dict[str, dict[str, Any]], progress: Progress
) -> None:
    table = Table(title="edgepack build")
    columns = (
        "target",
        "precision",
        "size MB",
        "fp32 MB",
        "mean cos",
        "min cos",
        "p50 ms",
        "fp32 p50 ms",
        "ratio",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "target" else "right")
    for r in results:
        m, lat = r.manifest, latency[r.target]
        table.add_row(
            r.target,
            m["model"]["precision"],
            f"{m['model']['bytes'] / 1e6:.1f}",
            f"{m['model']['fp32_bytes'] / 1e6:.1f}",
            f"{m['fidelity']['mean_cosine']:.4f}",
            f"{m['fidelity']['min_cosine']:.4f}",
            f"{lat['model']['p50_ms']:.2f}",
            f"{lat['fp32']['p50_ms']:.2f}",
            f"{lat['model']['p50_ms'] / lat['fp32']['p50_ms']:.2f}",
        )
    progress.console.print(table)
