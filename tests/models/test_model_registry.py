"""The lit_mpq backbone registry."""

from __future__ import annotations

import pytest
from torch import nn

from lit_mpq.models import registry


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_BACKBONES", dict(registry._BACKBONES))
    monkeypatch.setattr(registry, "_DATA_CONFIGS", dict(registry._DATA_CONFIGS))


def test_register_list_get(isolated_registry):
    @registry.register_backbone("zz_test_net")
    def zz_test_net(num_classes: int = 10) -> nn.Module:
        return nn.Linear(2, num_classes)

    assert "zz_test_net" in registry.list_backbones()
    assert registry.list_backbones("zz_*") == ["zz_test_net"]
    assert registry.get_backbone_fn("zz_test_net") is zz_test_net
    assert registry.list_backbones() == sorted(registry.list_backbones())


def test_overwrite_warns(isolated_registry):
    registry.register_backbone("zz_dup")(lambda num_classes=10: nn.Identity())
    with pytest.warns(UserWarning, match="Overwriting backbone 'zz_dup'"):
        registry.register_backbone("zz_dup")(lambda num_classes=10: nn.Identity())


def test_unknown_and_bad_names():
    with pytest.raises(ValueError, match="Unknown backbone 'nope'.*cifar_resnet20"):
        registry.get_backbone_fn("nope")
    with pytest.raises(ValueError, match="':'"):
        registry.register_backbone("torchvision:mine")
    with pytest.raises(ValueError, match="non-empty"):
        registry.register_backbone("")


def test_data_config_is_registered_with_the_backbone(isolated_registry):
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}
    registry.register_backbone("zz_cifar_net", data_config=cfg)(lambda num_classes=10: nn.Identity())
    assert registry.get_backbone_data_config("zz_cifar_net") == cfg
    registry.get_backbone_data_config("zz_cifar_net")["crop_pct"] = 0.5  # a copy: the registry is not changed
    assert registry.get_backbone_data_config("zz_cifar_net")["crop_pct"] == 1.0
    registry.register_backbone("zz_plain")(lambda num_classes=10: nn.Identity())
    assert registry.get_backbone_data_config("zz_plain") is None
    with pytest.raises(ValueError, match="unknown keys \\['normalisation'\\]"):
        registry.register_backbone("zz_bad", data_config={"normalisation": "cifar"})
    with pytest.raises(ValueError, match="Unknown backbone 'nope'"):
        registry.get_backbone_data_config("nope")


def test_cifar_resnets_declare_their_training_preprocessing():
    """shared/data/README.md: the CIFAR ResNet weights were trained on whole 32x32 images with ImageNet mean/std."""
    for depth in (20, 32, 44, 56):
        cfg = registry.get_backbone_data_config(f"cifar_resnet{depth}")
        assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
