"""ImageNet-style image folders (``root/val/<class>/*.jpg``), preprocessed as the backbone expects.

The evaluation transform (resize, center crop, normalization) comes from the backbone's pretrained configuration:
timm's ``pretrained_cfg`` (read without building the model), the torchvision weights' ``transforms()``, or, for a
lit_mpq backbone, its ``default_input_size`` with ImageNet statistics. The calibration pool is ``root/calib_dir``
when that folder exists (usually ``train``); otherwise a seeded split of the validation folder gives
``num_calibration_samples`` calibration images and keeps the disjoint rest for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Subset

from lit_mpq.data.base import ClassificationDataModule

__all__ = ["DEFAULT_DATA_CONFIG", "ImageFolderDataModule", "resolve_backbone_data_config"]

DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
"""Preprocessing used when the backbone declares none: 224x224 center crop of a 256 resize, ImageNet statistics."""


def resolve_backbone_data_config(backbone: str, input_size: int | None = None) -> dict[str, Any]:
    """Return the evaluation preprocessing of a backbone, without downloading or building big models.

    Args:
        backbone: A timm name, ``torchvision:<name>`` or a lit_mpq backbone.
        input_size: Square crop size overriding the backbone's.

    Returns:
        ``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct`` and ``crop_mode``: the keyword
        arguments of ``timm.data.create_transform``.

    Raises:
        ValueError: If the backbone name is unknown or ``input_size`` is not positive.
    """
    from lit_mpq.models.factory import TIMM_PREFIX, TORCHVISION_PREFIX
    from lit_mpq.models.registry import get_backbone_fn, is_backbone, list_backbones

    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise ValueError(f"input_size must be a positive integer (pixels) or null (backbone's), got {input_size!r}.")
    name = backbone.strip()
    cfg = dict(DEFAULT_DATA_CONFIG)
    if name.startswith(TORCHVISION_PREFIX):
        cfg.update(_torchvision_data_config(name[len(TORCHVISION_PREFIX) :]))
    elif is_backbone(name):
        size = getattr(get_backbone_fn(name)(), "default_input_size", None)
        if size is not None:
            cfg["input_size"] = tuple(int(s) for s in size)
    else:
        import timm
        from timm.data import resolve_data_config

        timm_name = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
        if not timm.is_model(timm_name):
            raise ValueError(
                f"Unknown backbone {backbone!r} (it sets the input size, crop and normalization). Use a timm name "
                f"(timm.list_models()), 'torchvision:<name>' (torchvision.models.list_models()) or a lit_mpq "
                f"backbone ({', '.join(list_backbones())})."
            )
        pretrained_cfg = timm.models.get_pretrained_cfg(timm_name)
        if pretrained_cfg is not None:
            cfg.update(resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()))
    if input_size is not None:
        cfg["input_size"] = (int(cfg["input_size"][0]), input_size, input_size)
    cfg["input_size"] = tuple(int(s) for s in cfg["input_size"])
    return cfg


def _torchvision_data_config(name: str) -> dict[str, Any]:
    import torchvision

    try:
        tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
        return {
            "input_size": (3, crop, crop),
            "interpolation": tf.interpolation.value,
            "mean": tuple(tf.mean),
            "std": tuple(tf.std),
            "crop_pct": crop / resize,
        }
    except (ValueError, KeyError, AttributeError, TypeError, IndexError):
        return {}  # no classification weights: keep the defaults


class ImageFolderDataModule(ClassificationDataModule):
    """ImageNet-style folders: ``root/val_dir/<class>/*`` for evaluation, ``root/calib_dir/<class>/*`` to calibrate.

    Args:
        root: Dataset root folder.
        val_dir: Evaluation folder under ``root``.
        calib_dir: Calibration (and ``fit``) folder under ``root``; when it is ``null`` or missing, calibration images
            are split off the evaluation folder instead (seeded, disjoint).
        backbone: Backbone whose preprocessing to use (timm name, ``torchvision:<name>`` or lit_mpq backbone).
        input_size: Square crop size overriding the backbone's (``null``: the backbone's).
        batch_size: Images per batch.
        num_workers: Worker processes per loader.
        num_calibration_samples: Calibration images.
        calibration_seed: Seed of the calibration draw (and of the validation split when there is no calib_dir).
        calibration_subset: ``"random"`` or ``"first"``.

    Raises:
        ValueError: If the backbone is unknown or a number is out of range.
    """

    def __init__(
        self,
        root: str,
        val_dir: str = "val",
        calib_dir: str | None = "train",
        backbone: str = "deit_tiny_patch16_224",
        input_size: int | None = None,
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
        self.root = root
        self.val_dir = val_dir
        self.calib_dir = calib_dir
        self.backbone = backbone
        self.data_config = resolve_backbone_data_config(backbone, input_size)
        self.classes: list[str] = []
        self.calib_pool_indices: list[int] | None = None
        self.val_indices: list[int] | None = None

    @property
    def num_classes(self) -> int:
        """Number of class folders in the evaluation folder."""
        if not self.classes:
            from torchvision.datasets.folder import find_classes

            self.classes = find_classes(str(self._val_path()))[0]
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` after the evaluation transform."""
        return self.data_config["input_size"]

    def _layout(self) -> str:
        calib = f" and optionally {self.root}/{self.calib_dir}/<class>/*.jpg for calibration" if self.calib_dir else ""
        return f"Expected layout: {self.root}/{self.val_dir}/<class>/*.jpg{calib}."

    def _val_path(self) -> Path:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder root '{root}' does not exist. {self._layout()}")
        val_path = root / self.val_dir
        if not val_path.is_dir():
            raise FileNotFoundError(f"Evaluation folder '{val_path}' does not exist. {self._layout()}")
        return val_path

    def _image_folder(self, path: Path, transform: Any) -> Any:
        from torchvision.datasets import ImageFolder

        try:
            return ImageFolder(str(path), transform=transform)
        except FileNotFoundError as exc:  # no class folders, or no images in them
            raise FileNotFoundError(f"{exc} {self._layout()}") from None

    def _build(self, stage: str | None) -> None:
        from timm.data import create_transform

        val_path = self._val_path()
        eval_tf = create_transform(**self.data_config, is_training=False)
        val_full = self._image_folder(val_path, eval_tf)
        self.classes = list(val_full.classes)

        calib_path = Path(self.root).expanduser() / self.calib_dir if self.calib_dir else None
        if calib_path is not None and calib_path.is_dir():
            pool = self._image_folder(calib_path, eval_tf)
            if pool.classes != val_full.classes:
                rank_zero_warn(
                    f"The class folders of '{calib_path}' ({len(pool.classes)}) differ from those of '{val_path}' "
                    f"({len(val_full.classes)}); calibration ignores labels, but `fit` on this folder will use "
                    "different class indices."
                )
            self.calib_pool, self.val_set = pool, val_full
            self.calib_pool_indices = self.val_indices = None
            train_tf = create_transform(**self.data_config, is_training=True)
            self.train_set = self._image_folder(calib_path, train_tf)
            return

        n = self.num_calibration_samples
        if n >= len(val_full):
            raise ValueError(
                f"There is no calibration folder{f' ({calib_path})' if calib_path else ''}, so "
                f"num_calibration_samples={n} images are split off the {len(val_full)} images of '{val_path}', "
                f"which leaves none to evaluate on. Set num_calibration_samples below {len(val_full)} or add a "
                "calibration folder (calib_dir)."
            )
        rank_zero_info(
            f"No calibration folder{f' at {calib_path}' if calib_path else ''}: using {n} seeded images of "
            f"'{val_path}' for calibration and the other {len(val_full) - n} for evaluation."
        )
        perm = torch.randperm(len(val_full), generator=torch.Generator().manual_seed(self.calibration_seed))
        self.calib_pool_indices = sorted(perm[:n].tolist())
        self.val_indices = sorted(perm[n:].tolist())
        self.calib_pool = Subset(val_full, self.calib_pool_indices)
        self.val_set = Subset(val_full, self.val_indices)
        self.train_set = None
