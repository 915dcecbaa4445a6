"""AdaRound on one layer: the paper's soft rounding and regularizer by hand, and its result against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lit_mpq.rounding.adaround import (
    adaround,
    beta_schedule,
    offset_gradient,
    rectified_sigmoid,
    rounding_regularizer,
)
from lit_mpq.rounding.grid import Grid
from lit_mpq.rounding.refine import quadratic_objective


def test_the_rectified_sigmoid_and_the_regularizer_by_hand():
    # σ(log 3) = 0.75, so h = 0.75 · (1.1 + 0.1) - 0.1 = 0.8; the regularizer there with β = 2: 1 - (2·0.8 - 1)² = 0.64.
    v = torch.tensor([math.log(3.0), 0.0, 20.0, -20.0])
    torch.testing.assert_close(rectified_sigmoid(v), torch.tensor([0.8, 0.5, 1.0, 0.0]))
    torch.testing.assert_close(rounding_regularizer(v[:1], 2.0), torch.tensor(0.64))
    # Zero once every offset is 0 or 1 (the stretched sigmoid reaches both exactly); 1 for an undecided 0.5.
    assert float(rounding_regularizer(v[2:], 20.0)) == 0.0
    assert float(rounding_regularizer(v[1:2], 20.0)) == pytest.approx(1.0)


def test_beta_is_off_during_the_warm_start_then_anneals_from_20_to_2():
    assert beta_schedule(199, 1000, 0.2, (20.0, 2.0)) is None
    assert beta_schedule(200, 1000, 0.2, (20.0, 2.0)) == pytest.approx(20.0)
    assert beta_schedule(600, 1000, 0.2, (20.0, 2.0)) == pytest.approx(11.0)  # halfway: the cosine's midpoint
    assert beta_schedule(1000, 1000, 0.2, (20.0, 2.0)) == pytest.approx(2.0)


def correlated_problem(seed: int, rows: int = 8, columns: int = 6, samples: int = 64):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64)
    x = torch.randn(samples, columns, generator=generator, dtype=torch.float64) @ mixing  # correlated features
    weight = torch.randn(1, rows, columns, generator=generator, dtype=torch.float64)
    quadratic = (x.T @ x)[None]
    linear = weight @ quadratic  # b = B w: the layer's own output error ||X (w - q)||²
    scale = weight.abs().amax(dim=-1) / 3.5
    grid = Grid(scale, torch.zeros_like(scale), -4, 3)
    return weight, linear, quadratic, grid, samples


def brute_force_best(weight, linear, quadratic, grid) -> torch.Tensor:
    """Every up/down choice of every weight of each row (the set AdaRound searches), the best per row."""
    scale = grid.scale.unsqueeze(-1)
    floor = torch.floor(weight / scale)
    best = torch.empty_like(weight)
    columns = weight.shape[-1]
    for row in range(weight.shape[1]):
        choices = torch.tensor(list(itertools.product([0.0, 1.0], repeat=columns)), dtype=torch.float64)
        levels = torch.clamp(floor[0, row] + choices, grid.qmin, grid.qmax) * scale[0, row]
        values = torch.einsum("kc,cd,kd->k", levels, quadratic[0], levels) - 2 * levels @ linear[0, row]
        best[0, row] = levels[values.argmin()]
    return best


def test_on_correlated_inputs_it_closes_most_of_nearest_roundings_gap_to_the_brute_force_optimum():
    excess_adaround = excess_nearest = 0.0
    for seed in range(4):
        weight, linear, quadratic, grid, samples = correlated_problem(seed)
        rounded = adaround(weight, linear, quadratic, grid, samples, iterations=2000)
        levels = rounded / grid.scale.unsqueeze(-1)
        floor = torch.floor(weight / grid.scale.unsqueeze(-1))
        assert bool(((levels.round() == floor) | (levels.round() == floor + 1)).all())  # only down or up
        torch.testing.assert_close(levels, levels.round())
        best = quadratic_objective(brute_force_best(weight, linear, quadratic, grid), linear, quadratic)
        excess_adaround += float((quadratic_objective(rounded, linear, quadratic) - best).sum())
        excess_nearest += float((quadratic_objective(grid.round(weight), linear, quadratic) - best).sum())
    assert excess_nearest > 0
    # A heuristic, not an exact solver: it must close most of the gap (it closes 81 % here; 10 passes of coordinate
    # descent from nearest rounding close 84 %).
    assert excess_adaround < 0.25 * excess_nearest


def test_with_uncorrelated_inputs_it_rounds_to_nearest():
    # B diagonal and b = B w: f(q) = Σ_t B_tt (q_t - w_t)², which nearest rounding minimises weight by weight.
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(1, 5, 4, generator=generator, dtype=torch.float64)
    quadratic = torch.diag(torch.rand(4, generator=generator, dtype=torch.float64) + 0.5)[None] * 50
    scale = weight.abs().amax(dim=-1) / 3.5
    grid = Grid(scale, torch.zeros_like(scale), -4, 3)
    rounded = adaround(weight, weight @ quadratic, quadratic, grid, samples=50, iterations=2000)
    torch.testing.assert_close(rounded, grid.round(weight))


def test_bad_shapes_and_settings_are_refused():
    weight, linear, quadratic, grid, samples = correlated_problem(0)
    with pytest.raises(ValueError, match="AdaRound needs b"):
        adaround(weight, linear[:, :2], quadratic, grid, samples)
    with pytest.raises(ValueError, match="iterations >= 1"):
        adaround(weight, linear, quadratic, grid, samples, iterations=0)


@pytest.mark.parametrize("beta", [None, 2.0, 12.5])
def test_the_written_out_gradient_equals_autograds(beta):
    weight, linear, quadratic, grid, _ = correlated_problem(3)
    scale, zero_point = grid.scale.unsqueeze(-1), grid.zero_point.unsqueeze(-1)
    floor = torch.floor(weight / scale)
    # Offsets spread over the whole range, some clipped by the rectified sigmoid, some levels clamped by the grid.
    v = torch.linspace(-4, 4, weight.numel(), dtype=torch.float64).reshape(weight.shape).requires_grad_(True)
    level = torch.clamp(floor + rectified_sigmoid(v) + zero_point, grid.qmin, grid.qmax)
    q = (level - zero_point) * scale
    loss = ((q @ quadratic) * q).sum() - 2 * (q * linear).sum()
    if beta is not None:
        loss = loss + 0.3 * rounding_regularizer(v, beta)
    (expected,) = torch.autograd.grad(loss, v)
    got = offset_gradient(v.detach(), floor, scale, zero_point, (grid.qmin, grid.qmax), quadratic, linear, 0.3, beta)
    torch.testing.assert_close(got, expected)
