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

    latency: dict[str, dict[str, Any]] = {}
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
            lat = host_latency(models, feeds, threads=threads, rounds=ROUNDS, per_round=PER_ROUND)
        lat.setdefault("fp32", lat["model"])
        ratio = speed_ratio(lat["model"]["times_ms"], lat["fp32"]["times_ms"], PER_ROUND)
        latency[r.target] = {**lat, "threads": threads, "ratio": ratio}
        if original is not None:
            latency[r.target]["original_bytes"] = original.stat().st_size
    return latency


# host_latency runs the models in turn, PER_ROUND calls each, ROUNDS times: 50 calls a model, a
# second or two for a small encoder. Each round gives one ratio measured under the same load.
ROUNDS, PER_ROUND = 10, 5
# Per-round ratios spread wider than this fraction of their median: the machine was busy.
NOISY_SPREAD = 0.25


def speed_ratio(model_ms: list[float], fp32_ms: list[float], per_round: int) -> dict[str, Any]:
    """The model's latency over fp32's, from timings taken interleaved in rounds of ``per_round``
    calls each: the median of the per-round ratios (each round's medians, measured moments apart,
    so a load that comes and goes shifts both), and their min and max. One ratio of two medians
    taken a second apart printed int8 1.72x slower than fp32 on a loaded machine."""
    rounds = min(len(model_ms), len(fp32_ms)) // per_round
    if rounds == 0:
        raise ValueError("no complete round of timings")
    ratios = [
        float(np.median(model_ms[i * per_round : (i + 1) * per_round]))
        / float(np.median(fp32_ms[i * per_round : (i + 1) * per_round]))
        for i in range(rounds)
    ]
    median = float(np.median(ratios))
    low, high = min(ratios), max(ratios)
    return {
        "median": round(median, 3),
        "min": round(low, 3),
        "max": round(high, 3),
        "rounds": rounds,
        "noisy": (high - low) > NOISY_SPREAD * median,
    }


COLUMNS = ("target", "prec", "MB", "size x", "cos", "min cos", "p50 ms", "p50 x", "x range")


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
            f"{lat['ratio']['median']:.2f}",
            f"{lat['ratio']['min']:.2f}-{lat['ratio']['max']:.2f}",
        )
    progress.console.print(table)
    progress.note(
        f"p50 x: median over {ROUNDS} interleaved rounds of the bundle's model / fp32 on this "
        "host; x range: the lowest and highest round"
    )
    noisy = [r.target for r in results if latency[r.target]["ratio"]["noisy"]]
    if noisy:
        progress.note(
            f"noisy: the machine is busy ({', '.join(noisy)}: rounds differ by more than "
            f"{NOISY_SPREAD:.0%}); rerun on an idle host before trusting p50 x"
        )
    for r in results:
        lat = latency[r.target]
        if "original" in lat:
            size = r.manifest["model"]["bytes"] / lat["original_bytes"]
            speed = lat["model"]["p50_ms"] / lat["original"]["p50_ms"]
            progress.note(
                f"{r.target} vs the original model's fp32 export: size {size:.2f}x, "
                f"p50 {speed:.2f}x ({lat['original']['p50_ms']:.2f} ms)"
            )
