"""The ``BlockRangeSearch`` callback: every block's activation ranges searched for its output, after allocation.

:func:`lit_mpq.quant.block_ranges.refine_block_ranges` does the work: for each block (a transformer block, a residual
block), in execution order, the factor each activation quantizer's clipping range is scaled by is searched for the
least squared error of the block's output against the float block's on the same input, at the plan's widths. List it
after ``BitAllocator`` (and ``AttentionRefinement``, whose factors it starts from) and before ``WeightRounding``: GPTQ
and GPFQ then round every weight for the input grids it will see, and a post-LayerNorm layer's folded weight, which
depends on its input's per-channel ranges, is rounded as it will be evaluated (a search after the rounding would
change that weight and lose its rounding)::

    - class_path: lit_mpq.callbacks.BlockRangeSearch
      init_args: {num_samples: 32}

In a sweep each point's search starts from the observers' ranges (and the attention refinement's factors of that
point): the factors a previous point's search wrote are undone first, so a point's result does not depend on the
order of the sweep. Every rank searches on the same first ``num_samples`` calibration images, so the ranges, and the
result, are those of one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
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
from lit_mpq.callbacks.rounding import WeightRounding
from lit_mpq.quant.block_ranges import DEFAULT_FACTORS, OBJECTIVES, TARGETS, refine_block_ranges
from lit_mpq.quant.modules import ActivationQuantizer


class BlockRangeSearch(Callback):
    """Search each block's activation range factors for the least block-output error, at the allocated widths.

    Args:
        num_samples: Calibration images the errors are measured on (the first ones, on every rank).
        candidates: Range factors tried for every activation quantizer (times the observer's range).
        rounds: Passes over each block's quantizers.
        blocks: Module names of the blocks; default: found (``lit_mpq.quant.block_ranges.find_blocks``).
        objective: ``"mse"`` or ``"channel_normalized"`` (each output channel's error over its float variance).
        float_weights: Search with the weights in float (the activations' error alone); for use before a
            ``WeightRounding`` that will compensate the weights for the ranges chosen.
        target: ``"float_block"`` (the block's own error) or ``"float_network"`` (the float network's block output).

    Raises:
        ValueError: On a non-positive ``num_samples`` or ``rounds``, or a non-positive candidate.
    """

    def __init__(
        self,
        num_samples: int = 32,
        candidates: Sequence[float] = DEFAULT_FACTORS,
        rounds: int = 2,
        blocks: Sequence[str] | None = None,
        objective: str = "mse",
        float_weights: bool = False,
        target: str = "float_block",
    ) -> None:
        for name, value in (("num_samples", num_samples), ("rounds", rounds)):
            if value <= 0:
                raise ValueError(f"BlockRangeSearch.{name} must be a positive integer, got {value}")
        if not candidates or any(not f > 0 for f in candidates):
            raise ValueError(f"BlockRangeSearch.candidates must be positive factors, got {list(candidates)}")
        self.num_samples = num_samples
        self.candidates = [float(f) for f in candidates]
        self.rounds = rounds
        self.blocks = list(blocks) if blocks is not None else None
        if objective not in OBJECTIVES:
            raise ValueError(f"BlockRangeSearch.objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective
        self.float_weights = float_weights
        if target not in TARGETS:
            raise ValueError(f"BlockRangeSearch.target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self._written: list[tuple[ActivationQuantizer, int, float | None, float]] = []
        """(quantizer, width, factor before, factor written) of the last search, to undo before the next one."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if quantizes_in_stage(trainer, stage):
            require_before(trainer, self, BitAllocator, "searches the ranges at the allocated bit widths")
            mine = trainer.callbacks.index(self)
            if any(isinstance(cb, WeightRounding) for cb in trainer.callbacks[:mine]):
                raise MisconfigurationException(
                    "BlockRangeSearch is listed after WeightRounding: list it before, so that the weights are rounded "
                    "for the ranges it chooses (a post-LayerNorm layer's folded weight changes with its input ranges, "
                    "which would lose its rounding)"
                )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer) or trained_model_is_final(pl_module, "BlockRangeSearch"):
            return
        require_plan(pl_module, "BlockRangeSearch")
        self._undo_last_search()  # each sweep point starts from the observers' ranges, not the previous point's choice
        before = _factors(pl_module.model)
        start = timer()
        report = refine_block_ranges(
            pl_module.model,
            first_calibration_images(trainer, self.num_samples),
            blocks=self.blocks,
            candidates=self.candidates,
            rounds=self.rounds,
            max_images=self.num_samples,
            objective=self.objective,
            float_weights=self.float_weights,
            target=self.target,
        )
        seconds = timer() - start
        after = _factors(pl_module.model)
        self._written = [
            (quantizer, bits, before[quantizer].get(bits), factor)
            for quantizer, factors in after.items()
            for bits, factor in factors.items()
            if before[quantizer].get(bits) != factor
        ]
        pl_module.record.block_ranges = {**report.to_dict(), "wall_seconds": seconds}
        pl_module.log("time/block_ranges_s", seconds)

    def _undo_last_search(self) -> None:
        for quantizer, bits, previous, written in self._written:
            if quantizer.range_factors.get(bits) != written:
                continue  # changed since (e.g. AttentionRefinement ran again): keep that
            if previous is None:
                quantizer.range_factors.pop(bits, None)
                quantizer._cache.pop(bits, None)
            else:
                quantizer.set_range_factor(bits, previous)
        self._written = []


def _factors(model: nn.Module) -> dict[ActivationQuantizer, dict[int, float]]:
    return {m: dict(m.range_factors) for m in model.modules() if isinstance(m, ActivationQuantizer)}
