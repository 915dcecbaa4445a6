"""probe_output_error against a brute-force recomputation with torch.ao observers and torch.fake_quantize_*.

The probe measures each layer's OUTPUT error for float inputs: with ``x`` the layer's input in the float network
and ``y = layer(x)``, ``S_w(b)^2 = sum ||y - layer_{W quantized at b}(x)||^2`` and
``S_a(b)^2 = sum ||y - layer(x quantized at b)||^2`` over the calibration batches. The brute force below slices
the float ``nn.Sequential`` to get ``x`` and recomputes both with torch's own kernels.
"""

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver

from lit_mpq.quant.apply import QuantSettings, current_modes, quant_layers, quantize_model, set_mode
from lit_mpq.sensitivity import OutputErrorStats, probe_output_error

pytestmark = pytest.mark.usefixtures("single_thread")


CANDIDATES = [4, 6, 8]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def convnet() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )


def make_batches(model_name: str, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    shape = (4, 6) if model_name == "mlp" else (2, 3, 8, 8)
    return [torch.randn(shape, generator=gen) * (1 + i) for i in range(n)]


def prepared(model_name: str):
    float_model = mlp() if model_name == "mlp" else convnet()
    model = copy.deepcopy(float_model)
    quantize_model(model, QuantSettings())
    batches = make_batches(model_name)
    set_mode(model, weights="observe", activations="observe")
    with torch.no_grad():
        for batch in batches:
            model(batch)
    set_mode(model, weights="off", activations="off")
    return float_model, model, batches


def layer_indices(float_model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(float_model) if isinstance(m, nn.Conv2d | nn.Linear)]


def weight_fq(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    obs = AoPerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
    )
    obs(w)
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)


def apply_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer on ``x`` with ``weight``, in float64 (the reference's differences of near-equal outputs must not
    carry float32 cancellation: at 8 bits that alone is ~1e-5 relative)."""
    x, weight = x.double(), weight.double()
    bias = None if layer.bias is None else layer.bias.double()
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


@torch.no_grad()
def brute_force(float_model: nn.Sequential, batches: list[torch.Tensor]):
    """``{name: {"w": {b: sum sq}, "a": {b: sum sq}, "y": sum sq}}`` keyed by the Sequential index."""
    result = {}
    for i in layer_indices(float_model):
        layer = float_model[i]
        inputs = [float_model[:i](batch) for batch in batches]  # the float input of layer i
        act_obs = {b: AoMinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=2**b - 1) for b in CANDIDATES}
        for x in inputs:
            for obs in act_obs.values():
                obs(x)
        entry = {"w": dict.fromkeys(CANDIDATES, 0.0), "a": dict.fromkeys(CANDIDATES, 0.0), "y": 0.0}
        for x in inputs:
            y = apply_layer(layer, x, layer.weight)
            entry["y"] += float((y**2).sum())
            for b in CANDIDATES:
                y_w = apply_layer(layer, x, weight_fq(layer.weight, b))
                entry["w"][b] += float(((y_w - y) ** 2).sum())
                scale, zp = act_obs[b].calculate_qparams()
                xq = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), 0, 2**b - 1)
                y_a = apply_layer(layer, xq, layer.weight)
                entry["a"][b] += float(((y_a - y) ** 2).sum())
        result[str(i)] = entry
    return result


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_probe_equals_brute_force_layer_output_error(model_name):
    float_model, model, batches = prepared(model_name)
    stats = probe_output_error(model, batches, CANDIDATES)
    expected = brute_force(float_model, batches)
    assert list(stats.weight_sq) == list(expected) == list(quant_layers(model))
    assert stats.num_samples == sum(b.shape[0] for b in batches)
    for name, entry in expected.items():
        assert stats.output_sq[name] == pytest.approx(entry["y"], rel=1e-5)  # float32 sums
        for b in CANDIDATES:
            # The probe computes f(x, dW) instead of f(x, W_q) - f(x, W): equal up to float32 rounding.
            assert stats.weight_sq[name][b] == pytest.approx(entry["w"][b], rel=1e-5), (name, b)
            assert stats.act_sq[name][b] == pytest.approx(entry["a"][b], rel=1e-5), (name, b)
            assert entry["w"][b] > 0 and entry["a"][b] > 0

    scores = stats.scores()
    normalized = stats.scores(transform="normalized")
    for name, entry in expected.items():
        for kind in ("w", "a"):
            for b in CANDIDATES:
                s = entry[kind][b] ** 0.5
                assert scores[name][kind][b] == pytest.approx(s, rel=1e-5)
                assert normalized[name][kind][b] == pytest.approx(s / entry["y"] ** 0.5, rel=1e-5)


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_errors_decrease_with_more_bits(model_name):
    _, model, batches = prepared(model_name)
    scores = probe_output_error(model, batches, [2, 4, 6, 8]).scores()
    for name, table in scores.items():
        for kind in ("w", "a"):
            s = table[kind]
            assert s[8] < s[6] < s[4] < s[2], (name, kind, s)


def test_probe_leaves_the_model_as_it_was():
    float_model, model, batches = prepared("mlp")
    model[0].weight_quantizer.set_mode("quant")
    model[2].input_quantizer.set_mode("quant")
    modes = [(q, m) for q, m in current_modes(model)]
    observer_state = {k: v.clone() for k, v in model.state_dict().items()}
    probe_output_error(model, batches, CANDIDATES)
    assert [(q, q.mode) for q, _ in modes] == modes
    for layer in quant_layers(model).values():
        assert not layer._forward_hooks
    for key, value in model.state_dict().items():  # the probe does not observe (no statistics change)
        assert torch.equal(value, observer_state[key]), key


def test_probe_kinds_and_custom_forward():
    _, model, batches = prepared("mlp")
    calls = []

    def forward(batch):
        calls.append(batch.shape[0])
        return model(batch)

    only_w = probe_output_error(model, batches, CANDIDATES, forward=forward, kinds=("w",))
    assert calls == [4, 4, 4]
    full = probe_output_error(model, batches, CANDIDATES)
    for name in only_w.weight_sq:
        assert only_w.weight_sq[name] == full.weight_sq[name]
        assert all(v == 0.0 for v in only_w.act_sq[name].values())


def test_stats_pack_round_trip_and_merge_by_summation():
    _, model, batches = prepared("convnet")
    names = list(quant_layers(model))
    full = probe_output_error(model, batches, CANDIDATES)
    packed = full.as_tensor(names, CANDIDATES)
    assert packed.dtype == torch.float64 and packed.shape == (len(names) * (2 * len(CANDIDATES) + 1) + 1,)
    back = OutputErrorStats.from_tensor(packed, names, CANDIDATES)
    assert back == full

    # Two "ranks" with half the data each: the summed tensors decode to the statistics of all the data.
    first = probe_output_error(model, batches[:1], CANDIDATES)
    second = probe_output_error(model, batches[1:], CANDIDATES)
    merged = OutputErrorStats.from_tensor(
        first.as_tensor(names, CANDIDATES) + second.as_tensor(names, CANDIDATES), names, CANDIDATES
    )
    assert merged.num_samples == full.num_samples == 6
    for name in names:
        assert merged.output_sq[name] == pytest.approx(full.output_sq[name], rel=1e-12)
        for b in CANDIDATES:
            assert merged.weight_sq[name][b] == pytest.approx(full.weight_sq[name][b], rel=1e-12)
            assert merged.act_sq[name][b] == pytest.approx(full.act_sq[name][b], rel=1e-12)


def test_stats_hand_made_scores():
    stats = OutputErrorStats(
        weight_sq={"fc": {4: 9.0, 8: 0.25}},
        act_sq={"fc": {4: 16.0, 8: 1.0}},
        output_sq={"fc": 4.0},
        num_samples=2,
    )
    assert stats.scores() == {"fc": {"w": {4: 3.0, 8: 0.5}, "a": {4: 4.0, 8: 1.0}}}
    assert stats.scores(transform="normalized") == {"fc": {"w": {4: 1.5, 8: 0.25}, "a": {4: 2.0, 8: 0.5}}}
    packed = stats.as_tensor(["fc"], [4, 8])
    assert packed.tolist() == [9.0, 0.25, 16.0, 1.0, 4.0, 2.0]
    zero_output = OutputErrorStats(
        weight_sq={"fc": {4: 9.0}}, act_sq={"fc": {4: 0.0}}, output_sq={"fc": 0.0}, num_samples=1
    )
    assert zero_output.scores(transform="normalized") == {"fc": {"w": {4: 3.0}, "a": {4: 0.0}}}


def test_probe_requires_calibrated_observers():
    model = mlp()
    quantize_model(model, QuantSettings())
    with pytest.raises(RuntimeError, match="calibration"):
        probe_output_error(model, make_batches("mlp"), CANDIDATES)


def test_subsampled_positions_estimate_the_full_sums():
    """Every 2nd row/column (or token): an unbiased estimate, here within 10 % of the exact sums."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=1, padding=1))
    quantize_model(model, QuantSettings())
    batches = [torch.randn(4, 3, 24, 24) for _ in range(2)]
    set_mode(model, weights="off", activations="observe")
    for x in batches:
        model(x)
    set_mode(model, weights="off", activations="off")
    exact = probe_output_error(model, batches, CANDIDATES)
    estimate = probe_output_error(model, batches, CANDIDATES, subsample=2)
    for name in exact.weight_sq:
        assert estimate.output_sq[name] == pytest.approx(exact.output_sq[name], rel=1e-6)
        for b in CANDIDATES:
            assert estimate.weight_sq[name][b] == pytest.approx(exact.weight_sq[name][b], rel=0.1)
            assert estimate.act_sq[name][b] == pytest.approx(exact.act_sq[name][b], rel=0.1)
    with pytest.raises(ValueError, match="subsample"):
        probe_output_error(model, batches, CANDIDATES, subsample=0)


def test_subsampled_tokens_for_a_linear_over_tokens():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 16))
    quantize_model(model, QuantSettings())
    batches = [torch.randn(3, 50, 16)]
    set_mode(model, weights="off", activations="observe")
    model(batches[0])
    set_mode(model, weights="off", activations="off")
    exact = probe_output_error(model, batches, CANDIDATES)
    estimate = probe_output_error(model, batches, CANDIDATES, subsample=2)
    for b in CANDIDATES:
        assert estimate.weight_sq["0"][b] == pytest.approx(exact.weight_sq["0"][b], rel=0.15)
        assert estimate.act_sq["0"][b] == pytest.approx(exact.act_sq["0"][b], rel=0.15)
