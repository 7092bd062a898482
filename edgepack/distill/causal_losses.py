"""The decoder distillation losses: against the teacher's full next-token distribution, or against
its cached top-k (the k likeliest tokens plus one bucket for the rest), which the training loop
keeps per window instead of running the teacher every step (causal.py says why)."""

from __future__ import annotations

from typing import Any

from edgepack.distill.losses import IGNORE_LABEL, kd_loss


def causal_kd_loss(
    student_logits: Any, teacher_logits: Any, ids: Any, mask: Any, temperature: float, alpha: float
) -> Any:
    """``kd_loss`` over every position that has a next token inside the window and is not
    padding: logits ``[B, L, V]`` at position i are scored against ``ids[:, i + 1]``."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_LABEL)
    valid = (labels != IGNORE_LABEL) & (mask[:, :-1] != 0)
    s, t = student_logits[:, :-1][valid], teacher_logits[:, :-1][valid]
    return kd_loss(s, t, labels[valid], temperature, alpha)


def teacher_top_k(
    teacher: Any, rows: Any, k: int, temperature: float, batch: int = 8
) -> tuple[Any, Any, Any]:
    """For every window position but the last: the teacher's ``k`` likeliest next tokens (int32
    ids) with their log-probabilities at ``temperature``, and the log of the mass left to the
    other tokens (``[N, L-1, k]``, ``[N, L-1, k]``, ``[N, L-1]``)."""
    import torch
    import torch.nn.functional as F

    ids, logps, rests = [], [], []
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            logits = teacher(input_ids=rows[start : start + batch]).logits[:, :-1].float()
            log_p = F.log_softmax(logits / temperature, dim=-1)
            top = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
            rest = log_p.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
            ids.append(top.indices.to(torch.int32))
            logps.append(top.values)
            rests.append(rest)
    return torch.cat(ids), torch.cat(logps), torch.cat(rests)


def top_k_kd_loss(
    student_logits: Any, top_ids: Any, top_logp: Any, rest_logp: Any, ids: Any,
    temperature: float, alpha: float,
) -> Any:  # fmt: skip
    """``causal_kd_loss`` against a cached teacher: KL at T between the teacher's and the
    student's distributions over the teacher's k tokens plus one bucket for all the others (a
    lower bound of the full KL, equal to it when the rest's mass is nil), plus next-token CE.
    Unpadded windows only (every position scores against ``ids[:, i + 1]``)."""
    import torch.nn.functional as F

    t = float(temperature)
    logits = student_logits[:, :-1].float()
    log_q = F.log_softmax(logits / t, dim=-1)
    index = top_ids.long()
    q_top = log_q.gather(-1, index)
    q_rest = log_q.scatter(-1, index, float("-inf")).logsumexp(-1)
    # Below e^-80 a bucket weighs nothing; the clamp keeps -inf (k = vocab) out of the gradient.
    p_rest, q_rest = rest_logp.clamp(min=-80.0), q_rest.clamp(min=-80.0)
    kl = (top_logp.exp() * (top_logp - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    soft = kl.mean() * t * t
    if alpha >= 1.0:
        return soft
    hard = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return alpha * soft + (1.0 - alpha) * hard
