"""Backbones: lit_mpq's own registry (CIFAR ResNets, the digits CNN) plus timm and torchvision by name.

Importing this package registers the built-in backbones. Build any model with :func:`create_backbone`::

    create_backbone("cifar_resnet20", pretrained=True, checkpoint_path="../shared/data/cifar10_resnet20.pt")
    create_backbone("deit_tiny_patch16_224", pretrained=True)       # timm
    create_backbone("torchvision:resnet18", pretrained=True)        # torchvision
"""

from lit_mpq.models import cifar_resnet, cifar_shufflenet, cifar_vgg, small  # noqa: F401  (import registers the built-in backbones)
from lit_mpq.models.factory import (
    PretrainedWeightsUnavailableError,
    backbone_input_size,
    create_backbone,
    load_checkpoint,
)
from lit_mpq.models.registry import get_backbone_fn, list_backbones, register_backbone

__all__ = [
    "PretrainedWeightsUnavailableError",
    "backbone_input_size",
    "create_backbone",
    "get_backbone_fn",
    "list_backbones",
    "load_checkpoint",
    "register_backbone",
]
