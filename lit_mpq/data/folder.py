"""ImageNet-style image folders (``root/val/<class>/*.jpg``), preprocessed as the backbone expects.

The evaluation transform (resize, center crop, normalization) comes from the backbone's pretrained configuration:
timm's ``pretrained_cfg`` (read without building the model), the torchvision weights' ``transforms()``, or, for a
lit_mpq backbone, the ``data_config`` it was registered with (its ``default_input_size`` with ImageNet statistics
when it declares none). Small inputs (at most :data:`SMALL_INPUT_MAX` pixels, CIFAR-style models) are fed whole:
``crop_pct`` 1.0, so an image is resized to the input size and not re-cropped the ImageNet way. Without ``backbone``,
the data module takes the backbone of the model it is trained or evaluated with.

Labels: with ``classes_file`` (one class per line, ``<folder name> [description]``, line i is label i, the format of
``imagenet_classes.txt``), each class folder is labelled by its line in that file, so a folder that holds only some
of the classes still gets the model's class indices. Without it, a folder's label is its position among the folders
present, which is only right when every class is present: :meth:`ImageFolderDataModule.check_num_outputs` refuses a
folder count that differs from the model's number of outputs.

The calibration pool is ``root/calib_dir`` when that folder exists (usually ``train``); otherwise a seeded split of
the validation folder gives ``num_calibration_samples`` calibration images and keeps the disjoint rest for
evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from lit_mpq.data.base import ClassificationDataModule

__all__ = [
    "DEFAULT_DATA_CONFIG",
    "ClassListImageFolder",
    "SMALL_INPUT_MAX",
    "ImageFolderDataModule",
    "UnreadableImageError",
    "load_rgb_image",
    "read_class_list",
    "resolve_backbone_data_config",
]

DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
"""Preprocessing used when the backbone declares none: 224x224 center crop of a 256 resize, ImageNet statistics."""

SMALL_INPUT_MAX = 64
"""Inputs up to this many pixels a side (CIFAR's 32x32) are whole images: ``crop_pct`` 1.0, no ImageNet crop."""


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

    Example:
        >>> cfg = resolve_backbone_data_config("cifar_resnet20")
        >>> cfg["input_size"], cfg["crop_pct"]
        ((3, 32, 32), 1.0)
    """
    from lit_mpq.models.factory import TIMM_PREFIX, TORCHVISION_PREFIX
    from lit_mpq.models.registry import get_backbone_data_config, get_backbone_fn, is_backbone, list_backbones

    _check_input_size(input_size)
    name = backbone.strip()
    cfg = dict(DEFAULT_DATA_CONFIG)
    if name.startswith(TORCHVISION_PREFIX):
        cfg.update(_torchvision_data_config(name[len(TORCHVISION_PREFIX) :]))
    elif is_backbone(name):
        declared = get_backbone_data_config(name)
        if declared is not None:
            cfg.update(declared)
        else:
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
    if max(cfg["input_size"][1:]) <= SMALL_INPUT_MAX:
        # ImageNet's crop_pct (0.875) would resize a 32x32 image to 36 and cut its border off again: the model
        # never saw that, and CIFAR ResNet-20 loses 3.5 points of top-1 to it.
        cfg["crop_pct"] = 1.0
    return cfg


def _check_input_size(input_size: Any) -> None:
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise ValueError(f"input_size must be a positive integer (pixels) or null (backbone's), got {input_size!r}.")


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


def read_class_list(path: str | Path) -> list[str]:
    """Read a class list: line i (0-based) is ``<folder name> [description...]`` of label i.

    This is the format of ``imagenet_classes.txt`` (WordNet ids in the standard label order, each followed by a
    name); a file of bare names (``airplane``, ``automobile``, ...) works too. Trailing blank lines are ignored; a
    blank line inside would shift every later label, so it is an error.

    Args:
        path: The text file.

    Returns:
        The folder names (first word of each line), in label order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is empty, has a blank line before its last class, or names a class twice.
    """
    file = Path(path).expanduser()
    what = "one class per line, '<folder name> [description]', line i for label i"
    if not file.is_file():
        raise FileNotFoundError(f"classes_file '{file}' does not exist. Give a text file with {what}.")
    lines = file.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"classes_file '{file}' is empty. Give a text file with {what}.")
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        words = line.split()
        if not words:
            raise ValueError(f"classes_file '{file}' line {number} is blank, which would shift every later label.")
        if words[0] in seen:
            raise ValueError(
                f"classes_file '{file}' names class '{words[0]}' twice (lines {seen[words[0]]} and {number})."
            )
        seen[words[0]] = number
        names.append(words[0])
    return names


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message names the file.

    A DataLoader worker's exception is re-created in the main process from a text that embeds the worker's
    traceback; this class keeps only its own last line, so the user sees one line naming the file either way.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:  # torch.utils.data's ExceptionWrapper.reraise
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def load_rgb_image(path: str) -> Any:
    """Open an image file as an RGB ``PIL.Image``; a file that cannot be decoded is named in the error.

    Args:
        path: The image file.

    Returns:
        The decoded image, converted to RGB.

    Raises:
        UnreadableImageError: A ``ValueError``, if the file is truncated, corrupt or not an image (PIL's own message
            is kept as the reason).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes now, so a bad file fails here, with its name
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(f"image '{path}' cannot be decoded: {exc}. Replace or remove the file.") from None


class ClassListImageFolder(ImageFolder):
    """``ImageFolder`` that labels folder ``<name>`` with ``class_index[name]``, not its position among the folders.

    Images are decoded by :func:`load_rgb_image`, so a corrupt file is named in the error.

    Args:
        root: Folder of class folders.
        transform: Transform applied to each image.
        class_index: Folder name to label; ``None`` keeps torchvision's sorted-position labels.
        classes_file: Where ``class_index`` came from, for the error message.

    Raises:
        ValueError: If a class folder is not in ``class_index``.
    """

    def __init__(
        self, root: str, transform: Any = None, class_index: dict[str, int] | None = None, classes_file: str = ""
    ) -> None:
        self.class_index = class_index
        self.classes_file = classes_file
        super().__init__(root, transform=transform, loader=load_rgb_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """Return the class folders present and their labels (from ``class_index`` when given)."""
        folders, positions = super().find_classes(directory)
        if self.class_index is None:
            return folders, positions
        unknown = [f for f in folders if f not in self.class_index]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ValueError(
                f"Class folder '{Path(directory) / unknown[0]}'{more} is not in classes_file '{self.classes_file}': "
                "each folder name must be the first word of a line of that file."
            )
        return folders, {f: self.class_index[f] for f in folders}


class ImageFolderDataModule(ClassificationDataModule):
    """ImageNet-style folders: ``root/val_dir/<class>/*`` for evaluation, ``root/calib_dir/<class>/*`` to calibrate.

    Args:
        root: Dataset root folder.
        val_dir: Evaluation folder under ``root``.
        calib_dir: Calibration (and ``fit``) folder under ``root``; when it is ``null`` or missing, calibration images
            are split off the evaluation folder instead (seeded, disjoint).
        backbone: Backbone whose preprocessing to use (timm name, ``torchvision:<name>`` or lit_mpq backbone);
            ``null`` (default): the backbone of the model this data module runs with, resolved in :meth:`setup`.
        classes_file: Class list, line i = ``<folder name> [description]`` of label i (e.g.
            ``../shared/data/imagenet_classes.txt``); folders are labelled through it, and it sets the number of
            classes. ``null``: label folders by their sorted position, which needs every class to have a folder.
        input_size: Square crop size overriding the backbone's (``null``: the backbone's).
        batch_size: Images per batch.
        num_workers: Worker processes per loader.
        num_calibration_samples: Calibration images.
        calibration_seed: Seed of the calibration draw (and of the validation split when there is no calib_dir).
        calibration_subset: ``"random"`` or ``"first"``.

    Raises:
        ValueError: If the backbone is unknown, the class list is malformed or a number is out of range.
        FileNotFoundError: If ``classes_file`` does not exist.
    """

    def __init__(
        self,
        root: str,
        val_dir: str = "val",
        calib_dir: str | None = "train",
        backbone: str | None = None,
        classes_file: str | None = None,
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
        _check_input_size(input_size)
        # Logged as data_backbone: Lightning refuses a datamodule hparam that shares a name with a different model
        # hparam, and null (follow the model) differs from the model's backbone by design.
        for hparams in (self.hparams, self._hparams_initial):
            hparams["data_backbone"] = hparams.pop("backbone")
        self.root = root
        self.val_dir = val_dir
        self.calib_dir = calib_dir
        self.backbone = backbone
        self.classes_file = classes_file
        self.class_list: list[str] | None = read_class_list(classes_file) if classes_file is not None else None
        """Folder names in label order, from ``classes_file`` (``None`` without one)."""
        self._input_size_override = input_size
        self.data_config: dict[str, Any] | None = (
            resolve_backbone_data_config(backbone, input_size) if backbone is not None else None
        )
        """``timm.data.create_transform`` arguments; ``None`` until :meth:`setup` when the model's backbone is used."""
        self.classes: list[str] = []
        """Class names in label order (the class list, or the folders of ``val_dir``), filled by :meth:`setup`."""
        self._folders: list[str] | None = None
        self._warned_backbone: str | None = None
        self.calib_pool_indices: list[int] | None = None
        self.val_indices: list[int] | None = None

    @property
    def num_classes(self) -> int:
        """Classes in ``classes_file``, or else class folders in the evaluation folder."""
        if self.class_list is not None:
            return len(self.class_list)
        return len(self._val_folders())

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` after the evaluation transform."""
        return self._resolved_data_config()["input_size"]

    def check_num_outputs(self, num_outputs: int) -> None:
        """Check that the labels of this data index the outputs of a model with ``num_outputs`` classes.

        :meth:`setup` calls it with the model's ``num_classes`` when the data module runs under a Trainer. Without a
        class list, a matching count still assumes the folders are the model's classes in sorted order.

        Args:
            num_outputs: The model's number of outputs (classes).

        Raises:
            ValueError: If the class list's length, or (without one) the number of class folders, differs from
                ``num_outputs``.
        """
        if self.class_list is not None:
            if len(self.class_list) != num_outputs:
                raise ValueError(
                    f"classes_file '{Path(self.classes_file).expanduser()}' lists {len(self.class_list)} classes but "
                    f"the model has {num_outputs} outputs. Give the class list of the model's outputs (line i names "
                    "output i)."
                )
            return
        folders = self._val_folders()
        if len(folders) != num_outputs:
            raise ValueError(
                f"'{self._val_path()}' has {len(folders)} class folder(s) but the model has {num_outputs} outputs, so "
                "a folder's position cannot be its label. Set classes_file to a list of the model's classes, one "
                "'<folder name> [description]' per line in output order (for ImageNet: imagenet_classes.txt)."
            )

    def setup(self, stage: str | None = None) -> None:
        """Resolve the preprocessing (from the model's backbone when ``backbone`` is ``null``), then build the data.

        Args:
            stage: Lightning stage; the same datasets serve every stage.

        Raises:
            ValueError: If ``backbone`` is ``null`` and no model with a ``backbone`` hyperparameter is attached, or the
                classes do not fit the model's outputs (see :meth:`check_num_outputs`).
        """
        if not self._built:
            self._resolved_data_config()
        super().setup(stage)

    def _resolved_data_config(self) -> dict[str, Any]:
        if self.data_config is not None:
            model_backbone = self._model_backbone()
            if model_backbone is not None and model_backbone != self.backbone:
                self._warn_if_preprocessing_differs(model_backbone)
            return self.data_config
        model_backbone = self._model_backbone()
        if model_backbone is None:
            raise ValueError(
                "ImageFolderDataModule has no backbone to take its preprocessing (input size, crop, normalization) "
                "from: with backbone: null it follows the model's backbone, but no model with a 'backbone' "
                "hyperparameter is attached. Set the data module's backbone (e.g. backbone: deit_tiny_patch16_224)."
            )
        self.data_config = resolve_backbone_data_config(model_backbone, self._input_size_override)
        return self.data_config

    def _model_backbone(self) -> str | None:
        """The ``backbone`` hyperparameter of the LightningModule this data module runs with, if any."""
        trainer = getattr(self, "trainer", None)  # set by Lightning when the data module is attached to a Trainer
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        hparams = getattr(model, "hparams", None)
        name = hparams.get("backbone") if isinstance(hparams, Mapping) else None
        return name if isinstance(name, str) and name.strip() else None

    def _warn_if_preprocessing_differs(self, model_backbone: str) -> None:
        if self._warned_backbone == model_backbone:
            return
        self._warned_backbone = model_backbone
        try:
            model_config = resolve_backbone_data_config(model_backbone, self._input_size_override)
        except ValueError:  # a name only timm can resolve with the network (hf-hub:): nothing to compare with
            return
        if model_config != self.data_config:
            rank_zero_warn(
                f"The data module preprocesses for backbone {self.backbone!r} but the model is {model_backbone!r}, "
                f"whose preprocessing differs ({_config_diff(self.data_config, model_config)}). Remove the data "
                "module's backbone to follow the model."
            )

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

    def _val_folders(self) -> list[str]:
        if self._folders is None:
            from torchvision.datasets.folder import find_classes

            val_path = self._val_path()
            try:
                self._folders = find_classes(str(val_path))[0]
            except FileNotFoundError as exc:  # no class folders
                raise FileNotFoundError(f"{exc} {self._layout()}") from None
        return self._folders

    def _image_folder(self, path: Path, transform: Any) -> Any:
        class_index = None if self.class_list is None else {name: i for i, name in enumerate(self.class_list)}
        classes_file = None if self.classes_file is None else str(Path(self.classes_file).expanduser())
        try:
            return ClassListImageFolder(str(path), transform, class_index, classes_file or "")
        except FileNotFoundError as exc:  # no class folders, or no images in them
            raise FileNotFoundError(f"{exc} {self._layout()}") from None

    def _build(self, stage: str | None) -> None:
        from timm.data import create_transform

        data_config = self._resolved_data_config()
        val_path = self._val_path()
        eval_tf = create_transform(**data_config, is_training=False)
        val_full = self._image_folder(val_path, eval_tf)
        self.classes = list(self.class_list) if self.class_list is not None else list(val_full.classes)

        calib_path = Path(self.root).expanduser() / self.calib_dir if self.calib_dir else None
        if calib_path is not None and calib_path.is_dir():
            pool = self._image_folder(calib_path, eval_tf)
            if self.class_list is None and pool.classes != val_full.classes:
                rank_zero_warn(
                    f"The class folders of '{calib_path}' ({len(pool.classes)}) differ from those of '{val_path}' "
                    f"({len(val_full.classes)}); calibration ignores labels, but `fit` on this folder will use "
                    "different class indices. Set classes_file to label both through one class list."
                )
            self.calib_pool, self.val_set = pool, val_full
            self.calib_pool_indices = self.val_indices = None
            train_tf = create_transform(**data_config, is_training=True)
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
        split = f"using {n} seeded images of '{val_path}' to calibrate and the other {len(val_full) - n} to evaluate"
        if calib_path is None:
            rank_zero_info(f"No calibration folder (calib_dir is null): {split}.")
        else:  # a named folder that is not there may be a typo: the evaluation set shrinks, so say it loudly
            rank_zero_warn(
                f"The calibration folder {calib_path} does not exist: {split}. Fix calib_dir, or set it to null to "
                "split the validation folder on purpose."
            )
        perm = torch.randperm(len(val_full), generator=torch.Generator().manual_seed(self.calibration_seed))
        self.calib_pool_indices = sorted(perm[:n].tolist())
        self.val_indices = sorted(perm[n:].tolist())
        self.calib_pool = Subset(val_full, self.calib_pool_indices)
        self.val_set = Subset(val_full, self.val_indices)
        self.train_set = None


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
