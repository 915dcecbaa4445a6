"""Helpers shared by the callbacks: where outputs go, calibration batches, cross-rank reductions, order checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lit_mpq.plan import QuantPlan

QUANT_STAGES = ("validate", "test")
"""Stages in which the quantization callbacks act; ``fit`` trains the plain FP32 model, unless a training callback
(:mod:`lit_mpq.callbacks.qat`) quantizes it: then the post-training steps run once before training starts."""

_PTQ_BEFORE_TRAINING: ContextVar[bool] = ContextVar("ptq_before_training", default=False)


def trains_quantized(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` has a callback that trains under quantization (QAT, learned bit widths)."""
    return any(getattr(callback, "trains_quantized", False) for callback in getattr(trainer, "callbacks", ()))


def quantizes_in_stage(trainer: pl.Trainer, stage: str) -> bool:
    """Whether the post-training callbacks set up in ``stage``: ``validate``/``test``, and ``fit`` for QAT."""
    return stage in QUANT_STAGES or (stage == "fit" and trains_quantized(trainer))


@contextmanager
def post_training_steps() -> Iterator[None]:
    """Make :func:`is_quant_run` true in ``fit`` for the duration of the block.

    A training callback runs the calibration, probe, allocation and rounding callbacks' ``on_validation_start`` in it,
    once, before the first training step.
    """
    token = _PTQ_BEFORE_TRAINING.set(True)
    try:
        yield
    finally:
        _PTQ_BEFORE_TRAINING.reset(token)


def is_quant_run(trainer: pl.Trainer) -> bool:
    """Whether the quantization callbacks act now: in ``validate`` and each sweep point.

    Not in ``fit``'s validation loop nor in a sanity check, so a training config may list them too (in ``fit`` they
    act only when a training callback calls them, inside :func:`post_training_steps`).
    """
    if getattr(trainer, "sanity_checking", False):
        return False
    stage = getattr(getattr(trainer, "state", None), "fn", None)
    if stage is None:  # hooks called by hand
        return True
    stage = str(getattr(stage, "value", stage))
    return stage in QUANT_STAGES or (stage == "fit" and _PTQ_BEFORE_TRAINING.get())


def trained_model_is_final(pl_module: pl.LightningModule, who: str) -> bool:
    """Whether ``pl_module``'s quantized model was trained in this process (QAT, learned widths): then it is final.

    A ``validate`` after such a ``fit`` must evaluate the trained model as it was saved: calibrating, allocating,
    rounding or searching ranges again would change it (re-rounding trained weights with GPFQ gave chance accuracy).
    The post-training callbacks (``who``: the caller's name) check this first; the first to skip says so once.
    """
    record = getattr(pl_module, "record", None)
    if getattr(record, "training", None) is None:
        return False
    if not getattr(pl_module, "_final_model_notice_given", False):
        rank_zero_info(
            f"{who} and the other post-training steps are skipped: the model was trained under quantization in this "
            "process and is evaluated as trained"
        )
        pl_module._final_model_notice_given = True
    return True


def run_dir(trainer: pl.Trainer) -> Path:
    """Directory for this run's files: the logger's version directory, else ``default_root_dir``.

    ``trainer.log_dir`` broadcasts from rank 0, so every rank must call this, never only rank 0.
    """
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


def calibration_shard(trainer: pl.Trainer, limit: int | None = None) -> tuple[DataLoader, int]:
    """This rank's part of the calibration set, in whole global batches, and the global number of images.

    The calibration images (the first ``limit`` of the datamodule's calibration split) are cut into batches exactly as
    on one device; rank ``r`` of ``N`` takes a contiguous block of about ``1/N`` of those batches. Every batch is
    therefore the same on any number of devices, so per-batch statistics agree bit for bit, and statistics merged in
    batch order equal the single-device ones.

    Raises:
        MisconfigurationException: If the datamodule has no ``calib_dataloader``.
        ValueError: If the calibration set is empty.
    """
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "calib_dataloader"):
        raise MisconfigurationException(
            "calibration needs a datamodule with calib_dataloader(); use one of lit_mpq.data's DataModules"
        )
    reference = datamodule.calib_dataloader()
    dataset, batch_size = reference.dataset, reference.batch_size or 1
    total = len(dataset) if limit is None else min(limit, len(dataset))
    if total == 0:
        raise ValueError("the calibration set is empty: set num_calibration_samples to a positive number")
    num_batches = -(-total // batch_size)
    world, rank = trainer.world_size, trainer.global_rank
    first = rank * num_batches // world
    last = (rank + 1) * num_batches // world
    indices = list(range(first * batch_size, min(last * batch_size, total)))
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=reference.num_workers,
        collate_fn=reference.collate_fn,
        pin_memory=reference.pin_memory,
    )
    return loader, total


def calibration_batches(trainer: pl.Trainer, desc: str, limit: int | None = None) -> Iterator[Tensor]:
    """This rank's calibration inputs (see :func:`calibration_shard`) on the model's device, with a progress bar.

    Args:
        trainer: The running trainer; its datamodule must provide ``calib_dataloader()``.
        desc: Progress-bar label.
        limit: Use only the first ``limit`` calibration images.
    """
    loader, _ = calibration_shard(trainer, limit)
    with progress(trainer, len(loader.dataset), desc, "img") as advance:
        for batch in loader:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            advance(int(x.shape[0]))
            yield trainer.strategy.batch_to_device(x)


def first_calibration_images(trainer: pl.Trainer, count: int) -> Iterator[Tensor]:
    """The first ``count`` calibration images on the model's device, the same on every rank (not this rank's shard).

    For searches whose choices must be those of one device whatever the number of devices.
    """
    seen = 0
    for batch in trainer.datamodule.calib_dataloader():
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x[: count - seen]
        seen += int(x.shape[0])
        yield trainer.strategy.batch_to_device(x)
        if seen >= count:
            return


@contextmanager
def progress(trainer: pl.Trainer, total: int, desc: str, unit: str) -> Iterator[Callable[[int], None]]:
    """A progress bar in the trainer's own style (rich or tqdm), shown only when the trainer shows one.

    Yields:
        ``advance(n)``, to call after each step.
    """
    if not show_progress(trainer):
        yield lambda n: None
        return
    if isinstance(trainer.progress_bar_callback, RichProgressBar):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(desc, total=total)
            yield lambda n: bar.advance(task, n)
        return
    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as bar:
        yield bar.update


def show_progress(trainer: pl.Trainer) -> bool:
    """Whether lit_mpq's own progress bars show: on rank 0, when ``trainer.enable_progress_bar`` left a bar on."""
    return bool(trainer.is_global_zero and trainer.progress_bar_callback is not None)


def gather_rows(trainer: pl.Trainer, rows: Tensor) -> Tensor:
    """Concatenate every rank's ``[n_r, D]`` rows in rank order (``n_r`` may differ); identity on one device."""
    if trainer.world_size == 1:
        return rows
    import torch.distributed as dist

    device = trainer.strategy.root_device
    count = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(trainer.world_size)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.zeros_like(padded) for _ in range(trainer.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts, strict=True)]).to(rows.device)


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


@contextmanager
def measure_phase(pl_module: pl.LightningModule, phase: str) -> Iterator[None]:
    """Count the enclosed work's energy and time under ``phase`` when an ``EnergyMeter`` set up a phase meter."""
    meter = getattr(pl_module, "phase_meter", None)
    if meter is None:
        yield
        return
    meter.start(phase)
    try:
        yield
    finally:
        meter.stop(phase)


def timer() -> float:
    """Monotonic clock, synchronising CUDA first so GPU work is counted."""
    import time

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
