"""GPFQ against a literal re-implementation of the paper's update, and its basic guarantees.

The reference (the ``paper_gpfq`` fixture of ``conftest.py``) is the update of Lybrand and Saab (JMLR 2021) and
Zhang, Zhou and Saab (SIMODS 2023) as the paper writes it, with the explicit residual vector ``u`` over the samples.
lit_mpq's implementation only keeps the input features' inner products, so agreeing with it checks the algebra as
well as the code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_mpq.rounding import Grid, gpfq_round, median_alphabet_scale


def _lit_mpq_gpfq(weight: np.ndarray, x_float: np.ndarray, x_quant: np.ndarray, step: float, bits: int) -> np.ndarray:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grid = Grid.from_qparams(
        torch.tensor(step, dtype=torch.float64), torch.tensor(0), qmin, qmax, groups=1, rows=weight.shape[0]
    )
    cross = torch.from_numpy(x_quant.T @ x_float)[None]
    gram = torch.from_numpy(x_quant.T @ x_quant)[None]
    return gpfq_round(torch.from_numpy(weight)[None], cross, gram, grid)[0].numpy()


def _problem(seed: int, rows: int = 6, columns: int = 20, samples: int = 200):
    generator = np.random.default_rng(seed)
    mixing = generator.normal(size=(columns, columns)) / np.sqrt(columns)
    x_float = generator.normal(size=(samples, columns)) @ mixing  # correlated features
    x_quant = np.round(x_float * 4) / 4  # the quantized network's inputs: the float ones on a coarse grid
    weight = generator.normal(size=(rows, columns)) * 0.3
    return weight, x_float, x_quant


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", [128, 7])
def test_gpfq_equals_the_papers_update_neuron_by_neuron(paper_gpfq, seed, block_size):
    weight, x_float, x_quant = _problem(seed)
    bits, step = 3, 0.1
    levels = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)) * step  # the grid lit_mpq uses: signed, holds zero
    expected = np.stack([paper_gpfq(row, x_float, x_quant, levels) for row in weight])

    grid = Grid.from_qparams(
        torch.tensor(step, dtype=torch.float64), torch.tensor(0), -4, 3, groups=1, rows=weight.shape[0]
    )
    cross = torch.from_numpy(x_quant.T @ x_float)[None]
    gram = torch.from_numpy(x_quant.T @ x_quant)[None]
    rounded = gpfq_round(torch.from_numpy(weight)[None], cross, gram, grid, block_size=block_size)[0].numpy()

    np.testing.assert_allclose(rounded, expected, atol=1e-12)


def test_gpfq_handles_a_feature_that_is_always_zero(paper_gpfq):
    weight, x_float, x_quant = _problem(3)
    x_float[:, 4] = 0.0
    x_quant[:, 4] = 0.0
    levels = np.arange(-8, 8) * 0.05
    expected = np.stack([paper_gpfq(row, x_float, x_quant, levels) for row in weight])
    rounded = _lit_mpq_gpfq(weight, x_float, x_quant, step=0.05, bits=4)
    np.testing.assert_allclose(rounded, expected, atol=1e-12)
    nearest = np.clip(np.round(weight[:, 4] / 0.05), -8, 7) * 0.05
    np.testing.assert_allclose(rounded[:, 4], nearest, atol=1e-12)  # nearest rounding where the input is always zero


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_gpfq_output_error_is_below_nearest_rounding_on_correlated_inputs(seed):
    weight, x_float, x_quant = _problem(seed, rows=16, columns=40, samples=400)
    step = 0.15  # 3 bits covering [-0.6, 0.45]: rounding, not clipping, dominates the error
    rounded = _lit_mpq_gpfq(weight, x_float, x_quant, step=step, bits=3)
    nearest = np.clip(np.round(weight / step), -4, 3) * step
    target = x_float @ weight.T
    error_gpfq = np.linalg.norm(target - x_quant @ rounded.T)
    error_nearest = np.linalg.norm(target - x_quant @ nearest.T)
    assert error_gpfq < 0.9 * error_nearest


def test_median_alphabet_step_matches_the_source_projects_linspace_alphabet():
    weight = torch.tensor([[0.1, -0.2, 0.3, -0.4], [1.0, 2.0, -3.0, 4.0]])
    # Source project: alphabet = linspace(-1, 1, 2^b) * C * median|w|; its step is 2 C median / (2^b - 1).
    bits, scalar = 3, 2.0
    median = float(np.median(np.abs(weight.numpy())))  # of an even count: the mean of the middle two, as numpy does
    alphabet = np.linspace(-1, 1, 2**bits) * scalar * median
    step = median_alphabet_scale(weight, bits, scalar, per_channel=False)
    assert float(step) == pytest.approx(alphabet[1] - alphabet[0])
    per_channel = median_alphabet_scale(weight, bits, scalar, per_channel=True)
    assert per_channel.shape == (2,)
    assert float(per_channel[0]) == pytest.approx(2 * scalar * 0.25 / 7)  # median of 0.1, 0.2, 0.3, 0.4
    with pytest.raises(ValueError, match="alphabet_scalar must be positive"):
        median_alphabet_scale(weight, bits, 0.0, per_channel=False)
