"""The embedded default dataset: scikit-learn's 8x8 handwritten digits (offline, installed with scikit-learn).

``sklearn.datasets.load_digits()`` ships 1,797 grayscale 8x8 images (pixel values 0 to 16) of the digits 0 to 9
(the UCI "Optical Recognition of Handwritten Digits" test set). They are scaled to [-1, 1] (``x / 16``, then
``(x - 0.5) / 0.5``) and split once with a seeded permutation into three disjoint parts:

* validation: 450 images;
* calibration pool: 300 images;
* training: the remaining 1,047 images.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lit_mpq.data.base import ClassificationDataModule

__all__ = ["DigitsDataModule"]

NUM_VAL = 450
"""Images in the validation split."""
NUM_CALIB_POOL = 300
"""Images in the calibration pool."""


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn digits (1x8x8, 10 classes) with fixed train / calibration-pool / validation splits.

    Args:
        split_seed: Seed of the permutation that splits the 1,797 images (the split is the same on every rank).
        batch_size: Images per batch.
        num_workers: Worker processes per loader.
        num_calibration_samples: Calibration images drawn from the 300-image calibration pool.
        calibration_seed: Seed of the calibration draw and of the training shuffle.
        calibration_subset: ``"random"`` or ``"first"``.
        max_val_samples: Evaluate only the first N validation images (e.g. an odd count to check multi-device
            evaluation); default: all 450.

    Example:
        >>> dm = DigitsDataModule(num_calibration_samples=64)
        >>> dm.setup("validate")
        >>> images, labels = next(iter(dm.calib_dataloader()))
        >>> tuple(images.shape)
        (64, 1, 8, 8)
    """

    def __init__(
        self,
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        num_calibration_samples: int = 256,
        calibration_seed: int = 0,
        calibration_subset: str = "random",
        max_val_samples: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            num_calibration_samples=num_calibration_samples,
            calibration_seed=calibration_seed,
            calibration_subset=calibration_subset,
        )
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise ValueError(f"split_seed must be an integer, got {split_seed!r}.")
        if max_val_samples is not None and not 0 < max_val_samples <= NUM_VAL:
            raise ValueError(f"max_val_samples must be in 1..{NUM_VAL} (or null for all), got {max_val_samples}")
        self.split_seed = split_seed
        self.max_val_samples = max_val_samples
        self.train_indices: list[int] = []
        self.calib_pool_indices: list[int] = []
        self.val_indices: list[int] = []

    @property
    def num_classes(self) -> int:
        """Ten digit classes."""
        return 10

    @property
    def input_size(self) -> tuple[int, int, int]:
        """One grayscale 8x8 channel."""
        return (1, 8, 8)

    def _build(self, stage: str | None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], 0..16
        images = (images / 16.0 - 0.5) / 0.5
        labels = torch.as_tensor(digits.target, dtype=torch.int64)

        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.split_seed))
        self.val_indices = sorted(perm[:NUM_VAL].tolist())[: self.max_val_samples]
        self.calib_pool_indices = sorted(perm[NUM_VAL : NUM_VAL + NUM_CALIB_POOL].tolist())
        self.train_indices = sorted(perm[NUM_VAL + NUM_CALIB_POOL :].tolist())

        def part(indices: list[int]) -> TensorDataset:
            idx = torch.tensor(indices, dtype=torch.long)
            return TensorDataset(images[idx], labels[idx])

        self.val_set = part(self.val_indices)
        self.calib_pool = part(self.calib_pool_indices)
        self.train_set = part(self.train_indices)
