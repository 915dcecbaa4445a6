"""The registered CIFAR ShuffleNetV2 0.5x: the shared weights load strictly and give the README's top-1."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lit_mpq.data.cifar import NORMALIZATIONS
from lit_mpq.models import create_backbone, list_backbones


def test_registered_with_a_cifar_stem():
    assert "cifar_shufflenetv2_x0_5" in list_backbones("cifar_*")
    model = create_backbone("cifar_shufflenetv2_x0_5")
    stem = model.conv1[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1)) and isinstance(model.maxpool, nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_shared_weights_give_905_of_1000(shared_data):
    """905/1000 on cifar10_test_1k_lossless.npz (shared/data/README.md: 90.50 %), preprocessing done in NumPy."""
    model = create_backbone(
        "cifar_shufflenetv2_x0_5", checkpoint_path=str(shared_data / "cifar10_shufflenetv2_x0_5.pt")
    ).eval()
    data = np.load(shared_data / "cifar10_test_1k_lossless.npz")
    mean, std = (np.array(v, np.float32) for v in ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)))
    assert np.allclose(NORMALIZATIONS["cifar10_chenyaofo"], (mean, std))
    x = (data["images"].astype(np.float32) / 255.0 - mean) / std
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(500)])
    assert int((pred == torch.from_numpy(data["labels"])).sum()) == 905
