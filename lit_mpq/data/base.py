"""Base LightningDataModule for image classification with a deterministic calibration subset.

Post-training quantization needs a small, fixed set of images to calibrate on. ``trainer.validate`` only calls
``setup("validate")``, so the calibration subset is built in ``setup`` for every stage and served by
:meth:`ClassificationDataModule.calib_dataloader`, which callbacks call by hand. Every rank draws the same subset
(a ``torch.Generator`` seeded from the config), so statistics agree without communication.

Subclasses implement :meth:`ClassificationDataModule._build`, which creates three datasets:

* ``train_set``: training data with augmentation (``None`` when the module has none);
* ``calib_pool``: the images the calibration subset is drawn from (evaluation transforms, never the val set);
* ``val_set``: the evaluation data (also used for ``test``).

Each item is ``(image, label)``: a float tensor ``[C, H, W]`` and an integer class index. Under a Trainer,
:meth:`ClassificationDataModule.setup` first checks the number of classes against the model's outputs
(:meth:`ClassificationDataModule.check_num_outputs`), since labels that do not index the model's outputs give a
wrong accuracy without any error.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = ["CALIBRATION_SUBSETS", "ClassificationDataModule", "ExactDistributedSampler"]

CALIBRATION_SUBSETS: tuple[str, ...] = ("random", "first")
"""How the calibration subset is drawn from the pool: a seeded random sample, or the first N images."""


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class ExactDistributedSampler(DistributedSampler):
    """Splits a dataset into contiguous per-rank shards without padding: every sample is seen exactly once.

    ``torch``'s ``DistributedSampler`` pads the dataset to a multiple of the world size (9 samples become 5 + 5), so
    multi-device accuracy double-counts a few images. Being a ``DistributedSampler``, this one is left in place by
    Lightning; shards differ in length by at most one sample, and metrics that sum counts across ranks
    (torchmetrics) then give exactly the single-device figure.

    Args:
        dataset: The evaluation dataset.
        num_replicas: World size.
        rank: This process's rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)  # type: ignore[arg-type]
        self.start, self.stop = rank * size // num_replicas, (rank + 1) * size // num_replicas
        self.num_samples = self.stop - self.start
        self.total_size = size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples


class ClassificationDataModule(LightningDataModule):
    """Common loaders and the calibration subset for classification data modules.

    Args:
        batch_size: Images per batch for every loader (``calib_dataloader`` can override it).
        num_workers: Worker processes per loader (0 loads in the main process).
        num_calibration_samples: Size of the calibration subset drawn from the calibration pool.
        calibration_seed: Seed of the ``torch.Generator`` that draws the calibration subset (with
            ``calibration_subset="random"``) and shuffles the training loader.
        calibration_subset: ``"random"`` (a seeded sample, kept in pool order) or ``"first"`` (the first
            ``num_calibration_samples`` images of the pool).

    Raises:
        ValueError: If an argument is out of range or ``calibration_subset`` is not one of the allowed values.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        num_calibration_samples: int = 512,
        calibration_seed: int = 0,
        calibration_subset: str = "random",
    ) -> None:
        super().__init__()
        _check_positive_int(batch_size, "batch_size")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        _check_positive_int(num_calibration_samples, "num_calibration_samples")
        if isinstance(calibration_seed, bool) or not isinstance(calibration_seed, int):
            raise ValueError(f"calibration_seed must be an integer, got {calibration_seed!r}.")
        if calibration_subset not in CALIBRATION_SUBSETS:
            raise ValueError(
                f"calibration_subset must be one of {', '.join(map(repr, CALIBRATION_SUBSETS))}, "
                f"got {calibration_subset!r}."
            )
        self.save_hyperparameters()  # every constructor argument of the subclass too; logged with the run
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_calibration_samples = num_calibration_samples
        self.calibration_seed = calibration_seed
        self.calibration_subset = calibration_subset

        self.train_set: Dataset | None = None
        self.calib_pool: Dataset | None = None
        self.val_set: Dataset | None = None
        self._calib_indices: list[int] | None = None
        self._calib_dataset: Subset | None = None
        self._built = False

    # ----------------------------------------------------------------------------------------------------------------
    # to implement in subclasses

    def _build(self, stage: str | None) -> None:
        """Create ``self.train_set``, ``self.calib_pool`` and ``self.val_set``.

        Called once, by the first :meth:`setup`, whatever the stage: later stages reuse the same datasets.

        Args:
            stage: The stage that triggered the build (``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or
                ``None``), for subclasses that want to skip expensive work.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _build(stage).")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        raise NotImplementedError

    @property
    def input_size(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image as the loaders return it."""
        raise NotImplementedError

    def check_num_outputs(self, num_outputs: int) -> None:
        """Check that this data's labels index the outputs of a model with ``num_outputs`` classes.

        Args:
            num_outputs: The model's number of outputs (classes).

        Raises:
            ValueError: If :attr:`num_classes` differs from ``num_outputs``.
        """
        if self.num_classes != num_outputs:
            raise ValueError(
                f"{type(self).__name__} has {self.num_classes} classes but the model has {num_outputs} outputs. Set "
                f"the model's num_classes to {self.num_classes}, or use data with the model's classes."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets and the calibration subset (once; later calls are no-ops).

        Under a Trainer whose LightningModule has an integer ``num_classes``, :meth:`check_num_outputs` runs first.

        Args:
            stage: Lightning stage; the same datasets and calibration subset serve every stage.

        Raises:
            ValueError: If the classes do not fit the model's outputs, or the calibration pool is empty or smaller
                than ``num_calibration_samples``.
        """
        if self._built:
            return
        num_outputs = self._model_num_outputs()
        if num_outputs is not None:
            self.check_num_outputs(num_outputs)
        self._build(stage)
        assert self.calib_pool is not None and self.val_set is not None, "_build must set calib_pool and val_set"
        self._calib_indices = self._select_calibration_indices(len(self.calib_pool))  # type: ignore[arg-type]
        self._calib_dataset = Subset(self.calib_pool, self._calib_indices)
        self._built = True

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (order drawn from a generator seeded with ``calibration_seed``).

        Raises:
            ValueError: If this data module has no training data.
        """
        self._ensure_setup()
        if self.train_set is None:
            raise ValueError(
                f"{type(self).__name__} has no training data, so it cannot be used with `fit`; see its documentation "
                "for where training images come from."
            )
        generator = torch.Generator().manual_seed(self.calibration_seed)
        return self._loader(self.train_set, self.batch_size, shuffle=True, generator=generator, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        """Evaluation loader, in dataset order; under DDP, this rank's contiguous shard, every image exactly once."""
        self._ensure_setup()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                sampler = ExactDistributedSampler(self.val_set, world, torch.distributed.get_rank())
                return DataLoader(
                    self.val_set,
                    batch_size=self.batch_size,
                    sampler=sampler,
                    num_workers=self.num_workers,
                    persistent_workers=self.num_workers > 0,
                )
        return self._loader(self.val_set, self.batch_size)

    def full_val_dataloader(self) -> DataLoader:
        """Every evaluation image, in dataset order, whatever the process group (for one rank's own evaluation)."""
        self._ensure_setup()
        return self._loader(self.val_set, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """Same data as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def calib_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Loader over the calibration subset: deterministic, never shuffled, available after any ``setup``.

        Args:
            batch_size: Images per batch; defaults to the module's ``batch_size``.

        Returns:
            A loader that yields ``(images, labels)`` in the order of :attr:`calib_indices`.
        """
        if batch_size is not None:
            _check_positive_int(batch_size, "batch_size")
        return self._loader(self.calib_dataset, batch_size or self.batch_size)

    # ----------------------------------------------------------------------------------------------------------------
    # calibration subset

    @property
    def calib_indices(self) -> list[int]:
        """Indices into ``calib_pool`` of the calibration images, ascending."""
        self._ensure_setup()
        assert self._calib_indices is not None
        return list(self._calib_indices)

    @property
    def calib_dataset(self) -> Subset:
        """The calibration subset of ``calib_pool``."""
        self._ensure_setup()
        assert self._calib_dataset is not None
        return self._calib_dataset

    def _select_calibration_indices(self, pool_size: int) -> list[int]:
        n = self.num_calibration_samples
        if pool_size == 0:
            raise ValueError(
                f"{type(self).__name__} has an empty calibration pool, so it cannot draw "
                f"num_calibration_samples={n} calibration images. Point the data module at a non-empty "
                "calibration set."
            )
        if n > pool_size:
            raise ValueError(
                f"num_calibration_samples={n} is larger than the calibration pool of {type(self).__name__}, which has "
                f"{pool_size} images. Set num_calibration_samples to at most {pool_size}, or give a larger "
                "calibration set."
            )
        if self.calibration_subset == "first":
            return list(range(n))
        generator = torch.Generator().manual_seed(self.calibration_seed)
        return sorted(torch.randperm(pool_size, generator=generator)[:n].tolist())

    # ----------------------------------------------------------------------------------------------------------------
    # helpers

    def _model_num_outputs(self) -> int | None:
        """``num_classes`` of the LightningModule this data module runs with (``None`` outside a Trainer)."""
        trainer = getattr(self, "trainer", None)  # set by Lightning when the data module is attached to a Trainer
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        n = getattr(model, "num_classes", None)
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    def _ensure_setup(self) -> None:
        if not self._built:
            self.setup(None)

    def _loader(
        self,
        dataset: Dataset | None,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
