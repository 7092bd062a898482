"""Recovery training for a pruned decoder: the pruned student learns the unpruned teacher's
next-token distributions (alpha · T² · KL at temperature T) plus the text's own next tokens
((1 − alpha) · cross-entropy), on fixed-length token windows of the distillation text.

Built on the encoder engine, not beside it: ``CausalLoop`` subclasses ``loop.Loop`` and keeps its
``run`` (seeded batch order, per-step reseeding, time budget, checkpoints written by rename and
``resume``, torchrun/DDP with gloo on CPU) and its optimizer and schedule; the loss is
``losses.kd_loss`` on the valid token rows. What differs for a decoder is overridden: a batch is a
set of token windows cut from one stream (no per-text padding, so every example has the same
number of predicted tokens and the token mean equals the per-example mean DDP relies on), and
held-out scoring is perplexity and KL to the teacher instead of cosine. ``stage.distill`` was not
extended because it is shaped around encoder tasks throughout (layer choice, pooling, labels).

Why a step cost 27 s on the sample (batch 8 of 128-token windows, SmolLM2 pruned to 26 layers):
not the model but the machine. Quiet, one step is ~7 s (teacher forward 1.1, student forward
1.1, full-vocab loss 1.4, backward 3.4, AdamW 0.3); with other jobs on the two cores, torch's two
intra-op threads wait on each other at every op (a batch-4 step on the cached teacher, load 6-8,
interleaved: 2 threads 52-56 s, 1 thread 13.2 s), so on a shared machine run with
``OMP_NUM_THREADS=1``.

The teacher is run once per training window, the first time a batch holds it, not every step:
its k = 128 likeliest next tokens at T (int32 ids and log-probabilities) plus the log of the rest's
mass, 130 KB a window (46 MB for the sample's 349 windows), where its full distribution would be
25 MB a window (8.7 GB). Recomputing costs a teacher forward per step, every epoch; the cache costs
one per window, once. It is filled as training goes, not before: filled up front on the loaded
machine it took the sample's whole 600 s budget (870 s, no step taken). The loss over k tokens
plus one bucket is a lower bound of the full KL (equal when the rest's mass is nil; the test
checks both).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.artifacts import HFModel
from edgepack.distill.causal_losses import causal_kd_loss, teacher_top_k, top_k_kd_loss
from edgepack.distill.data import split_heldout, steps_per_epoch
from edgepack.distill.loop import (
    Loop,
    start_distributed,
    stop_distributed,
)
from edgepack.errors import UserError

RECORD = "decoder_distillation.json"
# Part of the cache key: bump when the same teacher, student, text and settings train differently.
CAUSAL_DISTILL_VERSION = 3


@dataclass(frozen=True)
class CausalDistillSettings:
    """The knobs of a decoder recovery run; the loop reads the same names as ``DistillSettings``."""

    temperature: float = 2.0
    alpha: float = 0.5  # weight of the SOFT (teacher) loss; the next-token CE gets 1 - alpha
    seq_len: int = 128  # tokens per window
    # Global batch (windows), split across processes under torchrun: 4 gives twice the updates of 8
    # in a time budget, which on two cores is a few hundred steps at most.
    batch_size: int = 4
    lr: float = 1e-4  # a pruned model is close to its teacher already: small steps
    # The teacher's k likeliest next tokens (log-probabilities at T) plus the rest's mass, computed
    # once per training window before the loop; 0 runs the teacher every step on the full vocab.
    top_k: int = 128
    # Keep the (tied) token embedding / lm_head as the teacher's: no gradient, no AdamW state.
    freeze_embedding: bool = False
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0  # recovery, not regularisation: decay only pulls weights away
    epochs: int = 3  # the planned schedule; the time budget usually ends the run first
    max_steps: int | None = None
    time_budget: float | None = None
    max_tokens: int = 200_000  # of the distillation text, after tokenizing
    heldout_fraction: float = 0.05  # of the windows, seeded
    seed: int = 0
    checkpoint_every: int = 200
    dropout: float = 0.0

    def check(self) -> None:
        if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
            raise UserError("distillation needs temperature > 0 and alpha in [0, 1].")
        if self.seq_len < 2 or self.batch_size < 1 or self.lr <= 0 or self.top_k < 0:
            raise UserError(
                "distillation needs seq_len >= 2, batch_size >= 1, lr > 0 and top_k >= 0."
            )


def token_windows(ids: list[int], seq_len: int) -> Any:
    """The stream as ``[windows, seq_len]`` rows; the tail shorter than a window is dropped."""
    import torch

    count = len(ids) // seq_len
    if count < 2:
        raise UserError(
            f"the distillation text is {len(ids)} tokens; it needs at least two windows of "
            f"{seq_len} (one to train on, one held out)."
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def heldout_scores(student: Any, teacher: Any, rows: Any, batch: int = 8) -> dict[str, float]:
    """Student and teacher perplexity and mean per-token KL(teacher ‖ student) at T = 1 on
    ``rows``, from one forward pass of each."""
    import torch
    import torch.nn.functional as F

    nll = kl = t_nll = 0.0
    count = 0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            x = rows[start : start + batch]
            s = student(input_ids=x).logits[:, :-1].float()
            t = teacher(input_ids=x).logits[:, :-1].float()
            log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
            nll -= float(log_s.gather(-1, x[:, 1:, None]).sum())
            t_nll -= float(log_t.gather(-1, x[:, 1:, None]).sum())
            kl += float((log_t.exp() * (log_t - log_s)).sum())
            count += x[:, 1:].numel()
    return {
        "perplexity": round(math.exp(nll / count), 4),
        "kl": round(kl / count, 6),
        "teacher_perplexity": round(math.exp(t_nll / count), 4),
    }


class CausalLoop(Loop):
    """``Loop.run`` over token windows: ``train_texts`` holds window rows, ``lengths`` is None
    (every window is as long as the next), the loss is ``causal_kd_loss``."""

    def __init__(self, **kw: Any) -> None:  # Loop.__init__ tokenizes texts; windows are ready
        import torch

        self.s = kw["settings"]
        self.rt = kw["runtime"]
        self.teacher = kw["teacher"].to(self.rt.device).eval()
        student = kw["student"].to(self.rt.device)
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = self.s.dropout
        student.train()
        self.train_texts = kw["train_rows"]  # run() counts and indexes these
        self.lengths = None
        self.held_texts = kw["heldout_rows"]
        self.per_epoch, self.total = kw["steps_per_epoch"], kw["total_steps"]
        self.ckpt_dir, self.fingerprint = kw["checkpoint_dir"], kw["fingerprint"]
        self.progress, self.started = kw["progress"], kw["started"]
        self.frozen = 0
        if self.s.freeze_embedding:
            weight = student.get_input_embeddings().weight
            weight.requires_grad_(False)  # tied: the lm_head is the same tensor
            self.frozen = weight.numel()
        self.cached: dict[int, tuple[Any, Any, Any]] = {}  # window -> the teacher's top k
        self._training(student)
        self.step, self.elapsed_before = 0, 0.0
        self.curve: list[dict[str, Any]] = []
        self.step_losses: list[float] = []  # this session's, for the record's loss summary

    def _train_step(self, indices: list[int]) -> float:
        import torch

        torch.manual_seed(self.s.seed * 1_000_003 + self.step * 1009 + self.rt.rank)
        x = self.train_texts[indices].to(self.rt.device)
        if self.s.top_k:
            top_ids, top_logp, rest = self._teacher_top_k(indices)
            s_logits = self.model(input_ids=x).logits
            loss = top_k_kd_loss(
                s_logits, top_ids, top_logp, rest, x, self.s.temperature, self.s.alpha
            )
        else:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=x).logits
            s_logits = self.model(input_ids=x).logits
            mask = torch.ones_like(x)
            loss = causal_kd_loss(s_logits, t_logits, x, mask, self.s.temperature, self.s.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.plain_student().parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.step_losses.append(float(loss.detach()))
        return self.step_losses[-1]

    def _teacher_top_k(self, indices: list[int]) -> tuple[Any, Any, Any]:
        """The teacher's top k for these windows, each run once, the first time a batch holds it
        (so a budget shorter than an epoch pays no more than recomputing would). One window per
        forward: the figures then do not depend on which batch first held a window, and a
        resumed run, which starts with an empty cache, trains on the same numbers."""
        import torch

        for i in indices:
            if i not in self.cached:
                row = self.train_texts[i : i + 1].to(self.rt.device)
                found = teacher_top_k(self.teacher, row, self.s.top_k, self.s.temperature, 1)
                self.cached[i] = tuple(t[0] for t in found)  # type: ignore[assignment]
        return tuple(torch.stack([self.cached[i][j] for i in indices]) for j in range(3))  # type: ignore[return-value]

    def _evaluate(self, losses: list[float]) -> None:
        """Held-out perplexity and KL to the teacher (rank 0; the others wait)."""
        if self.rt.rank == 0 and len(self.held_texts):
            student = self.plain_student()
            student.eval()
            point: dict[str, Any] = heldout_scores(student, self.teacher, self.held_texts)
            student.train()
            point.update(step=self.step, epoch=round(self.step / self.per_epoch, 3))
            if losses:
                point["train_loss"] = round(sum(losses) / len(losses), 6)
            self.curve.append(point)
            self._note(
                f"step {self.step}: held-out perplexity {point['perplexity']:.2f}, "
                f"KL to teacher {point['kl']:.4f}"
            )
        self.rt.barrier()


def _fingerprint(teacher: HFModel, student: HFModel, ids_sha: str, s: CausalDistillSettings):
    """What a checkpoint must agree with to be resumed (budget and cadence may vary)."""
    knobs = dataclasses.asdict(s)
    for key in ("time_budget", "checkpoint_every"):
        knobs.pop(key)
    return {
        "teacher": teacher.weights_sha256,
        "student": student.weights_sha256,
        "data": ids_sha,
        "settings": knobs,
    }


def _load(model: HFModel) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32)


def distill_decoder(
    teacher: HFModel,
    student: HFModel,
    ids: list[int],
    settings: CausalDistillSettings,
    out_dir: Path,
    progress: Any = None,
    resume: bool = False,
) -> HFModel:
    """Train ``student`` (e.g. ``teacher`` pruned) toward ``teacher`` on the token stream ``ids``
    and write it to ``out_dir`` as a loadable folder with ``decoder_distillation.json``.

    Long because it is the run's one ordered script (windows, split, loop, scores, record), and
    the torchrun process group must be closed in one ``finally`` around all of it.
    """
    import hashlib

    import torch

    started = time.monotonic()
    settings.check()
    out_dir = Path(out_dir)
    ids = ids[: settings.max_tokens]
    ids_sha = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    rows = token_windows(ids, settings.seq_len)
    train_idx, held_idx = split_heldout(len(rows), settings.heldout_fraction, settings.seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    runtime = start_distributed()
    try:
        if settings.batch_size % runtime.world:
            raise UserError(f"batch size {settings.batch_size} must divide over the processes.")
        per_epoch = steps_per_epoch(len(train_idx), settings.batch_size)
        if per_epoch == 0:
            raise UserError(
                f"{len(train_idx)} training windows of {settings.seq_len} tokens are fewer than "
                f"one batch of {settings.batch_size}; give more distillation text."
            )
        total = settings.epochs * per_epoch
        total = min(total, settings.max_steps) if settings.max_steps else total
        torch.manual_seed(settings.seed)
        teacher_net, student_net = _load(teacher).eval(), _load(student)
        held = rows[held_idx]
        before = heldout_scores(student_net.eval(), teacher_net, held)
        loop = CausalLoop(
            settings=settings,
            runtime=runtime,
            teacher=teacher_net,
            student=student_net,
            train_rows=rows[train_idx],
            heldout_rows=held,
            steps_per_epoch=per_epoch,
            total_steps=total,
            checkpoint_dir=out_dir / "checkpoints",
            fingerprint=_fingerprint(teacher, student, ids_sha, settings),
            progress=progress,
            started=started,
        )
        if resume:
            loop.resume()
        result = loop.run()
        if runtime.rank == 0:
            trained = loop.plain_student().eval()
            after = result["curve"][-1]  # run() ends with a held-out score of the final weights
            record = {
                "format": 1,
                "teacher": {"source": teacher.source, "weights_sha256": teacher.weights_sha256},
                "student_start_sha256": student.weights_sha256,
                "settings": dataclasses.asdict(settings),
                "data": {"tokens": len(ids), "windows": len(rows), "sha256": ids_sha,
                         "train_windows": len(train_idx), "heldout_windows": len(held_idx)},
                "summary": _summary(settings, result, loop.step_losses, before, after, started),
                "curve": result["curve"],
            }  # fmt: skip
            _save(student, trained, record, out_dir)
        runtime.barrier()
    finally:
        stop_distributed(runtime)
        torch.use_deterministic_algorithms(deterministic)
    return _described(student, out_dir)


def _summary(s, result, losses: list[float], before, after, started: float) -> dict[str, Any]:
    """What the manifest and the build's notes show: the recovery in held-out perplexity."""
    head = losses[: max(1, len(losses) // 10)]  # a tenth of the steps each end: one is noise
    tail = losses[-len(head) :]
    return {
        "stage": "distill",
        "kind": "decoder",
        "loss": "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(next token)",
        "temperature": s.temperature,
        "alpha": s.alpha,
        "steps": result["steps"],
        "planned_steps": result["planned_steps"],
        "stopped_by": result["stopped_by"],
        "world_size": result["world_size"],
        "seconds": round(time.monotonic() - started, 1),
        "train_loss_first_tenth": round(sum(head) / len(head), 6) if losses else None,
        "train_loss_last_tenth": round(sum(tail) / len(tail), 6) if losses else None,
        "heldout_perplexity_teacher": before["teacher_perplexity"],
        "heldout_perplexity_before": before["perplexity"],
        "heldout_perplexity_after": after["perplexity"],
        "heldout_kl_before": before["kl"],
        "heldout_kl_after": after["kl"],
    }


def _save(student: HFModel, trained: Any, record: dict[str, Any], out_dir: Path) -> None:
    """The student's support files (tokenizer, its pruning plan), the trained weights, the record;
    the checkpoint (weights plus optimizer state, three times the model) is not kept."""
    from edgepack.folders import copy_support_files

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    copy_support_files(student.path, out_dir)
    trained.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _described(student: HFModel, out_dir: Path) -> HFModel:
    from edgepack.load import load_model

    loaded = load_model(str(out_dir), task=student.task)
    ref = [h for h in loaded.history if h.get("record") == RECORD]
    summary = json.loads((out_dir / RECORD).read_text())["summary"]
    return dataclasses.replace(
        loaded,
        source=student.source,
        history=(*student.history, {**(ref[-1] if ref else {}), **summary}),
    )
