"""GPTQ: exactly nearest rounding under a diagonal Hessian, lower output error on correlated inputs, and agreement
with a brute-force check of its objective on a tiny layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lit_mpq.rounding import Grid, gptq_round


def _grid(step: float, rows: int, qmin: int = -8, qmax: int = 7, groups: int = 1) -> Grid:
    return Grid.from_qparams(
        torch.tensor(step, dtype=torch.float64), torch.tensor(0), qmin, qmax, groups=groups, rows=rows
    )


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_is_nearest_rounding_when_the_hessian_is_diagonal(act_order):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1, 8, 30, generator=generator, dtype=torch.float64)
    hessian = torch.diag(torch.rand(30, generator=generator, dtype=torch.float64) + 0.1)[None]
    grid = _grid(0.2, 8)
    rounded = gptq_round(weight, hessian, grid, damp=0.01, block_size=7, act_order=act_order)
    nearest = torch.clamp(torch.round(weight / 0.2), -8, 7) * 0.2
    torch.testing.assert_close(rounded, nearest, rtol=0, atol=1e-12)


def _correlated(seed: int, rows: int, columns: int, samples: int):
    generator = np.random.default_rng(seed)
    base = generator.normal(size=(samples, 3))
    x = base @ generator.normal(size=(3, columns)) + 0.1 * generator.normal(size=(samples, columns))
    weight = generator.normal(size=(rows, columns)) * 0.5
    return weight, x


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_the_output_error_on_correlated_inputs(act_order):
    weight, x = _correlated(1, rows=12, columns=48, samples=500)
    step = 0.25
    grid = _grid(step, 12)
    hessian = torch.from_numpy(x.T @ x)[None]
    rounded = gptq_round(torch.from_numpy(weight)[None], hessian, grid, act_order=act_order, block_size=16)[0].numpy()
    nearest = np.clip(np.round(weight / step), -8, 7) * step
    error_gptq = np.linalg.norm(x @ (weight - rounded).T)
    error_nearest = np.linalg.norm(x @ (weight - nearest).T)
    assert error_gptq < 0.5 * error_nearest
    levels = rounded / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-9)  # on the grid
    assert levels.min() >= -8 and levels.max() <= 7


def test_gptq_finds_the_optimum_of_two_strongly_coupled_weights():
    # Two perfectly correlated inputs: only w0 + w1 matters. Nearest rounds each weight down (0.4 -> 0 twice),
    # losing 0.8 of the sum; GPTQ passes the first weight's error to the second, which then rounds up.
    x = np.ones((10, 2))
    weight = np.array([[0.4, 0.4]])
    grid = _grid(1.0, 1)
    rounded = gptq_round(torch.from_numpy(weight)[None], torch.from_numpy(x.T @ x)[None], grid, damp=0.01)[0].numpy()
    best = min(
        itertools.product(range(-2, 3), repeat=2),
        key=lambda q: np.linalg.norm(x @ (weight[0] - np.array(q))),
    )
    assert np.linalg.norm(x @ (weight[0] - rounded[0])) == pytest.approx(np.linalg.norm(x @ (weight[0] - best)))
    assert rounded.sum() == pytest.approx(1.0)


def test_gptq_rounds_groups_independently_like_separate_layers():
    generator = np.random.default_rng(5)
    weights, hessians = [], []
    for _ in range(3):
        w, x = _correlated(int(generator.integers(1000)), rows=4, columns=9, samples=80)
        weights.append(w)
        hessians.append(x.T @ x)
    batched = gptq_round(
        torch.from_numpy(np.stack(weights)), torch.from_numpy(np.stack(hessians)), _grid(0.3, 4, groups=3)
    )
    for g in range(3):
        alone = gptq_round(torch.from_numpy(weights[g])[None], torch.from_numpy(hessians[g])[None], _grid(0.3, 4))
        torch.testing.assert_close(batched[g], alone[0], rtol=0, atol=1e-12)


def test_gptq_rejects_a_hessian_of_the_wrong_shape():
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_round(torch.zeros(1, 2, 3), torch.eye(4)[None], _grid(1.0, 2))
