"""LightningDataModules for image classification, each with a deterministic ``calib_dataloader()``.

* :class:`DigitsDataModule`: scikit-learn's 8x8 digits, the embedded offline default;
* :class:`CIFARDataModule`: CIFAR-10/100 from ``.npz`` files or torchvision;
* :class:`ImageFolderDataModule`: ImageNet-style folders with the backbone's preprocessing, labelled through a class
  list (:func:`read_class_list`) when the folder holds only some of the model's classes.

Each checks its number of classes against the model's outputs when it is set up under a Trainer
(``check_num_outputs``).
"""

from lit_mpq.data.base import CALIBRATION_SUBSETS, ClassificationDataModule
from lit_mpq.data.cifar import NORMALIZATIONS, CIFARDataModule
from lit_mpq.data.digits import DigitsDataModule
from lit_mpq.data.folder import ImageFolderDataModule, read_class_list, resolve_backbone_data_config

__all__ = [
    "CALIBRATION_SUBSETS",
    "NORMALIZATIONS",
    "CIFARDataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "read_class_list",
    "resolve_backbone_data_config",
]
