"""The ``Calibration`` callback.

Prepares the model for quantization and collects activation statistics on the calibration split.

``setup`` swaps every Conv2d/Linear of the backbone for a fake-quantized twin and measures the layers into the
module's :class:`~lit_mpq.plan.QuantPlan` (structure only: no data, no logging). ``on_validation_start`` runs
the calibration images through the float model with the input observers recording (each rank its own shard of
whole batches), merges the statistics across ranks through their declared reductions, and leaves the quantizers
off until an allocation is applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lit_mpq.callbacks._common import (
    calibration_batches,
    gather_rows,
    is_quant_run,
    measure_phase,
    quantizes_in_stage,
    require_plan,
    strategy_reduce,
    timer,
    trained_model_is_final,
)
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_post_layernorm,
    invalidate_qparams,
    measure_model,
    quantize_model,
    set_mode,
)
from lit_mpq.quant.batchnorm import BatchNormFoldError, fold_batchnorm
from lit_mpq.quant.checks import check_calibrated, check_finite_parameters
from lit_mpq.quant.equalization import equalize_cross_layer
from lit_mpq.quant.observers import sync_observers
from lit_mpq.report.record import CalibrationRecord
from lit_mpq.sensitivity.cache import image_digest, stack_digests, unstack_digests


class Calibration(Callback):
    """Insert quantizers and calibrate activation ranges before the measured validation pass.

    Args:
        num_samples: Calibration images to use; default: all of the datamodule's calibration split
            (``num_calibration_samples``).
        act_observer: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        percentile: Percentile kept by the ``"percentile"`` observer (e.g. 99.9, 99.99).
        act_symmetric: Signed symmetric activation range instead of asymmetric (unsigned with zero point).
        weight_observer: ``"minmax"`` or ``"mse"`` (clipping searched on the weights themselves).
        weight_granularity: ``"per_channel"`` or ``"per_tensor"``.
        bias_correction: Empirical bias correction of weight quantization (Nagel et al., ICCV 2019), from the
            same calibration pass.
        attention: Quantize the two matmuls of every timm ``Attention`` (q·kᵀ and softmax·V become rows of the
            plan: allocated, probed and costed like layers).
        softmax_quantizer: Levels of the softmax output: ``"uniform"``, ``"log2"`` (FQ-ViT) or ``"log_sqrt2"``
            (RepQ-ViT).
        softmax_uniform_from_bits: With logarithmic softmax levels, the width from which the uniform grid is used
            instead (null: logarithmic at every width; recorded in the card).
        softmax_underflow: With logarithmic softmax levels, the zero code's value: ``"zero"``, or ``"mean"`` (the
            mean of the calibration probabilities under the smallest level, snapped to the grid; recorded in the card).
        post_layernorm: Inputs of Linear layers fed by a LayerNorm: ``"per_tensor"``, or ``"reparam"`` (per-channel
            min/max ranges folded into the LayerNorm affine and the Linear, as in RepQ-ViT: per tensor at inference),
            or ``"reparam_mse"`` (the same with each channel's range searched for the smallest squared error).
        act_observer_overrides: ``{pattern: observer}``: layers whose name matches ``pattern`` (``re.fullmatch``,
            in the order given) observe their input with ``observer`` instead of ``act_observer``, e.g.
            ``{".*mlp.fc2": percentile}`` for a ViT's post-GELU activations; ``ptf`` instead of an observer gives a
            Linear input FQ-ViT's power-of-two channel factors (:mod:`lit_mpq.quant.power_of_two`), ``twin_uniform``
            PTQ4ViT's separate grids for negative and positive values (:mod:`lit_mpq.quant.twin_uniform`).
        ptf_max_shift: ``K`` of the ``ptf`` inputs: channel factors ``2^0 .. 2^K`` (recorded in the card).
        fold_batchnorm: Fold every BatchNorm that directly follows a Conv2d/Linear into it before quantizing, as a
            deployment does (:mod:`lit_mpq.quant.batchnorm`; the card's ``bn_folded``). Default (null): fold when the
            run exports a model (an :class:`~lit_mpq.callbacks.Export` callback is in the trainer), otherwise not.
            A target that folds (``integer_only``) folds whatever this says, and refuses ``false``.
        cross_layer_equalization: Iterations of cross-layer equalization (Nagel et al., ICCV 2019;
            :mod:`lit_mpq.quant.equalization`) after BatchNorm folding: each pair of layers joined only by ReLU,
            pooling or dropout gets equal per-channel weight ranges, the float function unchanged. 0 (default): off;
            20 is Brevitas' choice. Folds BatchNorm (refuses ``fold_batchnorm: false``); the card records the
            iterations and the pairs.
        target: The hardware target (:mod:`lit_mpq.quant.targets`): ``lenient`` (the inputs of convolutions,
            Linear layers and attention matmuls quantized; the default), ``integer_only`` (every activation tensor
            quantized: the operands of every residual add and the network output too, BatchNorm folded, weights
            symmetric, activations asymmetric) or ``integer_only_pow2`` (the same with power-of-two scales);
            or a mapping of :class:`~lit_mpq.quant.targets.QuantTarget`'s fields for a custom one, e.g.
            ``{name: my_npu, quantized_tensors: all, fold_batchnorm: true, bit_pairs: [[8, 8], [4, 8]]}`` (the
            allocation then only uses those W/A pairs). Recorded in the card.

    Raises:
        ValueError: On an unknown observer or granularity, or a non-positive ``num_samples``.
    """

    def __init__(
        self,
        num_samples: int | None = None,
        act_observer: str = "minmax",
        percentile: float = 99.99,
        act_symmetric: bool = False,
        weight_observer: str = "minmax",
        weight_granularity: str = "per_channel",
        bias_correction: bool = False,
        attention: bool = True,
        softmax_quantizer: str = "uniform",
        softmax_uniform_from_bits: int | None = None,
        softmax_underflow: str = "zero",
        post_layernorm: str = "per_tensor",
        act_observer_overrides: dict[str, str] | None = None,
        ptf_max_shift: int = 3,
        fold_batchnorm: bool | None = None,
        cross_layer_equalization: int = 0,
        target: str | dict[str, Any] = "lenient",
    ) -> None:
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"Calibration.num_samples must be a positive integer or null (all), got {num_samples}")
        self.num_samples = num_samples
        self.settings = QuantSettings(
            weight_granularity=weight_granularity,
            weight_observer=weight_observer,
            act_observer=act_observer,
            act_symmetric=act_symmetric,
            percentile=percentile,
            bias_correction=bias_correction,
            attention=attention,
            softmax_quantizer=softmax_quantizer,
            softmax_uniform_from_bits=softmax_uniform_from_bits,
            softmax_underflow=softmax_underflow,
            post_layernorm=post_layernorm,
            act_observer_overrides=tuple((act_observer_overrides or {}).items()),
            ptf_max_shift=ptf_max_shift,
            target=target,
        )
        quant_target = self.settings.quant_target
        target_folds = quant_target.fold_batchnorm
        if target_folds is not None:
            if fold_batchnorm is not None and fold_batchnorm != target_folds:
                raise ValueError(
                    f"Calibration: target {quant_target.name!r} {'folds' if target_folds else 'never folds'} "
                    f"BatchNorm, but fold_batchnorm is {fold_batchnorm}; leave fold_batchnorm null or choose another "
                    "target"
                )
            fold_batchnorm = target_folds
        if isinstance(cross_layer_equalization, bool) or cross_layer_equalization < 0:
            raise ValueError(
                "Calibration.cross_layer_equalization is a number of iterations (0: off; 20 is usual), got "
                f"{cross_layer_equalization!r}"
            )
        if cross_layer_equalization and fold_batchnorm is False:
            raise ValueError(
                "Calibration: cross_layer_equalization needs BatchNorm folded first (an inference BatchNorm does not "
                "commute with the channel scales); drop fold_batchnorm: false or set cross_layer_equalization: 0"
            )
        self.cross_layer_equalization = cross_layer_equalization
        self.equalized_pairs: list[tuple[str, str]] = []
        """The ``(first, second)`` layer pairs equalized in ``setup``."""
        self.fold_batchnorm = fold_batchnorm
        self.folded_batchnorms: list[tuple[str, str]] = []
        """The ``(layer, batchnorm)`` pairs folded in ``setup``."""
        self._calibrated = False
        self.image_digests: list[bytes] = []
        """SHA-256 of every calibration image, in order (what the probe cache keys on)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not quantizes_in_stage(trainer, stage):
            return
        if getattr(pl_module, "quantization_frozen", False):
            raise MisconfigurationException(
                "the model was loaded quantized from a packed checkpoint (quantized.pt): it is calibrated and allocated"
                " already. Remove Calibration and the callbacks that need it from trainer.callbacks to evaluate it"
            )
        if getattr(pl_module, "plan", None) is not None:
            return
        size = getattr(trainer.datamodule, "input_size", None) or pl_module.input_size
        device = next(pl_module.parameters()).device
        example = torch.zeros(1, *size, device=device)
        self._fold(trainer, pl_module, example)
        self._equalize(pl_module, example)
        quantize_model(pl_module.model, self.settings)
        pl_module.plan = measure_model(pl_module.model, example)
        if self.settings.post_layernorm in ("reparam", "reparam_mse"):
            ranges = "mse" if self.settings.post_layernorm == "reparam_mse" else "minmax"
            apply_post_layernorm(pl_module.model, example, ranges)

    def _fold(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: torch.Tensor) -> None:
        from lit_mpq.callbacks.export import Export  # imports this module

        wanted = self.fold_batchnorm
        if wanted is None:
            wanted = bool(self.cross_layer_equalization) or any(
                isinstance(callback, Export) for callback in getattr(trainer, "callbacks", ())
            )
        if not wanted:
            return
        try:
            self.folded_batchnorms = fold_batchnorm(pl_module.model, example)
        except BatchNormFoldError as exc:
            if self.fold_batchnorm or self.cross_layer_equalization:  # asked for: the run must not go on without it
                raise
            rank_zero_warn(f"BatchNorm not folded for the export: {exc}")

    def _equalize(self, pl_module: pl.LightningModule, example: torch.Tensor) -> None:
        if not self.cross_layer_equalization:
            return
        # A random example: the pair check needs activations on both sides of every ReLU.
        probe = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example)
        self.equalized_pairs = equalize_cross_layer(pl_module.model, probe, self.cross_layer_equalization)
        if not self.equalized_pairs:
            rank_zero_warn(
                "Calibration: cross_layer_equalization found no pair of layers joined only by ReLU, pooling or dropout "
                "(e.g. a ViT's GELU or a ResNet's residual adds in between); the model is unchanged"
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._calibrated or not is_quant_run(trainer) or trained_model_is_final(pl_module, "Calibration"):
            return
        require_plan(pl_module, "Calibration")
        check_finite_parameters(pl_module.model)
        start = timer()
        set_mode(pl_module.model, weights="off", activations="observe")
        seen = 0
        digests: list[bytes] = []
        try:
            with measure_phase(pl_module, "calibration"):
                for x in calibration_batches(trainer, "calibration", self.num_samples):
                    pl_module(x)
                    seen += int(x.shape[0])
                    digests.extend(image_digest(image) for image in x)
        finally:
            set_mode(pl_module.model, weights="off", activations="off")
        sync_observers(pl_module.model, strategy_reduce(trainer))
        invalidate_qparams(pl_module.model)
        check_calibrated(pl_module.model)
        per_rank = [int(n) for n in gather_rows(trainer, torch.tensor([[seen]], dtype=torch.int64))[:, 0]]
        # Per-image digests in calibration order (shards are contiguous blocks of batches): the probe cache key.
        self.image_digests = unstack_digests(gather_rows(trainer, stack_digests(digests)))
        total = sum(per_rank)
        self._calibrated = True
        pl_module.record.calibration = CalibrationRecord(
            images=total,
            images_per_rank=per_rank,
            seconds=timer() - start,
            settings=dataclasses.asdict(self.settings)
            | {
                "bn_folded": bool(self.folded_batchnorms),
                "cross_layer_equalization": (
                    {"iterations": self.cross_layer_equalization, "pairs": len(self.equalized_pairs)}
                    if self.cross_layer_equalization
                    else None
                ),
            },
        )
        pl_module.log("calib/num_images", float(total))
        pl_module.log("calib/max_images_per_rank", float(max(per_rank)))
        pl_module.log("time/calibration_s", pl_module.record.calibration.seconds)
