"""The benchmark's output: markdown tables ready for the README, and a latency-vs-fidelity plot."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.timing import GEMM_KINDS, GemmPeak, Harness
from benchmarks.variants import Variant

Setting = tuple[int, int]  # (threads, seq)


@dataclass(frozen=True)
class Row:
    variant: Variant
    size_mb: float | None = None
    mean_cos: float | None = None
    min_cos: float | None = None
    spearman: float | None = None
    macs_per_token: int | None = None
    latency_ms: dict[Setting, float] = field(default_factory=dict)
    peak_fraction: dict[Setting, float] = field(default_factory=dict)


def machine() -> dict[str, Any]:
    """CPU model, cores and the int8 instructions that decide which kernels MLAS can use."""
    import onnxruntime

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": ", ".join(isa) or "unknown",
        "onnxruntime": onnxruntime.__version__,
        "date": date.today().isoformat(),
    }


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _setting_name(s: Setting) -> str:
    return f"{s[0]} thr, seq {s[1]}"


def quality_table(rows: list[Row]) -> str:
    lines = [
        "| variant | size MB | mean cos | min cos | STS Spearman | build s | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        v = r.variant
        build = _f(v.build_seconds, ".0f")
        if v.export_seconds and v.key != "fp32":
            build += f" ({v.export_seconds:.0f} export)"
        lines.append(
            f"| {v.label} | {_f(r.size_mb, '.1f')} | {_f(r.mean_cos, '.4f')} | "
            f"{_f(r.min_cos, '.4f')} | {_f(r.spearman, '.4f')} | {build} | {v.note} |"
        )
    return "\n".join(lines)


def latency_table(rows: list[Row], settings: list[Setting]) -> str:
    head = " | ".join(_setting_name(s) for s in settings)
    lines = [f"| variant | {head} |", "|---|" + "---:|" * len(settings)]
    ref = next((r for r in rows if r.variant.key == "fp32"), None)
    for r in rows:
        cells = []
        for s in settings:
            ms = r.latency_ms.get(s)
            if ms is None:
                cells.append("–")
                continue
            base = ref.latency_ms.get(s) if ref else None
            cells.append(f"{ms:.2f} ({ms / base:.2f}×)" if base else f"{ms:.2f}")
        lines.append(f"| {r.variant.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peak_table(rows: list[Row], settings: list[Setting]) -> str:
    head = " | ".join(_setting_name(s) for s in settings)
    lines = [
        f"| variant | linear MMAC/token | {head} |",
        "|---|---:|" + "---:|" * len(settings),
    ]
    for r in rows:
        macs = _f(r.macs_per_token / 1e6 if r.macs_per_token else None, ".2f")
        cells = [
            _f(r.peak_fraction.get(s, None) and 100 * r.peak_fraction[s], ".0f") for s in settings
        ]
        cells = [c if c == "–" else c + " %" for c in cells]
        lines.append(f"| {r.variant.label} | {macs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gemm_table(peaks: list[GemmPeak]) -> str:
    shapes = list(peaks[0].per_shape["fp32"]) if peaks else []
    names = [f"{k}×{n}" for k, n in shapes]
    lines = [
        "| threads | M | kernel | " + " | ".join(names) + " | model-weighted |",
        "|---:|---:|---|" + "---:|" * (len(shapes) + 1),
    ]
    kernel = {
        "fp32": "fp32 MatMul",
        "int8": "MatMulInteger u8×s8→s32",
        "int8->fp32": "MatMulIntegerToFloat u8×s8→fp32",
    }
    for p in peaks:
        for kind in GEMM_KINDS:
            cells = [f"{p.per_shape[kind][s]:.1f}" for s in shapes]
            lines.append(
                f"| {p.threads} | {p.m} | {kernel[kind]} | "
                + " | ".join(cells)
                + f" | **{p.weighted[kind]:.1f}** |"
            )
    return "\n".join(lines)


def render(
    rows: list[Row],
    peaks: list[GemmPeak],
    harness: Harness,
    info: dict[str, Any],
    command: str,
    wall_seconds: float,
    title: str,
) -> str:
    settings = [(t, s) for t in harness.threads for s in harness.seqs]
    m = info["machine"]
    return "\n".join(
        [
            f"### {title}",
            "",
            f"Model: {info['model']}. Machine: {m['cpu']}, {m['cores']} cores ({m['isa']}), "
            f"onnxruntime {m['onnxruntime']}, {m['date']}. Command (wall time "
            f"{wall_seconds / 60:.0f} min):",
            "",
            f"    {command}",
            "",
            "**Quality, size, build time.** Fidelity is the cosine between each variant's sentence "
            f"embedding and the fp32 export's, on all {info['heldout_count']} texts of "
            "samples/heldout.txt (padded to 128); STS Spearman is on samples/sts-mini.csv "
            f"({info['sts_count']} pairs; fp32 gives the first row). Build time starts from the "
            "Hugging Face folder; for the baselines it includes the shared fp32 export (in "
            "brackets). Static variants calibrate on the same texts (samples/calibration.txt, "
            f"seeded sample of {info['calibration_count']}, padded to 128).",
            "",
            quality_table(rows),
            "",
            f"**Latency**, median ms per call, batch 1, ratio to fp32 in brackets. "
            f"{harness.rounds} interleaved rounds × {harness.per_round} calls per model and setting "
            "(every model runs in each round, so drift on this shared machine favours none).",
            "",
            latency_table(rows, settings),
            "",
            f"The all-cores settings ({max(harness.threads)} threads) share the cores with "
            "whatever else runs on the host; on a busy machine they measure contention as much "
            "as the model, so read them as a comparison between variants, not as absolute "
            "speeds. A peak fraction above 100 % below means the GEMM peak was measured at a "
            "busier moment than the model.",
            "",
            "**Fraction of the GEMM peak**: linear-layer ops of the variant (2 × MACs × seq) per "
            "median call, over the peak this CPU reaches on the same shapes (int8 peak = "
            "MatMulInteger for int8 variants, fp32 MatMul for fp32). The rest of each call is "
            "attention, softmax, LayerNorm, GELU, (de)quantization and framework overhead.",
            "",
            peak_table(rows, settings),
            "",
            "**GEMM peak on this CPU**, GOPS (2 ops per MAC), one-node onnxruntime graphs at the "
            "model's linear shapes (K×N; M = sequence length), measured interleaved the same way. "
            "Model-weighted = total ops / total time over the model's linear layers.",
            "",
            gemm_table(peaks),
            "",
        ]
    )


def plot(rows: list[Row], setting: Setting, path: Path) -> Path | None:
    """Latency vs mean cosine, one labelled point per measured variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.latency_ms.get(setting) and r.mean_cos is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    xs = [r.latency_ms[setting] for r in points]
    ys = [r.mean_cos for r in points if r.mean_cos is not None]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for r in sorted(points, key=lambda p: (-(p.mean_cos or 0), p.latency_ms[setting])):
        x, y = r.latency_ms[setting], r.mean_cos or 0.0
        # Points that nearly coincide (e.g. two int8 builds) get their labels stacked, not overprinted.
        near = sum(abs(x - px) < 0.15 * span_x and abs(y - py) < 0.04 * span_y for px, py in placed)
        placed.append((x, y))
        is_ep = r.variant.key.startswith("edgepack")
        ax.scatter(
            x,
            y,
            s=60,
            marker="o" if is_ep else "s",
            color="tab:blue" if is_ep else "tab:gray",
            zorder=3,
        )
        ax.annotate(
            r.variant.label,
            (x, y),
            textcoords="offset points",
            xytext=(6, 4 + 11 * near),
            fontsize=8,
        )
    ax.margins(x=0.08, y=0.1)  # room for stacked labels above the top points
    ax.set_xlabel(f"median latency, ms ({setting[0]} thread, seq {setting[1]}, batch 1)")
    ax.set_ylabel("mean cosine to fp32 (held-out texts)")
    ax.set_title("Latency vs fidelity (up and left is better)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


MARK_START, MARK_END = "<!-- breakdown:start -->", "<!-- breakdown:end -->"


def splice(results: Path, section: str) -> None:
    """Put ``section`` between the markers of ``results`` (appended the first time)."""
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    block = f"{MARK_START}\n{section}{MARK_END}\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    results.write_text(text, encoding="utf-8")


def spliced_section(results: Path) -> str:
    """The section between the markers of ``results`` ("" when there is none)."""
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    if MARK_START not in text or MARK_END not in text:
        return ""
    return text.split(MARK_START, 1)[1].split(MARK_END, 1)[0].lstrip("\n")
