"""report.md and a self-contained report.html beside the bundles: the numbers behind each choice.

Plots are PNGs embedded in the HTML as data URIs, so the report is one file to mail or attach.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path
from typing import Any

from edgepack.bundle import BuildResult, write_files


def _node_counts(result: BuildResult) -> str:
    """QDQ vs plain MatMuls in the shipped graph (ORT-format models are not readable by onnx)."""
    path = result.folder / result.manifest["model"]["file"]
    if path.suffix != ".onnx":
        path = result.fp32_model if result.manifest["model"]["precision"] == "fp32" else path
        if path.suffix != ".onnx":
            return "n/a (ORT format)"
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    producer = {o: n.op_type for n in graph.node for o in n.output}
    int8 = sum(
        1
        for n in graph.node
        if n.op_type == "MatMul" and producer.get(n.input[0]) == "DequantizeLinear"
    )
    return f"{int8} int8 / {ops['MatMul'] - int8} fp32 MatMuls, {ops['QuantizeLinear']} Q"


def _ratio(lat: dict[str, Any]) -> str:
    """The median per-round ratio and its range; a latency record without rounds (older callers)
    gives the ratio of medians."""
    ratio = lat.get("ratio")
    if not ratio:
        return f"{lat['model']['p50_ms'] / lat['fp32']['p50_ms']:.2f}"
    return f"{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f})" + (
        " noisy" if ratio["noisy"] else ""
    )


def _rows(results: list[BuildResult], latency: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        m, lat = r.manifest, latency[r.target]
        ev = m.get("evaluation") or {}
        metric = (
            f"{ev['metric']} {ev['fp32']:.4f} → {ev[m['model']['precision']]:.4f}" if ev else "—"
        )
        rows.append(
            [
                r.target,
                m["model"]["precision"],
                f"{m['model']['bytes'] / 1e6:.1f} / {m['model']['fp32_bytes'] / 1e6:.1f}",
                f"{m['fidelity']['mean_cosine']:.4f} / {m['fidelity']['min_cosine']:.4f}",
                metric,
                f"{lat['model']['p50_ms']:.2f} / {lat['model']['p90_ms']:.2f}",
                f"{lat['fp32']['p50_ms']:.2f}",
                _ratio(lat),
                _node_counts(r),
            ]
        )
    return rows


HEADER = [
    "target",
    "precision",
    "MB (model / fp32)",
    "cosine to fp32 (mean / min)",
    "task metric (fp32 → model)",
    "host p50 / p90 ms",
    "fp32 p50 ms",
    "ratio (round range)",
    "nodes",
]


def png(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    # "tight" grows the canvas to every label, so a long layer name or tick is never cut off.
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return buffer.getvalue()


def _plots(results: list[BuildResult], latency: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """The report's figures as PNG bytes by file name; nothing is written here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    series = [latency[results[0].target]["fp32"]["times_ms"]] + [
        latency[r.target]["model"]["times_ms"] for r in results
    ]
    ax.boxplot(series, showfliers=False)
    ax.set_xticks(
        range(1, len(series) + 1), ["fp32"] + [r.target for r in results], rotation=30, ha="right"
    )
    ax.set_ylabel("latency per query, ms (host)")
    ax.set_title("Latency distribution per variant")
    fig.tight_layout()
    plots["report-latency.png"] = png(fig)

    plots["report-size.png"] = _size_plot(results)
    sens = next(
        (
            ((r.manifest.get("quantization") or {}).get("accuracy_search") or {}).get("sensitivity")
            for r in results
            if r.manifest.get("quantization")
        ),
        None,
    )
    if sens:
        plots["report-sensitivity.png"] = _sensitivity_plot(sens)
    return plots


def _size_plot(results: list[BuildResult]) -> bytes:
    """fp32 beside each bundle's model, in MB, with the ratio on each bar: one scatter point per
    target said nothing once the targets' sizes coincided."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r.target for r in results]
    fp32 = [r.manifest["model"]["fp32_bytes"] / 1e6 for r in results]
    model = [r.manifest["model"]["bytes"] / 1e6 for r in results]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, fp32, 0.4, color="grey", label="fp32 export")
    bars = ax.bar(x + 0.2, model, 0.4, color="tab:blue", label="bundle's model")
    labels = [
        f"{m / f:.2f}x\n{r.manifest['model']['precision']}"
        for m, f, r in zip(model, fp32, results, strict=True)
    ]
    ax.bar_label(bars, labels, fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("model file, MB")
    ax.set_ylim(0, max(fp32 + model) * 1.3)
    ax.set_title("Model size: fp32 export vs each bundle")
    ax.legend(fontsize=8, loc="upper left")
    return png(fig)


def _sensitivity_plot(sens: list[dict[str, Any]]) -> bytes:
    """One bar per layer, names without the prefixes every layer shares, and plain tick numbers
    (matplotlib's "1e-5" offset text landed on the axis label)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    names = [_layer_name(s["name"]) for s in sens][::-1]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(sens) + 1)))
    ax.barh(names, [s["dev_drop_recovered"] for s in sens][::-1])
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.tick_params(axis="x", labelsize=8, rotation=30)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("mean cosine drop recovered when this layer stays fp32")
    ax.set_title("Per-layer int8 sensitivity (dev texts)")
    return png(fig)


def _layer_name(name: str) -> str:
    """A layer's node or weight name without what every layer shares (``/0/encoder/``,
    ``0.model.``, ``/MatMul``, ``.weight``), so the label fits beside the bar."""
    for prefix in ("/0/encoder/", "/0/model/", "0.model.", "/encoder/", "/model/", "model."):
        name = name.removeprefix(prefix)
    for suffix in ("/MatMul", ".weight"):
        name = name.removesuffix(suffix)
    return name


def write_report(
    results: list[BuildResult],
    latency: dict[str, dict[str, Any]],
    timings: dict[str, float],
    out_root: Path,
) -> tuple[Path, Path]:
    """Write report.md, report.html and the figures into ``out_root``, all or none of them;
    returns the paths of the two pages.

    Long because the report's sections are written in page order.
    """
    rows = _rows(results, latency)
    plots = _plots(results, latency)
    first = results[0].manifest
    title = f"edgepack build: {Path(first['source']['model']).name}"
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    threads = ", ".join(f"{t}: {lat['threads']}" for t, lat in latency.items())
    md = [
        f"# {title}",
        "",
        f"Source `{first['source']['model']}`, task {first['task']}, "
        f"edgepack {first['versions']['edgepack']}, onnxruntime {first['versions']['onnxruntime']}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += [
        "",
        f"Host latency: batch 1, interleaved medians, threads {threads}. Stage times: {stages}.",
        "",
    ]
    for r in results:
        search = (r.manifest.get("quantization") or {}).get("accuracy_search")
        if search:
            md.append(
                f"- {r.target}: accuracy search chose **{search['chosen']}** (dev drop "
                f"{search['dev_drop']:.4f}, tolerance {search['max_drop']}, met: {search['met']})."
            )
    md += [""] + [f"![{Path(name).stem}]({name})" for name in plots]

    def img(name: str) -> str:
        data = base64.b64encode(plots[name]).decode()
        return f'<img alt="{Path(name).stem}" src="data:image/png;base64,{data}">'

    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEADER) + "</tr>"
    table += "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    table += "</table>"
    notes = "".join(
        f"<li>{html.escape(line[2:]).replace('**', '')}</li>"
        for line in md
        if line.startswith("- ")
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%;margin:1em 0}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{table}<p>Host latency: batch 1, interleaved medians, threads "
        f"{html.escape(threads)}. Stage times: {html.escape(stages)}.</p><ul>{notes}</ul>"
        + "".join(img(p) for p in plots)
        + "</body></html>"
    )
    files = {**plots, "report.md": ("\n".join(md) + "\n").encode(), "report.html": page.encode()}
    write_files(out_root, files)
    return out_root / "report.md", out_root / "report.html"
