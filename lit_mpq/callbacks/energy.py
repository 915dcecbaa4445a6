"""The ``EnergyMeter`` callback.

Reports the analytic energy of the applied plan (per image, per layer and per term) with the energy model's
citation, next to the uniform-INT8 and FP32 references, and measured energy where hardware counters exist: NVML for
the GPU, RAPL for CPU package and DRAM, optionally CO2 through CodeCarbon's offline tracker. Measurements are taken
per phase (calibration, probing, evaluation), summed over ranks, and given in J and J/image beside the analytic
estimate; where no counter works, the results say ``"unavailable"`` with the reason, and no number is invented.
It also logs ``time/eval_images_per_s``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_mpq.callbacks._common import QUANT_STAGES, is_quant_run, require_before, require_plan, strategy_reduce
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.energy import EnergyModel, HorowitzEnergyModel, MemoryHierarchyEnergyModel, energy_report, hierarchy_report
from lit_mpq.energy.measure import PhaseMeter, codecarbon_tracker, select_counters

UNAVAILABLE = "unavailable"
PHASES = ("calibration", "probe", "evaluation")


class EnergyMeter(Callback):
    """Analytic and measured energy of the quantized model.

    Args:
        energy_model: An :class:`~lit_mpq.energy.EnergyModel`; default: the Horowitz 45 nm table.
        measure: Measurement backends: ``["auto"]`` (every available one), a list of ``nvml`` / ``rapl``, or
            ``[]`` for none.
        codecarbon_country: ISO 3166 alpha-3 country code for CodeCarbon's offline CO2 estimate (e.g. ``FRA``);
            null disables CodeCarbon.

    Raises:
        ValueError: On an unknown backend.
    """

    def __init__(
        self,
        energy_model: EnergyModel | None = None,
        measure: list[str] = ["auto"],  # noqa: B006 - shown as the default by jsonargparse
        codecarbon_country: str | None = None,
    ) -> None:
        self.energy_model = energy_model if energy_model is not None else HorowitzEnergyModel()
        unknown = [m for m in measure if m not in ("auto", "nvml", "rapl")]
        if unknown:
            raise ValueError(f"unknown energy measurement backend(s) {unknown}; choose from ['auto', 'nvml', 'rapl']")
        self.measure = list(measure)
        self.codecarbon_country = codecarbon_country
        self.status: dict[str, str] = {}
        self._tracker: Any = None
        self._images = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in QUANT_STAGES:
            return
        require_before(trainer, self, Calibration, "needs the measured layers of the plan")
        if getattr(pl_module, "phase_meter", None) is None:
            device = trainer.strategy.root_device
            index = (device.index or 0) if device.type == "cuda" else 0
            names = [m for m in self.measure if not (m == "nvml" and device.type != "cuda")]
            if "auto" in names and device.type != "cuda":
                names = ["rapl"]
            counters, self.status = select_counters(names, index, read_rapl=trainer.local_rank == 0)
            if device.type != "cuda" and ("auto" in self.measure or "nvml" in self.measure):
                self.status["nvml"] = "unavailable: the run is not on a CUDA device"
            pl_module.phase_meter = PhaseMeter(counters)
        if self.codecarbon_country and trainer.is_global_zero and self._tracker is None:
            self._tracker, self.status["codecarbon"] = codecarbon_tracker(self.codecarbon_country)
            if self._tracker is not None:
                self._tracker.start()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = 0

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and getattr(pl_module, "phase_meter", None) is not None:
            pl_module.phase_meter.start("evaluation")

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
        self._images += int(batch[0].shape[0])

    def _measured(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: int) -> tuple[Any, float]:
        meter: PhaseMeter = pl_module.phase_meter
        reduce = strategy_reduce(trainer)
        # Every rank takes part in every reduction, in the same order, whatever its counters.
        available = int(reduce(torch.tensor(float(bool(meter.counters))), "max")) > 0
        phases = {}
        for phase in PHASES:
            seconds = float(reduce(torch.tensor(meter.seconds(phase), dtype=torch.float64), "max"))
            joules = float(reduce(torch.tensor(meter.joules(phase) or 0.0, dtype=torch.float64), "sum"))
            phases[phase] = {"seconds": seconds, "joules": joules if available else UNAVAILABLE}
        eval_seconds = phases["evaluation"]["seconds"]
        throughput = images / eval_seconds if eval_seconds > 0 else float("nan")
        if not available:
            return {"status": UNAVAILABLE, "backends": self.status, "phases": phases}, throughput
        joules = phases["evaluation"]["joules"]
        measured = {
            "status": "ok",
            "backends": self.status,
            "phases": phases,
            "eval_j": joules,
            "eval_j_per_image": joules / images if images else float("nan"),
        }
        return measured, throughput

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        if getattr(pl_module, "phase_meter", None) is not None:
            pl_module.phase_meter.stop("evaluation")
        plan = require_plan(pl_module, "EnergyMeter")
        report = energy_report(plan, self.energy_model)
        if isinstance(self.energy_model, MemoryHierarchyEnergyModel):  # where the energy goes, level by level
            report["hierarchy"] = hierarchy_report(plan, self.energy_model)
        images = int(strategy_reduce(trainer)(torch.tensor(self._images, dtype=torch.int64), "sum"))
        measured, throughput = self._measured(trainer, pl_module, images)
        if self._tracker is not None:
            emissions = self._tracker.stop()
            measured["co2_kg"] = float(emissions) if emissions is not None else UNAVAILABLE
            self._tracker = None
        report["measured"] = measured
        report["evaluated_images"] = images
        pl_module.record.energy = report
        pl_module.log("energy/analytic_uj_per_image", report["total_uj_per_image"])
        pl_module.log("energy/relative_to_int8", report["relative_to_int8"])
        pl_module.log("energy/relative_to_fp32", report["relative_to_fp32"])
        pl_module.log("energy/mac_uj_per_image", report["mac_uj_per_image"])
        pl_module.log("energy/weight_mem_uj_per_image", report["weight_mem_uj_per_image"])
        pl_module.log("energy/act_mem_uj_per_image", report["act_mem_uj_per_image"])
        for level, value in report.get("hierarchy", {}).get("levels_uj_per_image", {}).items():
            if level != "total":
                pl_module.log(f"energy/{level}_uj_per_image", value)
        pl_module.log("time/eval_images_per_s", throughput)
        if measured["status"] == "ok":  # the same on every rank (reduced above), so the keys match
            pl_module.log("energy/measured_eval_j_per_image", measured["eval_j_per_image"])
