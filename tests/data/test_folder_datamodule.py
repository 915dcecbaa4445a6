"""ImageFolderDataModule on tiny and real image folders, class lists, and the backbone data-config resolution."""

from __future__ import annotations

import re
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_mpq.data import ImageFolderDataModule, resolve_backbone_data_config
from lit_mpq.data.folder import read_class_list

DEIT = "deit_tiny_patch16_224"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _paths(dataset, indices=None):
    """File paths of a (possibly nested) Subset of an ImageFolder."""
    if hasattr(dataset, "indices"):
        inner = list(dataset.indices) if indices is None else [dataset.indices[i] for i in indices]
        return _paths(dataset.dataset, inner)
    indices = range(len(dataset.samples)) if indices is None else indices
    return [dataset.samples[i][0] for i in indices]


def _attach(dm, backbone: str | None, num_classes: int | None):
    """What Lightning does when it runs the data module with a model: ``dm.trainer.lightning_module``."""
    model = SimpleNamespace(hparams={"backbone": backbone} if backbone else {}, num_classes=num_classes)
    dm.trainer = SimpleNamespace(lightning_module=model)
    return dm


def test_with_calibration_folder(tiny_image_folder):
    dm = ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT, num_calibration_samples=5, batch_size=4)
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
    kwargs = dict(root=str(tiny_image_folder), backbone=DEIT, calib_dir=calib_dir, num_calibration_samples=4)
    dm = ImageFolderDataModule(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("validate")
    missing = [str(w.message) for w in caught if "does not exist" in str(w.message)]
    # a named folder that is missing may be a typo that shrinks the evaluation set: warned; null is on purpose: quiet
    assert len(missing) == (calib_dir is not None), missing
    if calib_dir is not None:
        assert str(tiny_image_folder / "train") in missing[0] and "8 to evaluate" in missing[0]
    calib, evaluation = set(_paths(dm.calib_dataset)), set(_paths(dm.val_set))
    assert len(calib) == 4 and len(evaluation) == 8
    assert not calib & evaluation
    assert calib | evaluation == {str(p) for p in (tiny_image_folder / "val").rglob("*.png")}
    assert set(dm.calib_pool_indices).isdisjoint(dm.val_indices)
    other = ImageFolderDataModule(**kwargs)
    other.setup("test")
    assert other.calib_pool_indices == dm.calib_pool_indices  # seeded
    with pytest.raises(ValueError, match="no training data"):
        dm.train_dataloader()


def test_split_needs_evaluation_images_left(tiny_image_folder):
    dm = ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT, calib_dir=None, num_calibration_samples=12)
    with pytest.raises(ValueError, match=r"num_calibration_samples=12 .* 12 images.*below 12"):
        dm.setup("validate")


def test_missing_root_and_val_dir(tmp_path, tiny_image_folder):
    with pytest.raises(FileNotFoundError, match=r"nowhere' does not exist\. Expected layout: .*/val/<class>/\*\.jpg"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"), backbone=DEIT).setup("validate")
    with pytest.raises(FileNotFoundError, match=r"validation' does not exist.*Expected layout"):
        ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT, val_dir="validation").setup("validate")
    (tmp_path / "flat" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        ImageFolderDataModule(root=str(tmp_path / "flat"), backbone=DEIT).setup("validate")


def test_input_size_override_and_other_backbones(tiny_image_folder):
    dm = ImageFolderDataModule(
        root=str(tiny_image_folder), backbone="test_vit", input_size=64, num_calibration_samples=2, batch_size=2
    )
    x, _ = next(iter(dm.calib_dataloader()))
    assert x.shape == (2, 3, 64, 64) and dm.input_size == (3, 64, 64)


def test_resolve_backbone_data_config():
    deit = resolve_backbone_data_config(DEIT)
    assert deit["input_size"] == (3, 224, 224) and deit["crop_pct"] == 0.9 and deit["interpolation"] == "bicubic"
    assert deit["mean"] == (0.485, 0.456, 0.406)
    assert resolve_backbone_data_config("test_vit")["input_size"] == (3, 160, 160)
    tv = resolve_backbone_data_config("torchvision:resnet18")
    assert tv["input_size"] == (3, 224, 224) and tv["crop_pct"] == pytest.approx(224 / 256)
    with pytest.raises(ValueError, match="Unknown backbone 'deit_tiniest'"):
        resolve_backbone_data_config("deit_tiniest")
    with pytest.raises(ValueError, match="input_size must be a positive integer"):
        ImageFolderDataModule(root="anywhere", input_size=0)


def test_small_inputs_are_not_cropped_the_imagenet_way():
    """Before: cifar_resnet20 got crop_pct 0.875 (a 32x32 image resized to 36 and cropped back to 32)."""
    cifar = resolve_backbone_data_config("cifar_resnet20")
    assert cifar["input_size"] == (3, 32, 32) and cifar["crop_pct"] == 1.0
    assert cifar["mean"] == (0.485, 0.456, 0.406) and cifar["std"] == (0.229, 0.224, 0.225)  # shared README
    assert resolve_backbone_data_config("resnet18", input_size=64)["crop_pct"] == 1.0
    resnet18 = resolve_backbone_data_config("resnet18")
    assert (
        resnet18["crop_pct"] < 1.0
        and resolve_backbone_data_config("resnet18", input_size=96)["crop_pct"] == (resnet18["crop_pct"])
    )


# ------------------------------------------------------------------------------------------------------------------
# class lists and the model's outputs


@pytest.fixture
def class_list(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("ant an insect\ncat a small cat\nbee\ndog good dog\nfox\n\n")  # trailing blank lines are fine
    return path


def test_read_class_list(class_list, tmp_path):
    assert read_class_list(class_list) == ["ant", "cat", "bee", "dog", "fox"]
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"gap\.txt' line 2 is blank"):
        read_class_list(tmp_path / "gap.txt")
    (tmp_path / "dup.txt").write_text("a x\nb\na y\n")
    with pytest.raises(ValueError, match=r"dup\.txt' names class 'a' twice \(lines 1 and 3\)"):
        read_class_list(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.txt' is empty"):
        read_class_list(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match=r"classes_file '.*nowhere\.txt' does not exist"):
        ImageFolderDataModule(root=str(tmp_path), classes_file=str(tmp_path / "nowhere.txt"))


def test_read_the_shared_imagenet_class_list(shared_data):
    imagenet = read_class_list(shared_data / "imagenet_classes.txt")
    assert len(imagenet) == 1000 and imagenet[0] == "n01440764" and imagenet[-1] == "n15075141"
    # line i is label i: the sorted-wnid order of torchvision and timm (shared/data/README.md)
    assert imagenet == sorted(imagenet)


def test_folders_are_labelled_through_the_class_list(tiny_image_folder, class_list):
    """Before: labels were positions among the folders present (cat 0, dog 1, fox 2), whatever the model's classes."""
    dm = ImageFolderDataModule(
        root=str(tiny_image_folder), backbone=DEIT, classes_file=str(class_list), num_calibration_samples=2
    )
    assert dm.num_classes == 5
    dm.setup("validate")
    assert dm.classes == ["ant", "cat", "bee", "dog", "fox"]
    expected = {"cat": 1, "dog": 3, "fox": 4}
    for dataset in (dm.val_set, dm.calib_pool, dm.train_set):
        assert [label for _, label in dataset.samples] == [expected[p.split("/")[-2]] for p, _ in dataset.samples]
    _, y = next(iter(dm.val_dataloader()))
    assert set(y.tolist()) <= {1, 3, 4}


def test_folder_missing_from_the_class_list_is_named(tiny_image_folder, tmp_path):
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    dm = ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT, classes_file=str(tmp_path / "two.txt"))
    with pytest.raises(ValueError, match=r"Class folder '.*/val/fox' is not in classes_file '.*two\.txt'"):
        dm.setup("validate")


def test_check_num_outputs(tiny_image_folder, class_list):
    dm = ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT)
    dm.check_num_outputs(3)
    with pytest.raises(ValueError, match=r"/val' has 3 class folder\(s\) but the model has 1000 outputs.*classes_file"):
        dm.check_num_outputs(1000)
    listed = ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT, classes_file=str(class_list))
    listed.check_num_outputs(5)
    with pytest.raises(ValueError, match=r"classes_file '.*classes\.txt' lists 5 classes but the model has 3 outputs"):
        listed.check_num_outputs(3)


def test_setup_checks_the_attached_models_outputs(tiny_image_folder):
    """Before: a folder whose classes are not the model's scored 0 % with no error (e.g. one class vs 1000)."""
    dm = _attach(ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT), DEIT, num_classes=1000)
    with pytest.raises(ValueError, match="3 class folder.*1000 outputs"):
        dm.setup("validate")
    dm = _attach(ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT, num_calibration_samples=2), DEIT, 3)
    dm.setup("validate")
    assert len(dm.val_set) == 12


def test_backbone_follows_the_model(tiny_image_folder):
    dm = ImageFolderDataModule(root=str(tiny_image_folder), num_calibration_samples=2, batch_size=2)
    assert dm.data_config is None
    with pytest.raises(ValueError, match="no backbone to take its preprocessing.*Set the data module's backbone"):
        dm.setup("validate")
    _attach(dm, "cifar_resnet20", 3).setup("validate")
    assert dm.input_size == (3, 32, 32) and dm.data_config["crop_pct"] == 1.0
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 32, 32)


def test_explicit_backbone_that_differs_from_the_model_warns(tiny_image_folder):
    dm = _attach(ImageFolderDataModule(root=str(tiny_image_folder), backbone=DEIT, num_calibration_samples=2), "x", 3)
    dm.trainer.lightning_module.hparams["backbone"] = "cifar_resnet20"
    with pytest.warns(UserWarning, match=r"preprocesses for backbone 'deit_tiny_patch16_224'.*input_size"):
        dm.setup("validate")
    assert dm.input_size == (3, 224, 224)  # an explicit backbone wins


def test_under_a_real_trainer(tiny_image_folder):
    """Lightning attaches the data module (dm.trainer), so setup sees the model's backbone and outputs."""
    from lightning.pytorch import Trainer

    from lit_mpq.module import MPQModule

    def trainer():
        return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    dm = ImageFolderDataModule(root=str(tiny_image_folder), num_calibration_samples=2, batch_size=4)
    (metrics,) = trainer().validate(MPQModule(backbone="cifar_resnet20", num_classes=3), datamodule=dm, verbose=False)
    assert dm.input_size == (3, 32, 32) and "val/top1" in metrics
    dm = ImageFolderDataModule(root=str(tiny_image_folder), num_calibration_samples=2)
    with pytest.raises(ValueError, match="3 class folder.*10 outputs"):
        trainer().validate(MPQModule(backbone="cifar_resnet20"), datamodule=dm, verbose=False)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_is_named(tiny_image_folder, num_workers):
    """Before: PIL's 'Truncated File Read' surfaced at evaluation without saying which file."""
    from PIL import Image

    bad = tiny_image_folder / "val" / "dog" / "broken.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:400])
    dm = ImageFolderDataModule(
        root=str(tiny_image_folder), backbone=DEIT, num_calibration_samples=2, batch_size=13, num_workers=num_workers
    )
    dm.setup("validate")
    with pytest.raises(ValueError) as info:
        next(iter(dm.val_dataloader()))
    # one line naming the file, also when a worker process hit it (torch re-raises with the worker's traceback)
    reason = "(Truncated File Read|image file is truncated)"
    assert re.fullmatch(rf"image '{bad}' cannot be decoded: {reason}\. Replace or remove the file\.", str(info.value))


# ------------------------------------------------------------------------------------------------------------------
# real images


def _cifar_png_folder(root, images, labels):
    from PIL import Image

    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / "val" / CIFAR10_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    (root / "classes.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")


@pytest.mark.slow
def test_cifar_pngs_through_a_folder_match_the_npz(tmp_path, shared_data):
    """The 1k lossless CIFAR-10 test images as PNG folders: same pixels as the npz, and ResNet-20's 915/1000."""
    from lit_mpq.models import create_backbone

    shared = shared_data
    data = np.load(shared / "cifar10_test_1k_lossless.npz")
    _cifar_png_folder(tmp_path, data["images"], data["labels"])
    dm = ImageFolderDataModule(
        root=str(tmp_path),
        calib_dir="val",
        classes_file=str(tmp_path / "classes.txt"),
        backbone="cifar_resnet20",
        num_calibration_samples=16,
        batch_size=250,
    )
    dm.setup("validate")
    # Independent reference: the npz pixels, /255, ImageNet mean/std (shared/data/README.md), HWC -> CHW.
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    reference = torch.from_numpy(((data["images"].astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2))
    order = [int(path.rsplit("/", 1)[-1][:4]) for path, _ in dm.val_set.samples]
    xs, ys = zip(*dm.val_dataloader(), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    torch.testing.assert_close(x, reference[order], rtol=0, atol=1e-6)
    assert y.tolist() == data["labels"][order].tolist()

    model = create_backbone("cifar_resnet20", checkpoint_path=str(shared / "cifar10_resnet20.pt")).eval()
    with torch.inference_mode():
        correct = int((torch.cat([model(chunk).argmax(1) for chunk in x.split(250)]) == y).sum())
    assert correct == 915  # README: 91.50 % (915/1000) on cifar10_test_1k_lossless.npz
