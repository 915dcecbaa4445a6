"""The lit_mpq backbone registry."""

from __future__ import annotations

import pytest
from torch import nn

from lit_mpq.models import registry


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_BACKBONES", dict(registry._BACKBONES))


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
