"""The training loop of ``distill``: processes, steps, checkpoints, held-out scoring, progress.

Reproducibility rests on three things. Batches are a pure function of (seed, epoch, step), so a
resumed run needs only the step count to know where it is. The RNG is re-seeded from
(seed, step, rank) before every step, so dropout (off by default) never depends on history.
A checkpoint holds everything else that changes: weights, optimizer, scheduler, RNG, step and
the held-out curve so far. It is written to a temporary file and renamed, so an interruption
mid-write leaves the previous one intact.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.distill.data import epoch_batches, token_lengths, tokenize
from edgepack.errors import UserError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class Runtime:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int
    world: int
    device: Any
    owns_group: bool  # we started the process group, so we end it

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def start_distributed() -> Runtime:
    """Join the torchrun job described by RANK/WORLD_SIZE, if any: gloo on CPU, nccl on GPU."""
    import torch

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(0, 1, torch.device("cuda" if cuda else "cpu"), False)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Runtime(rank, world, device, owns)


def stop_distributed(runtime: Runtime) -> None:
    if runtime.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def _make_optimizer(model: Any, lr: float, weight_decay: float) -> Any:
    """AdamW, without weight decay on biases and LayerNorm weights (the BERT convention)."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def _make_scheduler(optimizer: Any, total: int, warmup_fraction: float) -> Any:
    import torch

    warmup = int(total * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _freeze_unreached(student: Any, teacher: Any, objective: Any, batch: dict[str, Any]) -> int:
    """Freeze weights the loss never reaches (e.g. BERT's pooler under an embedding loss).

    They would stay the teacher's anyway, but AdamW's weight decay would shrink them, and under
    DDP every process would wait for gradients that never come. One probe backward finds them.
    """
    import torch

    with torch.no_grad():
        t_out = teacher(**batch, output_hidden_states=objective.wants_hidden)
    s_out = student(**batch, output_hidden_states=objective.wants_hidden)
    loss, _ = objective.loss(s_out, t_out, batch["attention_mask"], None)
    loss.backward()
    frozen = 0
    for p in student.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen += p.numel()
        p.grad = None
    return frozen


class Loop:
    """One distillation run's mutable state; ``run()`` trains until the plan or budget ends."""

    def __init__(self, **kw: Any) -> None:
        import torch

        self.s = kw["settings"]
        self.rt: Runtime = kw["runtime"]
        self.tokenizer = kw["tokenizer"]
        self.teacher = kw["teacher"].to(self.rt.device)
        student = kw["student"].to(self.rt.device)
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = self.s.dropout
        student.train()
        self.train_texts: list[str] = kw["train_texts"]
        self.train_labels: list[int] | None = kw["train_labels"]
        self.lengths = token_lengths(self.tokenizer, self.train_texts, self.s.max_length)
        self.held_texts: list[str] = kw["heldout_texts"]
        self.held_labels: list[int] | None = kw["heldout_labels"]
        self.per_epoch: int = kw["steps_per_epoch"]
        self.total: int = kw["total_steps"]
        self.ckpt_dir: Path = kw["checkpoint_dir"]
        self.fingerprint: dict[str, Any] = kw["fingerprint"]
        self.progress = kw["progress"]
        self.started: float = kw["started"]
        first = self._batch(self.train_texts[: self.s.batch_size])
        self.objective = kw["objective"].calibrate(self.teacher, first)
        self.frozen = _freeze_unreached(student, self.teacher, self.objective, first)
        self._training(student)
        self.step = 0
        self.elapsed_before = 0.0
        self.curve: list[dict[str, Any]] = []
        self._held_ref: list[Any] | None = None

    def _training(self, student: Any) -> None:
        """The model the steps run (DDP-wrapped under torchrun), its optimizer and schedule."""
        if self.rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(student)
        else:
            self.model = student
        self.optimizer = _make_optimizer(student, self.s.lr, self.s.weight_decay)
        self.scheduler = _make_scheduler(self.optimizer, self.total, self.s.warmup_fraction)

    def plain_student(self) -> Any:
        return getattr(self.model, "module", self.model)

    def _batch(self, texts: list[str]) -> dict[str, Any]:
        enc = tokenize(self.tokenizer, texts, self.s.max_length)
        return {k: v.to(self.rt.device) for k, v in enc.items()}

    # -- checkpoints -------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        import torch

        if self.rt.rank != 0:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "elapsed": self._elapsed(),
            "curve": self.curve,
            "fingerprint": self.fingerprint,
            "model": self.plain_student().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.ckpt_dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_dir / CHECKPOINT)

    def resume(self) -> bool:
        """Continue from the latest checkpoint if there is one (else start afresh)."""
        import torch

        path = self.ckpt_dir / CHECKPOINT
        if not path.is_file():
            self._note(f"no checkpoint in {self.ckpt_dir}; starting from step 0")
            return False
        state = torch.load(path, map_location=self.rt.device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT or state["fingerprint"] != self.fingerprint:
            old, new = state.get("fingerprint") or {}, self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if "settings" in diff:
                a, b = old.get("settings", {}), new["settings"]
                diff = [f"{k} ({a.get(k)} -> {b.get(k)})" for k in sorted(b) if a.get(k) != b[k]]
            raise UserError(
                f"{path} is from a different run (changed: {', '.join(diff)}); "
                "use the original flags or another --out."
            )
        self.plain_student().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed"])
        self.curve = list(state["curve"])
        self._note(f"resumed at step {self.step} of {self.total}")
        return True

    # -- training ----------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def _should_stop(self, step_seconds: float) -> bool:
        """Out of time budget (decided on rank 0 so every process stops at the same step)."""
        if self.s.time_budget is None:
            return False
        import torch

        stop = torch.tensor([float(self._elapsed() + step_seconds >= self.s.time_budget)])
        if self.rt.world > 1:
            import torch.distributed as dist

            dist.broadcast(stop, src=0)
        return bool(stop.item())

    def _train_step(self, indices: list[int]) -> float:
        import torch

        torch.manual_seed(self.s.seed * 1_000_003 + self.step * 1009 + self.rt.rank)
        batch = self._batch([self.train_texts[i] for i in indices])
        labels = None
        if self.train_labels is not None:
            labels = torch.tensor([self.train_labels[i] for i in indices], device=self.rt.device)
        hidden = self.objective.wants_hidden
        with torch.no_grad():
            t_out = self.teacher(**batch, output_hidden_states=hidden)
        s_out = self.model(**batch, output_hidden_states=hidden)
        loss, _ = self.objective.loss(s_out, t_out, batch["attention_mask"], labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.plain_student().parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def run(self) -> dict[str, Any]:
        """Long because the epoch loop, checkpointing and the held-out check share the loop's
        state; split, each piece would take most of it as arguments.
        """
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        console = getattr(self.progress, "console", None)
        bar = Bar(
            TextColumn("distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.1f} texts/s"),
            TimeElapsedColumn(),
            console=console,
            disable=self.rt.rank != 0 or console is None,
        )
        stopped, losses, seen = "planned steps", [], 0
        session_start, step_seconds = time.monotonic(), 0.0
        epoch_order: tuple[int, list[list[int]]] | None = None
        with bar:
            task = bar.add_task("distill", total=self.total, completed=self.step, loss=0.0, tps=0.0)
            while self.step < self.total:
                if self._should_stop(step_seconds):
                    stopped = "time budget"
                    break
                epoch, position = divmod(self.step, self.per_epoch)
                if epoch_order is None or epoch_order[0] != epoch:
                    batches = epoch_batches(
                        len(self.train_texts), self.s.batch_size, self.rt.world, self.rt.rank,
                        self.s.seed, epoch, self.lengths,
                    )  # fmt: skip
                    epoch_order = (epoch, batches)
                t0 = time.monotonic()
                losses.append(self._train_step(epoch_order[1][position]))
                step_seconds = time.monotonic() - t0
                self.step += 1
                seen += self.s.batch_size
                tps = seen / max(time.monotonic() - session_start, 1e-9)
                bar.update(task, completed=self.step, loss=losses[-1], tps=tps)
                at_checkpoint = self.step % self.s.checkpoint_every == 0
                if at_checkpoint or self.step % self.per_epoch == 0:
                    self._evaluate(losses)
                    losses = []
                if at_checkpoint:
                    self._save_checkpoint()
        if not self.curve or self.curve[-1]["step"] != self.step:
            self._evaluate(losses)
        self._save_checkpoint()
        final = self.curve[-1] if self.curve else {}
        session = max(time.monotonic() - session_start, 1e-9)
        return {
            "steps": self.step,
            "planned_steps": self.total,
            "epochs": round(self.step / self.per_epoch, 3),
            "stopped_by": stopped,
            "world_size": self.rt.world,
            "global_batch": self.s.batch_size,
            "train_count": len(self.train_texts),
            "heldout_count": len(self.held_texts),
            "texts_per_second": round(seen / session, 2),
            "frozen_parameters": self.frozen,
            "final_heldout": {k: v for k, v in final.items() if k not in ("step", "epoch")},
            "curve": self.curve,
        }

    # -- scoring -----------------------------------------------------------------------------

    def _outputs(self, model: Any) -> tuple[list[Any], list[Any]]:
        import torch

        outs, masks = [], []
        with torch.no_grad():
            for start in range(0, len(self.held_texts), self.s.batch_size):
                batch = self._batch(self.held_texts[start : start + self.s.batch_size])
                outs.append(self.objective.primary(model(**batch), batch["attention_mask"]))
                masks.append(batch["attention_mask"])
        return outs, masks

    def _evaluate(self, losses: list[float]) -> None:
        """Score the student against the teacher on held-out texts (rank 0; others wait)."""
        if self.rt.rank == 0 and self.held_texts:
            student = self.plain_student()
            student.eval()
            if self._held_ref is None:
                self._held_ref = self._outputs(self.teacher)[0]
            got, masks = self._outputs(student)
            student.train()
            point = self.objective.fidelity(got, self._held_ref, masks, self.held_labels)
            point.update(step=self.step, epoch=round(self.step / self.per_epoch, 3))
            if losses:
                point["train_loss"] = round(sum(losses) / len(losses), 6)
            self.curve.append(point)
            self._note(
                f"step {self.step}: held-out mean cosine {point['mean_cosine']:.4f}"
                + (f", train loss {point['train_loss']:.4f}" if losses else "")
            )
        self.rt.barrier()

    def _note(self, text: str) -> None:
        if self.rt.rank == 0 and self.progress is not None:
            self.progress.note(text)
