"""The end of a decoder build: host speed beside fp32, the summary table, and the build report.

The encoder's ``summary`` and ``report`` read cosines and per-query latency; a decoder's figures
are perplexity, next-token agreement, time to first token and decode tokens/s, so it gets its own
table and page. Both reports share one name in the output folder (report.md, report.html) and the
plots of the other kind's last build are removed, so the report there is always this build's.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgepack.bundle import BuildResult, Outbox, write_files
from edgepack.progress import Progress
from edgepack.report import png

ROUNDS = 5  # interleaved rounds per model; the median of each figure is kept
NEW_TOKENS = 16  # decode steps timed per round
THREADS = 1  # as bench.py's default, so host and device figures read alike


def _speed(sessions: dict[str, Any], prompt: list[int]) -> dict[str, dict[str, float]]:
    """Median time to first token and decode tokens/s per model, measured A B A B on this host."""
    from edgepack.families.generate import empty_past, step

    ttft: dict[str, list[float]] = {name: [] for name in sessions}
    rate: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(ROUNDS + 1):  # the first round warms up and is dropped below
        for name, sess in sessions.items():
            start = time.perf_counter()
            logits, past = step(sess, prompt, empty_past(sess), 0)
            first = time.perf_counter()
            pos = len(prompt)
            for _ in range(NEW_TOKENS):
                logits, past = step(sess, [int(np.argmax(logits[-1]))], past, pos)
                pos += 1
            ttft[name].append((first - start) * 1000)
            rate[name].append(NEW_TOKENS / (time.perf_counter() - first))
    return {
        name: {
            "ttft_ms": round(float(np.median(ttft[name][1:])), 3),
            "tokens_per_s": round(float(np.median(rate[name][1:])), 2),
        }
        for name in sessions
    }


def measure_speed(results: list[BuildResult], progress: Progress) -> dict[str, dict[str, Any]]:
    """Each bundle's shipped model beside its fp32 export on this host, one thread."""
    import json

    from edgepack.evaluate import session

    speed = {}
    for r in results:
        reference = json.loads((r.folder / r.manifest["reference"]["inputs"]).read_text())
        prompt = reference["prompts"][0]["prompt"]
        models = {"model": r.folder / r.manifest["model"]["file"], "fp32": r.fp32_model}
        with progress.stage("speed", f"{r.target}, {len(prompt)}-token prompt, host"):
            speed[r.target] = _speed({k: session(v, THREADS) for k, v in models.items()}, prompt)
    return speed


COLUMNS = (
    "target",
    "prec",
    "MB",
    "size x",
    "ppl",
    "fp32 ppl",
    "top-1",
    "TTFT ms",
    "tok/s",
    "speed x",
)


def _row(r: BuildResult, speed: dict[str, Any]) -> list[str]:
    m, fid, s = r.manifest, r.manifest["fidelity"], speed[r.target]
    return [
        r.target,
        m["model"]["precision"],
        f"{m['model']['bytes'] / 1e6:.1f}",
        f"{m['model']['bytes'] / m['model']['fp32_bytes']:.2f}",
        f"{fid['perplexity']:.2f}",
        f"{fid['perplexity_fp32']:.2f}",
        f"{fid['top1_agreement']:.3f}",
        f"{s['model']['ttft_ms']:.1f}",
        f"{s['model']['tokens_per_s']:.1f}",
        f"{s['model']['tokens_per_s'] / s['fp32']['tokens_per_s']:.2f}",
    ]


def print_summary(
    results: list[BuildResult], speed: dict[str, dict[str, Any]], progress: Progress
) -> None:
    """One row per bundle: size, held-out perplexity beside fp32's, and host speed; ``size x``
    and ``speed x`` are the shipped model against its fp32 export."""
    table = Table(title="edgepack build", padding=(0, 1), collapse_padding=True)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "target" else "right", no_wrap=True)
    for r in results:
        table.add_row(*_row(r, speed))
    progress.console.print(table)


def _plots(results: list[BuildResult], speed: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """What each weight-only step tried cost in perplexity, and host speed beside fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    plots["report-decoder-perplexity.png"] = _perplexity_plot(results)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    names = ["fp32"] + [r.target for r in results]
    for ax, key, label in zip(
        axes,
        ("ttft_ms", "tokens_per_s"),
        ("time to first token, ms", "decode tokens/s"),
        strict=True,
    ):
        values = [speed[results[0].target]["fp32"][key]]
        values += [speed[r.target]["model"][key] for r in results]
        bars = ax.bar(names, values, color=["grey"] + ["tab:blue"] * len(results))
        ax.bar_label(bars, [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=7)
        ax.set_ylim(0, max(values) * 1.15)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Host speed, {THREADS} thread, median of {ROUNDS} interleaved rounds")
    fig.tight_layout()
    plots["report-decoder-speed.png"] = png(fig)
    return plots


def _perplexity_plot(results: list[BuildResult]) -> bytes:
    """Each step the accuracy search tried as its perplexity change against fp32, in %: one point
    on a perplexity axis said nothing, and an axis from 422.8 to 423.9 made +0.3 % look huge."""
    import matplotlib.pyplot as plt

    labels, changes, chosen = [], [], []
    for r in results:
        fp32 = r.manifest["fidelity"]["perplexity_fp32"]
        tried = r.manifest["fidelity"].get("tried") or []
        for n, t in enumerate(tried):
            labels.append(f"{r.target}\n{t['step']}" if len(results) > 1 else str(t["step"]))
            changes.append((t["perplexity"] / fp32 - 1) * 100)
            chosen.append(n == len(tried) - 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(labels) + 2), 3.6))
    bars = ax.bar(
        range(len(labels)),
        changes,
        width=0.6,
        color=["tab:blue" if c else "lightgrey" for c in chosen],
    )
    ax.bar_label(bars, [f"{c:+.1f}%" for c in changes], fontsize=8, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
    ax.set_xlim(-0.8, len(labels) - 0.2)
    top = max([*(abs(c) for c in changes), 0.1])
    ax.set_ylim(min(0.0, min([*changes, 0.0]) * 1.3), top * 1.3)
    ax.set_ylabel("held-out perplexity vs fp32, %")
    ax.set_xlabel("weight-only step tried (blue: the one shipped)")
    ax.set_title("Perplexity cost of each step the accuracy search tried")
    return png(fig)


HEADER = [
    "bundle",
    "precision",
    "MB (model / fp32)",
    "perplexity (model / fp32)",
    "top-1 agreement",
    "greedy prefix (mean tokens)",
    "host TTFT ms (model / fp32)",
    "host tok/s (model / fp32)",
]


def _table(results: list[BuildResult], speed: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        m, fid, s = r.manifest, r.manifest["fidelity"], speed[r.target]
        rows.append(
            [
                r.folder.name,
                m["model"]["precision"],
                f"{m['model']['bytes'] / 1e6:.1f} / {m['model']['fp32_bytes'] / 1e6:.1f}",
                f"{fid['perplexity']:.2f} / {fid['perplexity_fp32']:.2f} "
                f"({fid['relative_perplexity_increase']:+.1%})",
                f"{fid['top1_agreement']:.3f}",
                f"{fid.get('greedy_prefix_mean', 0.0):.1f} of {fid.get('greedy_new_tokens', 0)}",
                f"{s['model']['ttft_ms']:.1f} / {s['fp32']['ttft_ms']:.1f}",
                f"{s['model']['tokens_per_s']:.1f} / {s['fp32']['tokens_per_s']:.1f}",
            ]
        )
    return rows


def _gguf_note(manifest: dict[str, Any]) -> str:
    """A GGUF source is already quantized: its "fp32" is that model dequantized."""
    gguf = manifest["source"].get("gguf")
    if not gguf:
        return ""
    kinds = ", ".join(f"{k} {v:,}" for k, v in gguf["parameters_by_type"].items())
    note = (
        f" The source is a GGUF of type {gguf['file_type']} (parameters by tensor type: {kinds}): "
        "fp32 here is that model dequantized, and fidelity is measured against it."
    )
    blocks = (manifest.get("quantization") or {}).get("source_blocks")
    if blocks:
        carried = ", ".join(f"{k} {v:,}" for k, v in blocks["carried"].items()) or "none"
        again = ", ".join(f"{k} {v:,}" for k, v in blocks["requantized"].items()) or "none"
        note += (
            f" Weights carried as the file's own blocks (parameters): {carried}; quantized "
            f"again: {again}."
        )
    return note


def write_report(
    results: list[BuildResult],
    speed: dict[str, dict[str, Any]],
    timings: dict[str, float],
    out: Path,
) -> tuple[Path, Path]:
    """report.md, report.html (plots inline) and the plots, replacing the previous build's."""
    rows, plots = _table(results, speed), _plots(results, speed)
    first = results[0].manifest
    title = f"edgepack build: {Path(first['source']['model']).name} (decoder)"
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    intro = (
        f"Built {first['built_at']} from `{first['source']['model']}` by edgepack "
        f"{first['versions'].get('edgepack')}, onnxruntime {first['versions'].get('onnxruntime')}. "
        f"Perplexity and top-1 agreement (next token, the same positions as fp32) on "
        f"{first['fidelity']['tokens']} held-out tokens; the greedy prefix is how many tokens "
        f"of each reference continuation stay on fp32's path.{_gguf_note(first)} "
        f"Stage times: {stages}."
    )
    md = [f"# {title}", "", intro, "", "| " + " | ".join(HEADER) + " |"]
    md += ["|" + "---|" * len(HEADER)] + ["| " + " | ".join(row) + " |" for row in rows]
    md += [""] + [f"![{Path(name).stem}]({name})" for name in plots]
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    images = "".join(
        f'<img alt="{Path(n).stem}" src="data:image/png;base64,{base64.b64encode(d).decode()}">'
        for n, d in plots.items()
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%;"
        "margin:1em 0;display:block}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro.replace('`', ''))}</p><table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        + f"</tr>{cells}</table>{images}</body></html>"
    )
    files = {**plots, "report.md": ("\n".join(md) + "\n").encode(), "report.html": page.encode()}
    write_files(out, files)
    return out / "report.md", out / "report.html"


def finish_decoder(results: list[BuildResult], progress: Progress, box: Outbox) -> None:
    """Host speed, the summary table and the report, written into ``box`` to be published with
    the bundles, as ``pipeline.finish`` does for encoders."""
    speed = measure_speed(results, progress)
    print_summary(results, speed, progress)
    with box.report_folder() as folder:
        write_report(results, speed, dict(progress.timings), folder)
