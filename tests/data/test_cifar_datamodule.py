"""CIFARDataModule: npz files (synthetic and the shared CIFAR-10 files), torchvision fallback, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from lit_mpq.data import NORMALIZATIONS, CIFARDataModule

IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


def _reference_normalize(images_hwc: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = (images_hwc.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 60), ("test", 40)):
        paths[split] = tmp_path / f"{split}.npz"
        np.savez(
            paths[split],
            images=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
            labels=rng.integers(0, 10, size=n).astype(np.int64),
        )
    return paths


def _all(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_npz_module_on_synthetic_files(tiny_npz):
    dm = CIFARDataModule(
        train_npz=str(tiny_npz["train"]), test_npz=str(tiny_npz["test"]), num_calibration_samples=20, batch_size=16
    )
    dm.setup("validate")
    assert (len(dm.calib_pool), len(dm.val_set), len(dm.calib_dataset)) == (60, 40, 20)
    assert dm.num_classes == 10 and dm.input_size == (3, 32, 32)
    raw = np.load(tiny_npz["test"])
    x, y = _all(dm.val_dataloader())
    torch.testing.assert_close(x, _reference_normalize(raw["images"], *IMAGENET), rtol=0, atol=1e-6)
    assert y.tolist() == raw["labels"].tolist()
    train = np.load(tiny_npz["train"])
    cx, cy = _all(dm.calib_dataloader())
    idx = dm.calib_indices
    torch.testing.assert_close(cx, _reference_normalize(train["images"][idx], *IMAGENET), rtol=0, atol=1e-6)
    assert cy.tolist() == train["labels"][idx].tolist()


@pytest.mark.parametrize("name", sorted(NORMALIZATIONS))
def test_normalizations_and_max_val_samples(tiny_npz, name):
    dm = CIFARDataModule(
        train_npz=str(tiny_npz["train"]),
        test_npz=str(tiny_npz["test"]),
        normalization=name,
        max_val_samples=7,
        num_calibration_samples=8,
    )
    dm.setup("test")
    x, _ = _all(dm.test_dataloader())
    mean, std = (np.array(v, np.float32) for v in NORMALIZATIONS[name])
    torch.testing.assert_close(x, _reference_normalize(np.load(tiny_npz["test"])["images"][:7], mean, std))


def test_training_augmentation_is_crop_and_flip(tiny_npz):
    dm = CIFARDataModule(train_npz=str(tiny_npz["train"]), test_npz=str(tiny_npz["test"]), num_calibration_samples=8)
    dm.setup("fit")
    torch.manual_seed(0)
    raw = torch.from_numpy(np.load(tiny_npz["train"])["images"]).permute(0, 3, 1, 2)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    changed = 0
    for i in range(12):
        x, y = dm.train_set[i]
        pixels = torch.round((x * std + mean) * 255).to(torch.uint8)
        padded = F.pad(raw[i], (4, 4, 4, 4))
        candidates = [
            img[:, t : t + 32, s : s + 32] for img in (padded, padded.flip(-1)) for t in range(9) for s in range(9)
        ]
        assert any(torch.equal(pixels, c) for c in candidates)
        changed += not torch.equal(pixels, raw[i])
    assert changed > 0
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (60, 3, 32, 32) and yb.dtype == torch.int64


def test_missing_npz(tmp_path, tiny_npz):
    dm = CIFARDataModule(train_npz=str(tiny_npz["train"]), test_npz=str(tmp_path / "absent_test.npz"))
    with pytest.raises(FileNotFoundError, match=r"test_npz=.*absent_test\.npz' does not exist"):
        dm.setup("validate")


def test_bad_npz_contents(tmp_path, tiny_npz):
    np.savez(tmp_path / "gray.npz", images=np.zeros((4, 32, 32), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"expected an \.npz file with 'images' \(uint8 \[N, 32, 32, 3\]"):
        CIFARDataModule(train_npz=str(tmp_path / "gray.npz"), test_npz=str(tiny_npz["test"])).setup()
    np.savez(tmp_path / "c100.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.array([0, 1, 50, 99]))
    with pytest.raises(ValueError, match=r"labels go up to 99.*'cifar10'"):
        CIFARDataModule(train_npz=str(tmp_path / "c100.npz"), test_npz=str(tiny_npz["test"])).setup()
    dm = CIFARDataModule(
        dataset="cifar100",
        train_npz=str(tmp_path / "c100.npz"),
        test_npz=str(tiny_npz["test"]),
        num_calibration_samples=4,
    )
    dm.setup()
    assert dm.num_classes == 100


def test_too_many_calibration_samples(tiny_npz):
    dm = CIFARDataModule(train_npz=str(tiny_npz["train"]), test_npz=str(tiny_npz["test"]))  # default 512 > 60
    with pytest.raises(ValueError, match=r"num_calibration_samples=512 .* 60 images"):
        dm.setup("validate")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dataset": "cifar1000"}, "dataset must be one of 'cifar10', 'cifar100'"),
        ({"normalization": "mnist"}, "normalization must be one of 'imagenet', 'cifar10', 'cifar100'"),
        ({"max_val_samples": 0}, "max_val_samples must be a positive integer"),
        ({"num_calibration_samples": -1}, "num_calibration_samples must be a positive integer, got -1"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CIFARDataModule(**kwargs)


def test_torchvision_files_absent_without_download(tmp_path):
    dm = CIFARDataModule(root=str(tmp_path / "cifar"))
    with pytest.raises(FileNotFoundError, match=r"`download: true`.*`train_npz`/`test_npz`"):
        dm.setup("validate")


def test_download_fails_fast_when_offline(tmp_path, monkeypatch):
    from lit_mpq.models import factory

    monkeypatch.setattr(factory, "is_host_reachable", lambda *a, **k: False)  # never download from a test
    dm = CIFARDataModule(root=str(tmp_path / "cifar"), download=True)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"www\.cs\.toronto\.edu is unreachable.*train_npz"):
        dm.prepare_data()
    assert time.monotonic() - start < 5


def test_shared_cifar10_files(shared_data):
    dm = CIFARDataModule(
        train_npz=str(shared_data / "cifar10_train_4k_lossless.npz"),
        test_npz=str(shared_data / "cifar10_test_1k_lossless.npz"),
        calibration_subset="first",
        batch_size=500,
    )
    dm.setup("validate")
    assert len(dm.val_set) == 1000 and len(dm.calib_pool) == 4000
    assert dm.calib_indices == list(range(512))
    train = np.load(shared_data / "cifar10_train_4k_lossless.npz")
    cx, cy = _all(dm.calib_dataloader())
    torch.testing.assert_close(cx, _reference_normalize(train["images"][:512], *IMAGENET), rtol=0, atol=1e-6)
    assert cy.tolist() == train["labels"][:512].tolist()
    assert cy[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # README: the official training order


def test_resnet20_through_the_module(shared_data):
    from lit_mpq.models import create_backbone

    dm = CIFARDataModule(
        train_npz=str(shared_data / "cifar10_train_4k_lossless.npz"),
        test_npz=str(shared_data / "cifar10_test_1k_lossless.npz"),
        batch_size=500,
    )
    dm.setup("validate")
    model = create_backbone(
        "cifar_resnet20", pretrained=True, checkpoint_path=str(shared_data / "cifar10_resnet20.pt")
    ).eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in dm.val_dataloader())
    assert correct == 915


def test_classes_are_checked_against_the_models_outputs(tiny_npz):
    """Under a Trainer, setup compares num_classes with the attached model's (a 100-class model on CIFAR-10 fails)."""
    from types import SimpleNamespace

    dm = CIFARDataModule(train_npz=str(tiny_npz["train"]), test_npz=str(tiny_npz["test"]), num_calibration_samples=4)
    dm.check_num_outputs(10)
    with pytest.raises(ValueError, match="CIFARDataModule has 10 classes but the model has 100 outputs"):
        dm.check_num_outputs(100)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(num_classes=100))
    with pytest.raises(ValueError, match="has 10 classes but the model has 100 outputs"):
        dm.setup("validate")
    dm.trainer.lightning_module.num_classes = 10
    dm.setup("validate")
    assert len(dm.val_set) == 40
