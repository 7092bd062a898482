"""Choose which heads and FFN neurons to remove, globally across layers, under a budget.

Pure functions over score lists, so the choice is testable without a model. Costs are encoder
linear-layer MACs per token: a head costs 4 * hidden * head_dim (its Q, K, V rows and the
attention output's columns), a neuron 2 * hidden (its intermediate row and output column).
Attention-score MACs (QK^T, PV) are not part of the budget; they shrink with the heads too and
are reported separately at the reference sequence length.

FFN widths move in steps of ``multiple`` (a kept width is a multiple of it, or the original
width), each layer keeps >= ``multiple`` neurons and >= 1 head. Budget mode follows Kwon et al.
2022: for every possible number of removed heads, fill the rest of the budget with the cheapest
FFN steps, and keep the split that removes the least total importance.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass

from edgepack.errors import UserError


@dataclass(frozen=True)
class Plan:
    keep_heads: list[list[int]]  # per layer, sorted indices into that layer's current heads
    keep_neurons: list[list[int]]  # per layer, sorted indices into its current FFN neurons
    removed_macs: int  # linear MACs per token removed by this plan


def order(scores: list[float]) -> list[int]:
    """Indices from least to most important; ties broken by index so the plan is deterministic."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def _ffn_steps(
    neuron_scores: list[list[float]], multiple: int
) -> list[tuple[int, int, float, list[int]]]:
    """Global greedy order of FFN steps: (layer, neurons removed, score removed, indices)."""
    queues: list[list[tuple[int, float, list[int]]]] = []
    for scores in neuron_scores:
        width, ranked = len(scores), order(scores)
        widths = [width] + [w for w in range((width - 1) // multiple * multiple, 0, -multiple)]
        steps, start = [], 0
        for a, b in itertools.pairwise(widths):
            chunk = ranked[start : start + a - b]
            steps.append((a - b, sum(scores[i] for i in chunk), chunk))
            start += a - b
        queues.append(steps)
    heap = [(q[0][1] / q[0][0], layer, 0) for layer, q in enumerate(queues) if q]
    heapq.heapify(heap)
    out = []
    while heap:
        _, layer, k = heapq.heappop(heap)
        count, removed, chunk = queues[layer][k]
        out.append((layer, count, removed, chunk))
        if k + 1 < len(queues[layer]):
            nxt = queues[layer][k + 1]
            heapq.heappush(heap, (nxt[1] / nxt[0], layer, k + 1))
    return out


def _head_candidates(head_scores: list[list[float]]) -> list[tuple[float, int, int]]:
    """Every head but each layer's most important one, least important first."""
    cands = []
    for layer, scores in enumerate(head_scores):
        for h in order(scores)[:-1]:
            cands.append((scores[h], layer, h))
    return sorted(cands)


def _assemble(
    head_scores: list[list[float]],
    neuron_scores: list[list[float]],
    heads: list[tuple[float, int, int]],
    steps: list[tuple[int, int, float, list[int]]],
    head_cost: int,
    neuron_cost: int,
) -> Plan:
    gone_h = {(layer, h) for _, layer, h in heads}
    gone_n = {(layer, i) for layer, _, _, chunk in steps for i in chunk}
    keep_heads = [
        [h for h in range(len(s)) if (layer, h) not in gone_h]
        for layer, s in enumerate(head_scores)
    ]
    keep_neurons = [
        [i for i in range(len(s)) if (layer, i) not in gone_n]
        for layer, s in enumerate(neuron_scores)
    ]
    removed = len(gone_h) * head_cost + len(gone_n) * neuron_cost
    return Plan(keep_heads, keep_neurons, removed)


def plan_budget(
    head_scores: list[list[float]],
    neuron_scores: list[list[float]],
    target_macs: float,
    head_cost: int,
    neuron_cost: int,
    multiple: int,
) -> Plan:
    """Remove at least ``target_macs`` linear MACs per token with the least total importance."""
    heads = _head_candidates(head_scores)
    steps = _ffn_steps(neuron_scores, multiple)
    cum_cost, cum_score = [0], [0.0]
    for _, count, removed, _ in steps:
        cum_cost.append(cum_cost[-1] + count * neuron_cost)
        cum_score.append(cum_score[-1] + removed)
    head_score = 0.0
    best: tuple[float, int, int, int] | None = None
    for r in range(len(heads) + 1):
        if r:
            head_score += heads[r - 1][0]
        need = target_macs - r * head_cost
        k = 0 if need <= 0 else bisect.bisect_left(cum_cost, need)
        if k < len(cum_cost):
            total = head_score + cum_score[k]
            cost = r * head_cost + cum_cost[k]
            if best is None or (total, cost) < best[:2]:
                best = (total, cost, r, k)
        if need <= 0:
            break
    if best is None:
        most = len(heads) * head_cost + cum_cost[-1]
        raise UserError(
            f"prune budget asks to remove {target_macs:.0f} MACs/token but at most {most} can go "
            "(>= 1 head and >= one FFN step per layer stay); use a smaller --prune."
        )
    _, _, r, k = best
    return _assemble(head_scores, neuron_scores, heads[:r], steps[:k], head_cost, neuron_cost)


def plan_fractions(
    head_scores: list[list[float]],
    neuron_scores: list[list[float]],
    heads_fraction: float,
    ffn_fraction: float,
    head_cost: int,
    neuron_cost: int,
    multiple: int,
) -> Plan:
    """Remove a fraction of all heads and (at least) a fraction of all FFN neurons."""
    heads = _head_candidates(head_scores)
    total_heads = sum(len(s) for s in head_scores)
    r = round(heads_fraction * total_heads)
    if r > len(heads):
        raise UserError(
            f"--prune-heads {heads_fraction} removes {r} of {total_heads} heads, but each layer "
            f"keeps one: at most {len(heads) / total_heads:.3f}."
        )
    steps = _ffn_steps(neuron_scores, multiple)  # least importance per neuron first
    total_neurons = sum(len(s) for s in neuron_scores)
    target = math.ceil(ffn_fraction * total_neurons - 1e-9)
    taken, removed = [], 0
    for step in steps:
        if removed >= target:
            break
        taken.append(step)
        removed += step[1]
    if removed < target:
        raise UserError(
            f"--prune-ffn {ffn_fraction} removes more FFN neurons than allowed (each layer keeps "
            f">= {multiple}): at most {removed / total_neurons:.3f}."
        )
    return _assemble(head_scores, neuron_scores, heads[:r], taken, head_cost, neuron_cost)


def ffn_levels(width: int, multiple: int) -> list[int]:
    """Neuron counts a layer may lose: down to each smaller multiple of ``multiple`` (>= one)."""
    return [0] + [width - w for w in range((width - 1) // multiple * multiple, 0, -multiple)]


def head_levels(count: int) -> list[int]:
    """Head counts a layer may lose: all but one."""
    return list(range(count))


def plan_measured(
    head_curves: list[list[tuple[int, float]]],
    ffn_curves: list[list[tuple[int, float]]],
    head_orders: list[list[int]],
    neuron_orders: list[list[int]],
    target_macs: float,
    head_cost: int,
    neuron_cost: int,
) -> Plan:
    """Per layer how many heads and neurons to remove, minimising the summed measured losses.

    ``*_curves[layer]`` lists (units removed, end-to-end loss when only that sub-layer loses
    them); ``*_orders[layer]`` lists the units least important first. Losses of separate
    sub-layers are taken as additive (as in ZipLM/SPDY), which turns the choice into a knapsack
    over MACs, solved exactly by dynamic programming in units of the two costs' gcd.
    """
    unit = math.gcd(head_cost, neuron_cost)
    need = max(0, math.ceil(target_macs / unit - 1e-9))
    groups = [(c, head_cost // unit) for c in head_curves]
    groups += [(c, neuron_cost // unit) for c in ffn_curves]
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for curve, per in groups:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for have, (loss, picks) in best.items():
            for count, value in curve:
                key = min(need, have + count * per)
                cand = (loss + max(value, 0.0), (*picks, count))
                if key not in nxt or cand < nxt[key]:
                    nxt[key] = cand
        best = nxt
    if need not in best:
        most = sum(max(c for c, _ in curve) * per for curve, per in groups) * unit
        raise UserError(
            f"prune budget asks to remove {target_macs:.0f} MACs/token but at most {most} can go "
            "(>= 1 head and >= one FFN step per layer stay); use a smaller --prune."
        )
    picks = best[need][1]
    n = len(head_curves)
    keep_heads = [sorted(order[k:]) for order, k in zip(head_orders, picks[:n], strict=True)]
    keep_neurons = [sorted(order[k:]) for order, k in zip(neuron_orders, picks[n:], strict=True)]
    removed = sum(picks[:n]) * head_cost + sum(picks[n:]) * neuron_cost
    return Plan(keep_heads, keep_neurons, removed)
