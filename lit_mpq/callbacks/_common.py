"""Helpers shared by the callbacks: where outputs go, calibration batches, cross-rank reductions, order checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from tqdm.auto import tqdm

from lit_mpq.plan import QuantPlan

QUANT_STAGES = ("validate", "test")
"""Stages in which the quantization callbacks act; ``fit`` trains the plain FP32 model."""


def run_dir(trainer: pl.Trainer) -> Path:
    """Directory for this run's files: the logger's version directory, else ``default_root_dir``."""
    path = Path(trainer.log_dir or trainer.default_root_dir)
    return path


def require_plan(pl_module: pl.LightningModule, who: str) -> QuantPlan:
    """The module's plan, or a clear error saying that the ``Calibration`` callback must come first."""
    plan = getattr(pl_module, "plan", None)
    if plan is None:
        raise MisconfigurationException(
            f"{who} needs the Calibration callback (lit_mpq.callbacks.Calibration) earlier in trainer.callbacks"
        )
    return plan


def require_before(trainer: pl.Trainer, me: pl.Callback, needed: type, why: str) -> None:
    """Fail at start-up unless a ``needed`` callback is listed before ``me`` in ``trainer.callbacks``."""
    callbacks = trainer.callbacks
    mine = callbacks.index(me)
    if not any(isinstance(cb, needed) for cb in callbacks[:mine]):
        where = "after" if any(isinstance(cb, needed) for cb in callbacks[mine:]) else "missing"
        raise MisconfigurationException(
            f"{type(me).__name__} {why}: add lit_mpq.callbacks.{needed.__name__} to trainer.callbacks before it"
            + (" (it is listed after it; callbacks run in list order)" if where == "after" else "")
        )


def calibration_batches(trainer: pl.Trainer, desc: str, limit: int | None = None) -> Iterator[Tensor]:
    """Calibration inputs on the model's device, with a progress bar on rank 0.

    Args:
        trainer: The running trainer; its datamodule must provide ``calib_dataloader()``.
        desc: Progress-bar label.
        limit: Stop after this many images (whole batches, the last one cut).

    Raises:
        MisconfigurationException: If the datamodule has no ``calib_dataloader``.
        ValueError: If the calibration loader yields no data.
    """
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "calib_dataloader"):
        raise MisconfigurationException(
            "calibration needs a datamodule with calib_dataloader(); use one of lit_mpq.data's DataModules"
        )
    loader = datamodule.calib_dataloader()
    seen = 0
    with tqdm(
        total=limit or len(loader.dataset),
        desc=desc,
        unit="img",
        disable=not trainer.is_global_zero,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for batch in loader:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            if limit is not None:
                x = x[: limit - seen]
            if x.shape[0] == 0:
                break
            x = trainer.strategy.batch_to_device(x)
            seen += int(x.shape[0])
            bar.update(int(x.shape[0]))
            yield x
            if limit is not None and seen >= limit:
                break
    if seen == 0:
        raise ValueError("the calibration set is empty: set num_calibration_samples to a positive number")


def strategy_reduce(trainer: pl.Trainer):
    """``reduce(tensor, op)`` through the trainer's strategy (an identity on one device)."""

    def reduce(tensor: Tensor, op: str) -> Tensor:
        if trainer.world_size == 1:
            return tensor
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        device = trainer.strategy.root_device
        work = tensor.to(device)
        dist.all_reduce(work, op=ops[op])
        return work.to(tensor.device)

    return reduce


def timer() -> float:
    """Monotonic clock, synchronising CUDA first so GPU work is counted."""
    import time

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
