"""The ``Report`` callback.

Writes what a run found: ``plan.yaml`` (the reusable allocation), ``results.json`` (accuracy, energy, size,
average bits, timings, settings), ``card.yaml`` (the quantization card: every setting needed to reproduce and
compare the result), PNG figures, and TensorBoard scalars, histograms, figures and hparams.
Files are written on rank 0 only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_mpq.callbacks._common import QUANT_STAGES, require_before, require_plan, run_dir
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.energy import HorowitzEnergyModel
from lit_mpq.quant.apply import quant_layers
from lit_mpq.report import (
    bit_distribution_pie,
    bit_width_figure,
    build_card,
    energy_breakdown_figure,
    save_figure,
    sensitivity_heatmap_figure,
    sensitivity_histogram_figure,
    summary_figure,
    write_card,
    write_results_json,
)

HPARAM_METRICS = {
    "val/top1": "hp/top1",
    "val/top1_fp32": "hp/top1_fp32",
    "energy/analytic_uj_per_image": "hp/energy_uj_per_image",
    "energy/relative_to_int8": "hp/energy_relative_to_int8",
    "bits/avg_weight": "hp/avg_weight_bits",
    "size/weights_mb": "hp/weights_mb",
}


class Report(Callback):
    """Write the plan, the results and the figures of a quantized validation run.

    Args:
        output_dir: Where files go; default: the logger's version directory (e.g. ``logs/default/version_0``).
        save_figures: Also render PNG figures and TensorBoard figures.
    """

    def __init__(self, output_dir: str | None = None, save_figures: bool = True) -> None:
        self.output_dir = output_dir
        self.save_figures = save_figures
        self.last_output_dir: Path | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in QUANT_STAGES:
            require_before(trainer, self, Calibration, "needs the plan")

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else run_dir(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        plan = require_plan(pl_module, "Report")
        pl_module.log("bits/avg_weight", plan.average_weight_bits())
        pl_module.log("bits/avg_act", plan.average_act_bits())
        pl_module.log("size/weights_mb", plan.weight_size_mb())
        pl_module.log("bits/bit_ops_g", plan.bit_ops() / 1e9)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        out = self._dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        plan = require_plan(pl_module, "Report")
        out.mkdir(parents=True, exist_ok=True)
        plan.to_yaml(out / "plan.yaml")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor | float)}
        results = self._results(pl_module, metrics)
        write_results_json(out / "results.json", results)
        write_card(out / "card.yaml", self._card(trainer, pl_module))
        write_results_json(out / "activation_qparams.json", self._activation_qparams(pl_module))
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in tensorboards:
            self._log_tensorboard(logger, pl_module, metrics)
        if self.save_figures:
            self._figures(plan, pl_module, out, tensorboards)
        self.last_output_dir = out

    @staticmethod
    def _results(pl_module: pl.LightningModule, metrics: dict[str, float]) -> dict[str, Any]:
        plan = pl_module.plan
        results: dict[str, Any] = {
            "top1": metrics.get("val/top1"),
            "top5": metrics.get("val/top5"),
            "top1_fp32": metrics.get("val/top1_fp32"),
            "top5_fp32": metrics.get("val/top5_fp32"),
            "avg_weight_bits": plan.average_weight_bits(),
            "avg_act_bits": plan.average_act_bits(),
            "weights_mb": plan.weight_size_mb(),
            "bit_ops_per_image": plan.bit_ops(),
            "num_quantized_layers": len(plan),
            "backbone": pl_module.hparams.get("backbone"),
            "metrics": metrics,
        }
        for key, value in pl_module.results.items():
            results[key] = {k: v for k, v in value.items() if k != "per_layer"} if key == "energy" else value
        if "energy" in pl_module.results:
            results["energy"]["per_layer"] = pl_module.results["energy"]["per_layer"]
        return results

    @staticmethod
    def _activation_qparams(pl_module: pl.LightningModule) -> dict[str, Any]:
        """Each layer's input-observer range and, at its allocated bits, scale and zero point (for audits)."""
        table = {}
        for name, layer in quant_layers(pl_module.model).items():
            quantizer = layer.input_quantizer
            row: dict[str, Any] = {
                "observer": type(quantizer.observer).__name__,
                "min": float(quantizer.observer.min_val),
                "max": float(quantizer.observer.max_val),
                "bits": quantizer.bits,
            }
            if quantizer.bits is not None and quantizer.observer.has_data:
                scale, zero_point = quantizer.qparams(quantizer.bits)
                row["scale"], row["zero_point"] = float(scale), int(zero_point)
            table[name] = row
        return table

    @staticmethod
    def _card(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        calibration = pl_module.results.get("calibration", {})
        sensitivity = pl_module.results.get("sensitivity", {})
        datamodule = trainer.datamodule
        hparams = dict(getattr(datamodule, "hparams", {}))
        subset = hparams.get("calibration_subset", "random")
        images = int(calibration.get("images", 0))
        seed = os.environ.get("PL_GLOBAL_SEED")
        return build_card(
            plan=pl_module.plan,
            energy_model=getattr(pl_module, "energy_model", None) or HorowitzEnergyModel(),
            weight_granularity=calibration.get("weight_granularity", "per_channel"),
            weight_symmetric=bool(calibration.get("weight_symmetric", True)),
            weight_observer=calibration.get("weight_observer", "minmax"),
            act_observer=calibration.get("act_observer", "minmax"),
            act_symmetric=bool(calibration.get("act_symmetric", False)),
            percentile=calibration.get("percentile"),
            bias_correction=bool(calibration.get("bias_correction", False)),
            bn_folded=False,
            calibration_images=images,
            calibration_seed=hparams.get("calibration_seed"),
            calibration_subset=f"{subset} {images} images of the calibration pool",
            dataset=str(hparams.get("dataset", type(datamodule).__name__)),
            sensitivity_metric=sensitivity.get("metric"),
            policy=str(pl_module.results.get("allocation", {}).get("policy", "none")),
            bits_candidates=sensitivity.get(
                "candidate_bits", sorted({b for b in pl_module.plan.bits().values() for b in b if b is not None})
            ),
            seed_everything=int(seed) if seed is not None else None,
        )

    @staticmethod
    def _log_tensorboard(logger: TensorBoardLogger, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        writer = logger.experiment
        plan = pl_module.plan
        for kind in ("w", "a"):
            scores = [s for _, lp in plan.items() for b, s in lp.sensitivity.get(kind, {}).items()]
            if scores:
                writer.add_histogram(f"sens/{kind}_log10", torch.log10(torch.tensor(scores).clamp_min(1e-30)), 0)
        writer.add_histogram("bits/weight", torch.tensor([lp.w_bits or 32 for _, lp in plan.items()]), 0)
        writer.add_histogram("bits/act", torch.tensor([lp.a_bits or 32 for _, lp in plan.items()]), 0)
        hp_metrics = {hp: metrics[key] for key, hp in HPARAM_METRICS.items() if key in metrics}
        params = {
            "backbone": str(pl_module.hparams.get("backbone")),
            "policy": str(pl_module.results.get("allocation", {}).get("policy", "none")),
            "act_observer": str(pl_module.results.get("calibration", {}).get("act_observer", "none")),
            "calibration_images": int(pl_module.results.get("calibration", {}).get("images", 0)),
        }
        logger.log_hyperparams(params, metrics=hp_metrics)
        writer.flush()

    @staticmethod
    def _figures(plan, pl_module: pl.LightningModule, out: Path, tensorboards: list[TensorBoardLogger]) -> None:
        figures = {
            "bits_per_layer": bit_width_figure(plan),
            "bit_distribution": bit_distribution_pie(plan),
            "sensitivity_histogram": sensitivity_histogram_figure(plan),
            "sensitivity_heatmap": sensitivity_heatmap_figure(plan),
        }
        if "energy" in pl_module.results:
            figures["energy_breakdown"] = energy_breakdown_figure(pl_module.results["energy"])
        figures["summary"] = summary_figure(plan, pl_module.results.get("energy"), None)
        for name, fig in figures.items():
            for logger in tensorboards:
                logger.experiment.add_figure(f"figures/{name}", fig, 0, close=False)
            save_figure(fig, out / f"{name}.png")
        for logger in tensorboards:
            logger.experiment.flush()
