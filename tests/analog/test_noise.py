"""Each analog noise model's variance on a constant input, against its formula worked out independently.

A layer with known weights is quantized at W8A8 (weights symmetric per channel, so ``Dw_c = 2 max|w_c|``; the input
observed over ``[0, 1]``, so ``Dx = 1`` and ``x = 51/255`` lies on the input grid). The quantized weight is rebuilt
here with ``round(w / s).clamp(-128, 127) * s``, ``s = max|w_c| / 127.5``. The layer then runs many times on the
constant input with noise, and the empirical variance of each output channel is compared with the formula within a
statistical tolerance: the sample variance of ``n`` Gaussian draws has a relative standard deviation of
``sqrt(2 / (n - 1))``, and the checks allow 5 of those.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_mpq.analog import NoiseInjector, ShotNoise, ThermalNoise, WeightNoise, build_noise
from lit_mpq.analog.noise import dot_length, input_full_scale, weight_full_scale
from lit_mpq.quant import QuantSettings, quantize_model
from lit_mpq.quant.apply import calibrate, set_mode

A = 51 / 255  # on the input grid: scale 1/255, zero point 0
DRAWS = 4000


def quantized(layer: nn.Module, calibration: torch.Tensor) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    quantize_model(model, QuantSettings(act_observer="minmax", weight_granularity="per_channel"))
    calibrate(model, [calibration])
    set_mode(model, "quant", "quant")
    return model


def reference_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit symmetric per-channel weight grid rebuilt by hand: (quantized weight, full scale per channel)."""
    max_abs = w.detach().flatten(1).abs().amax(dim=1)
    scale = (max_abs / 127.5).reshape(-1, *[1] * (w.dim() - 1))
    return torch.round(w.detach() / scale).clamp(-128, 127) * scale, 2 * max_abs


def linear_model() -> nn.Sequential:
    torch.manual_seed(1)
    layer = nn.Linear(16, 6)
    calibration = torch.cat([torch.zeros(1, 16), torch.ones(1, 16)])
    return quantized(layer, calibration)


def conv_model() -> nn.Sequential:
    torch.manual_seed(2)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    calibration = torch.cat([torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)])
    return quantized(layer, calibration)


def tolerance(n: int) -> float:
    return 5 * math.sqrt(2 / (n - 1))


def assert_variance(samples: torch.Tensor, expected: torch.Tensor, dim: int = 0) -> None:
    """``samples`` minus their mean over ``dim`` have, per entry, the variance ``expected`` (relative tolerance)."""
    empirical = samples.double().var(dim=dim)
    n = samples.shape[dim]
    ratio = empirical / expected.double().expand_as(empirical)
    assert (ratio - 1).abs().max().item() < tolerance(n), ratio


def noise_of(model: nn.Module, x: torch.Tensor, noise, energy: float, seed: int) -> torch.Tensor:
    """One forward's noise at the model's output: noisy minus clean."""
    clean = model(x)
    with NoiseInjector(model, noise, {"0": energy}, seed=seed):
        return model(x) - clean


def test_the_layer_quantities_are_the_hand_computed_ones():
    model = conv_model()
    layer = model[0]
    _, full_scale = reference_weight(layer.weight)
    assert dot_length(layer) == 27 and dot_length(linear_model()[0]) == 16
    torch.testing.assert_close(weight_full_scale(layer), full_scale, rtol=1e-6, atol=0)
    assert input_full_scale(layer).item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("energy", [0.5, 8.0])
def test_thermal_noise_variance_is_sigma_sqrt_n_full_scales_over_sqrt_energy_on_a_linear(energy):
    model = linear_model()
    layer = model[0]
    _, dw = reference_weight(layer.weight)
    noise = noise_of(model, torch.full((DRAWS, 16), A), ThermalNoise(), energy, seed=3)
    expected = (0.01 * math.sqrt(16) * dw * 1.0 / math.sqrt(energy)) ** 2
    assert_variance(noise, expected)
    assert (noise.mean(dim=0).abs() < 5 * expected.sqrt() / math.sqrt(DRAWS)).all()  # zero mean


def test_thermal_noise_on_a_convolution_does_not_depend_on_the_position_or_the_signal():
    model = conv_model()
    layer = model[0]
    _, dw = reference_weight(layer.weight)
    x = torch.full((DRAWS // 4, 3, 8, 8), A)
    x[:, :, :4] = 0.0  # half the image dark: the thermal noise is the same there
    noise = noise_of(model, x, ThermalNoise(sigma=0.02), 2.0, seed=4)
    expected = (0.02 * math.sqrt(27) * dw / math.sqrt(2.0)) ** 2
    assert_variance(noise, expected.reshape(4, 1, 1))


@pytest.mark.parametrize("energy", [1.0, 16.0])
def test_shot_noise_variance_is_the_norm_product_over_n_energy_on_a_linear(energy):
    model = linear_model()
    layer = model[0]
    w_hat, _ = reference_weight(layer.weight)
    noise = noise_of(model, torch.full((DRAWS, 16), A), ShotNoise(), energy, seed=5)
    # ||w^_c||^2 ||x||^2 / (N E) with ||x||^2 = N a^2
    expected = w_hat.square().sum(dim=1) * (16 * A**2) / (16 * energy)
    assert_variance(noise, expected)


def test_shot_noise_on_a_convolution_follows_the_receptive_field_norm_at_the_border():
    """Interior outputs see 27 input values of ``a``, a corner sees 3 channels x 4 taps = 12 (zero padding)."""
    model = conv_model()
    layer = model[0]
    w_hat, _ = reference_weight(layer.weight)
    noise = noise_of(model, torch.full((DRAWS // 2, 3, 8, 8), A), ShotNoise(), 4.0, seed=6)
    norm_sq = w_hat.square().flatten(1).sum(dim=1)
    interior = norm_sq * 27 * A**2 / (27 * 4.0)
    corner = norm_sq * 12 * A**2 / (27 * 4.0)
    edge = norm_sq * 18 * A**2 / (27 * 4.0)
    assert_variance(noise[:, :, 3, 4], interior)
    assert_variance(noise[:, :, 0, 0], corner)
    assert_variance(noise[:, :, 7, 7], corner)
    assert_variance(noise[:, :, 0, 4], edge)


def test_shot_noise_vanishes_for_a_zero_input():
    model = linear_model()
    x = torch.zeros(8, 16)
    with NoiseInjector(model, ShotNoise(), {"0": 1.0}, seed=0):
        noisy = model(x)
    assert torch.equal(noisy, model(x))


def test_weight_noise_variance_is_sigma_full_scale_input_norm_over_energy_and_shared_by_the_batch():
    model = linear_model()
    layer = model[0]
    _, dw = reference_weight(layer.weight)
    energy = 4.0
    x = torch.full((3, 16), A)
    clean = model(x)
    with NoiseInjector(model, WeightNoise(), {"0": energy}, seed=7):
        draws = torch.stack([model(x) - clean for _ in range(DRAWS)])  # one weight draw per forward call
    assert torch.allclose(draws[:, 0], draws[:, 2])  # the batch shares the weights, hence the noise
    # Var(sum_j d_cj a) = N a^2 (0.1 Dw_c)^2 / E
    expected = 16 * A**2 * (0.1 * dw) ** 2 / energy
    assert_variance(draws[:, 0], expected)


def test_weight_noise_on_a_convolution_matches_its_output_std_formula():
    model = conv_model()
    layer = model[0]
    _, dw = reference_weight(layer.weight)
    x = torch.full((1, 3, 8, 8), A)
    clean = model(x)
    noise = WeightNoise()
    with NoiseInjector(model, noise, {"0": 2.0}, seed=8):
        draws = torch.stack([model(x) - clean for _ in range(DRAWS)])
    expected = 27 * A**2 * (0.1 * dw) ** 2 / 2.0
    assert_variance(draws[:, 0, :, 3, 4], expected)
    std = noise.output_std(layer, x, 2.0)  # the closed form the docs give, at the interior position
    torch.testing.assert_close(std[0, :, 3, 4].square(), expected.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["thermal", "shot", "weight"])
def test_the_variance_scales_as_one_over_the_energy_on_the_same_draws(name):
    """Common random numbers: the same seed at 4x the energy gives exactly half the noise (thermal, shot, weight)."""
    model = conv_model()
    x = torch.rand(2, 3, 8, 8)
    low = noise_of(model, x, build_noise(name), 1.0, seed=9)
    high = noise_of(model, x, build_noise(name), 4.0, seed=9)
    torch.testing.assert_close(high, low / 2, rtol=1e-4, atol=1e-6)


def test_bad_noise_settings_are_refused_with_a_short_message():
    with pytest.raises(ValueError, match="unknown analog noise 'pink'"):
        build_noise("pink")
    for sigma in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="sigma"):
            ThermalNoise(sigma)
    with pytest.raises(ValueError, match="quantized Conv2d/Linear"):
        dot_length(nn.Linear(2, 2))
