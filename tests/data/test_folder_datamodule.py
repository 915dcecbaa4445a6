"""ImageFolderDataModule on a tiny ImageNet-style folder, and the backbone data-config resolution."""

from __future__ import annotations

import shutil

import pytest
import torch

from lit_mpq.data import ImageFolderDataModule, resolve_backbone_data_config


def _paths(dataset, indices=None):
    """File paths of a (possibly nested) Subset of an ImageFolder."""
    if hasattr(dataset, "indices"):
        inner = list(dataset.indices) if indices is None else [dataset.indices[i] for i in indices]
        return _paths(dataset.dataset, inner)
    indices = range(len(dataset.samples)) if indices is None else indices
    return [dataset.samples[i][0] for i in indices]


def test_with_calibration_folder(tiny_image_folder):
    dm = ImageFolderDataModule(root=str(tiny_image_folder), num_calibration_samples=5, batch_size=4)
    dm.setup("validate")
    assert len(dm.val_set) == 12 and len(dm.calib_pool) == 12 and len(dm.calib_dataset) == 5
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "fox"]
    assert all("/train/" in p for p in _paths(dm.calib_pool))
    assert all("/val/" in p for p, _ in dm.val_set.samples)
    x, y = next(iter(dm.calib_dataloader()))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.input_size == (3, 224, 224)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 224, 224) and yv.tolist() == [0, 0, 0, 0]
    xt, _ = next(iter(dm.train_dataloader()))
    assert xt.shape == (4, 3, 224, 224)


@pytest.mark.parametrize("calib_dir", [None, "train"])
def test_split_off_val_when_no_calibration_folder(tiny_image_folder, calib_dir):
    if calib_dir == "train":
        shutil.rmtree(tiny_image_folder / "train")  # named but missing: falls back to splitting val
    dm = ImageFolderDataModule(root=str(tiny_image_folder), calib_dir=calib_dir, num_calibration_samples=4)
    dm.setup("validate")
    calib, evaluation = set(_paths(dm.calib_dataset)), set(_paths(dm.val_set))
    assert len(calib) == 4 and len(evaluation) == 8
    assert not calib & evaluation
    assert calib | evaluation == {str(p) for p in (tiny_image_folder / "val").rglob("*.png")}
    assert set(dm.calib_pool_indices).isdisjoint(dm.val_indices)
    other = ImageFolderDataModule(root=str(tiny_image_folder), calib_dir=calib_dir, num_calibration_samples=4)
    other.setup("test")
    assert other.calib_pool_indices == dm.calib_pool_indices  # seeded
    with pytest.raises(ValueError, match="no training data"):
        dm.train_dataloader()


def test_split_needs_evaluation_images_left(tiny_image_folder):
    dm = ImageFolderDataModule(root=str(tiny_image_folder), calib_dir=None, num_calibration_samples=12)
    with pytest.raises(ValueError, match=r"num_calibration_samples=12 .* 12 images.*below 12"):
        dm.setup("validate")


def test_missing_root_and_val_dir(tmp_path, tiny_image_folder):
    with pytest.raises(FileNotFoundError, match=r"nowhere' does not exist\. Expected layout: .*/val/<class>/\*\.jpg"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere")).setup("validate")
    with pytest.raises(FileNotFoundError, match=r"validation' does not exist.*Expected layout"):
        ImageFolderDataModule(root=str(tiny_image_folder), val_dir="validation").setup("validate")
    (tmp_path / "flat" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        ImageFolderDataModule(root=str(tmp_path / "flat")).setup("validate")


def test_input_size_override_and_other_backbones(tiny_image_folder):
    dm = ImageFolderDataModule(
        root=str(tiny_image_folder), backbone="test_vit", input_size=64, num_calibration_samples=2, batch_size=2
    )
    x, _ = next(iter(dm.calib_dataloader()))
    assert x.shape == (2, 3, 64, 64) and dm.input_size == (3, 64, 64)


def test_resolve_backbone_data_config():
    deit = resolve_backbone_data_config("deit_tiny_patch16_224")
    assert deit["input_size"] == (3, 224, 224) and deit["crop_pct"] == 0.9 and deit["interpolation"] == "bicubic"
    assert deit["mean"] == (0.485, 0.456, 0.406)
    assert resolve_backbone_data_config("test_vit")["input_size"] == (3, 160, 160)
    tv = resolve_backbone_data_config("torchvision:resnet18")
    assert tv["input_size"] == (3, 224, 224) and tv["crop_pct"] == pytest.approx(224 / 256)
    assert resolve_backbone_data_config("cifar_resnet20")["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="Unknown backbone 'deit_tiniest'"):
        resolve_backbone_data_config("deit_tiniest")
    with pytest.raises(ValueError, match="input_size must be a positive integer"):
        ImageFolderDataModule(root="anywhere", input_size=0)
