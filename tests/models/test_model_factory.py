"""create_backbone (own registry, timm, torchvision; offline behaviour), load_checkpoint and backbone_input_size."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lit_mpq.models import (
    PretrainedWeightsUnavailableError,
    backbone_input_size,
    create_backbone,
    factory,
    load_checkpoint,
)


@dataclass
class _NotAllowlisted:  # pickled into a .ckpt to force torch.load(weights_only=False)
    lr: float = 0.1


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------------------------
# create_backbone


def test_unknown_name_lists_where_to_look():
    with pytest.raises(ValueError) as info:
        create_backbone("resnet_20")
    msg = str(info.value)
    assert "Unknown backbone 'resnet_20'" in msg
    assert "cifar_resnet20" in msg and "digits_cnn" in msg
    assert "timm.list_models" in msg and "torchvision:" in msg
    with pytest.raises(ValueError, match="Unknown torchvision model 'resnt18'.*torchvision:resnet18"):
        create_backbone("torchvision:resnt18")


def test_timm_models_build_without_weights():
    vit = create_backbone("test_vit", num_classes=7)
    assert vit(torch.randn(2, 3, 160, 160)).shape == (2, 7)
    assert backbone_input_size(vit) == (3, 160, 160)
    resnet = create_backbone("resnet18")
    assert resnet.fc.out_features == 1000  # num_classes=None keeps timm's default
    assert backbone_input_size(resnet) == (3, 224, 224)


def test_torchvision_model_builds_without_weights():
    model = create_backbone("torchvision:resnet18", num_classes=5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert not hasattr(model, "pretrained_cfg")
    assert backbone_input_size(model) == (3, 224, 224)


def test_own_backbone_pretrained_needs_checkpoint_path():
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_backbone("cifar_resnet20", pretrained=True)


def test_checkpoint_path_is_loaded(tmp_path):
    reference = create_backbone("digits_cnn")
    path = tmp_path / "digits.pt"
    torch.save(reference.state_dict(), path)
    model = create_backbone("digits_cnn", pretrained=True, checkpoint_path=str(path))
    assert _same_weights(model, reference)


def test_checkpoint_path_wins_over_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("no download expected when checkpoint_path is given")

    monkeypatch.setattr(factory, "is_host_reachable", no_network)
    reference = create_backbone("test_vit", num_classes=3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "vit.ckpt")
    model = create_backbone("test_vit", pretrained=True, num_classes=3, checkpoint_path=str(tmp_path / "vit.ckpt"))
    assert _same_weights(model, reference)


def test_torchvision_only_name_suggests_prefix():
    with pytest.raises(ValueError, match="Did you mean: torchvision:vit_b_16"):
        create_backbone("vit_b_16")


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "torchvision:resnet18"])
def test_offline_pretrained_fails_fast(name):
    """Against the real network: this project's machines cannot reach the weight hosts."""
    host = factory.TORCHVISION_HOST if name.startswith("torchvision:") else factory.HF_HUB_HOST
    if factory.is_host_reachable(host):
        pytest.skip(f"{host} is reachable: this test is about offline machines")
    hf_offline_before = os.environ.get("HF_HUB_OFFLINE")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        create_backbone(name, pretrained=True)
    assert time.monotonic() - start < 10.0
    msg = str(info.value)
    assert "could not be downloaded" in msg and "checkpoint_path: /path/to/weights.pth" in msg
    assert "pretrained: false" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised "from None": no traceback wall
    assert os.environ.get("HF_HUB_OFFLINE") == hf_offline_before  # offline mode only for the duration of the call


def test_hf_offline_mode_is_restored(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hf_constants.HF_HUB_OFFLINE
    with factory._hf_hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hf_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE == before


def test_torchvision_uses_cached_weights_when_offline(monkeypatch, tmp_path):
    """Unreachable host: cached weights still load; an empty cache raises at once without trying the network."""
    import torchvision

    monkeypatch.setattr(factory, "is_host_reachable", lambda *a, **k: False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsUnavailableError, match="is not cached"):
        create_backbone("torchvision:resnet18", pretrained=True)

    reference = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = create_backbone("torchvision:resnet18", pretrained=True)
    assert _same_weights(model, reference)


def test_is_host_reachable_offline_is_quick():
    start = time.monotonic()
    factory.is_host_reachable("nonexistent.invalid", timeout=1.0)
    assert time.monotonic() - start < 2.0


# ------------------------------------------------------------------------------------------------------------------
# load_checkpoint


def test_load_plain_state_dict(tmp_path):
    source, target = create_backbone("cifar_resnet20"), create_backbone("cifar_resnet20")
    assert not _same_weights(source, target)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    assert load_checkpoint(target, str(tmp_path / "w.pth")) is target
    assert _same_weights(source, target)


def test_load_lightning_checkpoint_strips_model_prefix(tmp_path):
    source, target = create_backbone("digits_cnn"), create_backbone("digits_cnn")
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state["fp32_reference.fc.weight"] = torch.zeros(1)  # another submodule of the LightningModule: ignored
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"backbone": "digits_cnn"}}, tmp_path / "a.ckpt")
    load_checkpoint(target, str(tmp_path / "a.ckpt"))
    assert _same_weights(source, target)


def test_load_dataparallel_and_pickled_hparams(tmp_path):
    source, target = create_backbone("digits_cnn"), create_backbone("digits_cnn")
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    payload = {"state_dict": state, "hyper_parameters": {"opt": _NotAllowlisted()}}
    torch.save(payload, tmp_path / "dp.ckpt")
    load_checkpoint(target, str(tmp_path / "dp.ckpt"))  # weights_only fails, .ckpt falls back
    assert _same_weights(source, target)
    torch.save(payload, tmp_path / "dp.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(target, str(tmp_path / "dp.pt"))


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "w.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(create_backbone("digits_cnn"), str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_backbone("digits_cnn", checkpoint_path=str(missing))


def test_load_mismatched_keys_and_shapes(tmp_path):
    torch.save(create_backbone("cifar_resnet32").state_dict(), tmp_path / "r32.pt")
    target = create_backbone("cifar_resnet20")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected key\(s\): layer1\.3\.") as info:
        load_checkpoint(target, str(tmp_path / "r32.pt"))
    assert "... (" in str(info.value)  # more than five listed keys are summarized
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded
    load_checkpoint(target, str(tmp_path / "r32.pt"), strict=False)  # the common layers load

    torch.save(create_backbone("cifar_resnet20", num_classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(ValueError, match=r"shape mismatch.*linear\.weight"):
        load_checkpoint(target, str(tmp_path / "c100.pt"))

    torch.save({"note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_checkpoint(target, str(tmp_path / "empty.pt"))


def test_backbone_input_size_fallback():
    assert backbone_input_size(nn.Linear(2, 2)) == (3, 224, 224)
