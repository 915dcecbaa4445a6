"""CIFAR VGG-11 with BatchNorm: VGG's configuration "A" convolutions and one Linear classifier on 32x32 images.

The CIFAR form used by the mixed-precision papers the source projects reproduced (and by kuangliu/pytorch-cifar):
eight 3x3 convolutions, each followed by BatchNorm and ReLU, five 2x2 max-pools bringing 32x32 down to 1x1, and a
``Linear(512, num_classes)`` head instead of ImageNet VGG's three large Linear layers (9.2M parameters, not 129M).
No pretrained weights ship: it is the "VGG-11 shape" of the deployment measurements.

Reference:
    K. Simonyan, A. Zisserman. "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015,
    arXiv:1409.1556.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_mpq.models.cifar_resnet import CIFAR_RESNET_DATA_CONFIG
from lit_mpq.models.registry import register_backbone

__all__ = ["CifarVGG", "cifar_vgg11_bn"]

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
"""Configuration "A" of Simonyan & Zisserman: output channels of each 3x3 convolution, ``"M"`` a 2x2 max-pool."""


class CifarVGG(nn.Module):
    """VGG on 32x32 inputs: ``features`` (conv-BN-ReLU and max-pools), then ``classifier`` (one Linear).

    Args:
        config: Channels per convolution and ``"M"`` for each max-pool.
        num_classes: Output classes.
    """

    default_input_size = (3, 32, 32)

    def __init__(self, config: tuple = VGG11, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, 3, 32, 32]``."""
        return self.classifier(self.flatten(self.features(x)))


@register_backbone("cifar_vgg11_bn", data_config=CIFAR_RESNET_DATA_CONFIG)
def cifar_vgg11_bn(num_classes: int = 10) -> CifarVGG:
    """CIFAR VGG-11 with BatchNorm (9.2M parameters with 10 classes); no weights ship."""
    return CifarVGG(VGG11, num_classes)
