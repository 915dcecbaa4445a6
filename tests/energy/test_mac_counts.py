"""The MACs that ``measure_layers`` records, against torch's own FLOP counter (FLOPs = 2 * MACs) and hand counts.

Conv2d: MACs per image = output elements per image * (in_channels / groups) * kh * kw.
Linear: MACs per image = output elements per image * in_features (tokens included for (N, T, D) inputs).
Biases are not counted, as in FlopCounterMode.
"""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_mpq.energy import HorowitzEnergyModel
from lit_mpq.plan import LayerSpec
from lit_mpq.quant.apply import QuantSettings, measure_layers, quantize_model


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def measured_spec(layer: nn.Module, x: torch.Tensor) -> LayerSpec:
    """The product's own measurement: quantize a one-layer model and measure it with a batch of ``x``."""
    model = nn.Sequential(layer)
    quantize_model(model, QuantSettings())
    (spec,) = measure_layers(model, x)
    return spec


@pytest.mark.parametrize(
    ("conv", "shape", "expected_macs"),
    [
        # ResNet-20 stem: 16 * 32 * 32 outputs * 3 * 3 * 3 = 442368
        (nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32), 442_368),
        # strided, no padding, no bias: out 8 x 15 x 15 = 1800 outputs * 4 * 3 * 3 = 64800
        (nn.Conv2d(4, 8, 3, stride=2, bias=False), (4, 32, 32), 64_800),
        # depthwise: 16 * 8 * 8 = 1024 outputs * (16 / 16) * 3 * 3 = 9216
        (nn.Conv2d(16, 16, 3, padding=1, groups=16), (16, 8, 8), 9_216),
        # grouped, rectangular kernel: out 8 x 8 x 6 = 384 outputs * (8 / 4) * 1 * 3 = 2304
        (nn.Conv2d(8, 8, (1, 3), groups=4), (8, 8, 8), 2_304),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_macs_match_flop_counter(conv, shape, expected_macs, batch):
    x = torch.randn(batch, *shape)
    spec = measured_spec(conv, x)
    assert spec.macs == expected_macs
    assert count_flops(conv, x) == 2 * spec.macs * batch
    assert spec.params == conv.weight.numel() and spec.act_in == x[0].numel()


@pytest.mark.parametrize(
    ("linear", "shape", "expected_macs"),
    [
        (nn.Linear(64, 10), (64,), 640),  # 10 outputs * 64
        (nn.Linear(64, 10, bias=False), (64,), 640),
        (nn.Linear(192, 768), (197, 192), 29_048_832),  # ViT-Tiny MLP fc1: 197 tokens * 768 outputs * 192
    ],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_linear_macs_match_flop_counter(linear, shape, expected_macs, batch):
    x = torch.randn(batch, *shape)
    spec = measured_spec(linear, x)
    assert spec.macs == expected_macs
    assert count_flops(linear, x) == 2 * spec.macs * batch


def test_energy_uses_the_pinned_macs():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    spec = measured_spec(conv, torch.randn(1, 3, 32, 32))
    # 442368 MAC * 0.23 pJ = 101744.64 pJ
    assert HorowitzEnergyModel().layer(spec, 8, 8).mac_pj == pytest.approx(101_744.64)
