"""PTQ4ViT twin-uniform quantization: the level set against a brute-force nearest level, the power-of-two relation of
the two steps, the positive step against a brute-force error search, the integer deployment it stands for (positive
codes shifted, one integer dot product), its advantage on post-GELU values, and its wiring through
``act_observer_overrides``.
"""

import pytest
import torch
from torch import nn

from lit_mpq.quant.apply import QuantSettings, quantize_model, set_mode
from lit_mpq.quant.twin_uniform import TwinUniformQuantizer, twin_uniform_quantize

pytestmark = pytest.mark.usefixtures("single_thread")


def post_gelu(seed: int = 0, count: int = 20000, spread: float = 2.0) -> torch.Tensor:
    """GELU of a wide normal: the negative side down to about -0.17, a long positive tail."""
    g = torch.Generator().manual_seed(seed)
    return nn.functional.gelu(torch.randn(count, generator=g) * spread)


def calibrated(x: torch.Tensor, bits: int = 4) -> TwinUniformQuantizer:
    quantizer = TwinUniformQuantizer(bits=bits)
    quantizer.set_mode("observe")
    quantizer(x)
    quantizer.set_mode("quant")
    return quantizer


def test_hand_computed_case():
    # 3 bits, H = 4: positive codes 0..3 (step 1), negative codes 1..4 (step 1/2^m). Minimum -0.5: the finest m with
    # 4 * 2^-m >= 0.5 is m = 3 (step 0.125, reaching -0.5).
    positive, negative = torch.tensor(1.0), torch.tensor(0.125)
    x = torch.tensor([-0.6, -0.5, -0.19, -0.05, 0.0, 0.4, 0.6, 2.49, 7.0])
    expected = torch.tensor([-0.5, -0.5, -0.25, -0.0, 0.0, 0.0, 1.0, 2.0, 3.0])
    assert torch.equal(twin_uniform_quantize(x, positive, negative, 3), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_every_value_goes_to_its_nearest_level_of_the_explicit_level_set(bits):
    x = post_gelu(seed=bits)
    quantizer = calibrated(x, bits)
    positive, negative = quantizer.steps(bits)
    half = 2 ** (bits - 1)
    levels = torch.cat([-negative * torch.arange(half, 0, -1), positive * torch.arange(half)])
    assert len(levels.unique()) == 2**bits  # every code is its own value
    probe = torch.cat([post_gelu(seed=100 + bits, count=5000), torch.linspace(-0.3, float(x.max()) * 1.2, 3001)])
    quantized = quantizer(probe)
    distance_to_chosen = (quantized - probe).abs()
    # the nearest level, up to float rounding at exact midpoints, on each side of zero (negative values never take a
    # positive level: their side's own grid holds 0)
    same_side = torch.where(probe[:, None] < 0, levels[None, :] <= 0, levels[None, :] >= 0)
    nearest_same_side = torch.where(same_side, (levels[None, :] - probe[:, None]).abs(), torch.inf).min(1).values
    assert bool((distance_to_chosen <= nearest_same_side + 1e-6).all())
    assert bool(((quantized == 0) | (quantized.sign() == probe.sign())).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_negative_step_is_the_finest_power_of_two_fraction_reaching_the_minimum(bits):
    x = post_gelu(seed=3)
    positive, negative = calibrated(x, bits).steps(bits)
    ratio = float(positive / negative)
    shift = round(torch.log2(torch.tensor(ratio)).item())
    assert ratio == pytest.approx(2.0**shift, rel=1e-6)
    half = 2 ** (bits - 1)
    minimum = float(-x.min())
    assert half * float(negative) >= minimum * (1 - 1e-6)  # reaches the minimum
    if shift > 0:
        assert half * float(negative) / 2 < minimum  # one more halving would not


def test_positive_step_minimises_the_positive_values_error_against_a_brute_force_search():
    x = post_gelu(seed=4, count=50000)
    bits, half = 4, 8
    positive, _ = calibrated(x, bits).steps(bits)
    values = x[x >= 0]

    def error(step: float) -> float:
        return float(((torch.round(values / step).clamp(0, half - 1) * step - values) ** 2).sum())

    brute = min(error(float(values.max()) * a / (half - 1)) for a in torch.linspace(0.02, 1.0, 500).tolist())
    # the search reads a histogram (bins 1/32 of an octave) with a noise model of rounding: within a few percent
    assert error(float(positive)) <= brute * 1.05


def test_negative_side_error_is_below_half_its_step_where_a_uniform_4_bit_grid_rounds_it_away():
    x = post_gelu(seed=5)
    quantizer = calibrated(x, 4)
    _, negative = quantizer.steps(4)
    negatives = x[x < 0]
    twin_error = (quantizer(negatives) - negatives).abs()
    assert bool((twin_error <= negative / 2 + 1e-7).all())
    # one uniform grid over [min, max] at 4 bits: the step is set by the tail, so the negatives keep at most one level
    low, high = float(x.min()), float(x.max())
    step = (high - low) / 15
    zero_point = round(-low / step)
    uniform = (torch.clamp(torch.round(negatives / step) + zero_point, 0, 15) - zero_point) * step
    assert float((uniform - negatives).pow(2).mean()) > 20 * float(twin_error.pow(2).mean())


def test_linear_output_equals_the_integer_deployment_with_shifted_positive_codes():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    quantizer = calibrated(post_gelu(seed=6, count=64 * 256).reshape(256, 64), 4)
    positive, negative = quantizer.steps(4)
    shift = round(float(torch.log2(positive / negative)))
    x = post_gelu(seed=7, count=64 * 32).reshape(32, 64)
    # deployment: a sign bit and 3 magnitude bits; positive magnitudes shifted left by m, then one signed integer
    # dot product with the weight and one rescale by the negative step
    magnitude_positive = torch.round(x / positive).clamp(0, 7).to(torch.int64)
    magnitude_negative = torch.round(-x / negative).clamp(0, 8).to(torch.int64)
    integer = torch.where(x < 0, -magnitude_negative, magnitude_positive << shift)
    deployed = float(negative) * (integer.double() @ linear.weight.double().T) + linear.bias.double()
    simulated = linear(quantizer(x)).double()
    torch.testing.assert_close(simulated, deployed, rtol=1e-5, atol=1e-4)


def test_override_wiring_straight_through_gradient_and_errors():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    quantize_model(model, QuantSettings(act_observer_overrides=((r"2", "twin_uniform"),)))
    assert isinstance(model[2].input_quantizer, TwinUniformQuantizer)
    assert not isinstance(model[0].input_quantizer, TwinUniformQuantizer)
    set_mode(model, weights="off", activations="observe")
    model(torch.randn(64, 8))
    set_mode(model, weights="quant", activations="quant")
    x = torch.randn(4, 16, requires_grad=True)
    model[2].input_quantizer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(RuntimeError, match="run calibration"):
        TwinUniformQuantizer().steps(4)
    quantizer = calibrated(post_gelu(), 4)
    with pytest.raises(ValueError, match="at least 2 bits"):
        quantizer.steps(1)
    before = quantizer.steps(4)[0]
    quantizer.set_range_factor(4, 0.5)
    assert float(quantizer.steps(4)[0]) == pytest.approx(float(before) * 0.5)
    assert quantizer.qparams(4)[1] == 0
