"""What the training callbacks share: the post-training steps before the first step, and the files at the end.

In ``fit``, :class:`~lit_mpq.callbacks.QuantizationAwareTraining` and :class:`~lit_mpq.callbacks.BitWidthLearning`
run the post-training callbacks listed before them (calibration, probe, allocation, rounding, attention ranges)
exactly as ``validate`` would, once, in ``on_train_start`` (the model is on its device, the process group is up, and
their metrics can be logged; the sanity check before it sees the float model), and
write the trained model as a packed checkpoint that ``validate`` and ``Export`` accept at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mpq.callbacks._common import post_training_steps, require_before, run_dir, timer
from lit_mpq.callbacks.allocation import BitAllocator
from lit_mpq.callbacks.block_ranges import BlockRangeSearch
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.callbacks.refinement import AttentionRefinement
from lit_mpq.callbacks.rounding import WeightRounding
from lit_mpq.callbacks.sensitivity import SensitivityProbe

POST_TRAINING_CALLBACKS = (
    Calibration,
    SensitivityProbe,
    BitAllocator,
    AttentionRefinement,
    BlockRangeSearch,
    WeightRounding,
)
"""The callbacks whose ``on_validation_start`` runs before training (in the order listed in the trainer)."""


def check_training_setup(trainer: pl.Trainer, me: pl.Callback) -> None:
    """Fail at start-up unless ``me`` is the only training callback, after a ``Calibration`` and a ``BitAllocator``."""
    others = [cb for cb in trainer.callbacks if getattr(cb, "trains_quantized", False) and cb is not me]
    if others:
        raise MisconfigurationException(
            f"{type(me).__name__} and {type(others[0]).__name__} both train the quantized model: list only one"
        )
    require_before(trainer, me, Calibration, "trains the calibrated model")
    require_before(trainer, me, BitAllocator, "trains at the allocated bit widths")
    misplaced = [
        type(cb).__name__
        for cb in trainer.callbacks[trainer.callbacks.index(me) + 1 :]
        if isinstance(cb, POST_TRAINING_CALLBACKS)
    ]
    if misplaced:
        raise MisconfigurationException(
            f"{', '.join(misplaced)} listed after {type(me).__name__}: list the post-training steps before it"
        )


def run_post_training_steps(trainer: pl.Trainer, pl_module: pl.LightningModule, me: pl.Callback) -> float:
    """Run the post-training callbacks listed before ``me`` on the eval-mode model; returns the seconds taken."""
    start = timer()
    was_training = pl_module.training
    pl_module.eval()
    try:
        with post_training_steps(), torch.no_grad():
            for callback in trainer.callbacks[: trainer.callbacks.index(me)]:
                if isinstance(callback, POST_TRAINING_CALLBACKS):
                    callback.on_validation_start(trainer, pl_module)
    finally:
        pl_module.train(was_training)
    return timer() - start


def write_training_outputs(
    trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, record: dict[str, Any]
) -> Path:
    """Write ``plan.yaml``, the packed ``quantized.pt`` and ``<name>.json`` (``record``) into the run folder.

    Every rank must call it (the run folder is a collective); rank 0 writes. Returns the folder.
    """
    from lit_mpq.callbacks.export import write_packed_checkpoint  # export imports the calibration module

    out = run_dir(trainer)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        pl_module.plan.to_yaml(out / "plan.yaml")
        record = {**record, **write_packed_checkpoint(trainer, pl_module, out / "quantized.pt")}
        (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    return out


def training_progress(trainer: pl.Trainer, pl_module: pl.LightningModule, fit_start: float) -> dict[str, Any]:
    """Epochs, steps, wall time since ``fit_start`` and the optimizer settings, for a training record."""
    return {
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "training_seconds": timer() - fit_start,
        "optimizer": {k: pl_module.hparams.get(k) for k in ("optimizer", "lr", "weight_decay")},
    }
