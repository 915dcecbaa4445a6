"""RepQ-ViT post-LayerNorm reparameterization against explicit per-channel pipelines and torch.ao references.

The references never use the fold formulas: the per-channel side is LayerNorm -> per-channel fake quantization ->
float Linear (checked against torch.ao's per-channel observer and torch's own fake-quantize kernel), the deployed
side is the folded modules with a per-tensor quantizer, and the two must agree code for code.
"""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver

from lit_mpq.quant.functional import fake_quantize, quant_range
from lit_mpq.quant.layernorm import (
    ChannelwiseActivationQuantizer,
    ChannelwiseMinMaxObserver,
    ChannelwiseMSEObserver,
    Reparameterization,
    fold_into_layernorm,
    fold_into_linear,
    fold_layernorm,
    reparameterize,
    simulated_linear,
    simulated_linear_params,
)
from lit_mpq.quant.modules import MODES
from lit_mpq.quant.observers import MinMaxObserver, MSEObserver, sync_observers

pytestmark = pytest.mark.usefixtures("single_thread")

C, OUT = 64, 48
WIDE = [3, 17, 40]  # channels whose LayerNorm gain is 20x the others: the inter-channel variation of ViTs


def make_layers(seed: int = 0, affine: bool = True, bias: bool = True) -> tuple[nn.LayerNorm, nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(C, elementwise_affine=affine)
    linear = nn.Linear(C, OUT, bias=bias)
    with torch.no_grad():
        if affine:
            gain = torch.rand(C, generator=gen) + 0.5
            gain[WIDE] *= 20
            sign = torch.where(torch.rand(C, generator=gen) < 0.2, -1.0, 1.0)
            norm.weight.copy_(gain * sign)
            norm.bias.copy_(torch.randn(C, generator=gen) * gain)  # offsets as channel-dependent as the gains
        linear.weight.copy_(torch.randn(OUT, C, generator=gen) / C**0.5)
        if bias:
            linear.bias.copy_(torch.randn(OUT, generator=gen))
    return norm, linear


def tokens(seed: int, n: int = 6, t: int = 40, spread: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Token-dependent mean and scale, and a few hot input channels, as in a residual stream.
    x = torch.randn(n, t, C, generator=gen) * (torch.rand(n, t, 1, generator=gen) + 0.5)
    x = x + torch.randn(n, t, 1, generator=gen)
    x[..., :4] *= 3
    return x * spread


def calibrated(norm: nn.LayerNorm, bits: int, symmetric: bool = False) -> ChannelwiseActivationQuantizer:
    quantizer = ChannelwiseActivationQuantizer(ChannelwiseMinMaxObserver(C, symmetric=symmetric), bits=bits)
    quantizer.set_mode("observe")
    with torch.no_grad():
        for seed in range(3):
            quantizer(norm(tokens(seed)))
    quantizer.set_mode("quant")
    return quantizer


def codes(x_hat: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Integer codes of a fake-quantized tensor (``x_hat`` is an exact multiple of ``scale``, broadcast last)."""
    return torch.round(x_hat.double() / scale.double()).long() + zero_point


def ao_per_channel(bits: int, symmetric: bool, ch_axis: int) -> tuple[AoPerChannelMinMaxObserver, int, int]:
    qmin, qmax = quant_range(bits, symmetric)
    scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    dtype = torch.qint8 if symmetric else torch.quint8
    obs = AoPerChannelMinMaxObserver(ch_axis=ch_axis, dtype=dtype, qscheme=scheme, quant_min=qmin, quant_max=qmax)
    return obs, qmin, qmax


def weight_fake_quant(bits: int):
    """Symmetric per-output-channel minmax weight fake-quantization through torch.ao and torch's kernel."""

    def quantize(w: torch.Tensor) -> torch.Tensor:
        qmin, qmax = quant_range(bits, symmetric=True)
        obs = AoPerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
        )
        obs(w.detach())
        scale, zp = obs.calculate_qparams()
        return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)

    return quantize


# -------------------------------------------------------------------------------------------- observer and quantizer
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_channelwise_quantizer_equals_torch_ao_per_channel(bits, symmetric):
    norm, _ = make_layers()
    quantizer = calibrated(norm, bits, symmetric)
    ref, qmin, qmax = ao_per_channel(bits, symmetric, ch_axis=2)  # tokens are [batch, tokens, channels]
    with torch.no_grad():
        for seed in range(3):
            ref(norm(tokens(seed)))
        y = norm(tokens(10, spread=1.5))  # wider than calibration: clipping is exercised
    assert torch.equal(quantizer.observer.min_val, ref.min_val)
    assert torch.equal(quantizer.observer.max_val, ref.max_val)
    ref_scale, ref_zp = ref.calculate_qparams()
    scale, zp = quantizer.qparams(bits)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp.long())
    expected = torch.fake_quantize_per_channel_affine(y, ref_scale, ref_zp.to(torch.int32), 2, qmin, qmax)
    assert torch.equal(quantizer(y), expected)


def test_quantizer_modes_contract():
    assert MODES == ("off", "observe", "quant")
    quantizer = ChannelwiseActivationQuantizer(ChannelwiseMinMaxObserver(C), bits=4)
    y = torch.randn(3, 5, C)
    assert quantizer(y) is y  # off
    quantizer.set_mode("observe")
    assert quantizer(y) is y
    assert torch.equal(quantizer.observer.min_val, y.reshape(-1, C).min(0).values)
    quantizer.set_mode("quant")
    out = quantizer(y)
    assert out.shape == y.shape and not torch.equal(out, y)
    assert torch.unique(out[..., 0]).numel() <= 16
    quantizer.bits = None
    assert quantizer(y) is y


def test_quantizer_straight_through_gradient():
    quantizer = ChannelwiseActivationQuantizer(ChannelwiseMinMaxObserver(C), bits=4)
    quantizer.set_mode("observe")
    quantizer(torch.randn(50, C))
    quantizer.set_mode("quant")
    x = (torch.randn(20, C) * 2).requires_grad_()
    out = quantizer(x)
    out.sum().backward()
    with torch.no_grad():
        no_grad_out = quantizer(x)
    assert torch.equal(out.detach(), no_grad_out)
    low, high = quantizer.observer.min_val, quantizer.observer.max_val
    step = quantizer.qparams(4)[0]
    inside = (x > low + step) & (x < high - step)  # a step away from the clip edges, where rounding decides
    outside = (x < low - step) | (x > high + step)
    assert (x.grad[inside] == 1).all() and (x.grad[outside] == 0).all()
    assert inside.any() and outside.any()


def test_channel_mismatch_and_missing_statistics_raise():
    observer = ChannelwiseMinMaxObserver(C)
    with pytest.raises(ValueError, match="64 channels"):
        observer(torch.randn(4, C + 1))
    quantizer = ChannelwiseActivationQuantizer(observer, bits=4)
    with pytest.raises(RuntimeError, match="calibration"):
        quantizer.reparameterization()
    with pytest.raises(TypeError, match="per-channel observer"):
        ChannelwiseActivationQuantizer(MinMaxObserver())
    with pytest.raises(ValueError, match="positive"):
        ChannelwiseMinMaxObserver(0)
    observer(torch.randn(4, C))
    quantizer.set_mode("quant")
    with pytest.raises(ValueError, match="64 channels"):
        quantizer(torch.randn(4, C - 1))
    quantizer.bits = None
    with pytest.raises(ValueError, match="bit width"):
        quantizer.reparameterization()


def test_observer_merge_equals_one_observer_fed_everything():
    data = torch.cat([tokens(seed) for seed in range(4)])
    whole, first, second = ChannelwiseMinMaxObserver(C), ChannelwiseMinMaxObserver(C), ChannelwiseMinMaxObserver(C)
    whole(data)
    first(data[:2])
    first(data[2:5])
    second(data[5:])
    # Two "ranks": each buffer reduced with its declared op against the other rank's copy.
    ops = {"min": torch.minimum, "max": torch.maximum}
    for name, op in ChannelwiseMinMaxObserver.REDUCTIONS.items():
        getattr(first, name).copy_(ops[op](getattr(first, name), getattr(second, name)))
    for name in ChannelwiseMinMaxObserver.REDUCTIONS:
        assert torch.equal(getattr(first, name), getattr(whole, name))
    for bits in (4, 6, 8):
        for a, b in zip(first.qparams(bits), whole.qparams(bits), strict=True):
            assert torch.equal(a, b)


def test_observer_is_found_by_sync_and_loads_before_calibration():
    quantizer = ChannelwiseActivationQuantizer(ChannelwiseMinMaxObserver(C))
    model = nn.Sequential(nn.LayerNorm(C), quantizer)
    seen = []
    assert sync_observers(model, lambda t, op: seen.append((tuple(t.shape), op)) or t) == 1
    assert sorted(seen) == [((C,), "max"), ((C,), "min")]
    # Buffers are sized at construction, so a fresh (uncalibrated) model accepts a calibrated state dict.
    quantizer.set_mode("observe")
    model(torch.randn(7, C))
    fresh = nn.Sequential(nn.LayerNorm(C), ChannelwiseActivationQuantizer(ChannelwiseMinMaxObserver(C)))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh[1].observer.max_val, quantizer.observer.max_val)


# ------------------------------------------------------------------------------------------------ reparameterization
def test_reparameterization_definitions():
    norm, _ = make_layers()
    rep = calibrated(norm, 6).reparameterization()
    scale, zp = rep.channel_scale, rep.channel_zero_point
    assert isinstance(rep, Reparameterization) and rep.num_channels == C and rep.bits == 6
    assert torch.allclose(rep.scale.double(), scale.double().mean())
    assert rep.zero_point.dtype == torch.int64 and abs(rep.zero_point.item() - zp.double().mean().item()) <= 0.5
    assert torch.allclose(rep.r1 * rep.scale, scale, rtol=1e-6)
    assert torch.equal(rep.r2 + rep.zero_point, zp)
    assert rep.scale.dim() == 0 and rep.zero_point.dim() == 0
    assert (rep.r1[WIDE] > 5).all()  # the wide channels carry the large scales
    with pytest.raises(Exception):  # noqa: B017 - frozen dataclass
        rep.bits = 4
    with pytest.raises(ValueError, match="per channel"):
        reparameterize(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="positive"):
        reparameterize(torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.long), 4)


FOLD_CASES = [(4, False), (6, False), (8, False), (8, True)]


@pytest.mark.parametrize(("bits", "symmetric"), FOLD_CASES)
@pytest.mark.parametrize(("affine", "bias"), [(True, True), (False, False)])
def test_folded_per_tensor_equals_per_channel(bits, symmetric, affine, bias):
    norm, linear = make_layers(affine=affine, bias=bias)
    quantizer = calibrated(norm, bits, symmetric)
    rep = quantizer.reparameterization()
    folded_norm, folded_linear = fold_layernorm(norm, linear, rep)
    qmin, qmax = quant_range(bits, symmetric)
    x = tokens(20, spread=1.5)
    with torch.no_grad():
        # (a) explicit: LayerNorm -> per-channel fake quantization -> float Linear.
        y_hat = quantizer(norm(x))
        explicit = linear(y_hat)
        # (b) deployed: folded LayerNorm -> one per-tensor (s~, z~) -> folded Linear.
        y_fold_hat = fake_quantize(folded_norm(x), rep.scale, rep.zero_point, qmin, qmax)
        deployed = folded_linear(y_fold_hat)
    assert torch.equal(rep.fake_quantize(folded_norm(x).detach()), y_fold_hat)

    scale, zp = quantizer.qparams(bits)
    codes_channel = codes(y_hat, scale, zp)
    codes_tensor = codes(y_fold_hat, rep.scale, rep.zero_point)
    assert codes_channel.min() >= qmin and codes_channel.max() <= qmax
    assert (codes_channel == qmin).any() or symmetric  # clipping happened (asymmetric: below the calibrated min)
    mismatch = codes_channel != codes_tensor
    assert mismatch.float().mean() < 1e-3  # only float-rounding ties may differ...
    assert (codes_channel - codes_tensor).abs().max() <= 1  # ...and by one level at most
    same_row = ~mismatch.any(dim=-1)
    tol = 1e-4 * explicit.abs().max().item()
    torch.testing.assert_close(deployed[same_row], explicit[same_row], atol=tol, rtol=0)


def test_fold_leaves_originals_untouched_and_returns_copies():
    norm, linear = make_layers()
    model = nn.Sequential(norm, linear)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = calibrated(norm, 4).reparameterization()
    folded_norm, folded_linear = fold_layernorm(norm, linear, rep)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert folded_norm is not norm and folded_linear is not linear
    assert folded_norm.weight.data_ptr() != norm.weight.data_ptr()
    assert type(folded_norm) is nn.LayerNorm and type(folded_linear) is nn.Linear
    assert folded_norm.eps == norm.eps and folded_norm.weight.dtype == norm.weight.dtype


def test_fold_rejects_mismatched_shapes():
    norm, linear = make_layers()
    rep = calibrated(norm, 4).reparameterization()
    with pytest.raises(ValueError, match="64 channels"):
        fold_into_layernorm(nn.LayerNorm(C + 1), rep)
    with pytest.raises(ValueError, match="LayerNorm over the last dimension"):
        fold_into_layernorm(nn.LayerNorm((2, C)), rep)
    with pytest.raises(ValueError, match="input features"):
        fold_into_linear(nn.Linear(C + 1, 3), rep)
    with pytest.raises(ValueError, match="input features"):
        simulated_linear(torch.randn(2, C), nn.Linear(C + 1, 3), rep, lambda w: w)


def test_one_layernorm_feeding_several_linears():
    norm, linear = make_layers()
    _, other = make_layers(seed=1)
    quantizer = calibrated(norm, 6)
    rep = quantizer.reparameterization()
    folded_norm = fold_into_layernorm(norm, rep)
    x = tokens(30)
    with torch.no_grad():
        y_hat = quantizer(norm(x))
        y_fold_hat = rep.fake_quantize(folded_norm(x))
        for layer in (linear, other):
            expected = layer(y_hat)
            tol = 1e-4 * expected.abs().max().item()
            torch.testing.assert_close(fold_into_linear(layer, rep)(y_fold_hat), expected, atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------- weight quantization
@pytest.mark.parametrize(("w_bits", "a_bits"), [(4, 4), (6, 6), (8, 4)])
def test_simulated_linear_equals_folded_deployment_with_weight_quantization(w_bits, a_bits):
    norm, linear = make_layers()
    quantizer = calibrated(norm, a_bits)
    rep = quantizer.reparameterization()
    folded_norm, folded_linear = fold_layernorm(norm, linear, rep)
    quantize_weight = weight_fake_quant(w_bits)
    x = tokens(40, spread=1.2)
    with torch.no_grad():
        y_fold_hat = rep.fake_quantize(folded_norm(x))
        deployed = F.linear(y_fold_hat, quantize_weight(folded_linear.weight), folded_linear.bias)
        y_hat = quantizer(norm(x))
        simulated = simulated_linear(y_hat, linear, rep, quantize_weight)
        naive = F.linear(y_hat, quantize_weight(linear.weight), linear.bias)  # quantizes W instead of W'
    mismatch = codes(y_hat, *quantizer.qparams(a_bits)) != codes(y_fold_hat, rep.scale, rep.zero_point)
    same_row = ~mismatch.any(dim=-1)
    assert same_row.float().mean() > 0.95
    tol = 1e-4 * deployed.abs().max().item()
    torch.testing.assert_close(simulated[same_row], deployed[same_row], atol=tol, rtol=0)
    # The simulation is not the naive one: quantizing W' rather than W changes the result.
    assert (naive - deployed).abs().max() > 100 * tol


def test_simulated_linear_without_weight_quantization_is_the_linear_and_passes_gradients():
    norm, linear = make_layers()
    quantizer = calibrated(norm, 4)
    rep = quantizer.reparameterization()
    y_hat = quantizer(norm(tokens(50))).detach()
    torch.testing.assert_close(simulated_linear(y_hat, linear, rep, lambda w: w), linear(y_hat), atol=1e-5, rtol=1e-5)
    weight, bias = simulated_linear_params(linear, rep, weight_fake_quant(4))
    (F.linear(y_hat, weight, bias) ** 2).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert linear.bias.grad is not None and linear.bias.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------- per channel beats per tensor
@pytest.mark.parametrize(("bits", "max_ratio"), [(4, 0.25), (6, 0.1)])
def test_folded_per_tensor_beats_plain_per_tensor_minmax(bits, max_ratio):
    norm, linear = make_layers()
    quantizer = calibrated(norm, bits)
    rep = quantizer.reparameterization()
    folded_norm, folded_linear = fold_layernorm(norm, linear, rep)
    plain = MinMaxObserver()
    with torch.no_grad():
        for seed in range(3):
            plain(norm(tokens(seed)))
        x = tokens(60)
        reference = linear(norm(x))
        scale, zp = plain.qparams(bits)
        per_tensor = linear(fake_quantize(norm(x), scale, zp, *quant_range(bits, False)))
        folded = folded_linear(rep.fake_quantize(folded_norm(x)))
    plain_error = ((per_tensor - reference) ** 2).mean().item()
    folded_error = ((folded - reference) ** 2).mean().item()
    assert folded_error < max_ratio * plain_error, (folded_error, plain_error)


# ------------------------------------------------------------------------------------ per-channel MSE ranges
MSE_SEEDS = range(12)
"""Calibration batches of the MSE-range tests: the histograms read a quarter of the tokens, so more batches than the
min/max tests use."""


def mse_calibrated(norm: nn.LayerNorm, bits: int) -> ChannelwiseActivationQuantizer:
    quantizer = ChannelwiseActivationQuantizer(ChannelwiseMSEObserver(C, minmax_from_bits=None), bits=bits)
    quantizer.set_mode("observe")
    with torch.no_grad():
        for seed in MSE_SEEDS:
            quantizer(norm(tokens(seed)))
    quantizer.set_mode("quant")
    return quantizer


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_ranges_are_each_channels_own_mse_observer_range(bits):
    norm, _ = make_layers(seed=4)
    quantizer = mse_calibrated(norm, bits)
    low, high = quantizer.observer.clip_range(bits)
    with torch.no_grad():
        batches = [norm(tokens(seed)).reshape(-1, C) for seed in MSE_SEEDS]
    data = torch.cat(batches)
    sampled = torch.cat(
        [batch[:: ChannelwiseMSEObserver.TOKEN_STRIDE] for batch in batches]
    )  # what the histograms read
    for channel in (0, 3, 17, 40, C - 1):  # the reference: a per-tensor MSE observer fed that channel alone
        reference = MSEObserver(symmetric=False, num_candidates=100, bins_per_octave=8)
        reference(sampled[:, channel])
        reference.min_val.copy_(data[:, channel].min())  # the extremes come from every token
        reference.max_val.copy_(data[:, channel].max())
        expected_low, expected_high = reference.clip_range(bits)
        assert float(low[channel]) == float(expected_low) and float(high[channel]) == float(expected_high)
    minmax_low, minmax_high = data.min(0).values, data.max(0).values
    assert bool((low >= minmax_low).all() and (high <= minmax_high).all())
    if bits <= 4:  # at 4 bits the search clips most channels' tails, and the error drops below min/max ranges
        assert float((high < minmax_high).float().mean()) > 0.5
        x = norm(tokens(100)).detach()
        mse_error = (quantizer(x) - x).pow(2).mean()
        minmax_error = (calibrated(norm, bits)(x) - x).pow(2).mean()
        assert float(mse_error) < 0.8 * float(minmax_error)


def test_mse_ranges_fold_into_the_layernorm_like_min_max_ones():
    norm, linear = make_layers(seed=5)
    quantizer = mse_calibrated(norm, 4)
    rep = quantizer.reparameterization()
    folded_norm, folded_linear = fold_layernorm(norm, linear, rep)
    qmin, qmax = quant_range(4, False)
    x = tokens(21, spread=1.5)
    with torch.no_grad():
        explicit = linear(quantizer(norm(x)))
        deployed = folded_linear(fake_quantize(folded_norm(x), rep.scale, rep.zero_point, qmin, qmax))
    close = (deployed - explicit).abs().amax(-1) <= 1e-4 * explicit.abs().max()
    assert float(close.float().mean()) > 0.99  # only rows with a float-rounding tie may differ


def test_mse_observer_uses_min_max_ranges_from_its_switch_width():
    norm, _ = make_layers(seed=7)
    observer = ChannelwiseMSEObserver(C)  # the default switch: min/max from 6 bits up
    with torch.no_grad():
        for seed in range(3):
            observer(norm(tokens(seed)))
    for bits in (6, 8):
        low, high = observer.clip_range(bits)
        assert torch.equal(low, observer.min_val) and torch.equal(high, observer.max_val)
    assert not torch.equal(observer.clip_range(4)[1], observer.max_val)


def test_mse_observer_histograms_sync_across_ranks_and_ranges_are_validated():
    norm, _ = make_layers(seed=6)
    quantizer = mse_calibrated(norm, 4)
    before = [t.clone() for t in quantizer.observer.clip_range(4)]
    hist = quantizer.observer.hist.clone()
    assert sync_observers(quantizer, lambda t, op: t * 2 if op == "sum" else t) == 1  # two ranks, the same data
    assert torch.equal(quantizer.observer.hist, hist * 2)
    after = quantizer.observer.clip_range(4)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    from lit_mpq.quant.apply import apply_post_layernorm

    with pytest.raises(ValueError, match="ranges must be one of"):
        apply_post_layernorm(nn.Sequential(), torch.zeros(1), ranges="percentile")
