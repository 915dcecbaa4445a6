"""Learned step size quantization: gradients against finite differences and torch's own LSQ kernel, exact starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_mpq.qat.lsq import (
    LearnedStepActivationQuantizer,
    LearnedStepWeightQuantizer,
    add_learned_steps,
    freeze_learned_steps,
    init_learned_steps,
    learned_step_fake_quantize,
    lsq_gradient_scale,
)
from lit_mpq.quant import QuantSettings, apply_plan, measure_model, quantize_model
from lit_mpq.quant.apply import calibrate, quant_layers
from lit_mpq.quant.functional import quant_range, quantize_dequantize
from lit_mpq.quant.modules import ActivationQuantizer, WeightQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")


def _away_from_edges(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Mask of values of ``v = x / s`` at least 0.15 from a rounding edge (k + 0.5) and from the clipping bounds."""
    frac = (v - torch.floor(v) - 0.5).abs()
    return (frac > 0.15) & ((v - low).abs() > 0.65) & ((v - high).abs() > 0.65)


def _surrogate(
    x: torch.Tensor, step: torch.Tensor, residual: torch.Tensor, low, high, axis: int | None
) -> torch.Tensor:
    """The LSQ paper's view of ``s * clip(round(x / s), -Q_N, Q_P)``: ``round(x/s)`` read as ``x/s + r`` with the
    rounding residual ``r`` held at its value for the unperturbed step; clipped values are ``s * bound``."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = step.reshape(shape) if step.dim() else step
    return s * torch.clamp(x / s + residual, low, high)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (3, False)])
def test_lsq_gradients_match_finite_differences_of_the_papers_surrogate(axis, bits, symmetric):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 7, dtype=torch.float64) * 2.0
    qmin, qmax = quant_range(bits, symmetric)
    channels = x.shape[0]
    step = (torch.rand(channels, dtype=torch.float64) * 0.3 + 0.3) if axis == 0 else torch.tensor(0.45, dtype=x.dtype)
    zero_point = torch.zeros_like(step, dtype=torch.int32) if symmetric else torch.full_like(step, 3, dtype=torch.int32)
    shape = [-1, 1, 1] if axis == 0 else []
    s = step.reshape(shape) if shape else step
    zp = zero_point.to(x.dtype).reshape(shape) if shape else zero_point.to(x.dtype)
    low, high = qmin - zp, qmax - zp
    v = x / s
    keep = _away_from_edges(v, low, high)  # finite differences are exact only away from the kinks
    weights = torch.randn_like(x) * keep  # a random linear read-out of the kept elements
    residual = torch.round(v) - v

    x_leaf = x.clone().requires_grad_(True)
    step_leaf = step.clone().requires_grad_(True)
    grad_scale = 0.37
    out = learned_step_fake_quantize(x_leaf, step_leaf, zero_point, qmin, qmax, axis, grad_scale)
    (out * weights).sum().backward()

    eps = 1e-6
    for index in range(step.numel()):
        bump = torch.zeros_like(step).reshape(-1)
        bump[index] = eps
        bump = bump.reshape(step.shape)
        plus = (_surrogate(x, step + bump, residual, low, high, axis) * weights).sum()
        minus = (_surrogate(x, step - bump, residual, low, high, axis) * weights).sum()
        expected = grad_scale * (plus - minus) / (2 * eps)
        assert step_leaf.grad.reshape(-1)[index].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-9)
    # the input's gradient: 1 inside the range, 0 where clipped (finite differences of the same surrogate)
    plus = _surrogate(x + eps, step, residual, low, high, axis)
    minus = _surrogate(x - eps, step, residual, low, high, axis)
    torch.testing.assert_close(x_leaf.grad, weights * (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_lsq_agrees_with_torchs_learnable_fake_quantize_kernel():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5) * 1.5
    step = torch.rand(4) * 0.2 + 0.1
    zero_point = torch.zeros(4, dtype=torch.int32)
    qmin, qmax = quant_range(4, True)
    # torch masks on the rounded level, the paper on x / s: they differ within half a step outside the range only
    v = x / step.reshape(-1, 1, 1, 1)
    x = torch.where(_away_from_edges(v, torch.tensor(qmin), torch.tensor(qmax)), x, torch.zeros_like(x))
    grad_out = torch.randn_like(x)
    ours_x, ours_s = x.clone().requires_grad_(True), step.clone().requires_grad_(True)
    out = learned_step_fake_quantize(ours_x, ours_s, zero_point, qmin, qmax, 0, 0.5)
    out.backward(grad_out)
    ref_x, ref_s = x.clone().requires_grad_(True), step.clone().requires_grad_(True)
    reference = torch._fake_quantize_learnable_per_channel_affine(ref_x, ref_s, zero_point.float(), 0, qmin, qmax, 0.5)
    reference.backward(grad_out)
    assert torch.equal(out, reference.detach())
    assert torch.equal(ours_x.grad, ref_x.grad)
    torch.testing.assert_close(ours_s.grad, ref_s.grad, rtol=1e-5, atol=1e-6)


def test_forward_is_the_usual_round_trip_bit_for_bit():
    x = torch.randn(3, 8, 4, 4)
    step, zero_point = torch.rand(3) * 0.1 + 0.02, torch.tensor([0, 2, 5], dtype=torch.int32)
    qmin, qmax = quant_range(5, False)
    expected = quantize_dequantize(x, step, zero_point, qmin, qmax, 0)
    assert torch.equal(learned_step_fake_quantize(x.requires_grad_(), step, zero_point, qmin, qmax, 0), expected)


def test_gradient_scale_is_one_over_sqrt_of_elements_times_qp():
    assert lsq_gradient_scale(288, 7) == pytest.approx(1 / (288 * 7) ** 0.5)


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _quantized(bits: int = 4) -> tuple[nn.Module, torch.Tensor]:
    model = _small_model().eval()
    x = torch.randn(16, 3, 6, 6)
    quantize_model(model, QuantSettings(act_observer="minmax", weight_granularity="per_channel"))
    plan = measure_model(model, x[:1])
    calibrate(model, [x])
    plan.set_bits({name: (bits, bits) for name in plan.names})
    apply_plan(model, plan)
    return model, x


def test_learned_steps_change_nothing_until_trained_and_freeze_back_exactly():
    model, x = _quantized()
    with torch.no_grad():
        before = model(x)
    swapped = add_learned_steps(model)
    assert len(swapped) == 4
    with torch.no_grad():
        assert torch.equal(model(x), before)  # uninitialized twins are the usual quantizers
    assert init_learned_steps(model) == 4
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the steps start at the calibrated parameters
    # train the steps a little: the output moves, and freezing keeps the moved output exactly
    params = [
        m.step for m in model.modules() if isinstance(m, LearnedStepWeightQuantizer | LearnedStepActivationQuantizer)
    ]
    optimizer = torch.optim.SGD(params, lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x) ** 2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        trained = model(x)
    assert not torch.equal(trained, before)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert freeze_learned_steps(model) == 4
    layers = quant_layers(model)
    assert all(type(layer.weight_quantizer) is WeightQuantizer for layer in layers.values())
    assert all(type(layer.input_quantizer) is ActivationQuantizer for layer in layers.values())
    with torch.no_grad():
        assert torch.equal(model(x), trained)


def test_other_bit_widths_keep_the_calibrated_parameters():
    model, x = _quantized(bits=4)
    layer = quant_layers(model)["0"]
    expected_8 = layer.quantize_weight(8).detach()
    add_learned_steps(model)
    init_learned_steps(model)
    with torch.no_grad():
        layer.weight_quantizer.step.mul_(1.5)
    assert torch.equal(layer.quantize_weight(8).detach(), expected_8)  # a probe at 8 bits sees the usual grid
    scale, _ = layer.weight_quantizer.qparams(layer.weight, 4)
    assert torch.equal(scale, layer.weight_quantizer.step.detach())


def test_steps_above_eight_bits_are_not_learned():
    model, x = _quantized(bits=16)
    add_learned_steps(model)
    assert init_learned_steps(model) == 0  # a 16-bit step is too small for the weights' learning rate
    with torch.no_grad():
        reference = model(x)
    layer = quant_layers(model)["0"]
    with torch.no_grad():
        layer.weight_quantizer.step.mul_(100.0)  # not used at 16 bits
        assert torch.equal(model(x), reference)
