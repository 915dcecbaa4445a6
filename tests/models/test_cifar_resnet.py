"""CIFAR ResNets: architecture, option-A shortcuts, and the shared pretrained weights (strict load, exact top-1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lit_mpq.models import backbone_input_size, create_backbone, list_backbones
from lit_mpq.models.cifar_resnet import BasicBlock, CifarResNet, PadShortcut

# README of shared/data: parameters (millions, 2 decimals) and blocks per stage of each depth.
EXPECTED = {20: (0.27, 3), 32: (0.46, 5), 44: (0.66, 7), 56: (0.85, 9)}


def test_registered_names():
    assert {f"cifar_resnet{d}" for d in EXPECTED} <= set(list_backbones())


@pytest.mark.parametrize("depth", sorted(EXPECTED))
def test_architecture(depth):
    model = create_backbone(f"cifar_resnet{depth}")
    params_m, blocks = EXPECTED[depth]
    assert isinstance(model, CifarResNet)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [blocks] * 3
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 * blocks + 1 and all(c.bias is None for c in convs)  # + linear = 6n + 2 layers
    assert model.default_input_size == (3, 32, 32) == backbone_input_size(model)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", sorted(EXPECTED))
def test_shared_weights_load_strictly(depth, shared_data):
    state = torch.load(shared_data / f"cifar10_resnet{depth}.pt", map_location="cpu", weights_only=True)
    model = create_backbone(f"cifar_resnet{depth}")
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_resnet20_top1_on_lossless_1k(shared_data):
    """915/1000 on cifar10_test_1k_lossless.npz with ImageNet normalization, as the shared README reports."""
    model = create_backbone(
        "cifar_resnet20", pretrained=True, checkpoint_path=str(shared_data / "cifar10_resnet20.pt")
    ).eval()
    data = np.load(shared_data / "cifar10_test_1k_lossless.npz")
    # independent preprocessing in NumPy: RGB in [0, 1], then ImageNet mean/std, HWC -> CHW
    x = data["images"].astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(500)])
    assert int((pred == torch.from_numpy(data["labels"])).sum()) == 915


def test_option_a_shortcut_pads_channels_and_subsamples():
    shortcut = PadShortcut(16, 32, stride=2)
    assert not list(shortcut.parameters()) and not list(shortcut.buffers())
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # (32 - 16) / 2 = 8 zero channels on each side
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0
    with pytest.raises(ValueError, match="even"):
        PadShortcut(16, 33)


def test_shortcuts_are_parameter_free():
    model = create_backbone("cifar_resnet20")
    downsampling = [b for b in model.modules() if isinstance(b, BasicBlock) and isinstance(b.shortcut, PadShortcut)]
    assert len(downsampling) == 2  # first block of layer2 and layer3
    for block in model.modules():
        if isinstance(block, BasicBlock):
            assert not any(isinstance(m, nn.Conv2d) for m in block.shortcut.modules())
            assert not list(block.shortcut.parameters())
    block = model.layer2[0]
    assert block(torch.randn(1, 16, 32, 32)).shape == (1, 32, 16, 16)


def test_num_classes():
    model = create_backbone("cifar_resnet56", num_classes=100)
    assert model.linear.out_features == 100
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("cifar_resnet20", num_classes=0)
