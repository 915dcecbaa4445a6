"""Cross-layer equalization: the paper's ranges, an unchanged float function, and only pairs that commute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_mpq.models import create_backbone
from lit_mpq.quant.batchnorm import fold_batchnorm
from lit_mpq.quant.equalization import equalization_pairs, equalize_cross_layer, input_channel_ranges
from tests.quant.test_batchnorm import randomize_batchnorms


def spread_channels(model: nn.Module, seed: int = 0) -> None:
    """Scale every layer's output channels by factors 0.01..10, so that equalization has something to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                factors = 10.0 ** (torch.rand(module.weight.shape[0], generator=generator) * 3 - 2)
                module.weight.mul_(factors.reshape(-1, *([1] * (module.weight.dim() - 1))))


def equalize_keeping_the_function(
    model: nn.Module, x: torch.Tensor, iterations: int, rtol: float, atol: float | None = None
) -> list[tuple[str, str]]:
    """Equalize ``model`` (pairs found on one random image of ``x``'s shape); assert its output on ``x`` is unchanged.

    ``atol`` None: ``rtol`` times the output's largest magnitude. Returns the equalized pairs.
    """
    with torch.no_grad():
        reference = model(x)
    pairs = equalize_cross_layer(model, torch.randn(1, *x.shape[1:]), iterations=iterations)
    atol = rtol * float(reference.abs().max()) if atol is None else atol
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=rtol, atol=atol)
    return pairs


class Block(nn.Module):
    """conv_a → ReLU → conv_b → ReLU6 → conv_c, plus conv_d whose output also feeds a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.relu_a = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv_b, self.relu6 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6()
        self.conv_c = nn.Conv2d(8, 8, 1)
        self.conv_d, self.relu_d = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.conv_e = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_c(self.relu6(self.conv_b(self.relu_a(self.conv_a(x)))))
        d = self.conv_d(y)
        return self.conv_e(self.relu_d(d)) + d[:, :4]  # conv_d's output is read twice


def test_only_pairs_joined_by_relus_and_read_once_are_found():
    model = Block().eval()
    # conv_b → ReLU6 → conv_c does not commute (ReLU6 clips at 6); conv_d → conv_e: conv_d's output is also added.
    assert equalization_pairs(model, torch.randn(2, 3, 8, 8) * 10) == [("conv_a", "conv_b"), ("conv_c", "conv_d")]


def test_equalized_ranges_are_the_geometric_mean_and_the_function_is_unchanged():
    model = create_backbone("cifar_resnet20", num_classes=10).eval()
    randomize_batchnorms(model)
    fold_batchnorm(model, torch.zeros(1, 3, 32, 32))
    spread_channels(model)
    before = {
        name: module.weight.detach().clone() for name, module in model.named_modules() if hasattr(module, "weight")
    }
    pairs = equalize_keeping_the_function(model, torch.randn(4, 3, 32, 32), iterations=1, rtol=1e-4)
    # Residual adds follow every conv2, so only the conv1 → ReLU → conv2 pair inside each of the 9 blocks qualifies.
    assert pairs == [(f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2") for s in (1, 2, 3) for b in range(3)]
    for first, second in pairs:
        r1 = before[first].abs().amax(dim=(1, 2, 3))  # output channel i of the first layer
        r2 = before[second].abs().amax(dim=(0, 2, 3))  # input channel i of the second
        expected = torch.sqrt(r1 * r2)  # Nagel et al. 2019, eq. 9: both ranges become sqrt(r1 r2)
        torch.testing.assert_close(model.get_submodule(first).weight.abs().amax(dim=(1, 2, 3)), expected)
        torch.testing.assert_close(model.get_submodule(second).weight.abs().amax(dim=(0, 2, 3)), expected)


def test_a_depthwise_separable_chain_converges_to_equal_ranges_on_both_pairs():
    model = nn.Sequential(
        nn.Conv2d(4, 12, 1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU(), nn.Conv2d(12, 6, 1)
    ).eval()
    spread_channels(model)
    pairs = equalize_keeping_the_function(model, torch.randn(3, 4, 8, 8), iterations=50, rtol=1e-4, atol=1e-5)
    assert pairs == [("0", "2"), ("2", "4")]
    for first, second in pairs:
        out_ranges = model.get_submodule(first).weight.abs().flatten(1).amax(dim=1)
        torch.testing.assert_close(out_ranges, input_channel_ranges(model.get_submodule(second)), rtol=1e-3, atol=0)


def test_input_channel_ranges_of_a_grouped_convolution_match_a_loop():
    conv = nn.Conv2d(6, 4, 3, groups=2)  # weight [4, 3, 3, 3]: outputs 0-1 read inputs 0-2, outputs 2-3 inputs 3-5
    expected = torch.stack([conv.weight[(c // 3) * 2 : (c // 3) * 2 + 2, c % 3].abs().max() for c in range(6)]).detach()
    torch.testing.assert_close(input_channel_ranges(conv), expected)


def test_mobilenet_pairs_skip_relu6_and_keep_the_function():
    model = create_backbone("torchvision:mobilenet_v2", num_classes=10).eval()
    randomize_batchnorms(model)
    fold_batchnorm(model, torch.zeros(1, 3, 64, 64))
    pairs = equalize_keeping_the_function(model, torch.randn(2, 3, 64, 64), iterations=2, rtol=1e-3)
    # Every ReLU6 blocks a pair, and so does a residual add: what is left is a block's projection feeding the next
    # block's expansion when neither block adds its input (blocks 1-2; 17 and the last 1x1 conv, features.18).
    assert pairs == [("features.1.conv.1", "features.2.conv.0.0"), ("features.17.conv.2", "features.18.0")]


def per_tensor_int8(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().max() / 127
    return torch.round(weight / scale).clamp(-127, 127) * scale


def test_equalization_lowers_the_per_tensor_weight_quantization_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    spread_channels(model[0])  # the first layer's channels span three decades: one per-tensor grid cannot fit them
    x = torch.randn(8, 3, 16, 16)

    def quantized_error(layers: list[int]) -> float:
        """Output MSE with the weights of ``layers`` on a per-tensor INT8 grid."""
        with torch.no_grad():
            reference = model(x)
            saved = [model[i].weight.detach().clone() for i in layers]
            for i in layers:
                model[i].weight.copy_(per_tensor_int8(model[i].weight))
            error = float((model(x) - reference).pow(2).mean())
            for i, weight in zip(layers, saved, strict=True):
                model[i].weight.copy_(weight)
        return error

    first_before, both_before = quantized_error([0]), quantized_error([0, 2])
    equalize_cross_layer(model, torch.randn(1, 3, 16, 16))
    # The first layer's small channels get most of its grid back; the second layer's range grows by what the first
    # gives up, so the pair's error falls by less than the first layer's alone.
    assert quantized_error([0]) < 0.2 * first_before
    assert quantized_error([0, 2]) < 0.5 * both_before


def test_zero_iterations_is_refused():
    with pytest.raises(ValueError, match="at least one iteration"):
        equalize_cross_layer(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2), iterations=0)
