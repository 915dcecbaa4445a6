"""Activation observers against torch.ao observers, torch.quantile, numpy histograms and brute-force range search."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver

from lit_mpq.quant.functional import qparams_from_range, quant_range, quantization_mse
from lit_mpq.quant.observers import (
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    build_observer,
    candidate_errors,
    sync_observers,
)

pytestmark = pytest.mark.usefixtures("single_thread")


ALL_OBSERVERS = [MinMaxObserver, PercentileObserver, MSEObserver, HistogramObserver]


def ao_observer(bits: int, symmetric: bool) -> AoMinMaxObserver:
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return AoMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=qmin, quant_max=qmax)
    return AoMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=2**bits - 1)


# Tensors stay under torch's parallel grain size (32768 elements) where it is cheap to, so the suite does not
# depend on intra-op threads (slow when the cores are shared).


def batches(seed: int = 0, n: int = 4, size: int = 1000) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen) * (i + 1) + (i - 1.5) for i in range(n)]


def round_trip_mse(x: torch.Tensor, low, high, bits: int, symmetric: bool) -> float:
    scale, zp = qparams_from_range(torch.as_tensor(low), torch.as_tensor(high), bits, symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    return quantization_mse(x, scale, zp, qmin, qmax, None).item()


def brute_force_best_mse(
    x: torch.Tensor, bits: int, symmetric: bool, grid: int = 400, two_ended: bool = False
) -> float:
    """Smallest round-trip error over shrunken ranges: one shared factor, or every pair of per-end factors."""
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    if symmetric:
        bound = max(-low, high)
        low, high = -bound, bound
    alphas = np.linspace(1.0 / grid, 1.0, grid)
    if two_ended:
        return min(round_trip_mse(x, a * low, b * high, bits, symmetric) for a in alphas for b in alphas)
    return min(round_trip_mse(x, a * low, a * high, bits, symmetric) for a in alphas)


# ------------------------------------------------------------------------------------------------ MinMax vs ao
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_stats_and_qparams_equal_torch_ao(symmetric):
    obs = MinMaxObserver(symmetric=symmetric)
    refs = {bits: ao_observer(bits, symmetric) for bits in (2, 4, 6, 8)}
    for x in batches():
        obs(x)
        for ref in refs.values():
            ref(x)
    ref8 = refs[8]
    assert torch.equal(obs.min_val, ref8.min_val) and torch.equal(obs.max_val, ref8.max_val)
    for bits, ref in refs.items():
        scale, zp = obs.qparams(bits)
        ref_scale, ref_zp = ref.calculate_qparams()
        assert torch.equal(scale.reshape(1), ref_scale.reshape(1)), bits
        assert zp.reshape(1).tolist() == ref_zp.reshape(1).tolist(), bits


def test_minmax_multidimensional_input_and_empty_batch():
    obs = MinMaxObserver()
    x = torch.randn(2, 3, 4, 5)
    obs(x)
    obs(torch.empty(0, 3))  # ignored
    assert obs.min_val.item() == x.min().item() and obs.max_val.item() == x.max().item()


# ------------------------------------------------------------------------------------------- forward contract
@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_observer_returns_its_input_unchanged(cls):
    x = torch.randn(3, 4, 5)
    copy = x.clone()
    out = cls()(x)
    assert out is x
    assert torch.equal(x, copy)


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_qparams_before_data_raises(cls):
    obs = cls()
    assert not obs.has_data
    with pytest.raises(RuntimeError, match="calibration"):
        obs.qparams(8)


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_reset_forgets_everything(cls):
    obs = cls()
    for x in batches(1):
        obs(x)
    assert obs.has_data
    obs.reset()
    assert not obs.has_data
    with pytest.raises(RuntimeError):
        obs.qparams(8)
    fresh = cls()
    x = torch.randn(500) * 0.1
    obs(x)
    fresh(x)
    for (name, a), (_, b) in zip(obs.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_statistics_are_registered_buffers_with_declared_reductions(cls):
    obs = cls()
    assert isinstance(obs, Observer)
    buffers = dict(obs.named_buffers())
    assert set(cls.REDUCTIONS) == set(buffers)
    assert set(cls.REDUCTIONS.values()) <= {"sum", "min", "max"}


# ------------------------------------------------------------------------------------------------- histogram
def sign_split(obs: HistogramObserver) -> tuple[np.ndarray, np.ndarray, int]:
    """``hist`` as (positive bins, negative bins by ascending magnitude, zero bin)."""
    n, hist = obs.num_bins, obs.hist.numpy()
    return hist[n + 1 :], hist[:n][::-1], int(hist[n])


def reference_edges(bins_per_octave: int) -> np.ndarray:
    """Every octave of 2^-24 .. 2^24 cut into ``bins_per_octave`` equal bins, in float64."""
    octaves = 2.0 ** np.arange(-24, 24, dtype=np.float64)
    steps = 1.0 + np.arange(bins_per_octave) / bins_per_octave
    return np.append((octaves[:, None] * steps[None, :]).ravel(), 2.0**24)


def bin_width_at(obs: HistogramObserver, value: float) -> float:
    """Width of the magnitude bin that holds ``value`` (the zero bin spans [0, 2^MIN_EXP))."""
    edges = obs._edges().numpy()
    k = np.searchsorted(edges, abs(value), side="right") - 1
    return float(edges[0]) if k < 0 else float(edges[min(k + 1, len(edges) - 1)] - edges[min(k, len(edges) - 2)])


def bin_floor(obs: HistogramObserver, value: float) -> float:
    """Lower edge of the magnitude bin that holds ``value`` (the top bin is open above; the zero bin starts at 0)."""
    edges = obs._edges().numpy()
    k = np.searchsorted(edges, abs(value), side="right") - 1
    return 0.0 if k < 0 else float(edges[min(k, len(edges) - 2)])


def test_histogram_counts_every_element():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(3000), torch.zeros(17), torch.full((5,), 1e-9), -torch.rand(100) * 1e3])
    obs = HistogramObserver()
    obs(x[:1000].reshape(10, 100))
    obs(x[1000:])
    assert obs.hist.sum().item() == x.numel()
    pos, neg, zero = sign_split(obs)
    tiny = x.abs() < 2.0**-24
    assert zero == int(tiny.sum())
    assert pos.sum() == int(((x > 0) & ~tiny).sum())
    assert neg.sum() == int(((x < 0) & ~tiny).sum())
    assert obs.min_val.item() == x.min().item() and obs.max_val.item() == x.max().item()


@pytest.mark.parametrize("bins_per_octave", [1, 4, 32, 128])
def test_histogram_bins_equal_numpy_histogram_on_fixed_edges(bins_per_octave):
    rng = np.random.default_rng(0)
    values = rng.lognormal(0.0, 5.0, 20000) * rng.choice([-1.0, 1.0], 20000)
    edges = reference_edges(bins_per_octave)
    # Every edge is a float32, and binning reads the float32 bits: values exactly on an edge belong to the bin
    # above, as in numpy.histogram, with no tolerance.
    inner = edges[:-1]
    values = np.concatenate([values, inner[::3], -inner[1::5], np.nextafter(inner[2::7].astype(np.float32), 0)])
    values = values.astype(np.float32)
    values = values[(np.abs(values) >= 2.0**-24) & (np.abs(values) < 2.0**24)]
    obs = HistogramObserver(bins_per_octave=bins_per_octave)
    assert torch.equal(obs._edges(), torch.from_numpy(edges))
    obs(torch.from_numpy(values))
    pos_ref, _ = np.histogram(values[values > 0].astype(np.float64), bins=edges)
    neg_ref, _ = np.histogram(-values[values < 0].astype(np.float64), bins=edges)
    pos, neg, zero = sign_split(obs)
    assert pos.tolist() == pos_ref.tolist()
    assert neg.tolist() == neg_ref.tolist()
    assert zero == 0


def test_histogram_of_strided_inputs_equals_that_of_their_contiguous_copy():
    gen = torch.Generator().manual_seed(15)
    qkv = torch.randn(2, 9, 3, 4, 8, generator=gen).permute(2, 0, 3, 1, 4)  # timm attention's q, k, v views
    inputs = [qkv[0], qkv[1].transpose(-2, -1), torch.randn(6, 5, generator=gen).half().t(), torch.tensor(-2.5)]
    inputs.append(torch.randn(1, generator=gen).expand(7))
    for x in inputs:
        strided, dense = HistogramObserver(), HistogramObserver()
        strided(x)
        dense(x.contiguous().flatten())
        assert strided.hist.sum().item() == x.numel()
        for name, value in dense.state_dict().items():
            assert torch.equal(strided.state_dict()[name], value), name


@pytest.mark.parametrize("bins_per_octave", [0, 3, 48, 2048, 2.0])
def test_histogram_rejects_bins_per_octave_other_than_a_power_of_two(bins_per_octave):
    with pytest.raises(ValueError, match="power of two"):
        HistogramObserver(bins_per_octave=bins_per_octave)


def test_histogram_of_halves_adds_up_to_the_histogram_of_the_whole():
    gen = torch.Generator().manual_seed(11)
    x = torch.cat(
        [torch.randn(5000, generator=gen) * 4, torch.zeros(30), torch.full((7,), -3e-9), torch.tensor([1e30, -5e25])]
    )
    x = x[torch.randperm(x.numel(), generator=gen)]
    whole, first, second = HistogramObserver(), HistogramObserver(), HistogramObserver()
    whole(x)
    first(x[:2000])
    second(x[2000:])
    assert torch.equal(first.hist + second.hist, whole.hist)
    pos, neg, zero = sign_split(whole)
    assert (pos[-1], neg[-1], zero) == (1, 1, 37)  # beyond 2^24: the top bin of its sign


@pytest.mark.parametrize("cls", [PercentileObserver, MSEObserver])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zeros_give_an_empty_range_with_finite_qparams(cls, symmetric):
    obs = cls(symmetric=symmetric)
    obs(torch.zeros(100))
    assert sign_split(obs)[2] == 100
    low, high = obs.clip_range(8)
    assert (low.item(), high.item()) == (0.0, 0.0)
    scale, zp = obs.qparams(4)
    assert torch.isfinite(scale).all() and torch.isfinite(zp.float()).all()


@pytest.mark.parametrize("value", [3.7, -0.02, 1e-9, -1e-9, 2.0**-24, 1e30])
def test_a_single_repeated_value_is_its_own_range(value):
    x = torch.full((200,), value)
    for symmetric in (True, False):
        pct = PercentileObserver(percentile=99.9, symmetric=symmetric)
        mse = MSEObserver(symmetric=symmetric)
        pct(x)
        mse(x)
        v = x[0].item()
        low, high = pct.clip_range(8)
        if symmetric:  # within the bin of |v|, never beyond it
            assert bin_floor(pct, v) <= high.item() <= abs(v) and low.item() == -high.item()
        else:  # exact, but for a value under 2^MIN_EXP, which may round to zero
            assert low.item() == high.item() == pytest.approx(v, abs=bin_width_at(pct, v) if abs(v) < 2**-24 else 0)
        low, high = mse.clip_range(8)
        assert low.item() <= min(v, 0.0) and high.item() >= max(v, 0.0)
        scale, _ = mse.qparams(8)
        assert torch.isfinite(scale).all() and scale.item() > 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_negative_only_data(symmetric):
    gen = torch.Generator().manual_seed(12)
    x = -torch.rand(20_000, generator=gen) * 5 - 0.1
    pct = PercentileObserver(percentile=99.0, symmetric=symmetric)
    pct(x)
    low, high = pct.clip_range(8)
    if symmetric:
        ref = float(np.percentile(x.abs().numpy(), 99.0))
        assert high.item() == pytest.approx(ref, abs=bin_width_at(pct, ref)) and low.item() == -high.item()
    else:
        ref_low, ref_high = np.percentile(x.numpy(), [1.0, 99.0])
        assert low.item() == pytest.approx(ref_low, abs=bin_width_at(pct, ref_low))
        assert high.item() == pytest.approx(ref_high, abs=bin_width_at(pct, ref_high))
        assert high.item() < 0
    assert sign_split(pct)[0].sum() == 0
    mse = MSEObserver(symmetric=symmetric)
    mse(x)
    low, high = mse.clip_range(4)
    assert low.item() < 0 and low.item() >= x.min().item()
    assert high.item() == (-low.item() if symmetric else 0.0)


def test_values_below_min_exp_count_as_zeros_and_keep_exact_extremes():
    x = torch.tensor([1e-12, -3e-10, 5e-8, -5e-8, 0.0, -0.0, 2.0**-25, 2.0**-24])
    obs = HistogramObserver()
    obs(x)
    pos, neg, zero = sign_split(obs)
    assert zero == 7 and pos[0] == 1 and pos.sum() == 1 and neg.sum() == 0  # 2^-24 opens the lowest bin
    assert obs.min_val.item() == x.min().item() and obs.max_val.item() == x.max().item()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_counted_and_poison_the_range(bad):
    x = torch.cat([torch.randn(1000), torch.tensor([bad])])
    obs = MSEObserver()
    obs(x)  # no error while observing: check_calibrated reports the layer afterwards
    assert obs.hist.sum().item() == x.numel()
    pos, neg, _ = sign_split(obs)
    assert pos[-1] + neg[-1] == 1  # the top bin of its sign (a NaN's sign bit decides)
    assert not obs.has_data
    with pytest.raises(RuntimeError, match="calibration"):
        obs.qparams(8)
    if math.isnan(bad):
        assert math.isnan(obs.min_val.item()) and math.isnan(obs.max_val.item())
    else:
        assert (obs.min_val.item() if bad < 0 else obs.max_val.item()) == bad


@pytest.mark.parametrize("data", ["normal", "lognormal", "relu", "laplace"])
def test_histogram_quantile_within_one_bin_of_numpy_percentile(data):
    rng = np.random.default_rng(13)
    x = {
        "normal": rng.normal(0.5, 2.0, 100_000),
        "lognormal": rng.lognormal(0.0, 1.0, 100_000),
        "relu": np.maximum(rng.normal(0.3, 1.0, 100_000), 0.0),
        "laplace": rng.laplace(0.0, 0.01, 100_000),
    }[data].astype(np.float32)
    obs = HistogramObserver()
    for chunk in np.array_split(x, 4):
        obs(torch.from_numpy(chunk))
    for q in (0.0001, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 0.9999):
        ref = float(np.percentile(x.astype(np.float64), 100 * q))
        got = obs.quantile(q).item()
        # Linear interpolation inside the bin where the CDF crosses q: the sample quantile is in that bin or, at
        # a bin edge, the next one.
        assert abs(got - ref) <= max(bin_width_at(obs, ref), bin_width_at(obs, got)) * (1 + 1e-6), q
    # The extremes are exact.
    assert obs.quantile(0.0).item() == x.min()
    assert obs.quantile(1.0).item() == x.max()


# ------------------------------------------------------------------------------------------------ percentile
@pytest.mark.parametrize("percentile", [99.9, 99.99])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("data", ["normal", "laplace", "relu"])
def test_percentile_range_within_one_bin_of_numpy_percentile(percentile, symmetric, data):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200_000, generator=gen) * 3.0 + 1.0
    if data == "laplace":
        x = torch.distributions.Laplace(0.0, 0.01).sample((200_000,))
    elif data == "relu":
        x = torch.relu(x)
    obs = PercentileObserver(percentile=percentile, symmetric=symmetric)
    for chunk in x.split(25_000):
        obs(chunk)
    low, high = obs.clip_range(8)
    values = x.double().numpy()
    if symmetric:
        ref = float(np.percentile(np.abs(values), percentile))
        assert high.item() == pytest.approx(ref, abs=bin_width_at(obs, ref))
        assert low.item() == -high.item()
    else:
        ref_low, ref_high = np.percentile(values, [100 - percentile, percentile])
        assert high.item() == pytest.approx(ref_high, abs=bin_width_at(obs, ref_high))
        assert low.item() == pytest.approx(ref_low, abs=bin_width_at(obs, ref_low))
    # The clipping range never exceeds the observed extremes; qparams derive from it.
    if symmetric:
        assert high.item() <= x.abs().max().item()
    else:
        assert low.item() >= x.min().item() and high.item() <= x.max().item()
    for bits in (4, 8):
        scale, zp = obs.qparams(bits)
        ref_scale, ref_zp = qparams_from_range(low, high, bits, symmetric)
        assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_100_is_min_max(symmetric):
    x = torch.randn(5000) * 2 + 0.3
    obs = PercentileObserver(percentile=100.0, symmetric=symmetric)
    obs(x)
    low, high = obs.clip_range(8)
    if symmetric:
        bound = x.abs().max().item()
        assert (low.item(), high.item()) == (-bound, bound)
    else:
        assert (low.item(), high.item()) == (x.min().item(), x.max().item())


@pytest.mark.parametrize("percentile", [50.0, 10.0, 100.5])
def test_percentile_rejects_invalid(percentile):
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=percentile)


# ------------------------------------------------------------------------------------------------------- MSE
@pytest.mark.parametrize("data", ["laplace", "student_t", "gelu"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_mse_observer_close_to_brute_force_best(data, symmetric, bits):
    torch.manual_seed(5)
    if data == "laplace":
        x = torch.distributions.Laplace(0.2, 1.0).sample((30_000,))
    elif data == "student_t":
        x = torch.distributions.StudentT(3.0).sample((30_000,))
    else:  # a transformer MLP's activations: a heavy positive tail, a short negative one, many values near 0
        x = torch.nn.functional.gelu(torch.distributions.StudentT(4.0).sample((30_000,)) * 1.5)
    obs = MSEObserver(symmetric=symmetric)
    for chunk in x.split(20_000):
        obs(chunk)
    low, high = obs.clip_range(bits)
    got = round_trip_mse(x, low, high, bits, symmetric)
    best = brute_force_best_mse(x, bits, symmetric)
    assert got <= 1.05 * best
    # qparams use that range
    scale, zp = obs.qparams(bits)
    ref_scale, ref_zp = qparams_from_range(low, high, bits, symmetric)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
    if bits == 4:  # heavy tails: clipping beats min/max by a wide margin at 4 bits
        minmax = round_trip_mse(x, x.min(), x.max(), bits, symmetric)
        assert got < 0.5 * minmax


@pytest.mark.parametrize("data", ["gelu", "skewed_normal", "relu"])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_asymmetric_mse_searches_both_ends_independently(data, bits):
    """Against a brute-force search of every (lower, upper) pair of shrink factors on the raw values."""
    gen = torch.Generator().manual_seed(21)
    z = torch.randn(20_000, generator=gen)
    x = {
        "gelu": torch.nn.functional.gelu(z * 1.5 + (torch.rand(20_000, generator=gen) < 0.01) * 12.0),
        "skewed_normal": torch.where(z > 0, z * 6.0, z * 0.5),  # a long upper tail, a short lower one
        "relu": torch.relu(z) * 3,
    }[data]
    obs = MSEObserver(symmetric=False)
    obs(x)
    low, high = obs.clip_range(bits)
    got = round_trip_mse(x, low, high, bits, symmetric=False)
    best_pair = brute_force_best_mse(x, bits, symmetric=False, grid=50, two_ended=True)
    best_shared = brute_force_best_mse(x, bits, symmetric=False, grid=50)
    assert got <= 1.03 * best_pair
    assert low.item() >= x.min().item() and high.item() <= x.max().item()
    if data == "relu":  # nothing below zero to clip: the lower end stays at 0
        assert low.item() == 0.0
    elif data == "skewed_normal":  # never worse than one shared factor, and at 3 bits clearly better
        assert got <= 1.01 * best_shared
        if bits == 3:
            assert got < 0.9 * best_shared


def all_pairs_errors(values, counts, lows, highs, noise):
    """``candidate_errors`` the direct way: every candidate range against every bin."""
    lows, highs, noise = lows[:, None], highs[:, None], noise[:, None]
    inside = (values[None, :] >= lows) & (values[None, :] <= highs)
    rounding = torch.minimum(values[None, :] ** 2, noise)
    clipping = (values[None, :] - values[None, :].clamp(lows, highs)) ** 2
    return (torch.where(inside, rounding, clipping) * counts[None, :]).sum(dim=1)


@pytest.mark.parametrize("data", ["normal", "relu", "student_t", "negative", "constant"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_candidate_errors_equal_the_all_pairs_sum(data, symmetric):
    gen = torch.Generator().manual_seed(14)
    x = {
        "normal": torch.randn(20_000, generator=gen),
        "relu": torch.relu(torch.randn(20_000, generator=gen)) * 3,
        "student_t": torch.randn(20_000, generator=gen) / torch.rand(20_000, generator=gen).clamp_min(0.01),
        "negative": -torch.rand(5_000, generator=gen),
        "constant": torch.full((100,), 0.3),
    }[data]
    obs = MSEObserver(symmetric=symmetric)
    obs(x)
    lower, upper, counts = obs.signed_distribution()
    keep = counts > 0
    values, counts = ((lower + upper) / 2)[keep], counts[keep]
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    if symmetric:
        low, high = -max(-low, high), max(-low, high)
    for bits in (2, 4, 8):
        qmin, qmax = quant_range(bits, symmetric)
        alphas = torch.linspace(1.0, 0.0, obs.num_candidates + 1, dtype=torch.float64)[:-1]
        lows, highs = alphas * low, alphas * high
        noise = ((highs - lows) / (qmax - qmin)) ** 2 / 12
        fast = candidate_errors(values, counts, lows, highs, noise)
        ref = all_pairs_errors(values, counts, lows, highs, noise)
        assert torch.allclose(fast, ref, rtol=1e-9, atol=1e-12 * float(ref.max()))
        assert int(torch.argmin(fast)) == int(torch.argmin(ref))
        if symmetric:  # one shared factor: the observer's search is exactly this candidate set
            clip_low, clip_high = obs.clip_range(bits)
            best = int(torch.argmin(ref))
            assert (clip_low.item(), clip_high.item()) == (lows[best].float().item(), highs[best].float().item())


def test_mse_observer_rejects_invalid_candidates():
    with pytest.raises(ValueError, match="num_candidates"):
        MSEObserver(num_candidates=0)
    with pytest.raises(ValueError, match="bins_per_octave"):
        HistogramObserver(bins_per_octave=0)


# -------------------------------------------------------------------------------------------- bit independence
@pytest.mark.parametrize("cls", [MinMaxObserver, PercentileObserver, MSEObserver])
@pytest.mark.parametrize("symmetric", [True, False])
def test_one_calibration_serves_every_bit_width(cls, symmetric):
    torch.manual_seed(6)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20_000,))
    obs = cls(symmetric=symmetric)
    obs(x)
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    params = {bits: obs.qparams(bits) for bits in (4, 6, 8)}
    # Deriving parameters does not touch the statistics...
    for k, v in obs.state_dict().items():
        assert torch.equal(v, before[k])
    # ... and each bit width's parameters equal those of a fresh observer calibrated for it alone.
    for bits in (8, 6, 4):
        fresh = cls(symmetric=symmetric)
        fresh(x)
        scale, zp = fresh.qparams(bits)
        assert torch.equal(scale, params[bits][0]) and torch.equal(zp, params[bits][1])
    for bits in (4, 6, 8):
        qmin, qmax = quant_range(bits, symmetric)
        low, high = obs.clip_range(bits)
        ref = qparams_from_range(low, high, bits, symmetric)
        assert torch.equal(params[bits][0], ref[0]) and torch.equal(params[bits][1], ref[1])
    if cls is MinMaxObserver:
        for bits in (4, 6, 8):
            ao = ao_observer(bits, symmetric)
            ao(x)
            assert torch.equal(params[bits][0].reshape(1), ao.calculate_qparams()[0].reshape(1))
    if cls is MSEObserver:  # fewer bits -> coarser steps -> tighter optimal clipping
        widths = [(obs.clip_range(b)[1] - obs.clip_range(b)[0]).item() for b in (4, 6, 8)]
        assert widths[0] < widths[1] < widths[2]


# --------------------------------------------------------------------------------------------------- merging
class TwoRankReduce:
    """A fake ``reduce(tensor, op)`` for "this rank", combining with the other rank's buffers (a snapshot).

    ``sync_observers`` walks the modules that declare REDUCTIONS (observers among them) and their buffers in a
    deterministic order; the other rank's buffers are snapshotted in the same order, and each call reduces with
    the next one, as an all_reduce would.
    """

    def __init__(self, other: nn.Module) -> None:
        self.queue = [
            getattr(module, name).clone()
            for module in other.modules()
            for name in getattr(module, "REDUCTIONS", None) or {}
        ]
        self.calls = 0

    def __call__(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        other = self.queue[self.calls]
        self.calls += 1
        assert other.shape == tensor.shape and other.dtype == tensor.dtype
        if op == "sum":
            return tensor + other
        if op == "min":
            return torch.minimum(tensor, other)
        if op == "max":
            return torch.maximum(tensor, other)
        raise AssertionError(f"unexpected reduction {op!r}")


def two_rank_sync(rank0: nn.Module, rank1: nn.Module) -> tuple[int, int]:
    reduce0, reduce1 = TwoRankReduce(rank1), TwoRankReduce(rank0)  # snapshots before either side changes
    n0 = sync_observers(rank0, reduce0)
    n1 = sync_observers(rank1, reduce1)
    assert reduce0.calls == len(reduce0.queue) and reduce1.calls == len(reduce1.queue)
    return n0, n1


@pytest.mark.parametrize("cls", [MinMaxObserver, PercentileObserver, MSEObserver])
def test_sync_of_two_halves_equals_one_observer_on_all_data(cls):
    torch.manual_seed(7)
    x = torch.cat([torch.randn(4000) * 3, torch.zeros(10)])
    x = x[torch.randperm(x.numel())]
    first, second = cls(), cls()
    first(x[:1500])
    second(x[1500:])
    whole = cls()
    whole(x)
    assert two_rank_sync(first, second) == (1, 1)
    for merged in (first, second):
        for name, value in whole.state_dict().items():
            assert torch.equal(merged.state_dict()[name], value), name
        for bits in (4, 8):
            a, b = merged.qparams(bits), whole.qparams(bits)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sync_over_a_model_with_several_observers():
    torch.manual_seed(8)

    def make():
        return nn.ModuleDict(
            {"a": MinMaxObserver(), "b": MSEObserver(), "c": nn.Linear(2, 2), "d": PercentileObserver()}
        )

    rank0, rank1, whole = make(), make(), make()
    data = {k: torch.randn(1000) * (i + 1) for i, k in enumerate("abd")}
    for key, x in data.items():
        rank0[key](x[:300])
        rank1[key](x[300:])
        whole[key](x)
    assert two_rank_sync(rank0, rank1) == (3, 3)
    for merged in (rank0, rank1):
        for name, value in whole.state_dict().items():
            if "c." not in name:
                assert torch.equal(merged.state_dict()[name], value), name


def test_sync_with_identity_reduce_is_a_no_op():
    obs = PercentileObserver()
    obs(torch.randn(100))
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    assert sync_observers(obs, lambda t, op: t) == 1
    for k, v in obs.state_dict().items():
        assert torch.equal(v, before[k])


# -------------------------------------------------------------------------------------------- inference mode
@pytest.mark.parametrize("cls", [MinMaxObserver, PercentileObserver, MSEObserver])
def test_update_inside_inference_mode_keeps_buffers_usable(cls):
    torch.manual_seed(9)
    a, b = torch.randn(500), torch.randn(500) * 4
    obs = cls()
    with torch.inference_mode():
        obs(a)
        obs.qparams(8)
    for buffer in obs.buffers():
        assert not buffer.is_inference()
    obs(b)  # in-place update outside inference mode must not raise
    sync_observers(obs, lambda t, op: t)
    ref = cls()
    ref(torch.cat([a, b]))
    for name, value in ref.state_dict().items():
        assert torch.equal(obs.state_dict()[name], value), name
    obs.reset()
    assert not obs.has_data


# ------------------------------------------------------------------------------------------------ factories
def test_build_observer_aliases_and_errors():
    assert set(OBSERVERS) == {"minmax", "percentile", "mse"}
    assert type(build_observer("minmax")) is MinMaxObserver
    assert type(build_observer("mse", symmetric=True)) is MSEObserver
    assert build_observer("mse", symmetric=True).symmetric is True
    pct = build_observer("percentile", percentile=99.9)
    assert type(pct) is PercentileObserver and pct.percentile == 99.9
    with pytest.raises(ValueError, match="minmax") as err:
        build_observer("kl")
    assert "mse" in str(err.value) and "percentile" in str(err.value)
    with pytest.raises(ValueError, match="percentile"):
        build_observer("percentile", percentile=120.0)


def test_symmetric_histogram_observer_minmax_equals_torch_ao_symmetric():
    x = torch.randn(3000) * 0.7 - 0.2
    obs = HistogramObserver(symmetric=True)
    obs(x)
    ao = ao_observer(8, True)
    ao(x)
    scale, zp = obs.qparams(8)
    assert torch.equal(scale.reshape(1), ao.calculate_qparams()[0].reshape(1)) and zp.item() == 0
    assert math.isclose(scale.item(), x.abs().max().item() / 127.5, rel_tol=1e-6)
