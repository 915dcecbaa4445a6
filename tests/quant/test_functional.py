"""lit_mpq.quant.functional against PyTorch's own fake-quantization kernels and torch.ao observers.

Conventions pinned here (all checked against torch, not re-derived from lit_mpq):

- The round trip equals ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
  bit for bit (``torch.equal``), with round-half-to-even.
- The STE gradient equals torch's: torch masks on the *rounded* integer level, i.e. the gradient is 1 where
  ``qmin <= round(x / scale) + zero_point <= qmax`` and 0 where the level is clamped.
- ``qparams_from_range`` equals ``torch.ao.quantization.observer.MinMaxObserver`` with
  ``reduce_range=False`` (the default): asymmetric = ``quint8`` / ``per_tensor_affine`` with
  ``quant_min=0, quant_max=2^b - 1``; symmetric = ``qint8`` / ``per_tensor_symmetric`` with
  ``quant_min=-2^(b-1), quant_max=2^(b-1) - 1``. torch.ao's symmetric scale divides ``max|x|`` by
  ``(quant_max - quant_min) / 2`` (127.5 at 8 bits, not 127), so the largest magnitude sits half a level beyond
  ``quant_max`` and is clipped by half a step; lit_mpq follows that convention. (``reduce_range=True`` would
  halve torch.ao's range, and symmetric ``quint8`` would use zero point 128; neither is lit_mpq's convention, so
  neither is compared.)
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver

from lit_mpq.quant.functional import (
    dequantize,
    fake_quantize,
    qparams_from_range,
    quant_range,
    quantization_mse,
    quantize_dequantize,
)
from lit_mpq.quant.weights import weight_qparams

BITS = list(range(2, 9))


def ao_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range written out independently of lit_mpq."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def ao_observer(bits: int, symmetric: bool) -> AoMinMaxObserver:
    qmin, qmax = ao_range(bits, symmetric)
    if symmetric:
        return AoMinMaxObserver(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=qmin, quant_max=qmax, reduce_range=False
        )
    return AoMinMaxObserver(
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=qmin, quant_max=qmax, reduce_range=False
    )


def ao_per_channel_observer(bits: int, symmetric: bool, axis: int = 0) -> AoPerChannelMinMaxObserver:
    qmin, qmax = ao_range(bits, symmetric)
    if symmetric:
        return AoPerChannelMinMaxObserver(
            ch_axis=axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
        )
    return AoPerChannelMinMaxObserver(
        ch_axis=axis, dtype=torch.quint8, qscheme=torch.per_channel_affine, quant_min=qmin, quant_max=qmax
    )


def random_input(seed: int, shape: tuple[int, ...], spread: float, shift: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * spread + shift


# ------------------------------------------------------------------------------------------------ quant_range
@pytest.mark.parametrize("bits", [*BITS, 16])
def test_quant_range_matches_torch_ao_conventions(bits):
    assert quant_range(bits, symmetric=True) == ao_range(bits, True)
    assert quant_range(bits, symmetric=False) == ao_range(bits, False)


def test_quant_range_hand_values():
    assert quant_range(2, True) == (-2, 1)
    assert quant_range(4, True) == (-8, 7)
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(4, False) == (0, 15)
    assert quant_range(8, False) == (0, 255)


@pytest.mark.parametrize("bits", [1, 0, -3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_range_rejects_fewer_than_two_bits(bits, symmetric):
    with pytest.raises(ValueError, match="at least 2"):
        quant_range(bits, symmetric)


# -------------------------------------------------------------------------------- round trip vs torch kernels
@st.composite
def per_tensor_case(draw, bits_choices=(*BITS, 16)):
    bits = draw(st.sampled_from(bits_choices))
    symmetric = draw(st.booleans())
    qmin, qmax = ao_range(bits, symmetric)
    scale = draw(st.floats(min_value=1e-4, max_value=10.0, allow_nan=False, allow_infinity=False))
    zero_point = 0 if symmetric else draw(st.integers(qmin, qmax))
    seed = draw(st.integers(0, 2**31 - 1))
    # Spread the inputs over about 1.5x the representable range, so some values clip on both sides.
    spread = draw(st.floats(0.1, 1.5)) * scale * (qmax - qmin) / 2
    shift = draw(st.floats(-1.0, 1.0)) * scale * (qmax - qmin) / 2
    return bits, symmetric, qmin, qmax, scale, zero_point, seed, spread, shift


@settings(max_examples=50, deadline=None)
@given(per_tensor_case())
def test_per_tensor_round_trip_equals_torch(case):
    bits, symmetric, qmin, qmax, scale, zero_point, seed, spread, shift = case
    x = random_input(seed, (4, 5, 6), spread, shift)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    zp_t = torch.tensor(zero_point, dtype=torch.int64)
    # Also exercise exact ties: values half-way between two levels (round-half-to-even).
    ties = (torch.arange(qmin, qmax + 1, max(1, (qmax - qmin) // 16)).float() - zero_point + 0.5) * scale_t
    x = torch.cat([x.flatten(), ties])

    expected = torch.fake_quantize_per_tensor_affine(x, float(scale_t), zero_point, qmin, qmax)
    expected_t = torch.fake_quantize_per_tensor_affine(x, scale_t, zp_t.to(torch.int32), qmin, qmax)
    assert torch.equal(expected, expected_t)
    assert torch.equal(quantize_dequantize(x, scale_t, zp_t, qmin, qmax), expected)
    assert torch.equal(fake_quantize(x, scale_t, zp_t, qmin, qmax), expected)
    # The autograd path has the same forward value.
    assert torch.equal(fake_quantize(x.clone().requires_grad_(), scale_t, zp_t, qmin, qmax).detach(), expected)


@st.composite
def per_channel_case(draw):
    bits = draw(st.sampled_from(BITS))
    symmetric = draw(st.booleans())
    qmin, qmax = ao_range(bits, symmetric)
    shape = draw(st.sampled_from([(3, 7), (4, 3, 3, 3), (2, 5, 4)]))
    axis = draw(st.integers(0, len(shape) - 1))
    channels = shape[axis]
    scales = draw(st.lists(st.floats(1e-3, 5.0), min_size=channels, max_size=channels))
    zps = [0] * channels if symmetric else draw(st.lists(st.integers(qmin, qmax), min_size=channels, max_size=channels))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.floats(0.1, 1.5))
    return bits, symmetric, qmin, qmax, shape, axis, scales, zps, seed, spread


@settings(max_examples=50, deadline=None)
@given(per_channel_case())
def test_per_channel_round_trip_equals_torch(case):
    bits, symmetric, qmin, qmax, shape, axis, scales, zps, seed, spread = case
    scale_t = torch.tensor(scales, dtype=torch.float32)
    zp_t = torch.tensor(zps, dtype=torch.int64)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    x = random_input(seed, shape, 1.0, 0.0) * spread * scale_t.reshape(bshape) * (qmax - qmin) / 2

    expected = torch.fake_quantize_per_channel_affine(x, scale_t, zp_t.to(torch.int32), axis, qmin, qmax)
    assert torch.equal(quantize_dequantize(x, scale_t, zp_t, qmin, qmax, axis=axis), expected)
    assert torch.equal(fake_quantize(x, scale_t, zp_t, qmin, qmax, axis=axis), expected)
    assert torch.equal(
        fake_quantize(x.clone().requires_grad_(), scale_t, zp_t, qmin, qmax, axis=axis).detach(), expected
    )


def test_round_half_to_even_hand_computed():
    scale, zp = torch.tensor(1.0), torch.tensor(0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 7.6, -9.0])
    expected = torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 0.0, 7.0, -8.0])
    assert torch.equal(quantize_dequantize(x, scale, zp, -8, 7), expected)
    assert torch.equal(torch.fake_quantize_per_tensor_affine(x, 1.0, 0, -8, 7), expected)


def test_docstring_example_hand_computed():
    # 4-bit symmetric on [-1, 1]: scale = 1 / 7.5; 0.3 * 7.5 = 2.25 -> level 2 -> 2 / 7.5 = 0.2667;
    # 1.0 * 7.5 = 7.5 rounds to 8 and is clamped to 7 -> 7 / 7.5 (the symmetric range clips max|x| by half a step).
    # (The module docstring's example output, 0.2857 = 2 / 7, is wrong: 2 / 7.5 = 0.2667.)
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), 4, symmetric=True)
    assert scale.item() == pytest.approx(1 / 7.5)
    assert zp.item() == 0
    x = torch.tensor([0.3, 1.0])
    out = fake_quantize(x, scale, zp, -8, 7)
    assert out.tolist() == pytest.approx([2 / 7.5, 7 / 7.5], rel=1e-6)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, scale, zp.int(), -8, 7))


# ----------------------------------------------------------------------------------------------- STE gradient
def torch_grad(x, scale, zp, qmin, qmax, axis=None):
    xr = x.detach().clone().requires_grad_()
    if axis is None:
        out = torch.fake_quantize_per_tensor_affine(xr, scale, zp.to(torch.int32), qmin, qmax)
    else:
        out = torch.fake_quantize_per_channel_affine(xr, scale, zp.to(torch.int32), axis, qmin, qmax)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape) + 1.0)
    return xr.grad


def our_grad(x, scale, zp, qmin, qmax, axis=None):
    xr = x.detach().clone().requires_grad_()
    out = fake_quantize(xr, scale, zp, qmin, qmax, axis)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape) + 1.0)
    return xr.grad


def test_ste_gradient_hand_computed_inside_and_outside():
    # 4-bit asymmetric, scale 0.1, zp 3: representable [-0.3, 1.2].
    scale, zp = torch.tensor(0.1), torch.tensor(3)
    x = torch.tensor([-1.0, -0.5, -0.2, 0.0, 0.55, 1.1, 1.5, 3.0])
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert torch.equal(our_grad(x, scale, zp, 0, 15) / (torch.arange(8) + 1.0), expected)
    assert torch.equal(torch_grad(x, scale, zp, 0, 15) / (torch.arange(8) + 1.0), expected)


def test_ste_gradient_at_the_clipping_boundary_matches_torch():
    """Within half a step beyond the range, x rounds to the end level (not clamped): torch's gradient is 1."""
    scale, zp = torch.tensor(0.25), torch.tensor(0)
    qmin, qmax = -8, 7
    x = torch.tensor([7.3 * 0.25, -8.4 * 0.25, 7.6 * 0.25, -8.6 * 0.25])
    assert torch_grad(x, scale, zp, qmin, qmax).tolist() == [1.0, 2.0, 0.0, 0.0]
    assert torch.equal(our_grad(x, scale, zp, qmin, qmax), torch_grad(x, scale, zp, qmin, qmax))


@settings(max_examples=50, deadline=None)
@given(per_tensor_case(bits_choices=tuple(BITS)))
def test_per_tensor_ste_gradient_equals_torch(case):
    bits, symmetric, qmin, qmax, scale, zero_point, seed, spread, shift = case
    x = random_input(seed, (64,), spread, shift)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    zp_t = torch.tensor(zero_point)
    assert torch.equal(our_grad(x, scale_t, zp_t, qmin, qmax), torch_grad(x, scale_t, zp_t, qmin, qmax))


@settings(max_examples=50, deadline=None)
@given(per_channel_case())
def test_per_channel_ste_gradient_equals_torch(case):
    bits, symmetric, qmin, qmax, shape, axis, scales, zps, seed, spread = case
    scale_t = torch.tensor(scales, dtype=torch.float32)
    zp_t = torch.tensor(zps, dtype=torch.int64)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    x = random_input(seed, shape, 1.0, 0.0) * spread * scale_t.reshape(bshape) * (qmax - qmin) / 2
    assert torch.equal(our_grad(x, scale_t, zp_t, qmin, qmax, axis), torch_grad(x, scale_t, zp_t, qmin, qmax, axis))


def test_no_grad_input_returns_plain_tensor_and_grad_input_builds_graph():
    scale, zp = torch.tensor(0.1), torch.tensor(0)
    assert fake_quantize(torch.randn(5), scale, zp, -8, 7).grad_fn is None
    assert fake_quantize(torch.randn(5, requires_grad=True), scale, zp, -8, 7).grad_fn is not None


# ------------------------------------------------------------------------------ qparams vs torch.ao observers
def test_qparams_hand_computed():
    lo, hi = torch.tensor(-1.0), torch.tensor(0.5)
    scale, zp = qparams_from_range(lo, hi, 4, symmetric=True)
    assert scale.item() == pytest.approx(1.0 / 7.5) and zp.item() == 0
    scale, zp = qparams_from_range(lo, hi, 4, symmetric=False)
    assert scale.item() == pytest.approx(0.1) and zp.item() == 10
    # The range always contains zero: [2, 5] is widened to [0, 5].
    scale, zp = qparams_from_range(torch.tensor(2.0), torch.tensor(5.0), 8, symmetric=False)
    assert scale.item() == pytest.approx(5.0 / 255) and zp.item() == 0
    scale, zp = qparams_from_range(torch.tensor(-4.0), torch.tensor(-2.0), 8, symmetric=False)
    assert scale.item() == pytest.approx(4.0 / 255) and zp.item() == 255
    # A degenerate range gets the float32-eps floor on the scale (torch.ao's eps).
    scale, zp = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), 8, symmetric=False)
    assert scale.item() == torch.finfo(torch.float32).eps and zp.item() == 0
    assert scale.dtype == torch.float32 and zp.dtype == torch.int64


@settings(max_examples=50, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(1e-3, 100.0),
    shift=st.floats(-3.0, 3.0),
    batches=st.integers(1, 3),
)
def test_qparams_from_range_equals_torch_ao_minmax_observer(bits, symmetric, seed, spread, shift, batches):
    gen = torch.Generator().manual_seed(seed)
    ao = ao_observer(bits, symmetric)
    lo, hi = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    for _ in range(batches):
        x = (torch.randn(50, generator=gen) + shift) * spread  # shift makes all-positive / all-negative cases
        ao(x)
        lo, hi = torch.minimum(lo, x.min()), torch.maximum(hi, x.max())
    ao_scale, ao_zp = ao.calculate_qparams()
    scale, zp = qparams_from_range(lo, hi, bits, symmetric)
    assert torch.equal(scale.reshape(1), ao_scale.reshape(1))
    assert zp.reshape(1).tolist() == ao_zp.reshape(1).tolist()


@settings(max_examples=50, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(8, 3, 3, 3), (16, 10), (5, 2, 1, 1)]),
)
def test_per_channel_weight_minmax_equals_torch_ao_per_channel_observer(bits, symmetric, seed, shape):
    w = random_input(seed, shape, 0.2, 0.0)
    w[0] = w[0].abs() + 0.01  # one all-positive channel
    ao = ao_per_channel_observer(bits, symmetric)
    ao(w)
    ao_scale, ao_zp = ao.calculate_qparams()
    scale, zp = weight_qparams(w, bits, symmetric=symmetric, per_channel=True, method="minmax")
    assert torch.equal(scale, ao_scale)
    assert zp.tolist() == ao_zp.tolist()
    # And per-channel qparams from qparams_from_range on per-channel extremes give the same.
    s2, z2 = qparams_from_range(w.flatten(1).amin(1), w.flatten(1).amax(1), bits, symmetric)
    assert torch.equal(s2, ao_scale) and z2.tolist() == ao_zp.tolist()


# ------------------------------------------------------------------------------------------- quantization_mse
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantization_mse_equals_hand_loop(axis):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5)
    qmin, qmax = -8, 7
    if axis is None:
        scale, zp = torch.tensor(0.3), torch.tensor(0)
        ref = ((torch.fake_quantize_per_tensor_affine(x, 0.3, 0, qmin, qmax) - x) ** 2).mean()
        assert quantization_mse(x, scale, zp, qmin, qmax, None).item() == pytest.approx(ref.item(), rel=1e-6)
        return
    channels = x.shape[axis]
    scale = torch.linspace(0.1, 0.5, channels)
    zp = torch.zeros(channels, dtype=torch.int64)
    got = quantization_mse(x, scale, zp, qmin, qmax, axis)
    assert got.shape == (channels,)
    for c in range(channels):
        xc = x.select(axis, c)
        ref = ((torch.fake_quantize_per_tensor_affine(xc, float(scale[c]), 0, qmin, qmax) - xc) ** 2).mean()
        assert got[c].item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("axis", [None, 0])
def test_dequantize_of_the_codes_is_torchs_fake_quantize_bit_for_bit(axis):
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3
    scale = torch.rand(4) * 0.1 + 0.01 if axis == 0 else torch.tensor(0.05)
    zero_point = torch.randint(-3, 4, (4,)) if axis == 0 else torch.tensor(2)
    if axis == 0:
        reference = torch.fake_quantize_per_channel_affine(x, scale, zero_point.int(), 0, -8, 7)
        inv = (1.0 / scale).reshape(-1, 1)
        codes = torch.clamp(torch.round(x * inv) + zero_point.reshape(-1, 1), -8, 7)
    else:
        reference = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), -8, 7)
        codes = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, -8, 7)
    assert torch.equal(dequantize(codes.long(), scale, zero_point, axis), reference)
