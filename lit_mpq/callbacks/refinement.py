"""The ``AttentionRefinement`` callback: ranking-aware refinement of the attention matmuls' ranges, after allocation.

Liu et al., "Post-Training Quantization for Vision Transformer" (NeurIPS 2021): the quantization ranges of each
attention matmul's operands are searched so that the quantized attention scores keep their float order (similarity
plus ranking loss) and the quantized softmax·V output stays close to the float one. The search is for the bit
widths the plan gives each operand, so it runs after ``BitAllocator`` (and again at every sweep point, whose bits
differ); :func:`lit_mpq.quant.ranking.refine_attention_ranges` does the work.

Every rank refines on the same first ``num_samples`` calibration images (not on its own shard), so the chosen
ranges, and the result, are those of one device.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_mpq.callbacks._common import (
    first_calibration_images,
    is_quant_run,
    quantizes_in_stage,
    require_before,
    require_plan,
    timer,
    trained_model_is_final,
)
from lit_mpq.callbacks.allocation import BitAllocator
from lit_mpq.quant.ranking import refine_attention_ranges


class AttentionRefinement(Callback):
    """Refine the attention matmuls' quantization ranges for the allocated bits (ranking-aware, Liu et al. 2021).

    Args:
        num_samples: Calibration images the objective is measured on (the first ones, on every rank).
        candidates: Range factors searched per operand, evenly spaced over ``search_range`` (the paper: 100).
        rounds: Alternating rounds over the two operands of each matmul.
        ranking_weight: Weight of the ranking loss against the similarity, for the attention scores.
        margin: Margin of the ranking hinge, in logits.
        search_range: ``(low, high)`` of the range factors. The paper searches 0.5 to 1.2; the default reaches
            down to 0.05 because a uniform 4-bit softmax grid is best at about a tenth of the observed maximum
            (DeiT-Tiny with 4-bit matmuls: 54.0 % top-1 with 0.5-1.2, 80.0 % with 0.05-1.2, FP32 85.2 %, first 500
            images; ``benchmarks/ranking_refinement.py``).

    Raises:
        ValueError: On a non-positive ``num_samples``, ``candidates`` or ``rounds``.
    """

    def __init__(
        self,
        num_samples: int = 32,
        candidates: int = 100,
        rounds: int = 2,
        ranking_weight: float = 1.0,
        margin: float = 0.1,
        search_range: tuple[float, float] = (0.05, 1.2),
    ) -> None:
        for name, value in (("num_samples", num_samples), ("candidates", candidates), ("rounds", rounds)):
            if value <= 0:
                raise ValueError(f"AttentionRefinement.{name} must be a positive integer, got {value}")
        self.num_samples = num_samples
        self.candidates = candidates
        self.rounds = rounds
        self.ranking_weight = ranking_weight
        self.margin = margin
        self.search_range = tuple(search_range)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if quantizes_in_stage(trainer, stage):
            require_before(trainer, self, BitAllocator, "refines the ranges at the allocated bit widths")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer) or trained_model_is_final(pl_module, "AttentionRefinement"):
            return
        plan = require_plan(pl_module, "AttentionRefinement")
        start = timer()
        report = refine_attention_ranges(
            pl_module.model,
            first_calibration_images(trainer, self.num_samples),
            plan.bits(),
            candidates=self.candidates,
            rounds=self.rounds,
            ranking_weight=self.ranking_weight,
            margin=self.margin,
            search_range=self.search_range,
            max_images=self.num_samples,
        )
        seconds = timer() - start
        record = report.to_dict()
        # The card shows the method with the search's settings (candidates, range, rounds, weight, margin, sampling).
        record["settings"] = {"method": "ranking-aware (Liu et al. 2021)", **record.get("settings", {})}
        pl_module.record.refinement = {**record, "wall_seconds": seconds}
        pl_module.log("time/refinement_s", seconds)
