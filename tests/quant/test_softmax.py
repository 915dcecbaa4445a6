"""Logarithmic softmax quantization (FQ-ViT log2, RepQ-ViT log√2) against brute force and the uniform grid."""

from __future__ import annotations

import math

import pytest
import torch

from lit_mpq.quant.apply import QuantSettings, apply_plan, invalidate_qparams, measure_model, quantize_model, set_mode
from lit_mpq.quant.functional import fake_quantize, qparams_from_range, quant_range
from lit_mpq.quant.softmax import LogQuantizer, SoftmaxObserver, log_quantize_dequantize


def brute_force_log_levels(x: torch.Tensor, scale: float, bits: int, steps: int) -> torch.Tensor:
    """Nearest level in log distance among the 2^bits - 1 powers, or 0 below the lowest level's lower midpoint."""
    levels = [scale * 2.0 ** (-k / steps) for k in range(2**bits - 1)]
    lowest_boundary = scale * 2.0 ** (-(2**bits - 1.5) / steps)
    out = []
    for value in x.tolist():
        if value < lowest_boundary:
            out.append(0.0)
        else:
            out.append(min(levels, key=lambda level: abs(math.log2(min(value, scale)) - math.log2(level))))
    return torch.tensor(out)


@pytest.mark.parametrize("bits,steps", [(2, 1), (3, 1), (4, 1), (3, 2), (4, 2)])
def test_log_levels_match_brute_force(bits, steps):
    torch.manual_seed(bits * 10 + steps)
    x = torch.cat([torch.rand(500) ** 6, torch.tensor([0.0, 1.0, 0.7, 1e-9])])
    scale = 0.9
    got = log_quantize_dequantize(x, torch.tensor(scale), bits, steps)
    torch.testing.assert_close(got, brute_force_log_levels(x, scale, bits, steps), rtol=1e-6, atol=0)
    assert len(set(got.tolist())) <= 2**bits  # honest about its code count: 2^b - 1 powers and zero


def softmax_like(temperature: float, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.softmax(torch.randn(512, 197) * temperature, dim=-1)


def uniform_roundtrip(p: torch.Tensor, bits: int) -> torch.Tensor:
    scale, zero_point = qparams_from_range(p.min(), p.max(), bits, symmetric=False)
    return fake_quantize(p, scale, zero_point, *quant_range(bits, False))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("bits", [3, 4])
def test_log2_error_is_below_uniform_at_equal_low_bits(temperature, bits):
    p = softmax_like(temperature)
    v = torch.randn(197, 64, generator=torch.Generator().manual_seed(1))
    log2 = log_quantize_dequantize(p, p.max(), bits, 1)
    uniform = uniform_roundtrip(p, bits)
    assert ((log2 - p) ** 2).mean() < ((uniform - p) ** 2).mean()
    # And what it feeds: the softmax · V product.
    assert ((log2 @ v - p @ v) ** 2).mean() < ((uniform @ v - p @ v) ** 2).mean()


def test_uniform_wins_at_8_bits_because_log_levels_have_a_relative_error_floor():
    p = softmax_like(1.0)
    for steps in (1, 2):
        log_error = ((log_quantize_dequantize(p, p.max(), 8, steps) - p) ** 2).mean()
        assert ((uniform_roundtrip(p, 8) - p) ** 2).mean() < log_error


def test_log_quantizer_gradient_is_straight_through_and_scale_is_the_calibrated_maximum():
    quantizer = LogQuantizer(steps_per_octave=1, bits=4)
    quantizer.set_mode("observe")
    quantizer(torch.tensor([0.1, 0.5, 0.8]))
    quantizer.set_mode("quant")
    scale, zero_point = quantizer.qparams(4)
    assert float(scale) == pytest.approx(0.8) and int(zero_point) == 0
    x = torch.tensor([0.3, 0.01], requires_grad=True)
    quantizer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2))
    quantizer.set_range_factor(4, 0.5)
    assert float(quantizer.qparams(4)[0]) == pytest.approx(0.4)


@pytest.mark.parametrize("name,steps", [("log2", 1), ("log_sqrt2", 2)])
def test_softmax_quantizer_is_selectable_and_used_by_the_attention(name, steps):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    quantize_model(model, QuantSettings(softmax_quantizer=name))
    plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    probs = model.blocks[0].attn.matmul_av.input_quantizer
    assert isinstance(probs, LogQuantizer) and probs.steps_per_octave == steps
    x = torch.randn(2, 3, 32, 32)
    set_mode(model, weights="off", activations="observe")
    seen = {}
    hook = model.blocks[0].attn.matmul_av.register_forward_pre_hook(lambda m, a: seen.update(p=a[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    for layer in plan.layers.values():
        layer.w_bits, layer.a_bits = None, None
    plan["blocks.0.attn.matmul_av"].a_bits = 4
    apply_plan(model, plan)
    assert torch.equal(probs(seen["p"]), log_quantize_dequantize(seen["p"], seen["p"].max(), 4, steps))


def test_uniform_from_bits_switches_grid_by_width_and_each_width_keeps_its_own_range_factor():
    """From ``uniform_from_bits`` up the quantizer is PyTorch's own uniform fake-quantize over the observed range."""
    torch.manual_seed(3)
    p = softmax_like(1.5)[:64]
    quantizer = LogQuantizer(steps_per_octave=2, bits=4, uniform_from_bits=6)
    quantizer.set_mode("observe")
    quantizer(p)
    quantizer.set_mode("quant")
    low, high = min(float(p.min()), 0.0), float(p.max())  # the range always contains zero

    def reference_uniform(bits: int, factor: float = 1.0) -> torch.Tensor:
        scale = (high - low) * factor / (2**bits - 1)
        zero_point = round(-low * factor / scale)
        return torch.fake_quantize_per_tensor_affine(p, scale, zero_point, 0, 2**bits - 1)

    for bits in (6, 8):
        torch.testing.assert_close(quantizer.quantize(p, bits), reference_uniform(bits), rtol=0, atol=1e-7)
    for bits in (3, 4, 5):
        torch.testing.assert_close(
            quantizer.quantize(p, bits),
            brute_force_log_levels(p.flatten(), high, bits, 2).reshape(p.shape),
            rtol=1e-6,
            atol=0,
        )
    quantizer.set_range_factor(8, 0.5)
    quantizer.set_range_factor(4, 0.25)
    torch.testing.assert_close(quantizer.quantize(p, 8), reference_uniform(8, 0.5), rtol=0, atol=1e-7)
    torch.testing.assert_close(quantizer.quantize(p, 4), log_quantize_dequantize(p, torch.tensor(high * 0.25), 4, 2))


def test_uniform_from_bits_is_validated_and_recorded_in_the_card():
    with pytest.raises(ValueError, match="softmax_uniform_from_bits only applies to logarithmic"):
        QuantSettings(softmax_quantizer="uniform", softmax_uniform_from_bits=6)
    with pytest.raises(ValueError, match="integer from 2 to 16"):
        QuantSettings(softmax_quantizer="log_sqrt2", softmax_uniform_from_bits=1)
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_vit", pretrained=False).eval()
    quantize_model(model, QuantSettings(softmax_quantizer="log2", softmax_uniform_from_bits=6))
    probs = model.blocks[0].attn.matmul_av.input_quantizer
    assert probs.is_uniform(6) and probs.is_uniform(8) and not probs.is_uniform(5)


def calibrated_log_quantizer(x: torch.Tensor, steps: int = 2, underflow: str = "mean") -> LogQuantizer:
    quantizer = LogQuantizer(steps, bits=4, underflow=underflow)
    quantizer.set_mode("observe")
    quantizer(x)
    quantizer.set_mode("quant")
    return quantizer


def test_softmax_observer_mean_below_a_bin_edge_equals_the_brute_force_mean():
    x = softmax_like(2.0, seed=3)
    x[0, :5] = 0.0  # exact zeros count as values under any threshold
    quantizer = calibrated_log_quantizer(x)
    sampled = x[:: SoftmaxObserver.ROW_STRIDE]  # the rows the histogram reads
    for threshold in (2.0**-5, 2.0**-7, 1.5 * 2.0**-10, 1.125 * 2.0**-12):  # bin edges: the binned mean is exact there
        brute = sampled[sampled < threshold].double().mean().item()
        assert quantizer.observer.mean_below(threshold) == pytest.approx(brute, rel=1e-6)  # float32 sums per batch
    assert quantizer.observer.mean_below(0.0) == 0.0


@pytest.mark.parametrize("steps", [1, 2])
def test_zero_code_takes_the_snapped_mean_of_the_values_it_stands_for(steps):
    x = softmax_like(1.5, seed=4)
    quantizer = calibrated_log_quantizer(x, steps)
    scale = float(x.max())
    zero_code = 2**4 - 1
    threshold = scale * 2.0 ** (-(zero_code - 0.5) / steps)
    brute_mean = x[x < threshold].double().mean().item()
    exponent = max(round(-steps * math.log2(brute_mean / scale)), zero_code)
    expected = scale * 2.0 ** (-exponent / steps)
    value = float(quantizer.underflow_value(4))
    assert value == pytest.approx(expected, rel=1e-6)
    assert 0 < value < scale * 2.0 ** (-(zero_code - 1) / steps)  # below the smallest level: still its own code
    quantized = quantizer(x)
    assert bool((quantized[x < threshold] == value).all())
    assert len(quantized.unique()) <= 2**4
    zero = calibrated_log_quantizer(x, steps, underflow="zero")
    assert float(zero.underflow_value(4)) == 0.0 and bool((zero(x)[x < threshold] == 0).all())


def test_mean_underflow_gives_back_on_average_the_probability_mass_that_zero_drops():
    # 197-key rows whose mass is spread, next to peaked rows that set the scale near 1 (DeiT-Tiny's attention at 4
    # bits): most of a spread row's probabilities fall under the smallest log√2 level and the zero code drops them
    calibration = torch.cat([softmax_like(8.0, seed=5), softmax_like(1.0, seed=6)])
    rows = torch.cat([softmax_like(8.0, seed=7), softmax_like(1.0, seed=8)])  # the same mixture, other draws
    # the zero code's value is the mean of what it stands for, so the mass it drops is given back on average
    mean_bias = (calibrated_log_quantizer(calibration)(rows).sum(-1) - 1).mean()
    zero_bias = (calibrated_log_quantizer(calibration, underflow="zero")(rows).sum(-1) - 1).mean()
    assert float(zero_bias) < -0.1 and abs(float(mean_bias)) < abs(float(zero_bias)) / 4


def test_softmax_underflow_is_validated_synced_and_recorded():
    with pytest.raises(ValueError, match="softmax_underflow"):
        QuantSettings(softmax_quantizer="log2", softmax_underflow="median")
    with pytest.raises(ValueError, match="underflow must be one of"):
        LogQuantizer(2, underflow="max")
    quantizer = calibrated_log_quantizer(softmax_like(1.0, seed=7))
    before = quantizer.observer.mean_below(2.0**-8)
    counts = quantizer.observer.bin_counts.clone()
    from lit_mpq.quant.observers import sync_observers

    sync_observers(quantizer, lambda t, op: t * 2 if op == "sum" else t)  # two ranks holding the same data
    assert torch.equal(quantizer.observer.bin_counts, counts * 2)
    assert quantizer.observer.mean_below(2.0**-8) == pytest.approx(before, rel=1e-12)
