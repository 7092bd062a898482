"""The distillation losses, as pure functions of tensors (no models, no state), so each can be
checked by hand.

- ``kd_loss``: Hinton et al. (2015) soft labels (KL at temperature T, times T²) plus the
  ordinary cross-entropy on ground truth, for models with logits.
- ``embedding_loss``: for feature-extraction models, which have no logits, the teacher's
  embedding *is* the soft target: 1 − cosine plus MSE.
- ``hidden_loss``: MSE between student and teacher hidden states over a layer map, each layer
  divided by a fixed scale (the teacher's mean square on that layer) so one weight fits any model.

Every loss is a mean over examples of a per-example value. That is what makes a run split over N
processes (DDP averages the per-process means) equal a single-process run with the same global
batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_LABEL = -100  # rows without a ground-truth label (cross_entropy's default ignore_index)
POOLING_MODES = ("mean", "cls", "max")


def kd_loss(
    student_logits: Any, teacher_logits: Any, labels: Any, temperature: float, alpha: float
) -> Any:
    """``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, labels)``.

    ``alpha`` weights the SOFT (teacher) loss and ``1 − alpha`` the HARD (ground-truth) loss;
    libraries disagree on which side alpha names, so we say it here. T² keeps the soft gradients
    the same size as the hard ones whatever T is (the softened gradients shrink as 1/T²).
    Logits are ``[rows, classes]``; KL is averaged over rows ("batchmean"), CE over labelled rows.
    With ``labels`` None, or no row labelled (all ``IGNORE_LABEL``), the soft loss is returned
    alone, at full weight: there is nothing for ``1 − alpha`` to weigh.
    """
    import torch.nn.functional as F

    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t
    if labels is None or not bool((labels != IGNORE_LABEL).any()):
        return soft
    hard = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_LABEL)
    return alpha * soft + (1.0 - alpha) * hard


def masked_mean(values: Any, mask: Any) -> Any:
    """Mean of ``values [B, T]`` over the valid tokens of each example: ``[B]``."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def pool(token_states: Any, mask: Any, mode: str, normalize: bool) -> Any:
    """Sentence embedding as sentence-transformers computes it: pool ``[B, T, D]`` -> ``[B, D]``."""
    import torch
    import torch.nn.functional as F

    m = mask.unsqueeze(-1).to(token_states.dtype)
    if mode == "mean":
        pooled = (token_states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    elif mode == "cls":
        pooled = token_states[:, 0]
    elif mode == "max":
        pooled = token_states.masked_fill(m == 0, torch.finfo(token_states.dtype).min).amax(1)
    else:
        raise ValueError(f"pooling mode {mode!r}; expected one of {POOLING_MODES}")
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def embedding_loss(student: Any, teacher: Any, mask: Any = None) -> Any:
    """``(1 − cos) + MSE`` per example, averaged over the batch.

    ``[B, D]`` (pooled sentence embeddings) or ``[B, T, D]`` with ``mask`` (token embeddings,
    averaged over each example's valid tokens first). Cosine carries the direction, which is all
    a normalised embedding has; MSE keeps the scale of un-normalised outputs honest.
    """
    import torch.nn.functional as F

    teacher = teacher.detach()
    cos = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    mse = (student - teacher).pow(2).mean(-1)
    per_row = (1.0 - cos) + mse
    if per_row.dim() == 2:
        per_row = masked_mean(per_row, mask)
    return per_row.mean()


def hidden_loss(
    student_states: Sequence[Any],
    teacher_states: Sequence[Any],
    mask: Any,
    layer_map: Sequence[tuple[int, int]],
    scales: Sequence[float],
) -> Any:
    """Mean over the map of ``MSE(student[i], teacher[j]) / scale`` on valid tokens.

    ``student_states``/``teacher_states`` are HF ``hidden_states`` tuples (index 0 = embeddings,
    k = output of layer k − 1). ``scales[n]`` is a fixed normaliser for pair n (the teacher's mean
    square on that layer, measured once): a fixed number keeps the loss the same function on every
    process and after a resume, unlike a per-batch statistic.
    """
    total = None
    for (i, j), scale in zip(layer_map, scales, strict=True):
        err = (student_states[i] - teacher_states[j].detach()).pow(2).mean(-1)
        term = masked_mean(err, mask).mean() / scale
        total = term if total is None else total + term
    if total is None:
        raise ValueError("hidden_loss needs a non-empty layer map")
    return total / len(layer_map)


def layer_scales(teacher_states: Sequence[Any], mask: Any, layer_map: Sequence[tuple[int, int]]):
    """The teacher's mean square per mapped layer on one batch: ``hidden_loss``'s normalisers."""
    out = []
    for _, j in layer_map:
        sq = teacher_states[j].detach().pow(2).mean(-1)
        out.append(max(float(masked_mean(sq, mask).mean()), 1e-6))
    return out
