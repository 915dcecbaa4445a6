"""Weight quantization parameters against torch.ao observers and a per-channel brute-force search."""

import pytest
import torch
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver

from lit_mpq.quant.functional import qparams_from_range, quant_range, quantization_mse
from lit_mpq.quant.weights import GRANULARITIES, WEIGHT_METHODS, weight_qparams, weight_range


def conv_weight(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, 3, 3, generator=gen) * torch.linspace(0.01, 1.0, 8).reshape(8, 1, 1, 1)
    w[3] = torch.randn(16, 3, 3, generator=gen) ** 3 * 0.05  # a heavy-tailed channel
    w[5] = w[5].abs()  # an all-positive channel
    return w


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (6, 10)])
def test_per_channel_symmetric_minmax_equals_torch_ao(bits, shape):
    torch.manual_seed(bits)
    w = torch.randn(shape) * 0.3
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ao = AoPerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
    )
    ao(w)
    ref_scale, ref_zp = ao.calculate_qparams()
    scale, zp = weight_qparams(w, bits, symmetric=True, per_channel=True, method="minmax")
    assert scale.shape == (shape[0],)
    assert torch.equal(scale, ref_scale)
    assert zp.tolist() == ref_zp.tolist() == [0] * shape[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_asymmetric_minmax_equals_torch_ao(bits):
    w = conv_weight()
    ao = AoPerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine, quant_min=0, quant_max=2**bits - 1
    )
    ao(w)
    ref_scale, ref_zp = ao.calculate_qparams()
    scale, zp = weight_qparams(w, bits, symmetric=False, per_channel=True, method="minmax")
    assert torch.equal(scale, ref_scale)
    assert zp.tolist() == ref_zp.tolist()


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_minmax_equals_torch_ao(symmetric):
    w = conv_weight(1)
    if symmetric:
        ao = AoMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-8, quant_max=7)
    else:
        ao = AoMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=15)
    ao(w)
    ref_scale, ref_zp = ao.calculate_qparams()
    scale, zp = weight_qparams(w, 4, symmetric=symmetric, per_channel=False, method="minmax")
    assert scale.dim() == 0
    assert torch.equal(scale.reshape(1), ref_scale.reshape(1))
    assert zp.item() == ref_zp.item()


def test_weight_range_per_channel_along_any_axis():
    w = conv_weight(2)
    for axis in range(4):
        low, high = weight_range(w, per_channel=True, axis=axis)
        dims = [d for d in range(4) if d != axis]
        assert torch.equal(low, w.amin(dim=dims)) and torch.equal(high, w.amax(dim=dims))
    low, high = weight_range(w, per_channel=False)
    assert low.item() == w.min().item() and high.item() == w.max().item()


def per_channel_error(w, scale, zp, bits, symmetric=True):
    qmin, qmax = quant_range(bits, symmetric)
    return quantization_mse(w, scale, zp, qmin, qmax, 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_method_never_worse_than_minmax_per_channel(bits, symmetric):
    w = conv_weight(3)
    mm = per_channel_error(w, *weight_qparams(w, bits, symmetric, True, "minmax"), bits, symmetric)
    mse = per_channel_error(w, *weight_qparams(w, bits, symmetric, True, "mse"), bits, symmetric)
    assert torch.all(mse <= mm)
    assert mse.sum() < mm.sum()  # and strictly better overall at low bit widths


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_method_equals_per_channel_brute_force(symmetric):
    """Each channel's error is the minimum over the same shrink grid, searched for that channel alone."""
    bits, candidates = 4, 40
    w = conv_weight(4)
    qmin, qmax = quant_range(bits, symmetric)
    scale, zp = weight_qparams(w, bits, symmetric, True, "mse", num_candidates=candidates)
    got = quantization_mse(w, scale, zp, qmin, qmax, 0)
    alphas = [1.0 - k / candidates for k in range(candidates)]  # 1, 1 - 1/C, ..., 1/C
    for c in range(w.shape[0]):
        wc = w[c]
        lo, hi = wc.min(), wc.max()
        best = min(
            quantization_mse(wc, *qparams_from_range(lo * a, hi * a, bits, symmetric), qmin, qmax, None).item()
            for a in alphas
        )
        assert got[c].item() == pytest.approx(best, rel=1e-5, abs=1e-12), c


def test_mse_method_per_tensor_never_worse_than_minmax():
    w = conv_weight(5)
    qmin, qmax = quant_range(4, True)
    mm = quantization_mse(w, *weight_qparams(w, 4, True, False, "minmax"), qmin, qmax, None)
    mse_scale, mse_zp = weight_qparams(w, 4, True, False, "mse")
    assert mse_scale.dim() == 0
    assert quantization_mse(w, mse_scale, mse_zp, qmin, qmax, None) < mm


def test_unknown_method_lists_choices():
    assert WEIGHT_METHODS == ("minmax", "mse")
    assert set(GRANULARITIES) == {"per_channel", "per_tensor"}
    with pytest.raises(ValueError, match="minmax") as err:
        weight_qparams(torch.randn(3, 3), 4, method="percentile")
    assert "mse" in str(err.value)
