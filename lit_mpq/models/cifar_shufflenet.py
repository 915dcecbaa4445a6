"""CIFAR-10 ShuffleNetV2 0.5x: torchvision's ShuffleNetV2 with a CIFAR stem (3x3 stride-1 convolution, no max-pool).

The layout of ``chenyaofo/pytorch-cifar-models`` (``cifar10_shufflenetv2_x0_5``): torchvision's stages ``[4, 8, 4]``
and channels ``[24, 48, 96, 192, 1024]``, module names unchanged (``stage2.0.branch1.0.weight`` ...), so the shared
``cifar10_shufflenetv2_x0_5.pt`` loads with ``strict=True``. Its depthwise and grouped convolutions and channel
shuffles are what a ResNet does not exercise. Those weights were trained with the CIFAR-10 mean and the commonly
used standard deviation (0.2023, 0.1994, 0.2010); :data:`CIFAR_SHUFFLENET_DATA_CONFIG` says so.

Reference:
    N. Ma, X. Zhang, H.-T. Zheng, J. Sun. "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
    Design", ECCV 2018, arXiv:1807.11164.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import ShuffleNetV2

from lit_mpq.models.registry import register_backbone

__all__ = ["CIFAR_SHUFFLENET_DATA_CONFIG", "cifar_shufflenetv2_x0_5"]

CIFAR_SHUFFLENET_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2023, 0.1994, 0.2010),  # chenyaofo's trainer (shared/data/README.md), not the exact CIFAR std
    "crop_pct": 1.0,
    "crop_mode": "center",
}
"""Evaluation preprocessing of the CIFAR ShuffleNetV2 (keys of ``timm.data.create_transform``)."""


@register_backbone("cifar_shufflenetv2_x0_5", data_config=CIFAR_SHUFFLENET_DATA_CONFIG)
def cifar_shufflenetv2_x0_5(num_classes: int = 10) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 0.5x (0.35M parameters with 10 classes)."""
    model = ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024], num_classes=num_classes)
    model.conv1 = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
    model.maxpool = nn.Identity()
    model.default_input_size = (3, 32, 32)  # read by lit_mpq.models.backbone_input_size
    return model
