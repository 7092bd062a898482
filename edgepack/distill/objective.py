"""What the student is trained to match, per kind of teacher, and how closeness is scored.

- sentence-transformers feature extraction: the pooled (and, if the teacher normalises,
  L2-normalised) sentence embedding -- the output the device gets. Loss: 1 − cos + MSE.
- plain feature extraction: the last hidden state per valid token. Loss: 1 − cos + MSE per token.
- sequence / token classifiers: logits. Loss: ``kd_loss`` (soft KL·T², plus hard CE if labelled).
Plus, for all kinds, ``hidden_weight`` × hidden-state MSE over the layer map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.artifacts import HFModel
from edgepack.distill.losses import (
    IGNORE_LABEL,
    embedding_loss,
    hidden_loss,
    kd_loss,
    layer_scales,
    pool,
)
from edgepack.errors import UserError
from edgepack.families import encoder

POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


@dataclass(frozen=True)
class Objective:
    kind: str  # "sentence" | "tokens" | "logits" | "token-logits"
    temperature: float
    alpha: float
    hidden_weight: float
    layer_map: tuple[tuple[int, int], ...] | None  # (student, teacher) hidden_states indices
    pooling: str = "mean"
    normalize: bool = False
    scales: tuple[float, ...] = ()  # hidden-loss normalisers, fixed once by ``calibrate``

    @property
    def wants_hidden(self) -> bool:
        return bool(self.layer_map) and self.hidden_weight > 0

    def calibrate(self, teacher: Any, batch: dict[str, Any]) -> Objective:
        """Fix the hidden-loss normalisers from one teacher batch (same on every process)."""
        if not self.wants_hidden:
            return self
        import torch

        with torch.no_grad():
            out = teacher(**batch, output_hidden_states=True)
        scales = layer_scales(out.hidden_states, batch["attention_mask"], self.layer_map)
        return replace(self, scales=tuple(round(s, 6) for s in scales))

    def primary(self, out: Any, mask: Any) -> Any:
        """The output fidelity is measured on: embedding, token states or logits."""
        if self.kind == "sentence":
            return pool(out.last_hidden_state, mask, self.pooling, self.normalize)
        if self.kind == "tokens":
            return out.last_hidden_state
        return out.logits

    def loss(self, s_out: Any, t_out: Any, mask: Any, labels: Any) -> tuple[Any, dict[str, float]]:
        """Total loss and its parts (for the progress bar and the record)."""
        s, t = self.primary(s_out, mask), self.primary(t_out, mask)
        if self.kind == "sentence":
            main = embedding_loss(s, t)
        elif self.kind == "tokens":
            main = embedding_loss(s, t, mask)
        elif self.kind == "logits":
            main = kd_loss(s, t, labels, self.temperature, self.alpha)
        else:
            valid = mask.bool()
            main = kd_loss(s[valid], t[valid], None, self.temperature, self.alpha)
        parts = {"main": float(main.detach())}
        total = main
        if self.wants_hidden:
            hid = hidden_loss(
                s_out.hidden_states, t_out.hidden_states, mask, self.layer_map, self.scales
            )
            parts["hidden"] = float(hid.detach())
            total = total + self.hidden_weight * hid
        return total, parts

    def describe(self) -> dict[str, Any]:
        main = {
            "sentence": f"1 - cos + mse on the {self.pooling}-pooled"
            + (" normalised" if self.normalize else "")
            + " sentence embedding (the soft target of a model without logits)",
            "tokens": "1 - cos + mse on the last hidden state per token",
            "logits": "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)",
            "token-logits": "T^2 * KL(teacher_T || student_T) per token",
        }[self.kind]
        return {
            "main": main,
            "main_weight": 1.0,
            "hidden": "mse per mapped layer / teacher mean square" if self.wants_hidden else None,
            "hidden_weight": self.hidden_weight if self.wants_hidden else 0.0,
            "hidden_scales": list(self.scales),
            "soft_weight_alpha": self.alpha if self.kind == "logits" else None,
            "hard_weight": round(1 - self.alpha, 6) if self.kind == "logits" else None,
        }

    def fidelity(
        self, student: list[Any], teacher: list[Any], masks: list[Any], labels: list[int] | None
    ) -> dict[str, Any]:
        """Closeness to the teacher on held-out texts (``evaluate.fidelity``'s figures), plus
        accuracy against ground truth where labels exist."""
        from edgepack.evaluate import fidelity

        task = encoder.KIND_TASK[self.kind]
        got = [x.float().cpu().numpy() for x in student]
        ref = [x.float().cpu().numpy() for x in teacher]
        token_level = self.kind in ("tokens", "token-logits")
        result = fidelity(ref, got, [m.cpu().numpy() for m in masks] if token_level else None, task)
        if labels and self.kind == "logits":
            predicted = np.concatenate([g.argmax(-1) for g in got])
            truth = np.asarray(labels)
            seen = truth != IGNORE_LABEL
            if seen.any():
                result["accuracy"] = round(float(np.mean(predicted[seen] == truth[seen])), 6)
                result["labelled"] = int(seen.sum())
        return result


def _sentence_head(folder: Path) -> tuple[str, bool]:
    """Pooling mode and normalisation from a sentence-transformers folder's modules."""
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    mode, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = json.loads(
                (folder / module["path"] / "config.json").read_text(encoding="utf-8")
            )
            modes = [v for k, v in POOLING_KEYS.items() if config.get(k)]
            if len(modes) != 1 or any(
                config.get(k)
                for k in config
                if k.startswith("pooling_mode") and k not in POOLING_KEYS
            ):
                raise UserError(
                    f"{folder}: unsupported pooling {config}; supported: mean, cls or max alone."
                )
            mode = modes[0]
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise UserError(
                f"{folder}: sentence-transformers module {kind!r} is not supported for "
                "distillation; supported modules are: Transformer, Pooling, Normalize."
            )
    return mode, normalize


def make_objective(teacher: HFModel, settings: Any, hidden_map: Any) -> Objective:
    common = {
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "hidden_weight": settings.hidden_weight,
        "layer_map": hidden_map,
    }
    kind = encoder.output_kind(teacher.task, teacher.library)
    if kind == "sentence":
        mode, normalize = _sentence_head(teacher.path)
        return Objective(kind=kind, pooling=mode, normalize=normalize, **common)
    return Objective(kind=kind, **common)
