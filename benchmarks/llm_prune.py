"""The decoder pruning curve: --prune 0.1 / 0.25 / 0.4, each without and with recovery
(--distill-data), against the unpruned int4 bundle, built and measured in one run.

usage:
    python -m benchmarks.llm_prune                               # recovery 600 s per fraction
    python -m benchmarks.llm_prune --recovery-seconds 300 --fractions 0.25
    python -m benchmarks.llm_prune --recovery-seconds 0          # the curve without recovery only

Every row is a real `edgepack build --config samples/llm.toml --target arm64` bundle (edgepack's
caches make a repeated run cheap). Measured on plain onnxruntime sessions, one thread:
size, held-out perplexity and next-token top-1 agreement with the unpruned fp32 teacher (the same
256-token windows as the build's fidelity), and greedy decode speed in interleaved rounds
(medians), so a noisy neighbour slows every row alike. Training minutes come from each bundle's
manifest (``distillation.seconds``), build minutes are the wall time of its build here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from benchmarks.llm_build import REPO, SAMPLE_CONFIG, default_workdir, resolve_model
from benchmarks.report import machine

SAMPLES = REPO / "samples"
FRACTIONS = (0.1, 0.25, 0.4)
# The targets for a pruned + recovered sample bundle, against the unpruned int4 one.
TARGETS = {"decode": 1.3, "size": 0.8, "perplexity": 49.0, "build_minutes": 30.0}


@dataclass(frozen=True)
class Variant:
    label: str
    fraction: float  # 0: the unpruned baseline
    recovery_seconds: float  # 0: pruned only

    @property
    def flags(self) -> list[str]:
        out = []
        if self.fraction:
            out += ["--prune", f"{self.fraction:g}"]
        if self.recovery_seconds:
            out += ["--distill-data", str(SAMPLES / "distill.txt")]
            out += ["--distill-seconds", f"{self.recovery_seconds:g}"]
        return out


@dataclass
class Row:
    variant: Variant
    model: Path | None = None
    build_minutes: float | None = None
    training_minutes: float | None = None
    shape: str = ""  # layers and FFN width after pruning
    size_mb: float | None = None
    perplexity: float | None = None
    top1: float | None = None  # next-token argmax agreement with the unpruned fp32 teacher
    tokens_per_s: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def variants(fractions: tuple[float, ...], recovery_seconds: float) -> list[Variant]:
    out = [Variant("unpruned int4", 0.0, 0.0)]
    for f in fractions:
        out.append(Variant(f"prune {f:g}", f, 0.0))
        if recovery_seconds:
            out.append(Variant(f"prune {f:g} + recovery", f, recovery_seconds))
    return out


def build(
    variant: Variant, workdir: Path, config: Path = SAMPLE_CONFIG, extra: tuple[str, ...] = ()
) -> Row:
    """``edgepack build`` of ``config`` with the variant's flags (and ``extra``) into its own
    --out folder; a failed build is a row that says so, not the end of the run."""
    name = variant.label.replace(" ", "-").replace("+", "and")
    out = workdir / f"prune-curve-{name}"
    command = [sys.executable, "-m", "edgepack.cli", "build", "--config", str(config)]
    command += ["--target", "arm64", "--out", str(out), "--force", *variant.flags, *extra]
    print(f"[bench-prune] {shlex.join(command)}", file=sys.stderr)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    done = subprocess.run(command, check=False, env={**os.environ, "PYTHONPATH": path})
    row = Row(variant, build_minutes=(time.perf_counter() - started) / 60)
    if done.returncode != 0:
        row.note = f"build failed (exit {done.returncode})"
        return row
    row.model = resolve_model(out)
    manifest = json.loads((row.model.parent / "manifest.json").read_text())
    pruning = (manifest.get("pruning") or {}).get("summary") or {}
    if pruning:
        row.shape = f"layers {pruning['layers']}, FFN {pruning['ffn']}"
    distillation = manifest.get("distillation") or {}
    if distillation:
        row.training_minutes = distillation["seconds"] / 60
        row.note = f"{distillation['steps']} steps, stopped by {distillation['stopped_by']}"
    return row


def measure(
    rows: list[Row], teacher: Path, ids: list[int], prompt: list[int], new_tokens: int,
    rounds: int, threads: int = 1,
) -> None:  # fmt: skip
    """Fill size, perplexity, top-1 and decode tok/s of every built row, timing interleaved."""
    from benchmarks.llm_measure import interleaved_timing, session, size_mb
    from edgepack.families.decoder_fidelity import perplexity_and_top1

    built = [r for r in rows if r.model is not None]
    reference = session(teacher, threads)
    sessions = {r.variant.label: session(r.model, threads) for r in built}  # type: ignore[arg-type]
    for r in built:
        print(f"[bench-prune] size, perplexity, top-1: {r.variant.label}", file=sys.stderr)
        r.size_mb = size_mb(r.model)  # type: ignore[arg-type]
        figures = perplexity_and_top1(reference, sessions[r.variant.label], ids)
        r.perplexity, r.top1 = figures["perplexity"], figures["top1_agreement"]
        r.extra["teacher_perplexity"] = figures["perplexity_fp32"]
    del reference
    print(f"[bench-prune] timing: {rounds} interleaved rounds", file=sys.stderr)
    for label, (_, rate) in interleaved_timing(sessions, prompt, new_tokens, rounds).items():
        next(r for r in built if r.variant.label == label).tokens_per_s = rate


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _x(value: float | None, base: float | None) -> str:
    return "–" if not value or not base else f"{value / base:.2f}×"


def table(rows: list[Row]) -> str:
    base = rows[0]
    head = (
        "| variant | shape | size MB | size vs unpruned | held-out ppl | top-1 vs fp32 teacher "
        "| decode tok/s | decode vs unpruned | training min | build min | notes |"
    )
    lines = [head, "|---|---|" + "---:|" * 8 + "---|"]
    for r in rows:
        cells = [
            r.variant.label, r.shape or ("unpruned" if not r.variant.fraction else "–"),
            _f(r.size_mb, ".1f"), _x(r.size_mb, base.size_mb), _f(r.perplexity, ".2f"),
            _f(r.top1 and 100 * r.top1, ".1f") + ("%" if r.top1 else ""),
            _f(r.tokens_per_s, ".1f"), _x(r.tokens_per_s, base.tokens_per_s),
            _f(r.training_minutes, ".1f"), _f(r.build_minutes, ".1f"), r.note,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    """Which rows meet the issue's targets (decode, size, perplexity, build time) at once."""
    base = rows[0]
    if not base.size_mb or not base.tokens_per_s:
        return "The unpruned baseline was not measured, so no row is judged against the targets."
    meets = [
        r.variant.label
        for r in rows[1:]
        if r.size_mb and r.tokens_per_s and r.perplexity and r.build_minutes is not None
        and r.tokens_per_s / base.tokens_per_s >= TARGETS["decode"]
        and r.size_mb / base.size_mb <= TARGETS["size"]
        and r.perplexity <= TARGETS["perplexity"]
        and r.build_minutes < TARGETS["build_minutes"]
    ]  # fmt: skip
    goal = (
        f"decode >= {TARGETS['decode']}x and size <= {TARGETS['size']}x the unpruned int4 "
        f"bundle, held-out perplexity <= {TARGETS['perplexity']:g}, build < "
        f"{TARGETS['build_minutes']:g} min"
    )
    if meets:
        return f"Rows meeting every target ({goal}): {', '.join(meets)}."
    return f"No row meets every target ({goal}) at once."


def render(rows: list[Row], command: str, seconds: float, notes: tuple[str, ...] = ()) -> str:
    m = machine()
    teacher = rows[0].extra.get("teacher_perplexity")
    return "\n".join(
        [
            "# Decoder pruning curve (SmolLM2-135M-Instruct, int4, arm64 bundles)",
            "",
            f"Command: `{command}` ({seconds / 60:.0f} min wall, builds included).",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, CPU flags {m['isa']}; onnxruntime "
            f"{m['onnxruntime']}; {m['date']}.",
            "",
            table(rows),
            "",
            "- Held-out: samples/heldout.txt, lines joined by newlines, no special tokens, "
            "256-token windows each from an empty cache (the build's fidelity windows); top-1: "
            "how often the bundle's next-token argmax equals the unpruned fp32 graph's"
            + (f" (fp32 perplexity {teacher:.2f})." if teacher else "."),
            "- Decode: greedy steps after a 32-token prompt, one thread, interleaved rounds "
            "(medians); ratios against the unpruned int4 row of the same run.",
            "- Training min: the distillation stage's own time from the manifest; build min: "
            "the whole build's wall time in this run (edgepack's caches included: a cached "
            "stage costs nothing here).",
            f"- {verdict(rows)}",
            *(f"- {n}" for n in notes),
            "",
        ]
    )


def teacher_graph(workdir: Path) -> Path:
    """The unpruned fp32 graph the bundles are compared with (optimum's export, cached)."""
    from benchmarks.llm_build import optimum_fp32, sample_folder

    return optimum_fp32(sample_folder(), workdir)


@click.command()
@click.option("--recovery-seconds", type=float, default=600.0, show_default=True,
              help="--distill-seconds of each recovered row; 0 leaves the recovered rows out.")  # fmt: skip
@click.option("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS), show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), help="Cache (~/.cache/edgepack/bench).")
@click.option("--out", type=click.Path(path_type=Path), help="Default benchmarks/results-prune.md.")
@click.option("--rounds", type=int, default=7, show_default=True, help="Interleaved rounds.")
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--source-blocks", type=click.Choice(["all", "layers", "off"]), default="off",
              show_default=True, help="Every row's --source-blocks. off: the re-quantized int4 "
              "baseline the pruning targets are set against; a pruned model's weights are no "
              "longer the GGUF's, so carrying blocks would favour the unpruned row.")  # fmt: skip
def main(
    recovery_seconds: float,
    fractions: str,
    workdir: Path | None,
    out: Path | None,
    rounds: int,
    new_tokens: int,
    source_blocks: str,
) -> None:
    """Build every row, measure them side by side, write and print the table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        chosen = tuple(float(f) for f in fractions.split(","))
    except ValueError:
        raise click.BadParameter(f"{fractions!r}: give fractions like 0.1,0.25") from None
    if not all(0 < f < 1 for f in chosen) or recovery_seconds < 0:
        raise click.BadParameter("fractions must be in (0, 1) and --recovery-seconds >= 0")
    started = time.perf_counter()
    command = shlex.join(["python", "-m", "benchmarks.llm_prune", *sys.argv[1:]])
    workdir = workdir or default_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    extra = ("--source-blocks", source_blocks)
    rows = [build(v, workdir, extra=extra) for v in variants(chosen, recovery_seconds)]

    from transformers import AutoTokenizer

    from benchmarks.llm_build import sample_folder
    from edgepack.calibration import read_texts

    tokenizer = AutoTokenizer.from_pretrained(str(sample_folder()), local_files_only=True)
    texts = read_texts(SAMPLES / "heldout.txt").texts
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    load = os.getloadavg()[0]
    measure(rows, teacher_graph(workdir), ids, ids[:32], new_tokens, rounds)
    notes = (
        f"1-minute load average {load:.1f} before measuring, {os.getloadavg()[0]:.1f} after, "
        f"on {os.cpu_count()} cores (a shared machine: absolute speeds move between runs).",
    )
    markdown = render(rows, command, time.perf_counter() - started, notes)
    out = out or REPO / "benchmarks" / "results-prune.md"
    out.write_text(markdown, encoding="utf-8")
    click.echo(markdown)
    click.echo(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
