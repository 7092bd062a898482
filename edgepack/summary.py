"""The table printed at the end of a build: size, fidelity and host latency per bundle."""

from __future__ import annotations

import os

import numpy as np
from rich.table import Table

from edgepack.bundle import BuildResult
from edgepack.progress import Progress


def print_summary(results: list[BuildResult], progress: Progress) -> None:
    from edgepack.evaluate import host_latency

    table = Table(title="edgepack build")
    for col in (
        "target",
        "precision",
        "size MB",
        "fp32 MB",
        "mean cos",
        "min cos",
        "p50 ms",
        "fp32 p50 ms",
        "ratio",
    ):
        table.add_column(col, justify="right" if col != "target" else "left")
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
        fp32_p50 = lat.get("fp32", lat["model"])["p50_ms"]
        table.add_row(
            r.target,
            m["model"]["precision"],
            f"{m['model']['bytes'] / 1e6:.1f}",
            f"{m['model']['fp32_bytes'] / 1e6:.1f}",
            f"{m['fidelity']['mean_cosine']:.4f}",
            f"{m['fidelity']['min_cosine']:.4f}",
            f"{lat['model']['p50_ms']:.2f}",
            f"{fp32_p50:.2f}",
            f"{lat['model']['p50_ms'] / fp32_p50:.2f}",
        )
    progress.console.print(table)
