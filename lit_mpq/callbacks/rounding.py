"""The ``WeightRounding`` callback.

Rounds every quantized weight layer at its allocated width with a data-driven method (GPTQ or GPFQ,
:mod:`lit_mpq.rounding`) instead of to nearest, on the calibration images. It runs after the ``BitAllocator`` in
every validation run, so each point of a sweep is rounded for its own allocation; rounded weights are kept by
everything that determines them, and a sweep reuses those its allocations share (with ``upstream: float``, every
layer whose widths repeat).

List it after ``BitAllocator`` (and after ``AttentionRefinement`` if the refined attention ranges should shape the
rounding's inputs)::

    - class_path: lit_mpq.callbacks.WeightRounding
      init_args: {method: gpfq, num_samples: 512}
"""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_mpq.callbacks._common import (
    calibration_batches,
    is_quant_run,
    measure_phase,
    quantizes_in_stage,
    require_before,
    require_plan,
    strategy_reduce,
    timer,
    trained_model_is_final,
)
from lit_mpq.callbacks.allocation import BitAllocator
from lit_mpq.report.record import RoundingRecord
from lit_mpq.rounding import LayerRounding, RoundingCache, RoundingSettings, round_model

GPFQ_DRIFT_WARNING = 0.5
"""GPFQ warns when the quantized network's inputs to a layer have drifted further than this from the float network's
(``input_drift``: ``||W X - W X~||² / ||W X||²``). GPFQ fits the float outputs from those inputs; far from them it
chases targets they cannot produce. Measured (docs/rounding.md): DeiT-Tiny at 4-bit activations reaches 1.09, 19 of
its 50 layers above 0.5, and GPFQ loses 52 points there (GPTQ gains 7); ResNet-20 with 2-bit weights and 4-bit
activations stays at 0.35, and GPFQ gains there."""

__all__ = ["WeightRounding"]


class WeightRounding(Callback):
    """Round weights with GPTQ or GPFQ after the allocation, before the quantized evaluation.

    Args:
        method: ``"gptq"`` (Frantar et al., ICLR 2023), ``"gpfq"`` (Lybrand and Saab 2021; Zhang, Zhou and Saab
            2023), ``"adaround"`` (Nagel et al., ICML 2020: each weight learns to round up or down, on the
            objective ``adaround_target`` names, :mod:`lit_mpq.rounding.adaround`) or ``"nearest"`` (no data-driven
            rounding: a switch for sweeps and ablations).
        upstream: What feeds each layer while its statistics are collected: ``"quantized"`` (the methods as
            published: the already rounded network) or ``"float"`` (the float network with only the layer's own input
            quantized; every layer's rounding then depends on its own widths only, which a sweep reuses).
        num_samples: Calibration images used; default: all of the calibration split.
        damp: GPTQ's dampening, a fraction of the mean Hessian diagonal.
        block_size: Columns per block update.
        act_order: GPTQ rounds columns in order of decreasing Hessian diagonal.
        alphabet_scalar: GPFQ only: the alphabet's step from ``C · median|w|`` of each layer (the source project's
            rule) instead of the weight quantizer's own scales.
        refine_passes: Passes of coordinate descent on the method's own objective after its greedy pass, each
            weight moved to its best level with the others fixed (:mod:`lit_mpq.rounding.refine`; never raises the
            objective); 0 runs the published algorithm alone.
        scale_fit: Rounds of refitting each output row's scale to the rounded codes by least squares on the
            method's objective (:mod:`lit_mpq.rounding.scale_fit`), each followed by ``refine_passes`` of coordinate
            descent on the refitted grid; 0 (default) keeps the weight quantizer's grid. A refitted weight is off
            the quantizer's grid, so ``lit_mpq.deploy`` refuses to pack it.
        adaround_iterations: AdaRound's Adam steps per layer (the paper's 10,000 by default; each is one product of
            the layer's weight with its input Gram matrix, not a pass over the images).
        adaround_regularization: AdaRound's ``λ``, the weight of the term that drives every weight to round up or
            down (the paper's 0.01).
        adaround_target: ``"float"`` (the paper's: the float network's outputs from the quantized network's inputs)
            or ``"quantized"`` (the layer's own output on its quantized inputs, GPTQ's objective: for ViTs at 4-bit
            activations, whose inputs drift far from the float ones).

    Raises:
        ValueError: On an unknown method or upstream, a negative ``damp``, a non-positive ``num_samples`` or
            ``block_size``, a negative ``refine_passes`` or ``scale_fit``, or ``alphabet_scalar`` with another method
            than GPFQ.
    """

    def __init__(
        self,
        method: str = "gptq",
        upstream: str = "quantized",
        num_samples: int | None = None,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
        alphabet_scalar: float | None = None,
        refine_passes: int = 0,
        scale_fit: int = 0,
        adaround_iterations: int = 10000,
        adaround_regularization: float = 0.01,
        adaround_target: str = "float",
    ) -> None:
        if num_samples is not None and (isinstance(num_samples, bool) or num_samples <= 0):
            raise ValueError(f"WeightRounding.num_samples must be a positive integer or null (all), got {num_samples}")
        self.settings = RoundingSettings(
            method=method,
            upstream=upstream,
            damp=damp,
            block_size=block_size,
            act_order=act_order,
            alphabet_scalar=alphabet_scalar,
            refine_passes=refine_passes,
            scale_fit=scale_fit,
            adaround_iterations=adaround_iterations,
            adaround_regularization=adaround_regularization,
            adaround_target=adaround_target,
        )
        self.num_samples = num_samples
        self.cache = RoundingCache()
        """Rounded weights of earlier validation runs (a sweep's points), by what determines them."""
        self._done = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not quantizes_in_stage(trainer, stage):
            return
        require_before(trainer, self, BitAllocator, "rounds each layer at the width the allocation gives it")
        self._done = False  # each validation run rounds for the allocation it evaluates

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or not is_quant_run(trainer) or trained_model_is_final(pl_module, "WeightRounding"):
            return
        require_plan(pl_module, "WeightRounding")
        start = timer()
        reduce = strategy_reduce(trainer) if trainer.world_size > 1 else None
        with measure_phase(pl_module, "rounding"):
            batches = list(calibration_batches(trainer, f"{self.settings.method} rounding", self.num_samples))
            layers = round_model(
                pl_module.model,
                batches,
                self.settings,
                reduce=(lambda tensor: reduce(tensor, "sum")) if reduce is not None else None,
                cache=self.cache,
            )
        self._done = True
        seconds = timer() - start
        images = sum(int(x.shape[0]) for x in batches)
        pl_module.record.rounding = RoundingRecord(
            settings=dataclasses.asdict(self.settings),
            images_per_rank=images,
            seconds=seconds,
            layers=[dataclasses.asdict(layer) for layer in layers],
        )
        pl_module.log("time/rounding_s", seconds)
        if self.settings.float_target:
            warn_on_drift(layers, self.settings.method)
        if layers:
            rounded = [layer for layer in layers if layer.error_nearest > 0]
            if rounded:
                ratio = sum(layer.error_rounded / layer.error_nearest for layer in rounded) / len(rounded)
                pl_module.log("rounding/mean_error_ratio", ratio)


def warn_on_drift(layers: list[LayerRounding], method: str = "gpfq") -> None:
    """Warn when a float-target method (GPFQ, AdaRound) rounded layers whose inputs drifted far from the float ones."""
    drifted = [layer for layer in layers if layer.input_drift is not None and layer.input_drift > GPFQ_DRIFT_WARNING]
    if drifted:
        worst = max(drifted, key=lambda layer: layer.input_drift)
        name = {"gpfq": "GPFQ", "adaround": "AdaRound"}.get(method, method)
        rank_zero_warn(
            f"{name}: the quantized network's inputs to {len(drifted)} of {len(layers)} layers are far from the float "
            f"network's (input drift above {GPFQ_DRIFT_WARNING}; worst {worst.name}: {worst.input_drift:.2f}). {name} "
            "fits the float outputs from them and can lose accuracy here (DeiT-Tiny at 4-bit activations: 12.5 % "
            "against 71.2 % with GPTQ): compare with nearest rounding, or use method: gptq, or give activations more "
            "bits"
        )
