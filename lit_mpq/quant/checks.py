"""Checks that stop a run on numbers that would otherwise give a silent wrong answer (NaN, Inf, missing data).

A NaN in an activation makes every min/max NaN, every scale NaN, and the quantized model predicts one class; a NaN
sensitivity makes ``np.percentile`` put every layer in the same bin. These checks name the layer so the user can
find the cause, and run on every rank after the statistics are merged, so every rank stops together.

Example:
    >>> import torch
    >>> check_finite_scores({"fc": {"w": {4: 1.0, 8: float("nan")}}}, "output_l2")
    Traceback (most recent call last):
    ...
    lit_mpq.quant.checks.NonFiniteError: sensitivity of layer 'fc' (weights at 8 bits, metric output_l2) is nan: ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["NonFiniteError", "check_calibrated", "check_finite_parameters", "check_finite_scores"]


class NonFiniteError(ValueError):
    """A tensor or score that must be finite is NaN or infinite; the message names the layer or tensor."""


def check_finite_parameters(model: nn.Module) -> None:
    """Raise if a parameter or floating-point buffer of ``model`` holds NaN or infinite values.

    Loading checks the file's tensors; this catches values changed after loading (by code, or by a callback),
    before calibration would blame the next layer's input for them.

    Raises:
        NonFiniteError: Naming the first such tensor, with the count of bad values.
    """
    # Quantizer statistics start at +-inf by design: only the model's own tensors are checked.
    own_buffers = [(n, b) for n, b in model.named_buffers() if "quantizer" not in n and "bias_correction" not in n]
    for name, tensor in [*model.named_parameters(), *own_buffers]:
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor.detach())
        if bool(bad.any()):
            nans = int(torch.isnan(tensor.detach()).sum())
            raise NonFiniteError(
                f"tensor {name!r} holds {int(bad.sum())} non-finite values ({nans} NaN): fix or reload the weights"
            )


def check_calibrated(model: nn.Module) -> None:
    """Raise unless every quantized layer's input observer saw finite data during calibration.

    Args:
        model: A model whose layers were swapped by :func:`lit_mpq.quant.apply.quantize_model` and calibrated.

    Raises:
        NonFiniteError: If a layer's input held NaN or infinite values.
        ValueError: If a layer saw no calibration data at all.
    """
    from lit_mpq.quant.modules import is_quant_layer
    from lit_mpq.quant.operations import is_quant_operation

    observed = []
    for name, layer in model.named_modules():
        if is_quant_layer(layer):
            observed.append((name, layer.input_quantizer))
        elif is_quant_operation(layer) and layer.other_quantizer is None:  # the network output
            observed.append((name, layer.input_quantizer))
        elif is_quant_operation(layer):  # both operands are activations: "<matmul> (left/right operand)"
            observed += [
                (f"{name} (left operand)", layer.input_quantizer),
                (f"{name} (right operand)", layer.other_quantizer),
            ]
    for name, quantizer in observed:
        observer = quantizer.observer
        low, high = observer.min_val, observer.max_val
        if torch.isnan(low).any() or torch.isnan(high).any():
            raise NonFiniteError(
                f"the input of layer {name!r} held NaN values during calibration: check the model's weights and "
                "the calibration images (every earlier layer's output feeds it)"
            )
        never_seen = bool(torch.isposinf(low).all() and torch.isneginf(high).all())
        if never_seen:
            raise ValueError(
                f"layer {name!r} saw no calibration data: the calibration images never reached it (is it used "
                "only in training, or is the calibration set empty?)"
            )
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise NonFiniteError(
                f"the input of layer {name!r} held infinite values during calibration (range {float(low.min()):g} .. "
                f"{float(high.max()):g}): check the model's weights and the calibration images"
            )


def check_finite_scores(scores: Mapping[str, Mapping[str, Mapping[int, float]]], metric: str) -> None:
    """Raise if a sensitivity score is NaN or infinite.

    Args:
        scores: ``{layer: {"w" | "a": {bits: score}}}`` as the probe returns them.
        metric: The metric's name, for the message.

    Raises:
        NonFiniteError: On the first non-finite score, naming the layer, the tensor and the bit width.
    """
    tensors = {"w": "weights", "a": "input activations"}
    for name, table in scores.items():
        for kind, by_bits in table.items():
            for bits, score in by_bits.items():
                if not math.isfinite(float(score)):
                    raise NonFiniteError(
                        f"sensitivity of layer {name!r} ({tensors.get(kind, kind)} at {bits} bits, metric {metric}) "
                        f"is {float(score)}: the layer's output overflows or holds NaN under quantization; check its "
                        "weights and calibration range"
                    )
