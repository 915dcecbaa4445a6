"""The ``SensitivityProbe`` callback.

Measures every layer's sensitivity to every candidate bit width, weights and input activations separately, in
one pass over the calibration data, and writes the table into the plan (and to ``sensitivity.json`` at once, so
it survives a later failure).
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_mpq.callbacks._common import (
    QUANT_STAGES,
    calibration_batches,
    require_before,
    require_plan,
    run_dir,
    strategy_reduce,
    timer,
)
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.plan import validate_bits
from lit_mpq.sensitivity import SENSITIVITY_METRICS, OutputErrorStats, probe_output_error


class SensitivityProbe(Callback):
    """Probe ``S[layer, bits]`` for weights and activations.

    Args:
        metric: ``"output_l2"`` (the seed metric ``||y_full - y_quant(b)||_2`` over the calibration set) or
            ``"output_l2_normalized"`` (the same divided by ``||y_full||_2``).
        candidate_bits: Bit widths to probe.
        num_samples: Calibration images used; default: all.

    Raises:
        ValueError: On an unknown metric, unsupported bits, or a non-positive ``num_samples``.
    """

    def __init__(
        self,
        metric: str = "output_l2",
        candidate_bits: list[int] = [4, 6, 8],  # noqa: B006 - shown as the default by jsonargparse
        num_samples: int | None = None,
    ) -> None:
        if metric not in SENSITIVITY_METRICS:
            raise ValueError(f"unknown sensitivity metric {metric!r}; choose one of {list(SENSITIVITY_METRICS)}")
        if not candidate_bits:
            raise ValueError("candidate_bits must list at least one bit width, e.g. [4, 6, 8]")
        for bits in candidate_bits:
            if validate_bits(bits, "SensitivityProbe.candidate_bits") is None:
                raise ValueError("candidate_bits must be integers; FP32 (null) needs no probing")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"SensitivityProbe.num_samples must be positive or null (all), got {num_samples}")
        self.metric = metric
        self.candidate_bits = sorted(set(candidate_bits))
        self.num_samples = num_samples
        self._done = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in QUANT_STAGES:
            require_before(trainer, self, Calibration, "needs calibrated activation quantizers")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or trainer.sanity_checking:
            return
        plan = require_plan(pl_module, "SensitivityProbe")
        start = timer()
        stats = probe_output_error(
            pl_module.model, calibration_batches(trainer, "sensitivity probe", self.num_samples), self.candidate_bits
        )
        packed = strategy_reduce(trainer)(stats.as_tensor(plan.names, self.candidate_bits), "sum")
        stats = OutputErrorStats.from_tensor(packed, plan.names, self.candidate_bits)
        scores = stats.scores(normalized=self.metric == "output_l2_normalized")
        for name, table in scores.items():
            plan[name].sensitivity = table
        seconds = timer() - start
        self._done = True
        pl_module.results["sensitivity"] = {
            "metric": self.metric,
            "candidate_bits": self.candidate_bits,
            "images": stats.num_samples,
            "seconds": seconds,
        }
        if trainer.is_global_zero:
            out = run_dir(trainer)
            out.mkdir(parents=True, exist_ok=True)
            (out / "sensitivity.json").write_text(
                json.dumps({"metric": self.metric, "images": stats.num_samples, "layers": scores}, indent=2)
            )
        pl_module.log("time/probe_s", seconds)
        pl_module.log("sens/images", float(stats.num_samples))
