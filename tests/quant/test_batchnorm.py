"""BatchNorm folding: the folded model computes what the original did, and the folded kernel is the textbook one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_mpq.models import create_backbone
from lit_mpq.quant.batchnorm import BatchNormFoldError, batchnorm_pairs, fold_batchnorm


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from the identity, so that an unfolded or misfolded BN shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)


def test_folded_kernel_and_bias_are_the_textbook_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    randomize_batchnorms(model)
    conv, bn = model[0], model[1]
    std = torch.sqrt(bn.running_var + bn.eps)
    expected_weight = conv.weight.detach() * (bn.weight.detach() / std).reshape(-1, 1, 1, 1)
    expected_bias = bn.bias.detach() - bn.weight.detach() * bn.running_mean / std
    assert fold_batchnorm(model, torch.zeros(1, 3, 8, 8)) == [("0", "1")]
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model[0].weight.detach(), expected_weight)
    torch.testing.assert_close(model[0].bias.detach(), expected_bias)


@pytest.mark.parametrize(
    "name,size,expected",
    [("cifar_resnet20", 32, 19), ("torchvision:resnet18", 64, 20), ("torchvision:mobilenet_v2", 64, 52)],
)
def test_every_batchnorm_of_a_cnn_folds_and_the_output_is_unchanged(name, size, expected):
    model = create_backbone(name, num_classes=10).eval()
    randomize_batchnorms(model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    pairs = fold_batchnorm(model, torch.zeros(1, 3, size, size))
    assert len(pairs) == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)


def test_timm_batchnorm_with_a_fused_activation_keeps_the_activation():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act_layer=nn.SiLU)).eval()
    randomize_batchnorms(model)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        reference = model(x)
    fold_batchnorm(model, x)
    assert any(isinstance(m, nn.SiLU) for m in model[1].modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)


class TwoUsers(nn.Module):
    """The convolution's output feeds its BatchNorm and, unnormalized, a second branch: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_layer_whose_output_is_also_used_elsewhere_is_refused_and_the_model_restored():
    model = TwoUsers().eval()
    randomize_batchnorms(model)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        reference = model(x)
    assert batchnorm_pairs(model, x) == [("conv", "bn")]
    with pytest.raises(BatchNormFoldError, match="nothing was folded"):
        fold_batchnorm(model, x)
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_linear_followed_by_batchnorm1d_folds():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).eval()
    randomize_batchnorms(model)
    x = torch.randn(4, 5)
    with torch.no_grad():
        reference = model(x)
    assert fold_batchnorm(model, x) == [("0", "1")]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)


def test_models_without_batchnorm_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    assert fold_batchnorm(model, torch.zeros(1, 3, 4, 4)) == []
