"""Pin the MAC formula that LayerSpec.macs follows against torch's own FLOP counter (FLOPs = 2 * MACs).

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


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def conv_spec(name: str, conv: nn.Conv2d, x: torch.Tensor) -> LayerSpec:
    with torch.no_grad():
        out = conv(x)
    out_per_image = out[0].numel()
    kh, kw = conv.kernel_size
    macs = out_per_image * (conv.in_channels // conv.groups) * kh * kw
    return LayerSpec(
        name=name,
        kind="conv2d",
        params=conv.weight.numel(),
        macs=macs,
        act_in=x[0].numel(),
        act_out=out_per_image,
        weight_shape=tuple(conv.weight.shape),
    )


def linear_spec(name: str, linear: nn.Linear, x: torch.Tensor) -> LayerSpec:
    with torch.no_grad():
        out = linear(x)
    out_per_image = out[0].numel()
    macs = out_per_image * linear.in_features
    return LayerSpec(
        name=name,
        kind="linear",
        params=linear.weight.numel(),
        macs=macs,
        act_in=x[0].numel(),
        act_out=out_per_image,
        weight_shape=tuple(linear.weight.shape),
    )


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
    spec = conv_spec("conv", conv, x)
    assert spec.macs == expected_macs
    assert count_flops(conv, x) == 2 * spec.macs * batch


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
    spec = linear_spec("fc", linear, x)
    assert spec.macs == expected_macs
    assert count_flops(linear, x) == 2 * spec.macs * batch


def test_energy_uses_the_pinned_macs():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    spec = conv_spec("conv", conv, torch.randn(1, 3, 32, 32))
    # 442368 MAC * 0.23 pJ = 101744.64 pJ
    assert HorowitzEnergyModel().layer(spec, 8, 8).mac_pj == pytest.approx(101_744.64)
