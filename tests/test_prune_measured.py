"""Reconstruction scores and measured allocation: checked against brute force on small cases."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from edgepack.errors import UserError
from edgepack.prune.alloc import solve_kept
from edgepack.prune.obs import DAMP, greedy_costs
from edgepack.prune.plan import ffn_levels, head_levels, plan_measured


def _problem(n_in: int, n_out: int = 6, tokens: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n_in)
    mix = torch.randn(n_in, n_in, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, n_in, generator=generator, dtype=torch.float64) @ mix
    a = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    weight = torch.randn(n_out, n_in, generator=generator, dtype=torch.float64)
    return weight, a.T @ a


def _refit_error(weight: torch.Tensor, gram: torch.Tensor, drop: list[int]) -> float:
    """Exact output error of dropping columns and re-solving the rest (same damping)."""
    h = gram + DAMP * float(torch.diagonal(gram).mean()) * torch.eye(len(gram), dtype=gram.dtype)
    full = torch.cat([weight, torch.zeros(len(weight), 1, dtype=weight.dtype)], 1)
    keep = [c for c in range(len(h)) if c not in drop]
    theta = torch.linalg.solve(h[keep][:, keep], h[keep] @ full.T)
    new = torch.zeros_like(full)
    new[:, keep] = theta.T
    d = new - full
    return float(torch.einsum("ri,ij,rj->", d, h, d))


@pytest.mark.parametrize("group", [1, 3])
def test_first_removal_is_the_exact_best(group: int) -> None:
    weight, gram = _problem(12)
    costs = greedy_costs(weight, gram, group, keep_min=1)
    groups = 12 // group
    exact = [
        _refit_error(weight, gram, list(range(g * group, (g + 1) * group))) for g in range(groups)
    ]
    first = int(torch.argmin(costs))
    assert first == min(range(groups), key=exact.__getitem__)
    assert costs[first].item() == pytest.approx(exact[first], rel=1e-6)


def test_greedy_costs_rise_in_removal_order_and_sum_to_the_error() -> None:
    weight, gram = _problem(10)
    costs = greedy_costs(weight, gram, 1, keep_min=2)
    order = torch.argsort(costs).tolist()
    kept = order[-2:]
    assert costs[kept].min() > costs[order[:-2]].max()  # the kept minimum ranks last
    # Marginal costs of the first k removals add up to the exact error of removing those k.
    for k in (1, 3, 6):
        want = _refit_error(weight, gram, order[:k])
        got = float(costs[order[:k]].sum())
        assert got == pytest.approx(want, rel=1e-4) or got >= want  # non-decreasing floor
        assert got == pytest.approx(want, rel=0.05)


def test_solve_kept_keeps_everything_and_refits_a_drop() -> None:
    weight, gram = _problem(8)
    bias = torch.randn(len(weight), dtype=torch.float64)
    w, b = solve_kept(weight, bias, gram, torch.arange(8), ridge=0.1)
    assert torch.allclose(w, weight, atol=1e-8) and torch.allclose(b, bias, atol=1e-8)
    w, b = solve_kept(weight, bias, gram, torch.tensor([0, 1, 2, 4, 5, 6, 7]), ridge=0.0)
    assert torch.all(w[:, 3] == 0)
    full = torch.cat([weight, bias[:, None]], 1)
    new = torch.cat([w, b[:, None]], 1)
    err_refit = torch.einsum("ri,ij,rj->", new - full, gram, new - full)
    cut = full.clone()
    cut[:, 3] = 0
    err_cut = torch.einsum("ri,ij,rj->", cut - full, gram, cut - full)
    assert err_refit < err_cut


def test_levels() -> None:
    assert ffn_levels(128, 32) == [0, 32, 64, 96]
    assert ffn_levels(100, 32) == [0, 4, 36, 68]
    assert head_levels(4) == [0, 1, 2, 3]


def test_plan_measured_is_the_brute_force_optimum() -> None:
    rng = random.Random(0)
    head_curves = [[(k, k * rng.uniform(0.5, 2.0) ** 2) for k in range(3)] for _ in range(2)]
    ffn_curves = [
        [(k, (k / 32) ** 1.5 * rng.uniform(0.1, 1.0)) for k in (0, 32, 64)] for _ in range(2)
    ]
    orders = [[2, 0, 1], [1, 2, 0]]
    neuron_orders = [list(range(96))[::-1], list(range(96))]
    head_cost, neuron_cost, target = 64, 1, 150
    plan = plan_measured(
        head_curves, ffn_curves, orders, neuron_orders, target, head_cost, neuron_cost
    )
    best = min(
        (sum(c[1] for c in picks), picks)
        for picks in itertools.product(*head_curves, *ffn_curves)
        if (picks[0][0] + picks[1][0]) * head_cost + (picks[2][0] + picks[3][0]) * neuron_cost
        >= target
    )
    picks = best[1]
    assert [3 - len(k) for k in plan.keep_heads] == [picks[0][0], picks[1][0]]
    assert [96 - len(k) for k in plan.keep_neurons] == [picks[2][0], picks[3][0]]
    assert plan.removed_macs >= target
    # The units removed are the first of each order.
    for order, keep in zip(orders, plan.keep_heads, strict=True):
        assert sorted(order[3 - len(keep) :]) == keep
    with pytest.raises(UserError, match="at most"):
        plan_measured(head_curves, ffn_curves, orders, neuron_orders, 10**6, head_cost, neuron_cost)
