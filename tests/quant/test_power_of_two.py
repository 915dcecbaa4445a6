"""FQ-ViT power-of-two-factor activation quantization: a hand-computed case, its never-clip and step bounds, the
integer deployment it stands for (codes shifted by the factors, one integer dot product), and its wiring through
``act_observer_overrides``.
"""

import pytest
import torch
from torch import nn

from lit_mpq.quant.apply import QuantSettings, quantize_model, set_mode
from lit_mpq.quant.functional import fake_quantize, quant_range
from lit_mpq.quant.observers import MinMaxObserver
from lit_mpq.quant.power_of_two import PowerOfTwoFactorQuantizer, power_of_two_qparams

pytestmark = pytest.mark.usefixtures("single_thread")


def calibrated(x: torch.Tensor, bits: int = 8, max_shift: int = 3) -> PowerOfTwoFactorQuantizer:
    quantizer = PowerOfTwoFactorQuantizer(x.shape[-1], max_shift=max_shift, bits=bits)
    quantizer.set_mode("observe")
    quantizer(x)
    quantizer.set_mode("quant")
    return quantizer


def heavy_channels(seed: int = 0, tokens: int = 512, channels: int = 64) -> torch.Tensor:
    """Post-GELU-like values: most channels within a few units, three channels up to ~100 (ViT-Tiny's fc2 inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.gelu(torch.randn(tokens, channels, generator=g) * 1.5)
    x[:, :3] *= torch.tensor([40.0, 60.0, 25.0])
    return x


def test_hand_computed_case():
    # 2 bits (3 levels), K = 3: base s = 6 / (3 * 8) = 0.25; channel 0 (span 6) needs 2^3 -> step 2, channel 1
    # (span 1.2) needs 1.2 / 0.75 = 1.6 -> 2^1 -> step 0.5; zero points 0 (both minima are 0).
    calibration = torch.tensor([[0.0, 0.0], [6.0, 1.2]])
    quantizer = calibrated(calibration, bits=2)
    step, zero_point = quantizer.qparams(2)
    assert step.tolist() == [2.0, 0.5] and zero_point.tolist() == [0, 0]
    assert quantizer.shifts(2).tolist() == [3, 1]
    x = torch.tensor([[6.0, 1.2], [2.9, 0.2], [0.9, 0.3]])
    expected = torch.tensor([[6.0, 1.0], [2.0, 0.0], [0.0, 0.5]])  # 2.9/2 = 1.45 -> 1; 1.2/0.5 = 2.4 -> 2; 0.3 -> 1
    assert torch.equal(quantizer(x), expected)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_never_clips_and_each_step_within_twice_its_own_min_max_step(bits):
    x = heavy_channels()
    quantizer = calibrated(x, bits=bits)
    step, _ = quantizer.qparams(bits)
    error = (quantizer(x) - x).abs()
    assert bool((error <= step / 2 + 1e-5).all())  # rounding only: nothing clipped
    levels = 2**bits - 1
    own = (x.amax(0).clamp(min=0) - x.amin(0).clamp(max=0)) / levels  # each channel's own min/max step
    base = own.max() / 2**3
    assert torch.allclose(step.max(), own.max())  # the widest channel gets exactly its own range
    assert bool((step <= torch.maximum(2 * own, base) * (1 + 1e-5)).all())
    assert bool((step >= own * (1 - 1e-5)).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_smaller_error_than_one_min_max_range_on_a_few_huge_channels(bits):
    x = heavy_channels()
    ptf = calibrated(x, bits=bits)
    observer = MinMaxObserver(symmetric=False)
    observer(x)
    scale, zero_point = observer.qparams(bits)
    per_tensor = fake_quantize(x, scale, zero_point, *quant_range(bits, False))
    ptf_error, tensor_error = (ptf(x) - x).pow(2), (per_tensor - x).pow(2)
    # the ordinary channels get a step 8 times finer (K = 3); at 4 bits the per-tensor grid already rounds most of them
    # to zero, so their error is capped by their own power and falls by less than the 64 times the steps suggest
    assert ptf_error[:, 3:].mean() < tensor_error[:, 3:].mean() / 4
    # the huge channels keep at most the per-tensor step, so no channel is worse off
    assert bool((ptf_error.mean(0) <= tensor_error.mean(0) * 1.05 + 1e-9).all())


def test_linear_output_equals_the_integer_deployment_with_shifted_codes():
    torch.manual_seed(0)
    x = heavy_channels(seed=1, tokens=32)
    linear = nn.Linear(64, 16)
    quantizer = calibrated(heavy_channels(seed=2), bits=8)
    step, zero_point = quantizer.qparams(8)
    shifts = quantizer.shifts(8)
    base = step.min() / 2 ** shifts[step.argmin()]
    # deployment: 8-bit codes per channel, shifted left by alpha_c, one integer dot product with the weight, one
    # per-tensor rescale by s; the zero points' contribution is a constant folded into the bias
    codes = torch.clamp(torch.round(x / step) + zero_point, 0, 255).to(torch.int64)
    shifted = (codes - zero_point) << shifts
    deployed = base * (shifted.double() @ linear.weight.double().T) + linear.bias.double()
    simulated = linear(quantizer(x)).double()
    torch.testing.assert_close(simulated, deployed, rtol=1e-5, atol=1e-4)


def test_override_gives_linear_inputs_power_of_two_factors_and_refuses_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.GELU(), nn.Linear(5, 2))
    settings = QuantSettings(act_observer_overrides=((r"4", "ptf"),))
    quantize_model(model, settings)
    assert isinstance(model[4].input_quantizer, PowerOfTwoFactorQuantizer)
    assert not isinstance(model[2].input_quantizer, PowerOfTwoFactorQuantizer)
    set_mode(model, weights="off", activations="observe")
    model(torch.randn(8, 3, 8, 8))
    set_mode(model, weights="quant", activations="quant")
    assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()
    shifted = nn.Sequential(nn.Linear(3, 2))
    quantize_model(shifted, QuantSettings(act_observer_overrides=((r"0", "ptf"),), ptf_max_shift=6))
    assert shifted[0].input_quantizer.max_shift == 6
    for bad in (-1, 9, 2.5, True):
        with pytest.raises(ValueError, match="ptf_max_shift"):
            QuantSettings(ptf_max_shift=bad)
    with pytest.raises(ValueError, match="only Linear inputs"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantSettings(act_observer_overrides=((r"0", "ptf"),)))


def test_range_factors_and_uncalibrated_use_are_refused():
    quantizer = PowerOfTwoFactorQuantizer(4)
    with pytest.raises(RuntimeError, match="run calibration"):
        quantizer.qparams(8)
    with pytest.raises(NotImplementedError):
        quantizer.set_range_factor(8, 0.5)
    with pytest.raises(ValueError, match="max_shift"):
        power_of_two_qparams(torch.zeros(2), torch.ones(2), 8, max_shift=-1)
