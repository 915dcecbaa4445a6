"""DigitsDataModule and the calibration machinery of ClassificationDataModule."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from lit_mpq.data import CALIBRATION_SUBSETS, ClassificationDataModule, DigitsDataModule


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _all(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_split_sizes_disjoint_and_complete():
    dm = DigitsDataModule()
    dm.setup("fit")
    train, pool, val = set(dm.train_indices), set(dm.calib_pool_indices), set(dm.val_indices)
    assert (len(train), len(pool), len(val)) == (1047, 300, 450)
    assert not train & pool and not train & val and not pool & val
    assert train | pool | val == set(range(1797))
    assert (len(dm.train_set), len(dm.calib_pool), len(dm.val_set)) == (1047, 300, 450)
    assert dm.num_classes == 10 and dm.input_size == (1, 8, 8)


def test_split_depends_on_split_seed():
    a, b, c = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=1)
    for dm in (a, b, c):
        dm.setup("validate")
    assert a.val_indices == b.val_indices and a.calib_pool_indices == b.calib_pool_indices
    assert a.val_indices != c.val_indices


def test_values_match_sklearn(digits):
    dm = DigitsDataModule(batch_size=1000)
    dm.setup("validate")
    x, y = _all(dm.val_dataloader())
    assert x.shape == (450, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    idx = dm.val_indices
    expected = (torch.tensor(digits.images[idx], dtype=torch.float32) / 16 - 0.5) / 0.5
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == digits.target[idx].tolist()
    assert x.min() == -1.0 and x.max() == 1.0


def test_calibration_subset_is_seeded_and_sorted():
    a, b, c = DigitsDataModule(calibration_seed=3), DigitsDataModule(calibration_seed=3), DigitsDataModule()
    for dm in (a, b, c):
        dm.setup("validate")
    reference = sorted(torch.randperm(300, generator=torch.Generator().manual_seed(3))[:256].tolist())
    assert a.calib_indices == reference == b.calib_indices
    assert c.calib_indices != a.calib_indices
    xa, ya = _all(a.calib_dataloader())
    xb, yb = _all(b.calib_dataloader())
    xc, _ = _all(c.calib_dataloader())
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    pool_x = torch.stack([a.calib_pool[i][0] for i in a.calib_indices])
    assert torch.equal(xa, pool_x)  # in calib_indices order, never shuffled
    xa2, _ = _all(a.calib_dataloader())
    assert torch.equal(xa, xa2)


def test_first_subset():
    dm = DigitsDataModule(num_calibration_samples=40, calibration_subset="first", calibration_seed=7)
    dm.setup("test")
    assert dm.calib_indices == list(range(40))
    x, _ = _all(dm.calib_dataloader(batch_size=16))
    assert torch.equal(x, torch.stack([dm.calib_pool[i][0] for i in range(40)]))


@pytest.mark.parametrize("first_stage", ["fit", "validate", "test", "predict"])
def test_calib_loader_after_any_stage_and_setup_idempotent(first_stage):
    dm = DigitsDataModule(num_calibration_samples=100)
    dm.setup(first_stage)
    indices, calib, val = dm.calib_indices, dm.calib_dataset, dm.val_set
    batches = [x.shape[0] for x, _ in dm.calib_dataloader(batch_size=32)]
    assert batches == [32, 32, 32, 4]
    for stage in ("fit", "validate", "test"):
        dm.setup(stage)
    assert dm.calib_indices == indices and dm.calib_dataset is calib and dm.val_set is val


def test_train_loader_is_shuffled_reproducibly():
    a, b = DigitsDataModule(batch_size=64), DigitsDataModule(batch_size=64)
    xa, ya = next(iter(a.train_dataloader()))  # setup happens on demand
    xb, yb = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    in_order = torch.stack([a.train_set[i][0] for i in range(64)])
    assert not torch.equal(xa, in_order)
    assert len(a.test_dataloader().dataset) == 450


@pytest.mark.parametrize("value", [0, -5])
def test_calibration_samples_must_be_positive(value):
    with pytest.raises(ValueError, match=rf"num_calibration_samples must be a positive integer, got {value}"):
        DigitsDataModule(num_calibration_samples=value)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be a non-negative integer"),
        ({"calibration_subset": "stratified"}, "'random', 'first'.*'stratified'"),
        ({"split_seed": "zero"}, "split_seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DigitsDataModule(**kwargs)


def test_too_many_calibration_samples():
    dm = DigitsDataModule(num_calibration_samples=301)
    with pytest.raises(ValueError, match=r"num_calibration_samples=301 .* 300 images.*at most 300"):
        dm.setup("validate")


def test_empty_pool_and_abstract_base():
    class Empty(ClassificationDataModule):
        def _build(self, stage):
            self.calib_pool = torch.utils.data.TensorDataset(torch.zeros(0, 1))
            self.val_set = torch.utils.data.TensorDataset(torch.zeros(3, 1))

    with pytest.raises(ValueError, match="empty calibration pool"):
        Empty().setup("validate")
    with pytest.raises(NotImplementedError):
        ClassificationDataModule().setup("validate")
    assert CALIBRATION_SUBSETS == ("random", "first")


def test_hparams_are_saved():
    dm = DigitsDataModule(split_seed=4, num_calibration_samples=10)
    assert dm.hparams["split_seed"] == 4 and dm.hparams["num_calibration_samples"] == 10


def test_trainer_validate_uses_the_module():
    """Lightning calls setup("validate") only; calibration and validation data are there."""
    from lightning.pytorch import LightningModule, Trainer

    from lit_mpq.models import create_backbone

    class Probe(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = create_backbone("digits_cnn")
            self.calib_batches = 0
            self.seen = 0

        def on_validation_start(self):
            self.calib_batches = len(list(self.trainer.datamodule.calib_dataloader()))

        def validation_step(self, batch, batch_idx):
            self.seen += batch[0].shape[0]

    dm, probe = DigitsDataModule(batch_size=150, num_calibration_samples=64), Probe()
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(probe, datamodule=dm, verbose=False)
    assert probe.calib_batches == 1 and probe.seen == 450
