"""The ``EnergyMeter`` callback.

Reports the analytic energy of the applied plan (per image, per layer and per term) with the energy model's
citation, next to the uniform-INT8 and FP32 references, and logs it under ``energy/``. Measured energy from
hardware counters is reported as ``"unavailable"`` where no counter exists; no number is ever invented.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_mpq.callbacks._common import QUANT_STAGES, require_before, require_plan
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.energy import EnergyModel, HorowitzEnergyModel, energy_report

UNAVAILABLE = "unavailable"


class EnergyMeter(Callback):
    """Analytic energy of the quantized model.

    Args:
        energy_model: An :class:`~lit_mpq.energy.EnergyModel`; default: the Horowitz 45 nm table.
    """

    def __init__(self, energy_model: EnergyModel | None = None) -> None:
        self.energy_model = energy_model if energy_model is not None else HorowitzEnergyModel()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in QUANT_STAGES:
            require_before(trainer, self, Calibration, "needs the measured layers of the plan")
            # Budget-aware allocation policies read the run's energy model from the module.
            pl_module.energy_model = self.energy_model

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        report = energy_report(require_plan(pl_module, "EnergyMeter"), self.energy_model)
        report["measured"] = UNAVAILABLE
        pl_module.results["energy"] = report
        pl_module.log("energy/analytic_uj_per_image", report["total_uj_per_image"])
        pl_module.log("energy/relative_to_int8", report["relative_to_int8"])
        pl_module.log("energy/relative_to_fp32", report["relative_to_fp32"])
        pl_module.log("energy/mac_uj_per_image", report["mac_uj_per_image"])
        pl_module.log("energy/weight_mem_uj_per_image", report["weight_mem_uj_per_image"])
        pl_module.log("energy/act_mem_uj_per_image", report["act_mem_uj_per_image"])
