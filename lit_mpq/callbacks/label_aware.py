"""The ``LabelAwareEvaluation`` callback.

Does quantization cost more on classes the model finds alike? In ``on_validation_start`` it runs the calibration
images through the FP32 model (every quantizer off), accumulates per-class sums of the softmax outputs (each rank
its shard, summed across ranks), builds the class-similarity matrix (symmetric KL between the per-class mean outputs;
low = similar) and picks ``k``-class subsets: the most similar, the most dissimilar and ``num_random`` random ones
(:mod:`lit_mpq.evaluation.label_aware`; decided on rank 0 and broadcast). During the validation loop it reads the
logits the module computes anyway (a forward hook on the backbone that keeps the outputs for this batch's images,
sorted by whether the quantizers were on), runs the missing pass itself only when the module did not (e.g. with
``fp32_reference: false``), and counts, per subset, the images labelled in it that the argmax over the subset's
classes gets right, FP32 and quantized. Counts are summed across ranks. The table goes into the run record
(``results.json``: ``label_aware``), ``label_aware.md``, ``label_aware.png``, ``class_divergence.npy``, TensorBoard
(text and figure) and the scalars ``label/<subset>_top1`` / ``label/<subset>_top1_fp32``.

Enable it in YAML (anywhere after ``Calibration``; the FP32 statistics are taken once per Trainer, so a sweep's
points share the subsets and each point's folder gets its own table)::

    - class_path: lit_mpq.callbacks.LabelAwareEvaluation
      init_args: {subset_size: 3, num_random: 3, seed: 0}
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch import Tensor
from typing_extensions import override

from lit_mpq.callbacks._common import (
    QUANT_STAGES,
    calibration_shard,
    is_quant_run,
    require_before,
    run_dir,
    strategy_reduce,
    timer,
)
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.evaluation.label_aware import (
    DEFAULT_BEAM_WIDTH,
    DEFAULT_EXHAUSTIVE_LIMIT,
    ClassProbabilitySums,
    ClassSubset,
    MissingClassesWarning,
    label_aware_figure,
    label_aware_markdown,
    label_aware_rows,
    select_subsets,
    subset_counts,
    symmetric_kl_matrix,
)
from lit_mpq.quant.apply import current_modes, quantizers_mode
from lit_mpq.report.record import LabelAwareRecord

MISSING_CLASS_ACTIONS = ("warn", "error")
KNOWN_CLASS_NAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
"""Class names of datasets whose DataModule knows only the dataset's name (keyed by its ``dataset`` attribute)."""


class LabelAwareEvaluation(Callback):
    """FP32 vs quantized accuracy on the most similar, the most dissimilar and random ``k``-class subsets.

    Args:
        subset_size: Classes per subset (``k``, at least 2).
        num_random: Random subsets besides the two extremes.
        seed: Seed of the random subsets.
        num_samples: Calibration images for the class statistics; default: all of the calibration split.
        class_names: Names of the classes in label order; default: the DataModule's (``classes``/``class_names``,
            or the names of a known ``dataset``), else the class indices.
        on_missing_class: A class without a calibration image: ``"warn"`` (a warning naming it; it takes part in no
            subset) or ``"error"``.
        exhaustive_limit: Score every subset when there are at most this many (``C(n, k)``); beam search beyond.
        beam_width: Subsets kept per size by the beam search (see :func:`lit_mpq.evaluation.select_subsets`).
        save_figure: Also draw ``label_aware.png`` (and put it in TensorBoard).

    Raises:
        ValueError: On a subset size below 2, a negative count, or an unknown ``on_missing_class``.
    """

    def __init__(
        self,
        subset_size: int = 3,
        num_random: int = 3,
        seed: int = 0,
        num_samples: int | None = None,
        class_names: list[str] | None = None,
        on_missing_class: str = "warn",
        exhaustive_limit: int = DEFAULT_EXHAUSTIVE_LIMIT,
        beam_width: int = DEFAULT_BEAM_WIDTH,
        save_figure: bool = True,
    ) -> None:
        if subset_size < 2:
            raise ValueError(f"LabelAwareEvaluation.subset_size must be at least 2, got {subset_size}")
        if num_random < 0:
            raise ValueError(f"LabelAwareEvaluation.num_random must be 0 or more, got {num_random}")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"LabelAwareEvaluation.num_samples must be positive or null (all), got {num_samples}")
        if on_missing_class not in MISSING_CLASS_ACTIONS:
            raise ValueError(
                f"LabelAwareEvaluation.on_missing_class must be one of {list(MISSING_CLASS_ACTIONS)}, "
                f"got {on_missing_class!r}"
            )
        if exhaustive_limit < 0 or beam_width < 1:
            raise ValueError("LabelAwareEvaluation: exhaustive_limit must be >= 0 and beam_width >= 1")
        self.subset_size = subset_size
        self.num_random = num_random
        self.seed = seed
        self.num_samples = num_samples
        self.class_names = list(class_names) if class_names is not None else None
        self.on_missing_class = on_missing_class
        self.exhaustive_limit = exhaustive_limit
        self.beam_width = beam_width
        self.save_figure = save_figure
        self.subsets: list[ClassSubset] | None = None
        """The chosen subsets (set once per Trainer, in the first validation run)."""
        self.divergence: Tensor | None = None
        """``[C, C]`` symmetric KL between the per-class mean FP32 outputs, nats."""
        self.rows: list[dict[str, Any]] = []
        """The last run's table (see :func:`lit_mpq.evaluation.label_aware_rows`)."""
        self._names: list[str] | None = None
        self._images = 0
        self._missing: list[int] = []
        self._seconds = 0.0
        self._counts = torch.zeros(0, 2, 2, dtype=torch.int64)  # [subset, fp32 | quant, correct | total]
        self._captured: dict[str, Tensor] = {}
        self._handle: Any = None

    # ------------------------------------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in QUANT_STAGES:
            return
        require_before(trainer, self, Calibration, "needs the quantized model")
        classes = getattr(pl_module, "num_classes", None)
        if isinstance(classes, int) and self.subset_size > classes:
            raise MisconfigurationException(
                f"LabelAwareEvaluation.subset_size is {self.subset_size} but the model has {classes} classes"
            )
        if self.class_names is not None and isinstance(classes, int) and len(self.class_names) != classes:
            raise MisconfigurationException(
                f"LabelAwareEvaluation.class_names has {len(self.class_names)} names for {classes} classes"
            )

    def _class_names(self, trainer: pl.Trainer, num_classes: int) -> list[str] | None:
        if self.class_names is not None:
            return self.class_names
        datamodule = trainer.datamodule
        for attribute in ("class_names", "classes"):
            names = getattr(datamodule, attribute, None)
            if isinstance(names, list | tuple) and len(names) == num_classes:
                return [str(n) for n in names]
        names = KNOWN_CLASS_NAMES.get(str(getattr(datamodule, "dataset", "")))
        return names if names is not None and len(names) == num_classes else None

    # ------------------------------------------------------------------------------------------------ FP32 stats

    def _select(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FP32 class statistics on the calibration data, the divergence matrix and the subsets (once)."""
        start = timer()
        loader, _ = calibration_shard(trainer, self.num_samples)
        stats: ClassProbabilitySums | None = None
        with torch.no_grad(), quantizers_mode(pl_module.model, "off"):
            for batch in loader:
                if not isinstance(batch, list | tuple) or len(batch) < 2:
                    raise MisconfigurationException(
                        "LabelAwareEvaluation needs labelled calibration data: calib_dataloader() must yield (x, y)"
                    )
                x, y = batch[0], batch[1]
                logits = pl_module(trainer.strategy.batch_to_device(x))
                if stats is None:
                    stats = ClassProbabilitySums.zeros(int(logits.shape[1]))
                stats.update_from_logits(logits, y)
        if stats is None:  # this rank got no calibration batch: its share of the sums is zero
            stats = ClassProbabilitySums.zeros(int(pl_module.num_classes))
        stats = ClassProbabilitySums.from_tensor(strategy_reduce(trainer)(stats.as_tensor(), "sum"))
        self._names = self._class_names(trainer, stats.num_classes)
        self._images = int(stats.counts.sum())
        self._missing = stats.missing_classes()
        decision: Any = None
        if trainer.is_global_zero:
            if self._missing and self.on_missing_class == "warn":
                names = ", ".join(f"{c} ({self._names[c]})" if self._names else str(c) for c in self._missing[:20]) + (
                    f" and {len(self._missing) - 20} more" if len(self._missing) > 20 else ""
                )
                rank_zero_warn(
                    f"LabelAwareEvaluation: {len(self._missing)} of {stats.num_classes} classes have no calibration "
                    f"image ({names}); they are left out of the class subsets. Use more calibration images "
                    "(num_samples / num_calibration_samples) or a class-balanced calibration set.",
                    category=MissingClassesWarning,
                )
            try:
                with warnings.catch_warnings():  # warned above, once, with the remedy
                    warnings.simplefilter("ignore", MissingClassesWarning)
                    means = stats.means(allow_missing=self.on_missing_class == "warn", class_names=self._names)
                divergence = symmetric_kl_matrix(means)
                subsets = select_subsets(
                    divergence,
                    self.subset_size,
                    self.num_random,
                    self.seed,
                    exhaustive_limit=self.exhaustive_limit,
                    beam_width=self.beam_width,
                )
                decision = (divergence, subsets)
            except ValueError as err:
                decision = f"LabelAwareEvaluation: {err}"
        decision = trainer.strategy.broadcast(decision, src=0)
        if isinstance(decision, str):
            raise MisconfigurationException(decision)
        self.divergence, self.subsets = decision
        self._seconds = timer() - start

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        if self.subsets is None:
            self._select(trainer, pl_module)
        assert self.subsets is not None
        self._counts = torch.zeros(len(self.subsets), 2, 2, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------------ evaluation

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.subsets is None or not is_quant_run(trainer):
            return
        x = batch[0]
        model = pl_module.model
        self._captured = {}

        def keep(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            # Only the module's own passes over this batch's images; the first of each kind.
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                return
            if inputs[0].shape != x.shape or inputs[0].data_ptr() != x.data_ptr():
                return
            kind = "quant" if any(mode != "off" for _, mode in current_modes(module)) else "fp32"
            self._captured.setdefault(kind, output.detach())

        self._remove_hook()
        self._handle = model.register_forward_hook(keep)

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._remove_hook()
        if self.subsets is None or not is_quant_run(trainer):
            return
        x, y = batch[0], batch[1]
        captured, self._captured = self._captured, {}
        with torch.no_grad():
            quant = captured.get("quant")
            if quant is None:  # the module made no quantized pass over these images (or one the hook missed)
                quant = pl_module(x)
            fp32 = captured.get("fp32")
            if fp32 is None:  # e.g. fp32_reference: false
                with quantizers_mode(pl_module.model, "off"):
                    fp32 = pl_module(x)
        classes = [s.classes for s in self.subsets]
        self._counts[:, 0] += subset_counts(fp32, y, classes)
        self._counts[:, 1] += subset_counts(quant, y, classes)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.subsets is None or not is_quant_run(trainer):
            return
        counts = strategy_reduce(trainer)(self._counts, "sum")
        self.rows = label_aware_rows(self.subsets, counts[:, 0], counts[:, 1], self._names)
        assert self.subsets is not None
        pl_module.record.label_aware = LabelAwareRecord(
            subset_size=self.subset_size,
            selection=self.subsets[0].method,
            calibration_images=self._images,
            missing_classes=list(self._missing),
            rows=self.rows,
            seconds=self._seconds,
        )
        random_index = 0
        for row in self.rows:
            name = row["kind"]
            if name == "random":
                name, random_index = f"random_{random_index}", random_index + 1
            if row["images"]:
                pl_module.log(f"label/{name}_top1", float(row["top1"]), sync_dist=False)
                pl_module.log(f"label/{name}_top1_fp32", float(row["top1_fp32"]), sync_dist=False)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.subsets is None or not is_quant_run(trainer) or not self.rows:
            return
        out = self._dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        title = self._title(pl_module)
        table = label_aware_markdown(self.rows)
        (out / "label_aware.md").write_text(self._markdown(title, table), encoding="utf-8")
        assert self.divergence is not None
        np.save(out / "class_divergence.npy", self.divergence.numpy())
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in tensorboards:
            logger.experiment.add_text("label_aware/table", table, 0)
        if self.save_figure:
            from lit_mpq.report.figures import save_figure

            fig = label_aware_figure(self.rows, self.divergence, self._names, title)
            path = save_figure(fig, out / "label_aware.png")
            if tensorboards:
                with Image.open(path) as png:
                    pixels = np.asarray(png.convert("RGB"))
                for logger in tensorboards:
                    logger.experiment.add_image("figures/label_aware", pixels, 0, dataformats="HWC")
        for logger in tensorboards:
            logger.experiment.flush()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hook()

    # ------------------------------------------------------------------------------------------------ outputs

    def _dir(self, trainer: pl.Trainer) -> Path:
        """The ``Report``'s folder when it has one of its own (a sweep point's), else the run folder."""
        from lit_mpq.callbacks.report import Report

        for callback in trainer.callbacks:
            if isinstance(callback, Report) and callback.output_dir:
                return Path(callback.output_dir)
        return run_dir(trainer)

    def _title(self, pl_module: pl.LightningModule) -> str:
        record = pl_module.record
        policy = record.allocation.policy if record.allocation is not None else "no allocation"
        backbone = pl_module.hparams.get("backbone", type(pl_module).__name__)
        return f"{backbone}: {self.subset_size}-class subsets, {policy}"

    def _markdown(self, title: str, table: str) -> str:
        assert self.subsets is not None
        missing = f"\nClasses without a calibration image (in no subset): {self._missing}.\n" if self._missing else ""
        return (
            f"# Label-aware evaluation\n\n{title}\n\n{table}\n"
            f"Subsets: the most similar and the most dissimilar {self.subset_size} classes ({self.subsets[0].method}) "
            f"and {self.num_random} random ones (seed {self.seed}). Similarity: symmetric KL divergence between the "
            f"per-class mean softmax outputs of the FP32 model on {self._images} calibration images (low = similar; "
            "the matrix is in class_divergence.npy); 'mean sym. KL' is the mean over the subset's pairs. Accuracy: "
            "over the evaluation images labelled with one of the subset's classes, argmax over those classes only.\n"
            f"{missing}"
        )
