"""probe_fisher and probe_end_to_end against brute-force recomputations on a float nn.Sequential.

Fisher: with ``x_l`` the float input of layer ``l`` and ``g_l = dL/dx_l`` (``L`` = summed cross-entropy against the
float model's own argmax), the activation score is ``sum (g_l * (Q_b(x_l) - x_l))^2`` over the batches, and the
weight score ``sum_batches sum (dL/dW * (Q_b(W) - W))^2``. End to end: ``sum KL(p_float || p_quant)`` with only
that layer's weights (or input) fake-quantized, rebuilt here with ``torch.fake_quantize_*`` on a copy.
"""

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lit_mpq.quant.apply import QuantSettings, quant_layers, quantize_model, set_mode
from lit_mpq.quant.functional import quant_range
from lit_mpq.sensitivity import probe_end_to_end, probe_fisher

CANDIDATES = [2, 4, 8]


pytestmark = pytest.mark.usefixtures("single_thread")


def setup():
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    model = copy.deepcopy(float_model)
    quantize_model(model, QuantSettings())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 6, generator=gen) for _ in range(3)]
    set_mode(model, weights="off", activations="observe")
    for x in batches:
        model(x)
    set_mode(model, weights="off", activations="off")
    return float_model, model, batches


def fq_weight(layer_q, weight, bits):
    scale, zp = layer_q.weight_quantizer.qparams(weight, bits)
    qmin, qmax = quant_range(bits, True)
    return torch.fake_quantize_per_channel_affine(weight, scale, zp.int(), 0, qmin, qmax)


def fq_input(layer_q, x, bits):
    scale, zp = layer_q.input_quantizer.observer.qparams(bits)
    qmin, qmax = quant_range(bits, False)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)


def test_fisher_equals_brute_force():
    float_model, model, batches = setup()
    stats = probe_fisher(model, batches, CANDIDATES)
    qlayers = list(quant_layers(model).values())
    names = list(quant_layers(model))
    linear_idx = [0, 2, 4]
    expected_a = {n: dict.fromkeys(CANDIDATES, 0.0) for n in names}
    expected_w = {n: dict.fromkeys(CANDIDATES, 0.0) for n in names}
    for batch in batches:
        ref = copy.deepcopy(float_model)
        inputs = []
        h = batch
        for i, module in enumerate(ref):
            if i in linear_idx:
                h = h.detach().requires_grad_(True) if i == 0 else h
                h.retain_grad()
                inputs.append(h)
            h = module(h)
        loss = F.cross_entropy(h, h.detach().argmax(-1), reduction="sum")
        loss.backward()
        for k, (name, idx) in enumerate(zip(names, linear_idx, strict=True)):
            x, g = inputs[k].detach(), inputs[k].grad
            weight, g_w = ref[idx].weight.detach(), ref[idx].weight.grad
            for b in CANDIDATES:
                expected_a[name][b] += float(((g * (fq_input(qlayers[k], x, b) - x)) ** 2).sum())
                expected_w[name][b] += float(((g_w * (fq_weight(qlayers[k], weight, b) - weight)) ** 2).sum())
    assert stats.num_samples == 15
    for name in names:
        for b in CANDIDATES:
            assert stats.act_sq[name][b] == pytest.approx(expected_a[name][b], rel=1e-4)
            assert stats.weight_sq[name][b] == pytest.approx(expected_w[name][b], rel=1e-4)
        assert stats.weight_sq[name][2] > stats.weight_sq[name][8]
    # Gradients and flags are left as they were.
    assert all(p.grad is None for p in model.parameters())


def test_fisher_works_inside_inference_mode():
    _, model, batches = setup()
    expected = probe_fisher(model, batches, CANDIDATES)
    with torch.inference_mode():
        inside = probe_fisher(model, [b.clone() for b in batches], CANDIDATES)
    for name in expected.act_sq:
        assert inside.act_sq[name] == pytest.approx(expected.act_sq[name], rel=1e-6)


def test_end_to_end_kl_equals_brute_force():
    float_model, model, batches = setup()
    stats = probe_end_to_end(model, batches, CANDIDATES)
    names = list(quant_layers(model))
    qlayers = list(quant_layers(model).values())
    linear_idx = [0, 2, 4]
    with torch.no_grad():
        reference = [F.log_softmax(float_model(x).double(), -1) for x in batches]
        for k, (name, idx) in enumerate(zip(names, linear_idx, strict=True)):
            for b in CANDIDATES:
                for kind in ("w", "a"):
                    ref = copy.deepcopy(float_model)
                    if kind == "w":
                        ref[idx].weight.copy_(fq_weight(qlayers[k], ref[idx].weight, b))
                    else:
                        layer = ref[idx]
                        ref[idx] = _QuantInput(layer, lambda x, k=k, b=b: fq_input(qlayers[k], x, b))
                    total = sum(
                        float(F.kl_div(F.log_softmax(ref(x).double(), -1), lp, log_target=True, reduction="sum"))
                        for x, lp in zip(batches, reference, strict=True)
                    )
                    got = (stats.weight_sq if kind == "w" else stats.act_sq)[name][b]
                    assert got == pytest.approx(total, rel=1e-6, abs=1e-12), (name, kind, b)
    # Quantizers are back off afterwards.
    assert all(q.mode == "off" for layer in qlayers for q in (layer.weight_quantizer, layer.input_quantizer))


class _QuantInput(nn.Module):
    def __init__(self, layer, fn):
        super().__init__()
        self.layer, self.fn = layer, fn

    def forward(self, x):
        return self.layer(self.fn(x))


def test_end_to_end_rows_probes_only_those_rows_with_the_full_probes_numbers():
    _, model, batches = setup()
    names = list(quant_layers(model))
    full = probe_end_to_end(model, batches, CANDIDATES)
    subset = probe_end_to_end(model, batches, CANDIDATES, rows=[names[1]])
    assert list(subset.weight_sq) == [names[1]] and list(subset.act_sq) == [names[1]]
    assert subset.weight_sq[names[1]] == full.weight_sq[names[1]]
    assert subset.act_sq[names[1]] == full.act_sq[names[1]]
    with pytest.raises(ValueError, match="no quantized row named"):
        probe_end_to_end(model, batches, CANDIDATES, rows=["not_a_layer"])
