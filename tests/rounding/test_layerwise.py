"""round_model on small fake-quantized networks, against literal per-layer re-implementations.

The references below do by hand what GPFQ and GPTQ prescribe for a whole network: walk the layers in order, feed
each the float network's inputs ``X`` and the quantized network's inputs ``X~`` (earlier layers already rounded, the
layer's own input quantized), and round that layer with the paper's update (the ``paper_gpfq`` fixture) or
with GPTQ on ``X~ᵀ X~``. ``round_model`` must give the same weights, whichever way it walks the model (one pass in
lockstep, or a pass per layer).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lit_mpq.deploy.checkpoint import QuantizedExportError, quantized_weight
from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import QuantSettings, apply_plan, measure_model, quant_layers, quantize_model, set_mode
from lit_mpq.quant.functional import quant_range
from lit_mpq.quant.weights import weight_qparams
from lit_mpq.rounding import Grid, RoundingCache, RoundingSettings, gptq_round, round_model
from lit_mpq.rounding.layerwise import column_order, im2col, input_columns

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(6, 16), act=nn.ReLU(), fc2=nn.Linear(16, 12), act2=nn.ReLU(), fc3=nn.Linear(12, 4))
    )


def cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(3, 8, 3, padding=1),
            act1=nn.ReLU(),
            depthwise=nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
            act2=nn.ReLU(),
            grouped=nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
            flat=nn.Flatten(),
            head=nn.Linear(8 * 4 * 4, 10),
        )
    )


def prepared(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor], w_bits: int, a_bits: int):
    """``model`` fake-quantized, calibrated on ``batches`` and set to ``W{w_bits}A{a_bits}`` everywhere."""
    quantize_model(model, QuantSettings(weight_observer="minmax", act_observer="minmax"))
    plan: QuantPlan = measure_model(model, example)
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        for x in batches:
            model(x)
    plan.set_bits({name: (w_bits, a_bits) for name in plan.names})
    apply_plan(model, plan)
    return model


def mlp_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(6, 6, generator=generator)
    return [torch.randn(32, 6, generator=generator) @ mixing for _ in range(3)]


def _grid_of(layer, bits: int) -> np.ndarray:
    scale, zero_point = weight_qparams(layer.weight, bits, True, True, "minmax")
    return scale.double().numpy(), zero_point.numpy()


def reference_gpfq_mlp(
    paper_gpfq, float_model: nn.Sequential, quant_model: nn.Sequential, batches, bits: int
) -> tuple[dict, dict]:
    """Literal GPFQ over the MLP: layer by layer, neuron by neuron, with explicit X and X~ (float64 numpy).

    Returns the rounded weights and each layer's input drift ``||W X - W X~||² / ||W X||²``.
    """
    x = torch.cat(batches)
    layers = quant_layers(quant_model)
    float_in = x
    quant_in = x
    rounded, drift = {}, {}
    for name in ("fc1", "fc2", "fc3"):
        layer = layers[name]
        x_float = float_in.double().numpy()
        x_quant = layer.input_quantizer(quant_in).double().numpy()  # this layer's own input quantization
        scale, _ = _grid_of(layer, bits)
        qmin, qmax = quant_range(bits, True)
        weight = layer.weight.detach().double().numpy()
        drift[name] = np.sum((x_float @ weight.T - x_quant @ weight.T) ** 2) / np.sum((x_float @ weight.T) ** 2)
        q = np.stack(
            [
                paper_gpfq(weight[r], x_float, x_quant, np.arange(qmin, qmax + 1) * scale[r])
                for r in range(weight.shape[0])
            ]
        )
        rounded[name] = q
        float_layer = getattr(float_model, name)
        float_out = float_layer(float_in)
        quant_out = torch.from_numpy(x_quant).float() @ torch.from_numpy(q).float().T + layer.bias.detach()
        if name != "fc3":
            float_out, quant_out = F.relu(float_out), F.relu(quant_out)
        float_in, quant_in = float_out.detach(), quant_out.detach()
    return rounded, drift


def test_round_model_gpfq_equals_the_literal_layer_by_layer_algorithm(paper_gpfq):
    batches = mlp_batches()
    float_model = mlp()
    model = prepared(mlp(), batches[0][:1], batches, w_bits=3, a_bits=4)
    records = round_model(model, batches, RoundingSettings(method="gpfq"))
    reference, drift = reference_gpfq_mlp(paper_gpfq, float_model, model, batches, bits=3)
    for name, layer in quant_layers(model).items():
        got = layer.weight_quantizer.rounded[3][1].double().numpy()
        np.testing.assert_allclose(got, reference[name], atol=1e-5, err_msg=name)
    assert [r.name for r in records] == ["fc1", "fc2", "fc3"]
    for record in records:  # 4-bit inputs: fc1's drift is its own input quantization, later ones add the upstream's
        assert record.input_drift == pytest.approx(drift[record.name], rel=1e-4), record.name
    assert records[0].input_drift < records[2].input_drift


def test_round_model_gptq_equals_gptq_on_the_quantized_networks_inputs():
    batches = mlp_batches()
    model = prepared(mlp(), batches[0][:1], batches, w_bits=3, a_bits=4)
    round_model(model, batches, RoundingSettings(method="gptq"))
    x = torch.cat(batches)
    layers = quant_layers(model)
    inputs = x
    for name in ("fc1", "fc2", "fc3"):
        layer = layers[name]
        x_quant = layer.input_quantizer(inputs).double()
        scale, zero_point = weight_qparams(layer.weight, 3, True, True, "minmax")
        grid = Grid.from_qparams(scale, zero_point, -4, 3, groups=1, rows=layer.weight.shape[0])
        expected = gptq_round(layer.weight.detach().double()[None], (x_quant.T @ x_quant)[None], grid)[0]
        got = layer.weight_quantizer.rounded[3][1].double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)
        with torch.no_grad():
            inputs = layer(inputs)  # the layer as the model now runs it: rounded weight, quantized input
            if name != "fc3":
                inputs = F.relu(inputs)


@pytest.mark.parametrize("method", ["gptq", "gpfq"])
def test_lockstep_walk_equals_a_pass_per_layer_on_grouped_and_depthwise_convolutions(method):
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(5, 3, 8, 8, generator=generator) for _ in range(3)]
    lockstep = prepared(cnn(), batches[0][:1], batches, w_bits=4, a_bits=6)
    per_layer = copy.deepcopy(lockstep)
    round_model(lockstep, batches, RoundingSettings(method=method))
    # A second call of the stem per forward (its output discarded) forces the pass-per-layer walk.
    stem = per_layer.stem
    original_forward = per_layer.forward

    def forward_calling_the_stem_twice(x):
        stem(x)
        return original_forward(x)

    per_layer.forward = forward_calling_the_stem_twice
    round_model(per_layer, batches, RoundingSettings(method=method))
    for (name, a), (_, b) in zip(quant_layers(lockstep).items(), quant_layers(per_layer).items(), strict=True):
        if name == "stem":
            continue  # saw its inputs twice per image in the second model
        torch.testing.assert_close(a.weight_quantizer.rounded[4][1], b.weight_quantizer.rounded[4][1], msg=name)


@pytest.mark.parametrize("method", ["gptq", "gpfq", "adaround"])
def test_rounding_lowers_the_networks_output_error_and_stays_on_the_grid(method):
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(16, 3, 8, 8, generator=generator) for _ in range(4)]
    model = prepared(cnn(), batches[0][:1], batches, w_bits=3, a_bits=8)
    float_model = cnn()
    x = torch.cat(batches)
    with torch.no_grad():
        reference = float_model(x)
        nearest_error = (model(x) - reference).norm()
        records = round_model(model, batches, RoundingSettings(method=method, adaround_iterations=1000))
        rounded_error = (model(x) - reference).norm()
    assert rounded_error < 0.8 * nearest_error
    assert [r.name for r in records] == ["stem", "depthwise", "grouped", "head"]
    assert all(r.error_rounded <= r.error_nearest for r in records)
    for name, layer in quant_layers(model).items():
        scale, _ = weight_qparams(layer.weight, 3, True, True, "minmax")
        levels = layer.weight_quantizer.rounded[3][1] / scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0, msg=name)
        assert levels.round().min() >= -4 and levels.round().max() <= 3


def test_round_model_with_scale_fit_lowers_each_layers_gpfq_error():
    batches = mlp_batches()
    plain = prepared(mlp(), batches[0][:1], batches, w_bits=3, a_bits=4)
    fitted = prepared(mlp(), batches[0][:1], batches, w_bits=3, a_bits=4)
    # float upstream: both runs round each layer from the same inputs, so the errors compare layer by layer
    before = round_model(plain, batches, RoundingSettings(method="gpfq", upstream="float"))
    after = round_model(fitted, batches, RoundingSettings(method="gpfq", upstream="float", scale_fit=1))
    for old, new in zip(before, after, strict=True):
        assert new.error_rounded <= old.error_rounded + 1e-12, new.name
    assert any(new.error_rounded < old.error_rounded for old, new in zip(before, after, strict=True))
    with pytest.raises(ValueError, match="scale_fit must be"):
        RoundingSettings(method="gpfq", scale_fit=-1)
    for name, layer in quant_layers(fitted).items():  # off the quantizer's own grid: packing refuses it
        with pytest.raises(QuantizedExportError, match="not exactly"):
            quantized_weight(name, layer, 3)


def test_nearest_clears_the_rounding_and_a_changed_weight_falls_back_with_a_warning():
    batches = mlp_batches()
    model = prepared(mlp(), batches[0][:1], batches, w_bits=3, a_bits=8)
    x = torch.cat(batches)
    with torch.no_grad():
        nearest = model(x)
        round_model(model, batches, RoundingSettings(method="gptq"))
        rounded = model(x)
        assert not torch.equal(nearest, rounded)
        round_model(model, batches, RoundingSettings(method="nearest"))
        torch.testing.assert_close(model(x), nearest, rtol=0, atol=0)
        round_model(model, batches, RoundingSettings(method="gptq"))
        model.fc1.weight.add_(1e-3)
        with pytest.warns(UserWarning, match="changed after it was rounded"):
            model(x)


def test_bias_correction_follows_the_rounded_weight():
    batches = mlp_batches()
    model = mlp()
    quantize_model(model, QuantSettings(bias_correction=True))
    plan = measure_model(model, batches[0][:1])
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        for x in batches:
            model(x)
    plan.set_bits({name: (3, None) for name in plan.names})
    apply_plan(model, plan)
    x = torch.cat(batches)
    with torch.no_grad():
        model(x)  # caches the nearest-rounding correction
        round_model(model, batches, RoundingSettings(method="gptq"))
        fc1 = model.fc1
        rounded = fc1.weight_quantizer.rounded[3][1]
        mean = torch.cat(batches).mean(dim=0)
        expected = F.linear(x, rounded, fc1.bias) + (fc1.weight - rounded) @ mean
        torch.testing.assert_close(fc1(x), expected, atol=1e-5, rtol=1e-5)


def test_a_sweep_reuses_roundings_whose_inputs_did_not_change():
    batches = mlp_batches()
    model = prepared(mlp(), batches[0][:1], batches, w_bits=4, a_bits=8)
    cache = RoundingCache()
    first = round_model(model, batches, RoundingSettings(method="gpfq"), cache=cache)
    assert not any(r.reused for r in first)
    model.fc3.weight_quantizer.bits = 3  # only the last layer changes: the two before keep their rounding
    second = round_model(model, batches, RoundingSettings(method="gpfq"), cache=cache)
    assert [r.reused for r in second] == [True, True, False]
    model.fc1.input_quantizer.bits = 6  # everything after fc1's input changes
    third = round_model(model, batches, RoundingSettings(method="gpfq"), cache=cache)
    assert [r.reused for r in third] == [False, False, False]
    floats = round_model(model, batches, RoundingSettings(method="gptq", upstream="float"), cache=cache)
    model.fc1.input_quantizer.bits = 8
    again = round_model(model, batches, RoundingSettings(method="gptq", upstream="float"), cache=cache)
    assert [r.reused for r in floats] == [False, False, False]
    assert [r.reused for r in again] == [False, True, True]  # with float upstream, only fc1's own widths matter


def test_im2col_equals_unfold():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 9, 7, generator=generator)
    for kernel, padding, stride, dilation in [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (2, 0), (2, 1), (2, 1))]:
        expected = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
        got = im2col(x, kernel, padding, stride, dilation)
        order = column_order(nn.Conv2d(4, 1, kernel))
        torch.testing.assert_close(got[:, order], expected.reshape(-1, expected.shape[-1]), rtol=0, atol=0)
    conv = prepared(
        nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 6, 3, padding=1, groups=2))), x[:1], [x], w_bits=8, a_bits=8
    ).conv
    cols = input_columns(conv, x)
    assert cols.shape == (2, 2 * 9 * 7, 2 * 9)
    for group in range(2):  # each group sees its own two input channels, columns like its flattened kernel slice
        expected = F.unfold(x[:, 2 * group : 2 * group + 2], 3, padding=1).transpose(1, 2).reshape(-1, 18)
        torch.testing.assert_close(cols[group][:, column_order(conv)], expected, rtol=0, atol=0)
    assert column_order(nn.Linear(3, 2)) is None and column_order(nn.Conv2d(4, 2, 1)) is None


def test_settings_are_checked():
    with pytest.raises(ValueError, match="rounding method must be one of"):
        RoundingSettings(method="brecq")
    with pytest.raises(ValueError, match="adaround_iterations must be a positive integer"):
        RoundingSettings(method="adaround", adaround_iterations=0)
    with pytest.raises(ValueError, match="adaround_regularization must be >= 0"):
        RoundingSettings(method="adaround", adaround_regularization=-0.1)
    with pytest.raises(ValueError, match="upstream must be one of"):
        RoundingSettings(upstream="both")
    with pytest.raises(ValueError, match="alphabet_scalar is GPFQ's"):
        RoundingSettings(method="gptq", alphabet_scalar=2.0)
    with pytest.raises(ValueError, match="damp must be"):
        RoundingSettings(damp=-1)


def test_adaround_on_the_quantized_target_lowers_each_layers_gptq_error():
    batches = mlp_batches()
    model = prepared(mlp(), batches[0][:1], batches, w_bits=3, a_bits=4)
    settings = RoundingSettings(method="adaround", adaround_target="quantized", adaround_iterations=1000)
    records = round_model(model, batches, settings)
    assert [r.name for r in records] == ["fc1", "fc2", "fc3"]
    assert all(r.input_drift is None for r in records)  # GPTQ's objective: the float network is never run
    assert all(r.error_rounded < r.error_nearest for r in records)
    with pytest.raises(ValueError, match="adaround_target must be one of"):
        RoundingSettings(method="adaround", adaround_target="both")


class ThreadAllReduce:
    """A sum across ``ranks`` threads, each calling its own ``reducer(rank)`` in the same order (what DDP does)."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks)
        self.slots: list[torch.Tensor | None] = [None] * ranks

    def reducer(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # the same order on every rank: identical sums
            self.barrier.wait()
            return total

        return reduce


@pytest.mark.parametrize(
    "settings",
    [
        RoundingSettings(method="gptq"),
        RoundingSettings(method="gpfq"),
        RoundingSettings(method="adaround", adaround_iterations=500),
        RoundingSettings(method="adaround", adaround_target="quantized", adaround_iterations=500),
    ],
    ids=["gptq", "gpfq", "adaround", "adaround_quantized_target"],
)
def test_two_ranks_each_rounding_half_the_images_hold_the_same_weights_as_one(settings):
    batches = mlp_batches() + mlp_batches()[:1]  # four batches: two per rank
    single = prepared(mlp(), batches[0][:1], batches, w_bits=3, a_bits=4)
    ranks = [copy.deepcopy(single) for _ in range(2)]
    round_model(single, batches, settings)
    all_reduce = ThreadAllReduce(2)
    errors: list[BaseException] = []

    def rank_job(rank: int) -> None:
        try:
            round_model(ranks[rank], batches[2 * rank : 2 * rank + 2], settings, reduce=all_reduce.reducer(rank))
        except BaseException as exc:  # surfaced below: a failing thread must fail the test
            errors.append(exc)
            all_reduce.barrier.abort()

    threads = [threading.Thread(target=rank_job, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name, layer in quant_layers(single).items():
        rank0, rank1 = (quant_layers(model)[name].weight_quantizer.rounded[3][1] for model in ranks)
        assert torch.equal(rank0, rank1), name  # every rank holds the same weights, bit for bit
        # Against one process the sums differ only in their order (last bits of float64), which moves no weight here.
        torch.testing.assert_close(rank0, layer.weight_quantizer.rounded[3][1], rtol=0, atol=1e-6, msg=name)
