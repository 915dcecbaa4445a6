"""Where training under quantization starts: the post-training model, made trainable without changing its outputs.

Post-training quantization leaves two things computed from the float weight that training would silently lose or
distort: a data-driven rounding (GPTQ, GPFQ), valid only while the weight is the one that was rounded, and the bias
correction shift, recomputed from ``W - W_q`` as the weight moves (where training should instead learn the bias).
:func:`start_from_post_training` makes both part of the model: the rounded weight becomes the weight, and the
correction becomes a constant per-channel shift. The fake-quantized model computes exactly what it computed before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lit_mpq.deploy.checkpoint import FrozenOutputShift
from lit_mpq.qat.lsq import init_learned_steps
from lit_mpq.quant.apply import quant_layers
from lit_mpq.quant.modules import BiasCorrection, QuantLayerMixin

__all__ = ["TrainingStart", "start_from_post_training"]


@dataclass(frozen=True)
class TrainingStart:
    """What :func:`start_from_post_training` changed."""

    rounded_weights: int
    """Layers whose data-driven rounding became their weight."""
    frozen_bias_corrections: int
    """Layers whose bias correction became a constant shift."""
    learned_steps: int
    """Quantizers whose step is now trained."""


@torch.no_grad()
def start_from_post_training(model: nn.Module) -> TrainingStart:
    """Prepare the calibrated, allocated (and possibly rounded) ``model`` for training; its outputs do not change.

    In this order: bias corrections are frozen at their current shift; learned steps (if the quantizers have them,
    :func:`~lit_mpq.qat.lsq.add_learned_steps`) start at the calibrated parameters of the *float* weight; then each
    data-driven rounding at the layer's bit width replaces the weight (it lies on that same grid, so the learned step
    quantizes it to itself).
    """
    frozen = rounded = 0
    for layer in quant_layers(model).values():
        quantizer = getattr(layer, "weight_quantizer", None)
        correction = getattr(layer, "bias_correction", None)
        if isinstance(correction, BiasCorrection) and quantizer is not None and quantizer.bits is not None:
            weight = layer.effective_weight()
            key = (quantizer.bits, quantizer.rounding_version, *layer.weight_version())
            shift = correction.correction(
                weight, layer.quantize_weight(quantizer.bits), key, getattr(layer, "groups", 1)
            )
            layer.bias_correction = FrozenOutputShift(shift)
            frozen += 1
    steps = init_learned_steps(model)
    for layer in quant_layers(model).values():
        quantizer = getattr(layer, "weight_quantizer", None)
        if quantizer is None or not getattr(quantizer, "rounded", None):
            continue
        # a weight-standardized layer rounds its computed kernel, not its parameter: it keeps nearest rounding
        if quantizer.bits is not None and type(layer).effective_weight is QuantLayerMixin.effective_weight:
            replacement = quantizer.rounded_weight(layer.weight, quantizer.bits)
            if replacement is not None:
                layer.weight.copy_(replacement)
                rounded += 1
        quantizer.clear_rounded()
    return TrainingStart(rounded_weights=rounded, frozen_bias_corrections=frozen, learned_steps=steps)
