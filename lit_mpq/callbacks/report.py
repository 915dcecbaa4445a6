"""The ``Report`` callback.

Writes what a run found: ``plan.yaml`` (the reusable allocation), ``results.json`` (accuracy, energy, size,
average bits, timings, settings), ``card.yaml`` (the quantization card: every setting needed to reproduce and
compare the result), PNG figures, and TensorBoard scalars, histograms, figures and hparams.
Files are written on rank 0 only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from typing_extensions import override

from lit_mpq.callbacks._common import QUANT_STAGES, is_quant_run, require_before, require_plan, run_dir
from lit_mpq.callbacks.allocation import energy_model_of
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.quant.apply import quant_layers
from lit_mpq.quant.operations import is_quant_operation
from lit_mpq.report import (
    bit_distribution_pie,
    bit_width_figure,
    energy_breakdown_figure,
    save_figure,
    sensitivity_heatmap_figure,
    sensitivity_histogram_figure,
    summary_figure,
    write_card,
    write_results_json,
)
from lit_mpq.report.results import run_card, run_results, run_summary

HPARAM_METRICS = {
    "val/top1": "hp/top1",
    "val/top1_fp32": "hp/top1_fp32",
    "energy/analytic_uj_per_image": "hp/energy_uj_per_image",
    "energy/relative_to_int8": "hp/energy_relative_to_int8",
    "bits/avg_weight": "hp/avg_weight_bits",
    "size/weights_mb": "hp/weights_mb",
}


class Report(Callback):
    """Write the plan, the results and the figures of a quantized validation run, and print a short summary.

    Args:
        output_dir: Where files go; default: the logger's version directory (e.g. ``logs/default/version_0``).
        save_figures: Also render PNG figures and TensorBoard figures.
        print_summary: Have the command line print a few lines when the run ends: accuracy next to FP32, energy,
            bits, size, policy and the run folder.

    The output folder is checked at setup, before any work: it must be writable, and it must not already hold
    another run's ``results.json`` (two runs given the same logger name and version would mix their files).
    """

    def __init__(self, output_dir: str | None = None, save_figures: bool = True, print_summary: bool = True) -> None:
        self.output_dir = output_dir
        self.save_figures = save_figures
        self.print_summary = print_summary
        self.probe_figures = True
        """Draw the figures of the sensitivity probe; a sweep's later points skip them (the probe is the config
        run's, so its figures would be the same in every point)."""
        self.last_output_dir: Path | None = None
        self.last_summary: str | None = None
        """The few lines that say what the last run gave; the command line prints them when it ends."""
        self._written: set[Path] = set()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in QUANT_STAGES:
            return
        require_before(trainer, self, Calibration, "needs the plan")
        out = self._dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if trainer.is_global_zero:
            check_output_dir(out, written_by_this_run=self._written)

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else run_dir(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        plan = require_plan(pl_module, "Report")
        pl_module.log("bits/avg_weight", plan.average_weight_bits())
        pl_module.log("bits/avg_act", plan.average_act_bits())
        pl_module.log("size/weights_mb", plan.weight_size_mb())
        pl_module.log("bits/bit_ops_g", plan.bit_ops() / 1e9)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        out = self._dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        plan = require_plan(pl_module, "Report")
        out.mkdir(parents=True, exist_ok=True)
        plan.to_yaml(out / "plan.yaml")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor | float)}
        results = run_results(plan, pl_module.record, metrics, pl_module.hparams.get("backbone"))
        write_results_json(out / "results.json", results)
        self._written.add(out.resolve())
        datamodule = trainer.datamodule
        hparams = dict(getattr(datamodule, "hparams", {}))
        card = run_card(
            plan,
            pl_module.record,
            energy_model_of(trainer),
            hparams,
            dataset=str(hparams.get("dataset", type(datamodule).__name__)),
        )
        write_card(out / "card.yaml", card)
        write_results_json(out / "activation_qparams.json", self._activation_qparams(pl_module))
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in tensorboards:
            self._log_tensorboard(logger, pl_module, metrics)
        if self.save_figures:
            self._figures(plan, pl_module, out, tensorboards, metrics, self.probe_figures)
        self.last_output_dir = out
        self.last_summary = run_summary(results, out)

    @staticmethod
    def _activation_qparams(pl_module: pl.LightningModule) -> dict[str, Any]:
        """Each layer's input-observer range and, at its allocated bits, scale and zero point (for audits)."""
        table = {}
        quantizers = []
        for name, layer in quant_layers(pl_module.model).items():
            quantizers.append((name, layer.input_quantizer))
            if is_quant_operation(layer) and layer.other_quantizer is not None:  # k, v, an add's second operand
                quantizers.append((f"{name} (right operand)", layer.other_quantizer))
        for name, quantizer in quantizers:
            row: dict[str, Any] = {
                "observer": type(quantizer.observer).__name__,
                # One range per tensor, or one per channel (the post-LayerNorm reparameterization)
                "min": _plain(quantizer.observer.min_val),
                "max": _plain(quantizer.observer.max_val),
                "bits": quantizer.bits,
            }
            if quantizer.bits is not None and quantizer.observer.has_data:
                scale, zero_point = quantizer.qparams(quantizer.bits)
                # One value per tensor, or one per channel (per-channel activation quantizers)
                row["scale"], row["zero_point"] = _plain(scale), _plain(zero_point)
            table[name] = row
        return table

    @staticmethod
    def _log_tensorboard(logger: TensorBoardLogger, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        writer = logger.experiment
        plan = pl_module.plan
        record = pl_module.record
        for kind in ("w", "a"):
            scores = [s for _, lp in plan.items() for b, s in lp.sensitivity.get(kind, {}).items()]
            if scores:
                writer.add_histogram(f"sens/{kind}_log10", torch.log10(torch.tensor(scores).clamp_min(1e-30)), 0)
        writer.add_histogram("bits/weight", torch.tensor([lp.w_bits or 32 for _, lp in plan.items()]), 0)
        writer.add_histogram("bits/act", torch.tensor([lp.a_bits or 32 for _, lp in plan.items()]), 0)
        hp_metrics = {hp: metrics[key] for key, hp in HPARAM_METRICS.items() if key in metrics}
        params = {
            "backbone": str(pl_module.hparams.get("backbone")),
            "policy": record.allocation.policy if record.allocation is not None else "none",
            "act_observer": str(record.calibration.settings.get("act_observer")) if record.calibration else "none",
            "calibration_images": record.calibration.images if record.calibration is not None else 0,
        }
        logger.log_hyperparams(params, metrics=hp_metrics)
        writer.flush()

    @staticmethod
    def _figures(
        plan,
        pl_module: pl.LightningModule,
        out: Path,
        tensorboards: list[TensorBoardLogger],
        metrics: dict[str, float],
        probe_figures: bool,
    ) -> None:
        energy = pl_module.record.energy
        figures = {"bits_per_layer": bit_width_figure(plan), "bit_distribution": bit_distribution_pie(plan)}
        if probe_figures:
            figures["sensitivity_histogram"] = sensitivity_histogram_figure(plan)
            figures["sensitivity_heatmap"] = sensitivity_heatmap_figure(plan)
        if energy is not None:
            figures["energy_breakdown"] = energy_breakdown_figure(energy)
        record = pl_module.record
        figures["summary"] = summary_figure(
            plan,
            energy,
            None,
            top1=metrics.get("val/top1"),
            top1_fp32=metrics.get("val/top1_fp32"),
            candidate_bits=record.sensitivity.candidate_bits if record.sensitivity is not None else None,
        )
        for name, fig in figures.items():
            path = save_figure(fig, out / f"{name}.png")
            if tensorboards:  # the saved pixels, not a second rendering: drawing is most of a figure's cost
                with Image.open(path) as png:
                    pixels = np.asarray(png.convert("RGB"))
                for logger in tensorboards:
                    logger.experiment.add_image(f"figures/{name}", pixels, 0, dataformats="HWC")
        for logger in tensorboards:
            logger.experiment.flush()


def check_output_dir(out: Path, written_by_this_run: set[Path] | None = None) -> None:
    """Fail before any work if ``out`` cannot be written or already holds another run's results.

    Args:
        out: The run's output folder.
        written_by_this_run: Folders this process already wrote (a sweep re-validates into the same run).

    Raises:
        RunDirectoryError: If the folder is not writable or holds another run's ``results.json``.
    """
    results = out / "results.json"
    if results.exists() and out.resolve() not in (written_by_this_run or set()):
        raise RunDirectoryError(
            f"{str(out)!r} already holds the results of another run ({results.name}): choose another folder "
            "(Report.output_dir, or the logger's name/version), or remove the old run first"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise RunDirectoryError(
            f"cannot write the run's files to {str(out)!r} ({err.strerror or err}): set Report.output_dir (or the "
            "logger's save_dir) to a writable folder"
        ) from None


class RunDirectoryError(ValueError):
    """The run's output folder cannot be used (not writable, or it holds another run's results)."""


def _plain(t: torch.Tensor) -> float | int | list:
    """A scalar tensor as a number, a per-channel one as a list (for JSON)."""
    return t.item() if t.numel() == 1 else t.flatten().tolist()
