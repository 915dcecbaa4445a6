"""CIFAR ResNet-20/32/44/56 (He et al., 2016, Sec. 4.2) with parameter-free "option A" shortcuts.

The network has ``6n + 2`` layers: a 3x3 stem convolution with 16 channels, three stages of ``n`` basic blocks with
16, 32 and 64 channels (the first block of stages 2 and 3 halves the resolution), global average pooling and a
linear classifier. Where a block changes shape, the shortcut subsamples the input with stride 2 and zero-pads the new
channels (``(cout - cin) / 2`` on each side), so shortcuts carry no weights and never appear among the layers that
get quantized.

Module names match the state_dict layout of ``akamaster/pytorch_resnet_cifar10`` (``conv1``, ``bn1``,
``layer1.0.conv1`` ... ``linear``), so the shared ``cifar10_resnet{20,32,44,56}.pt`` files load with ``strict=True``.
Those weights were trained on 32x32 images normalized with the ImageNet statistics; the registered
:data:`CIFAR_RESNET_DATA_CONFIG` says so, so an image folder is fed the same way (no ImageNet resize-and-crop).

Reference:
    K. He, X. Zhang, S. Ren, J. Sun. "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.models.registry import register_backbone

__all__ = [
    "CIFAR_RESNET_DATA_CONFIG",
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
]

CIFAR_RESNET_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    # What akamaster/pytorch_resnet_cifar10's trainer used (shared/data/README.md), not the CIFAR statistics.
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    # CIFAR images are the whole 32x32 frame: resize to the input size and keep it all (no ImageNet 0.875 crop).
    "crop_pct": 1.0,
    "crop_mode": "center",
}
"""Evaluation preprocessing of the CIFAR ResNets (keys of ``timm.data.create_transform``)."""


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: spatial subsampling plus zero-padding of channels.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output; ``out_channels - in_channels`` must be even and non-negative.
        stride: Spatial subsampling factor (``x[:, :, ::stride, ::stride]``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        extra = out_channels - in_channels
        if extra < 0 or extra % 2:
            raise ValueError(
                f"PadShortcut needs out_channels - in_channels to be even and >= 0, got {in_channels}->{out_channels}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.pad = extra // 2

    def forward(self, x: Tensor) -> Tensor:
        """Subsample ``x`` spatially and zero-pad its channels."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad), mode="constant", value=0.0)

    def extra_repr(self) -> str:
        """Show the channel change and stride in ``print(model)``."""
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (and of the shortcut when it is not the identity).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``6n + 2`` layers.

    Args:
        num_blocks: Basic blocks in each of the three stages (``n``); 3, 5, 7, 9 give ResNet-20/32/44/56.
        num_classes: Output classes.
    """

    default_input_size: tuple[int, int, int] = (3, 32, 32)

    def __init__(self, num_blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.in_planes = 16
        self.layer1 = self._make_layer(16, num_blocks, stride=1)
        self.layer2 = self._make_layer(32, num_blocks, stride=2)
        self.layer3 = self._make_layer(64, num_blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``[N, num_classes]`` for images of shape ``[N, 3, H, W]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


def _resnet(depth: int, num_classes: int) -> CifarResNet:
    assert (depth - 2) % 6 == 0, depth
    return CifarResNet((depth - 2) // 6, num_classes=num_classes)


@register_backbone("cifar_resnet20", data_config=CIFAR_RESNET_DATA_CONFIG)
def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters with 10 classes)."""
    return _resnet(20, num_classes)


@register_backbone("cifar_resnet32", data_config=CIFAR_RESNET_DATA_CONFIG)
def cifar_resnet32(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-32 (0.46M parameters with 10 classes)."""
    return _resnet(32, num_classes)


@register_backbone("cifar_resnet44", data_config=CIFAR_RESNET_DATA_CONFIG)
def cifar_resnet44(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-44 (0.66M parameters with 10 classes)."""
    return _resnet(44, num_classes)


@register_backbone("cifar_resnet56", data_config=CIFAR_RESNET_DATA_CONFIG)
def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56 (0.85M parameters with 10 classes)."""
    return _resnet(56, num_classes)
