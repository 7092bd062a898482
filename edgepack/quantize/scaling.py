"""Activation-aware per-channel scaling before int4 (the AWQ idea), folded so the graph computes
the same function in fp32.

A few input channels carry activations many times larger than the rest; their weights' rounding
error dominates the output error. Multiplying those weight rows by s > 1 (and the activations by
1/s) gives them a finer share of each block's int4 grid. The 1/s is folded into what produces the
activations, so no node is added: the RMSNorm weight in front of q/k/v and gate/up, and the up
projection's output channels in front of down (act = SiLU(gate) * up is linear in up).

Per group, s = rms(x)^alpha, normalized around 1; alpha is chosen from a grid by the quantized
weights' error weighted per channel by the calibration activations' mean square, the same measure
the block-scale search minimizes (a diagonal estimate of the output error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepack.quantize.weight_store import Weights

GRID = (0.0, 0.25, 0.5, 0.75)
NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


@dataclass
class Group:
    """Weights that read one activation, and the tensor the inverse scale folds into."""

    activation: str
    weights: list[str]  # [K, N] MatMul initializers, rows scaled by s
    fold: str  # initializer divided by s: a norm weight [K], or the up projection's columns
    fold_columns: bool


def _groups(model: Any, arrays: Weights, importance: dict[str, np.ndarray]) -> list[Group]:
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    groups = []
    for node in model.graph.node:
        readers = users.get(node.output[0], []) if node.output else []
        weights = [r.input[1] for r in readers if r.op_type == "MatMul" and r.input[1] in arrays]
        if not weights or len(weights) != len(readers) or node.output[0] not in importance:
            continue
        if "logits" in {o for r in readers for o in r.output}:
            continue  # the lm_head: tied to the embedding, whose rows must stay as they are
        if node.op_type in NORMS:
            groups.append(
                Group(
                    node.output[0], weights, node.input[1 if node.op_type == NORMS[0] else 2], False
                )
            )
        elif node.op_type == "Mul":
            sources = [producer.get(i) for i in node.input]
            up = [
                s
                for s in sources
                if s is not None and s.op_type == "MatMul" and s.input[1] in arrays
            ]
            other = [s for s in sources if s is not None and s not in up]
            if len(up) == 1 and len(other) == 1 and len(users.get(up[0].output[0], [])) == 1:
                groups.append(Group(node.output[0], weights, up[0].input[1], True))
    return groups


def fold_scales(
    model: Any,
    arrays: Weights,
    importance: dict[str, np.ndarray],
    error: Callable[[np.ndarray, np.ndarray], float],
    grid: tuple[float, ...] = GRID,
    frozen: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Scale and fold every group (recorded in ``arrays`` as factors to apply on read;
    ``importance`` updated); returns the alpha chosen per activation. ``error(weight_kn,
    importance_k)`` is the quantizer's error. One group's weights are in memory at a time. A
    group that would scale or fold into a ``frozen`` initializer is left alone."""
    chosen = {}
    for group in _groups(model, arrays, importance):
        if frozen.intersection([*group.weights, group.fold]):
            continue
        power = importance[group.activation].astype(np.float64)
        rms = np.sqrt(np.maximum(power, 1e-12))
        weights = [arrays[w] for w in group.weights]
        best, best_err = 0.0, np.inf
        for alpha in grid:
            s = _scales(rms, alpha)
            err = sum(error(w * s[:, None], power / s**2) for w in weights)
            if err < best_err:
                best, best_err = alpha, err
        del weights
        chosen[group.activation] = best
        if best == 0.0:
            continue
        s = _scales(rms, best)
        for w in group.weights:
            arrays.scale(w, s)
        arrays.scale(group.fold, s, axis=1 if group.fold_columns else 0, divide=True)
        importance[group.activation] = (power / s**2).astype(np.float32)
    return chosen


def _scales(rms: np.ndarray, alpha: float) -> np.ndarray:
    s = rms**alpha
    return s / np.sqrt(s.max() * s.min())
