"""Least-squares scale refit: the closed form against NumPy's least squares on the samples, per row and per tensor;
alternating it with coordinate descent never raises the sample-wise error; codes keep their integer range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_mpq.callbacks import WeightRounding
from lit_mpq.rounding import Grid, gpfq_round, gptq_round
from lit_mpq.rounding.scale_fit import fit_scales, least_squares_scale


def _problem(seed: int, rows: int = 5, columns: int = 9, samples: int = 300):
    generator = np.random.default_rng(seed)
    base = generator.normal(size=(samples, 3))
    x_float = base @ generator.normal(size=(3, columns)) + 0.3 * generator.normal(size=(samples, columns))
    x_quant = x_float + 0.1 * generator.normal(size=(samples, columns))
    weight = generator.normal(size=(rows, columns)) * 0.4
    steps = 0.1 + 0.1 * generator.random(rows)
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    grid = Grid.from_qparams(as_t(steps), torch.zeros(rows), -4, 3, groups=1, rows=rows)
    return as_t(weight)[None], as_t(x_float), as_t(x_quant), grid


def _gpfq_terms(weight, x_float, x_quant):
    cross, gram = (x_quant.T @ x_float)[None], (x_quant.T @ x_quant)[None]
    return cross, gram, weight @ cross.transpose(1, 2)


def _sample_error(weight, rounded, x_float, x_quant) -> np.ndarray:
    """``||W X - Q X~||²`` per row, from the samples."""
    return ((x_float @ weight[0].T - x_quant @ rounded[0].T) ** 2).sum(0).numpy()


@pytest.mark.parametrize("seed", range(3))
def test_per_channel_scale_is_the_samplewise_least_squares_solution(seed):
    weight, x_float, x_quant, grid = _problem(seed)
    cross, gram, linear = _gpfq_terms(weight, x_float, x_quant)
    rounded = gpfq_round(weight, cross, gram, grid)
    fitted = least_squares_scale(rounded, linear, gram, grid, per_channel=True)
    codes = (rounded[0] / grid.scale[0, :, None]).round().numpy()
    target = (x_float @ weight[0].T).numpy()
    for row in range(weight.shape[1]):  # min_s ||X w - s X~ z||²: a one-column least-squares problem
        design = (x_quant.numpy() @ codes[row])[:, None]
        expected = np.linalg.lstsq(design, target[:, row], rcond=None)[0][0]
        assert float(fitted.scale[0, row]) == pytest.approx(expected, rel=1e-9)
    assert torch.equal(fitted.zero_point, grid.zero_point) and (fitted.qmin, fitted.qmax) == (grid.qmin, grid.qmax)


def test_per_tensor_scale_pools_every_row():
    weight, x_float, x_quant, grid = _problem(5)
    grid = Grid.from_qparams(torch.tensor(0.15, dtype=torch.float64), torch.tensor(0), -4, 3, groups=1, rows=5)
    cross, gram, linear = _gpfq_terms(weight, x_float, x_quant)
    rounded = gpfq_round(weight, cross, gram, grid)
    fitted = least_squares_scale(rounded, linear, gram, grid, per_channel=False)
    codes = (rounded[0] / 0.15).round().numpy()
    design = (x_quant.numpy() @ codes.T).T.reshape(-1, 1)  # every row's samples stacked, one shared scale
    target = (x_float @ weight[0].T).numpy().T.reshape(-1)
    expected = np.linalg.lstsq(design, target, rcond=None)[0][0]
    torch.testing.assert_close(fitted.scale[0], torch.full((5,), expected, dtype=torch.float64), rtol=1e-9, atol=0)


def test_gptq_objective_scale_minimises_the_output_error_on_a_scan():
    weight, _, x_quant, grid = _problem(2)
    hessian = (x_quant.T @ x_quant)[None]
    rounded = gptq_round(weight, hessian, grid, damp=0.0)
    fitted = least_squares_scale(rounded, weight @ hessian, hessian, grid, per_channel=True)
    codes = (rounded / grid.scale.unsqueeze(-1)).round()
    for row in range(5):
        scan = torch.linspace(0.5, 1.5, 2001, dtype=torch.float64) * grid.scale[0, row]
        errors = ((x_quant @ (weight[0, row][:, None] - codes[0, row][:, None] * scan[None])) ** 2).sum(0)
        assert float(fitted.scale[0, row]) == pytest.approx(float(scan[errors.argmin()]), rel=1e-3)


def test_a_row_of_zero_codes_keeps_its_scale():
    weight, x_float, x_quant, grid = _problem(3)
    cross, gram, linear = _gpfq_terms(weight, x_float, x_quant)
    rounded = gpfq_round(weight, cross, gram, grid)
    rounded[0, 2] = 0
    fitted = least_squares_scale(rounded, linear, gram, grid, per_channel=True)
    assert float(fitted.scale[0, 2]) == float(grid.scale[0, 2])


@pytest.mark.parametrize("passes", [0, 3])
def test_alternating_fit_never_raises_the_error_and_keeps_integer_codes(passes):
    weight, x_float, x_quant, grid = _problem(4, rows=8, columns=12)
    cross, gram, linear = _gpfq_terms(weight, x_float, x_quant)
    greedy = gpfq_round(weight, cross, gram, grid)
    fitted, new_grid = fit_scales(greedy, linear, gram, grid, per_channel=True, rounds=3, passes=passes)
    assert (
        _sample_error(weight, fitted, x_float, x_quant) <= _sample_error(weight, greedy, x_float, x_quant) + 1e-9
    ).all()
    codes = fitted / new_grid.scale.unsqueeze(-1)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert codes.round().min() >= -4 and codes.round().max() <= 3
    if passes == 0:  # the method's levels stay; only the scales move
        torch.testing.assert_close(codes.round(), (greedy / grid.scale.unsqueeze(-1)).round(), rtol=0, atol=0)
    unchanged, same_grid = fit_scales(greedy, linear, gram, grid, per_channel=True, rounds=0, passes=passes)
    assert torch.equal(unchanged, greedy) and same_grid is grid
    with pytest.raises(ValueError, match="rounds >= 0"):
        fit_scales(greedy, linear, gram, grid, per_channel=True, rounds=-1, passes=0)


def test_weight_rounding_passes_scale_fit_to_its_settings():
    assert WeightRounding(method="gpfq", scale_fit=2).settings.scale_fit == 2
    assert WeightRounding(method="gpfq").settings.scale_fit == 0  # off by default: the quantizer's own grid
    with pytest.raises(ValueError, match="scale_fit must be"):
        WeightRounding(method="gpfq", scale_fit=-1)
