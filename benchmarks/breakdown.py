"""Where the time of one call goes, by op type, next to interleaved latency of the same models.

usage:
    python -m benchmarks.breakdown --int8 "edgepack int8=dist/all-MiniLM-L6-v2-arm64/model.onnx"
    python -m benchmarks.breakdown --int8 ... --seqs 32,128 --rounds 15 --results benchmarks/results.md

The fp32 export, onnxruntime's dynamic int8 and optimum's arm64 static preset are built (or reused)
in --workdir exactly as benchmarks/compare.py builds them; every ``--int8 label=path`` is added.

Two measurements, both interleaved (A B C A B C ...) so drift on a shared machine favours none:
1. latency: plain sessions, 1 thread, median ms per call and ratio to fp32, per sequence length;
2. breakdown: sessions with onnxruntime's profiler (``enable_profiling``), kernel time per call
   summed by category of the *optimized* graph's nodes (the graph saved through
   ``optimized_model_filepath`` says what each node is: a MatMul whose weight is a constant or a
   DequantizeLinear of one is a GEMM, other MatMuls are attention scores/context). The profiler adds
   overhead, so read shares, not absolute times. The fused-op counts show which fusions fired.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np

from benchmarks.report import machine, splice
from benchmarks.timing import Harness, interleave, make_session

CATEGORIES = (
    "GEMM (linear layers)",
    "attention MatMuls (scores, context)",
    "Softmax",
    "LayerNorm (incl. Skip/Embed)",
    "GELU",
    "Quantize/Dequantize",
    "outlier side path",
    "SmoothQuant Mul",
    "embedding Gathers",
    "Add (bias, residual)",
    "rest (Transpose, Reshape, mask, pooling ...)",
)
GEMM_OPS = {"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul",
            "Gemm", "FusedMatMul", "MatMulNBits"}  # fmt: skip
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearAdd"}
FUSED = ("SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
         "Attention", "MultiHeadAttention", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
         "FusedMatMul", "QuantizeLinear", "DequantizeLinear")  # fmt: skip


def categorize(model: Any) -> dict[str, str]:
    """{node name: category} for the optimized graph ``model`` (an onnx.ModelProto)."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def constant(name: str) -> bool:
        for _ in range(3):
            if name in inits:
                return True
            node = producer.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "Transpose", "Cast"):
                return False
            name = node.input[0]
        return False

    out = {}
    for n in model.graph.node:
        op, name = n.op_type, n.name
        if "_outlier_" in name:
            cat = "outlier side path"
        elif "_smooth_mul" in name:
            cat = "SmoothQuant Mul"
        elif op in GEMM_OPS or op == "MatMul":
            weight = n.input[3] if op == "QLinearMatMul" else n.input[1]
            linear = constant(weight)
            cat = "GEMM (linear layers)" if linear else "attention MatMuls (scores, context)"
        elif op in QDQ_OPS:
            cat = "Quantize/Dequantize"
        elif op == "Softmax":
            cat = "Softmax"
        elif "LayerNorm" in op:
            cat = "LayerNorm (incl. Skip/Embed)"
        elif op in ("Gelu", "BiasGelu", "FastGelu", "Erf") or "/intermediate_act_fn/" in name:
            cat = "GELU"
        elif "embeddings" in name and op in ("Gather", "GatherBlockQuantized", "Cast", "Mul"):
            cat = "embedding Gathers"
        elif op == "Add":
            cat = "Add (bias, residual)"
        else:
            cat = "rest (Transpose, Reshape, mask, pooling ...)"
        out[name] = cat
    return out


def _profiled(path: Path, workdir: Path, label: str) -> tuple[Any, Path]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.log_severity_level = 3
    options.enable_profiling = True
    safe = "".join(c if c.isalnum() else "_" for c in label)
    options.profile_file_prefix = str(workdir / f"prof_{safe}")
    options.optimized_model_filepath = str(workdir / f"optimized_{safe}.onnx")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), Path(
        options.optimized_model_filepath
    )


def breakdown(
    models: dict[str, Path], feeds: dict[str, np.ndarray], harness: Harness, workdir: Path
) -> tuple[dict[str, dict[str, float]], dict[str, Counter]]:
    """({model: {category: ms per call}}, {model: op-type counts of the optimized graph})."""
    import onnx

    calls, optimized = {}, {}
    for label, path in models.items():
        sess, opt = _profiled(path, workdir, label)
        wanted = {i.name for i in sess.get_inputs()}
        calls[label] = (sess, {k: v for k, v in feeds.items() if k in wanted})
        optimized[label] = opt
    interleave(calls, harness)
    n_calls = harness.rounds * harness.per_round + harness.warmup
    table, counts = {}, {}
    for label, (sess, _) in calls.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        graph = onnx.load(str(optimized[label]), load_external_data=False)
        cats = categorize(graph)
        counts[label] = Counter(n.op_type for n in graph.graph.node)
        sums = dict.fromkeys(CATEGORIES, 0.0)
        for e in events:
            name = e.get("name", "")
            if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
                continue
            node = name[: -len("_kernel_time")]
            cat = cats.get(node, "rest (Transpose, Reshape, mask, pooling ...)")
            sums[cat] += e["dur"] / 1e3 / n_calls
        table[label] = sums
    return table, counts


def latency(
    models: dict[str, Path], feeds: dict[int, dict[str, np.ndarray]], harness: Harness
) -> dict[int, dict[str, float]]:
    """{seq: {model: median ms}}, 1 thread, interleaved."""
    out = {}
    for seq, f in feeds.items():
        calls = {}
        for label, path in models.items():
            sess = make_session(path, 1)
            wanted = {i.name for i in sess.get_inputs()}
            calls[label] = (sess, {k: v for k, v in f.items() if k in wanted})
        times = interleave(calls, harness)
        out[seq] = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return out


def render(
    lat: dict[int, dict[str, float]],
    table: dict[str, dict[str, float]],
    counts: dict[str, Counter],
    sizes: dict[str, float],
    info: dict[str, Any],
) -> str:
    """The markdown section: CPU flags, latency, breakdown, fusions."""
    labels = list(table)
    fp32 = labels[0]
    seq = info["seq"]
    lines = [
        "### Where an int8 call spends its time",
        "",
        f"Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, CPU flags: "
        f"{info['machine']['isa']}; onnxruntime {info['machine']['onnxruntime']}, "
        f"{info['machine']['date']}. Command:",
        "",
        f"    {info['command']}",
        "",
        f"**Latency**, 1 thread, batch 1, median ms per call (ratio to {fp32}); "
        f"{info['rounds']} interleaved rounds x {info['per_round']} calls.",
        "",
        "| variant | MB | " + " | ".join(f"seq {s}" for s in lat) + " |",
        "|---|---:|" + "---:|" * len(lat),
    ]
    for k in labels:
        cells = [f"{lat[s][k]:.2f} ({lat[s][k] / lat[s][fp32]:.2f}×)" for s in lat]
        lines.append(f"| {k} | {sizes[k]:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Kernel time by op type**, seq {seq}, 1 thread, ms per call from onnxruntime's profiler "
        "(sum of node kernel times; the profiler adds overhead: read the shares).",
        "",
        "| op type | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for cat in CATEGORIES:
        if all(table[k][cat] < 0.005 for k in labels):
            continue
        lines.append(f"| {cat} | " + " | ".join(_cell(table[k], cat) for k in labels) + " |")
    totals = " | ".join(f"**{sum(table[k].values()):.2f}**" for k in labels)
    lines += [f"| **all kernels** | {totals} |", "", "Fused ops in the optimized graphs:", ""]
    for k in labels:
        fused = ", ".join(f"{op} {counts[k][op]}" for op in FUSED if counts[k][op])
        lines.append(f"- {k}: {fused or 'none'} ({sum(counts[k].values())} nodes)")
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, float], cat: str) -> str:
    total = sum(row.values())
    return "–" if row[cat] < 0.005 else f"{row[cat]:.2f} ({100 * row[cat] / total:.0f} %)"


def baselines(workdir: Path) -> dict[str, Path]:
    """fp32 export, onnxruntime dynamic int8 and optimum's arm64 preset, as compare.py builds them."""
    from transformers import AutoTokenizer

    from benchmarks.compare import CALIBRATION_SAMPLES, FIDELITY_SEQ, SAMPLES, SEED, _sample_model
    from benchmarks.variants import Plan, build_all
    from edgepack.calibration import read_texts, split

    calib, _ = split(read_texts(SAMPLES / "calibration.txt"), CALIBRATION_SAMPLES, SEED)
    keep = ("fp32", "ort-dynamic", "optimum-arm64")
    plan = Plan(
        model_dir=_sample_model(),
        calibration=calib.texts,
        seq_len=FIDELITY_SEQ,
        workdir=workdir,
        edgepack_config=None,
        distill_data=SAMPLES / "distill.txt",
        distill_seconds=0.0,
        skip=("ort-static", "edgepack", "edgepack-cpu", "edgepack-prune"),
        settings={"model": str(_sample_model()), "samples": CALIBRATION_SAMPLES, "quick": False},
    )
    del AutoTokenizer
    built = {v.key: v for v in build_all(plan) if v.key in keep and v.path is not None}
    return {built[k].label: built[k].path for k in keep if k in built}


@click.command()
@click.option("--int8", "extra", multiple=True, required=True, help="label=path of an int8 model.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
@click.option("--seqs", default="32,128", show_default=True)
@click.option("--profile-seq", type=int, default=128, show_default=True)
@click.option("--rounds", type=int, default=15, show_default=True)
@click.option("--per-round", type=int, default=5, show_default=True)
@click.option("--results", type=click.Path(path_type=Path), default=None, help="Splice into this.")
@click.option(
    "--no-baselines", is_flag=True, help="Only the --int8 models (first one = reference)."
)
def main(extra, workdir, seqs, profile_seq, rounds, per_round, results, no_baselines) -> None:
    from transformers import AutoTokenizer

    from benchmarks.compare import SAMPLES
    from benchmarks.quality import encode
    from edgepack.calibration import read_texts

    workdir = workdir or Path(tempfile.gettempdir()) / "edgepack-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    models = {} if no_baselines else baselines(workdir)
    for item in extra:
        label, _, path = item.partition("=")
        models[label] = Path(path)
    tok_dir = workdir / "fp32" if (workdir / "fp32" / "tokenizer.json").is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir or next(iter(models.values())).parent))
    text = list(read_texts(SAMPLES / "heldout.txt").texts)[:1]
    seq_list = [int(s) for s in seqs.split(",")]
    harness = Harness(threads=(1,), seqs=tuple(seq_list), rounds=rounds, per_round=per_round)
    print(f"[breakdown] CPU flags: {machine()['isa']}", file=sys.stderr)
    lat = latency(models, {s: encode(tokenizer, text, s) for s in seq_list}, harness)
    prof_dir = workdir / "profiles"
    prof_dir.mkdir(exist_ok=True)
    table, counts = breakdown(models, encode(tokenizer, text, profile_seq), harness, prof_dir)
    sizes = {k: p.stat().st_size / 1e6 for k, p in models.items()}
    command = "python -m benchmarks.breakdown " + shlex.join(sys.argv[1:])
    info = {"machine": machine(), "seq": profile_seq, "rounds": rounds, "per_round": per_round}
    section = render(lat, table, counts, sizes, {**info, "command": command})
    click.echo(section)
    if results:
        splice(results, section)
        click.echo(f"spliced into {results}")


if __name__ == "__main__":  # pragma: no cover
    main()
