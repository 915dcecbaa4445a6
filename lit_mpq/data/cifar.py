"""CIFAR-10 / CIFAR-100 from ``.npz`` files (offline) or from torchvision's download.

Each split comes from its own source:

* ``train_npz`` / ``test_npz``: files with ``images`` (uint8 ``[N, 32, 32, 3]``, RGB, HWC) and ``labels``
  (integers ``[N]``), the format of ``shared/data/cifar10_train_4k_lossless.npz`` and
  ``cifar10_test_1k_lossless.npz``;
* otherwise ``torchvision.datasets.CIFAR10/100(root, train=..., download=download)``.

The training images are the calibration pool (calibration never touches evaluation images) and, with random crop
(padding 4) and horizontal flip, the training set for ``fit``. Evaluation images are normalized once and kept as a
float tensor.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lit_mpq.data.base import ClassificationDataModule

__all__ = ["CIFAR_DATASETS", "NORMALIZATIONS", "CIFARDataModule", "Uint8ImageDataset"]

CIFAR_DATASETS: dict[str, int] = {"cifar10": 10, "cifar100": 100}
"""Supported datasets and their number of classes."""

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # ImageNet statistics: what the shared CIFAR ResNet weights (akamaster/pytorch_resnet_cifar10) were trained with.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # The CIFAR-10 mean with the widely copied standard deviation of kuangliu/pytorch-cifar, which
    # chenyaofo/pytorch-cifar-models trained with: what the shared ShuffleNetV2 weights expect.
    "cifar10_chenyaofo": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
"""Per-channel (mean, std) of RGB values in [0, 1], by name."""

_NPZ_FORMAT = "an .npz file with 'images' (uint8 [N, 32, 32, 3], RGB) and 'labels' (integers [N])"


class Uint8ImageDataset(Dataset):
    """uint8 images ``[N, C, H, W]`` normalized on access, with optional CIFAR training augmentation.

    Args:
        images: uint8 tensor ``[N, C, H, W]``.
        labels: Integer tensor ``[N]``.
        mean: Per-channel mean of values in [0, 1].
        std: Per-channel standard deviation of values in [0, 1].
        augment: Apply a random crop (zero padding 4, same size) and a random horizontal flip.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
    ) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        if self.augment:
            h, w = x.shape[-2:]
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = F.pad(x, (4, 4, 4, 4))[:, top : top + h, left : left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x.float().div(255) - self.mean) / self.std, self.labels[index]


def normalize_uint8(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Return ``(images / 255 - mean) / std`` as float32 (what ``ToTensor`` + ``Normalize`` compute).

    Args:
        images: uint8 tensor ``[N, C, H, W]``.
        mean: Per-channel mean.
        std: Per-channel standard deviation.
    """
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().div(255) - m) / s


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 or CIFAR-100: training images as calibration pool, test images for evaluation.

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        root: Folder of torchvision's CIFAR files (used for a split without an ``.npz`` file).
        train_npz: ``.npz`` with the training images (calibration pool and ``fit`` data), e.g.
            ``../shared/data/cifar10_train_4k_lossless.npz``.
        test_npz: ``.npz`` with the evaluation images, e.g. ``../shared/data/cifar10_test_1k_lossless.npz``.
        download: Let torchvision download the dataset into ``root`` (needs network access).
        normalization: Input statistics: ``"imagenet"`` (what the shared CIFAR ResNet weights expect),
            ``"cifar10"``, ``"cifar100"``, or ``"cifar10_chenyaofo"`` (the shared ShuffleNetV2's).
        max_val_samples: Evaluate only the first N test images (``None``: all).
        batch_size: Images per batch.
        num_workers: Worker processes per loader.
        num_calibration_samples: Calibration images drawn from the training images.
        calibration_seed: Seed of the calibration draw and of the training shuffle.
        calibration_subset: ``"random"`` or ``"first"``.

    Raises:
        ValueError: If ``dataset``, ``normalization`` or a number is not allowed.
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str = "data",
        train_npz: str | None = None,
        test_npz: str | None = None,
        download: bool = False,
        normalization: str = "imagenet",
        max_val_samples: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        num_calibration_samples: int = 512,
        calibration_seed: int = 0,
        calibration_subset: str = "random",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            num_calibration_samples=num_calibration_samples,
            calibration_seed=calibration_seed,
            calibration_subset=calibration_subset,
        )
        if dataset not in CIFAR_DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(map(repr, CIFAR_DATASETS))}, got {dataset!r}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(map(repr, NORMALIZATIONS))}, got {normalization!r}."
            )
        if max_val_samples is not None and (
            isinstance(max_val_samples, bool) or not isinstance(max_val_samples, int) or max_val_samples <= 0
        ):
            raise ValueError(f"max_val_samples must be a positive integer or null (all), got {max_val_samples!r}.")
        self.dataset = dataset
        self.root = root
        self.train_npz = train_npz
        self.test_npz = test_npz
        self.download = download
        self.normalization = normalization
        self.max_val_samples = max_val_samples
        self.mean, self.std = NORMALIZATIONS[normalization]

    @property
    def num_classes(self) -> int:
        """10 for CIFAR-10, 100 for CIFAR-100."""
        return CIFAR_DATASETS[self.dataset]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """RGB 32x32."""
        return (3, 32, 32)

    def prepare_data(self) -> None:
        """Download the torchvision files for splits without an ``.npz`` when ``download`` is set (rank 0 only)."""
        if self.download:
            for train, npz in ((True, self.train_npz), (False, self.test_npz)):
                if npz is None:
                    self._load_torchvision(train)

    def _build(self, stage: str | None) -> None:
        train_images, train_labels = self._load_split(train=True)
        val_images, val_labels = self._load_split(train=False)
        if self.max_val_samples is not None:
            val_images, val_labels = val_images[: self.max_val_samples], val_labels[: self.max_val_samples]
        self.val_set = TensorDataset(normalize_uint8(val_images, self.mean, self.std), val_labels)
        self.calib_pool = Uint8ImageDataset(train_images, train_labels, self.mean, self.std)
        self.train_set = Uint8ImageDataset(train_images, train_labels, self.mean, self.std, augment=True)

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        npz = self.train_npz if train else self.test_npz
        if npz is not None:
            images, labels = _load_npz(npz, "train_npz" if train else "test_npz")
        else:
            images, labels = self._load_torchvision(train)
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"The {'training' if train else 'test'} labels go up to {int(labels.max())}, but dataset="
                f"{self.dataset!r} has {self.num_classes} classes. Set dataset to one of "
                f"{', '.join(map(repr, CIFAR_DATASETS))} to match the data."
            )
        return images, labels

    def _load_torchvision(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.dataset == "cifar10" else datasets.CIFAR100
        split = "training" if train else "test"
        try:
            ds = cls(self.root, train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            if not self.download:
                raise FileNotFoundError(
                    f"The {self.dataset} {split} files are not under root='{Path(self.root).expanduser()}'. Either set "
                    f"`download: true` (needs network access), or pass `train_npz`/`test_npz`: {_NPZ_FORMAT}."
                ) from None
            ds = self._download(cls, train)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.int64)

    def _download(self, cls: type, train: bool) -> Dataset:
        from lit_mpq.models import factory

        host = urlparse(cls.url).hostname or ""
        advice = (
            f"Download it on a machine with network access into root='{self.root}', or pass "
            f"`train_npz`/`test_npz`: {_NPZ_FORMAT}."
        )
        if not factory.is_host_reachable(host):
            raise RuntimeError(f"Cannot download {self.dataset}: {host} is unreachable (offline?). {advice}")
        try:
            return cls(self.root, train=train, download=True)
        except Exception as exc:  # network errors come in many types (URLError, HTTPError, timeouts, bad archives)
            raise RuntimeError(
                f"Downloading {self.dataset} into root='{self.root}' failed ({type(exc).__name__}: {exc}). {advice}"
            ) from None


def _load_npz(path: str, arg: str) -> tuple[Tensor, Tensor]:
    """Load and check an npz file in the shared format; return uint8 ``[N, 3, 32, 32]`` images and int64 labels."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{arg}='{file}' does not exist. Give the path of {_NPZ_FORMAT}.")
    with np.load(file) as data:
        missing = [k for k in ("images", "labels") if k not in data.files]
        if missing:
            raise ValueError(f"{arg}='{file}' lacks {missing} (it has {data.files}); expected {_NPZ_FORMAT}.")
        images, labels = data["images"], data["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"{arg}='{file}' has images of dtype {images.dtype} and shape {images.shape}; expected {_NPZ_FORMAT}."
        )
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{arg}='{file}' has labels of dtype {labels.dtype} and shape {labels.shape} for {len(images)} images; "
            f"expected {_NPZ_FORMAT}."
        )
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{arg}='{file}' has negative labels; expected class indices starting at 0.")
    images_t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return images_t, torch.from_numpy(labels.astype(np.int64))
