"""Coordinate-descent refinement: never worse than its start, coordinate-wise optimal (checked level by level against
every grid level), the brute-force optimum when the features are uncorrelated, and lower output error than GPFQ's
greedy pass alone on correlated inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lit_mpq.rounding import Grid, gpfq_round
from lit_mpq.rounding.refine import coordinate_descent, quadratic_objective


def _grid(step: float, rows: int, qmin: int = -4, qmax: int = 3) -> Grid:
    return Grid.from_qparams(torch.tensor(step, dtype=torch.float64), torch.tensor(0), qmin, qmax, groups=1, rows=rows)


def _problem(seed: int, rows: int, columns: int, samples: int = 200):
    generator = np.random.default_rng(seed)
    base = generator.normal(size=(samples, 2))
    x_float = base @ generator.normal(size=(2, columns)) + 0.2 * generator.normal(size=(samples, columns))
    x_quant = x_float + 0.1 * generator.normal(size=(samples, columns))  # the quantized network's drifted inputs
    weight = generator.normal(size=(rows, columns)) * 0.4
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return as_t(weight)[None], as_t(x_float), as_t(x_quant)


def _output_error(weight, rounded, x_float, x_quant):
    """``||W X - Q X~||²`` per row, straight from the samples (not from the moment matrices)."""
    return ((x_float @ weight[0].T - x_quant @ rounded[0].T) ** 2).sum(0)


@pytest.mark.parametrize("seed", range(4))
def test_refined_gpfq_is_coordinatewise_optimal_and_not_worse(seed):
    weight, x_float, x_quant = _problem(seed, rows=5, columns=9)
    grid = _grid(0.15, 5)
    cross, gram = (x_quant.T @ x_float)[None], (x_quant.T @ x_quant)[None]
    greedy = gpfq_round(weight, cross, gram, grid)
    refined = coordinate_descent(greedy, weight @ cross.transpose(1, 2), gram, grid, passes=50)
    before, after = (_output_error(weight, q, x_float, x_quant) for q in (greedy, refined))
    assert bool((after <= before + 1e-9).all())
    levels = torch.arange(-4, 4, dtype=torch.float64) * 0.15
    for t in range(9):  # no single weight can move to another level and lower the sample-wise error
        for level in levels:
            moved = refined.clone()
            moved[0, :, t] = level
            assert bool((_output_error(weight, moved, x_float, x_quant) >= after - 1e-9).all())


def test_uncorrelated_features_reach_the_brute_force_optimum():
    generator = torch.Generator().manual_seed(1)
    columns = 4
    weight = torch.randn(1, 2, columns, generator=generator, dtype=torch.float64) * 0.3
    gram = torch.diag(torch.rand(columns, generator=generator, dtype=torch.float64) + 0.5)[None]
    linear = weight @ gram  # GPTQ's objective ||X (w - q)||² with orthogonal features
    grid = _grid(0.15, 2)
    start = torch.full_like(weight, -0.6)  # a bad start: every weight on the lowest level
    refined = coordinate_descent(start, linear, gram, grid, passes=3)
    levels = (torch.arange(-4, 4, dtype=torch.float64) * 0.15).tolist()
    for row in range(2):
        best = min(
            itertools.product(levels, repeat=columns),
            key=lambda q: float(
                quadratic_objective(torch.tensor(q, dtype=torch.float64)[None, None], linear[:, row : row + 1], gram)
            ),
        )
        torch.testing.assert_close(refined[0, row], torch.tensor(best, dtype=torch.float64), rtol=0, atol=1e-12)


def test_refinement_lowers_gpfq_error_on_correlated_inputs():
    weight, x_float, x_quant = _problem(7, rows=16, columns=24, samples=400)
    grid = _grid(0.2, 16)
    cross, gram = (x_quant.T @ x_float)[None], (x_quant.T @ x_quant)[None]
    greedy = gpfq_round(weight, cross, gram, grid)
    refined = coordinate_descent(greedy, weight @ cross.transpose(1, 2), gram, grid, passes=10)
    before = float(_output_error(weight, greedy, x_float, x_quant).sum())
    after = float(_output_error(weight, refined, x_float, x_quant).sum())
    assert after < 0.95 * before


def test_zero_passes_and_bad_shapes():
    weight = torch.zeros(1, 2, 3, dtype=torch.float64)
    gram = torch.eye(3, dtype=torch.float64)[None]
    assert torch.equal(coordinate_descent(weight, weight, gram, _grid(0.1, 2), passes=0), weight)
    with pytest.raises(ValueError, match="passes must be >= 0"):
        coordinate_descent(weight, weight, gram, _grid(0.1, 2), passes=-1)
    with pytest.raises(ValueError, match="needs b"):
        coordinate_descent(weight, weight, gram[:, :2, :2], _grid(0.1, 2), passes=1)
