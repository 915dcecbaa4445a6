"""create_backbone (own registry, timm, torchvision; offline behaviour), load_checkpoint and backbone_input_size."""

from __future__ import annotations

import os
import pathlib
import re
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


class _RunsCode:
    """Unpickling this creates the file ``marker``: what a crafted checkpoint could do with any command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


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


def _fake_hf_cache(root, repo_id: str, filename: str, state: dict) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    from safetensors.torch import save_file

    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "0123abcd" / filename))


def test_timm_offline_loads_from_hf_cache_without_touching_hub_settings(monkeypatch, tmp_path):
    """Unreachable Hub: cached weights load as a local file; the Hub client's global settings stay as they were."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(factory, "is_host_reachable", lambda *a, **k: False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    offline_before, env_before = hf_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    reference = create_backbone("test_vit")
    _fake_hf_cache(tmp_path / "hf", "timm/test_vit.r160_in1k", "model.safetensors", reference.state_dict())
    model = create_backbone("test_vit", pretrained=True)
    assert _same_weights(model, reference)
    assert hf_constants.HF_HUB_OFFLINE == offline_before and os.environ.get("HF_HUB_OFFLINE") == env_before
    assert not hasattr(factory, "_hf_hub_offline")


def test_timm_offline_without_cache_fails_before_building(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    import timm

    def no_build(*args, **kwargs):
        raise AssertionError("timm.create_model must not run when the weights cannot be had")

    monkeypatch.setattr(factory, "is_host_reachable", lambda *a, **k: False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(timm, "create_model", no_build)
    with pytest.raises(PretrainedWeightsUnavailableError, match="huggingface.co is unreachable"):
        create_backbone("test_vit", pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailableError, match="Hugging Face cache lacks them"):
        create_backbone("hf-hub:timm/test_vit.r160_in1k", pretrained=True)


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


def test_torchvision_cached_file_is_read_weights_only_first(monkeypatch, tmp_path):
    """torchvision's builders torch.load the cache with weights_only=False: a poisoned cache file must not get there."""
    import torchvision

    monkeypatch.setattr(factory, "is_host_reachable", lambda *a, **k: False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _RunsCode(str(marker))}, cached)
    with pytest.raises(ValueError, match=f"Refusing to load '{cached}'"):
        create_backbone("torchvision:resnet18", pretrained=True)
    assert not marker.exists()


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


def test_load_dataparallel_prefix(tmp_path):
    source, target = create_backbone("digits_cnn"), create_backbone("digits_cnn")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "dp.ckpt")
    load_checkpoint(target, str(tmp_path / "dp.ckpt"))
    assert _same_weights(source, target)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickled_objects_are_refused_whatever_the_suffix(tmp_path, suffix):
    """Before: a .ckpt that failed weights_only was re-loaded with weights_only=False (arbitrary code)."""
    source = create_backbone("digits_cnn")
    path = tmp_path / f"hparams{suffix}"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": {"opt": _NotAllowlisted()}}, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(create_backbone("digits_cnn"), str(path))
    msg = str(info.value)
    assert str(path) in msg and "weights_only=True" in msg and "_NotAllowlisted" in msg
    assert "torch.save(c.get('state_dict', c), 'weights.pt')" in msg  # how to convert a trusted file
    assert ".ckpt suffix" not in msg and "rename" not in msg.lower()
    assert len(msg.splitlines()) <= 3


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(10, 64)}, "x": _RunsCode(str(marker))}, evil)
    legacy = tmp_path / "legacy.pt"  # the pre-zip format takes another code path in torch.load
    torch.save({"x": _RunsCode(str(marker))}, legacy, _use_new_zipfile_serialization=False)
    for path in (evil, legacy):
        with pytest.raises(ValueError, match=f"Refusing to load '{path}'"):
            create_backbone("digits_cnn", checkpoint_path=str(path))
        with pytest.raises(ValueError, match=f"Refusing to load '{path}'"):
            load_checkpoint(create_backbone("digits_cnn"), str(path))
    assert not marker.exists()
    torch.load(legacy, weights_only=False)  # the payload is real: unpickling it does create the marker
    assert marker.exists()


def test_corrupt_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(create_backbone("digits_cnn").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(ValueError, match=f"Could not read checkpoint '{path}' \\(corrupt"):
            create_backbone("digits_cnn", checkpoint_path=str(path))


def test_a_real_lightning_checkpoint_loads_weights_only(tmp_path):
    """What `python cli.py fit` writes (loops, callbacks, optimizer, hparams) is plain data: no allow-list needed."""
    from lightning.pytorch import Trainer

    from lit_mpq.data import DigitsDataModule
    from lit_mpq.models.export import export_backbone
    from lit_mpq.module import MPQModule

    module = MPQModule(backbone="digits_cnn")
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    content = torch.load(ckpt, weights_only=True)  # torch's own check, independent of lit_mpq
    assert {"state_dict", "optimizer_states", "hyper_parameters"} <= content.keys()
    model = create_backbone("digits_cnn", checkpoint_path=str(ckpt))
    assert _same_weights(model, module.model)
    exported = export_backbone(ckpt, tmp_path / "digits.pt")
    assert _same_weights(create_backbone("digits_cnn", checkpoint_path=str(exported)), module.model)


# ------------------------------------------------------------------------------------------------------------------
# weights checked at load


def test_nan_weight_is_named_with_its_file(tmp_path):
    state = create_backbone("cifar_resnet20").state_dict()
    state["layer1.0.conv1.weight"].view(-1)[[0, 5, 9]] = float("nan")
    state["bn1.running_var"][2] = float("inf")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        create_backbone("cifar_resnet20", checkpoint_path=str(path))
    msg = str(info.value)
    assert msg.startswith(f"Parameter 'layer1.0.conv1.weight' has 3 NaN values in '{path}'")
    assert "(1 more non-finite tensor(s))" in msg


def test_inf_buffer_is_named(tmp_path):
    state = create_backbone("digits_cnn").state_dict()
    state["bn2.running_var"][0] = float("-inf")
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(ValueError, match=r"^Buffer 'bn2.running_var' has 1 Inf value in '.*inf\.pt'"):
        create_backbone("digits_cnn", checkpoint_path=str(tmp_path / "inf.pt"))


def test_all_zero_layer_warns(tmp_path):
    state = create_backbone("cifar_resnet20").state_dict()
    state["layer2.1.conv2.weight"].zero_()
    state["linear.weight"].zero_()
    torch.save(state, tmp_path / "zero.pt")
    with pytest.warns(UserWarning, match=r"All-zero weight in '.*zero\.pt'.*'layer2\.1\.conv2' \(Conv2d\), 'linear'"):
        create_backbone("cifar_resnet20", checkpoint_path=str(tmp_path / "zero.pt"))


def test_healthy_weights_load_without_warning(tmp_path, recwarn):
    torch.save(create_backbone("cifar_resnet20").state_dict(), tmp_path / "ok.pt")
    create_backbone("cifar_resnet20", checkpoint_path=str(tmp_path / "ok.pt"))
    assert not [w for w in recwarn if "All-zero" in str(w.message)]


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "w.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(create_backbone("digits_cnn"), str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_backbone("digits_cnn", checkpoint_path=str(missing))


def test_missing_relative_checkpoint_names_the_current_directory(tmp_path, monkeypatch):
    """The shipped configs use paths relative to the repository root; run from elsewhere, the error says so."""
    monkeypatch.chdir(tmp_path)
    where = re.escape(f"'../shared/w.pt' (relative to the current directory, {tmp_path})")
    with pytest.raises(FileNotFoundError, match=where):
        load_checkpoint(create_backbone("digits_cnn"), "../shared/w.pt")


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
