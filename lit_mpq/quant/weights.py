"""Quantization parameters for weights, computed directly from the weight tensor (no data needed).

Weights are static during post-training quantization, so their ranges come from the tensor itself:
``minmax`` uses its extremes (per tensor or per output channel), ``mse`` searches shrink factors of that range
for the one with the smallest round-trip error, exactly, on the real weights (per channel when per channel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mpq.quant.functional import qparams_from_range, quant_range, quantization_mse

WEIGHT_METHODS = ("minmax", "mse")
GRANULARITIES = ("per_channel", "per_tensor")


def weight_range(weight: Tensor, per_channel: bool, axis: int = 0) -> tuple[Tensor, Tensor]:
    """Min and max of ``weight``, per channel along ``axis`` or over the whole tensor."""
    w = weight.detach().float()
    if not per_channel:
        return w.min(), w.max()
    flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def weight_qparams(
    weight: Tensor,
    bits: int,
    symmetric: bool = True,
    per_channel: bool = True,
    method: str = "minmax",
    axis: int = 0,
    num_candidates: int = 100,
) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` for ``weight`` at ``bits``.

    Args:
        weight: The weight tensor (output channels along ``axis``).
        bits: Bit width.
        symmetric: Symmetric signed range with zero point 0 (the usual choice for weights).
        per_channel: One scale per output channel instead of one per tensor.
        method: ``"minmax"`` or ``"mse"`` (error-minimising clipping found by search).
        axis: Output-channel axis.
        num_candidates: Shrink factors searched by ``"mse"``.

    Raises:
        ValueError: If ``method`` is unknown.
    """
    if method not in WEIGHT_METHODS:
        raise ValueError(f"unknown weight observer {method!r}; choose one of {list(WEIGHT_METHODS)}")
    low, high = weight_range(weight, per_channel, axis)
    if method == "minmax":
        return qparams_from_range(low, high, bits, symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    w = weight.detach().float()
    err_axis = axis if per_channel else None
    best_scale, best_zp = qparams_from_range(low, high, bits, symmetric)
    best_err = quantization_mse(w, best_scale, best_zp, qmin, qmax, err_axis)
    for alpha in torch.linspace(1.0, 0.0, num_candidates + 1)[1:-1]:
        scale, zp = qparams_from_range(low * alpha, high * alpha, bits, symmetric)
        err = quantization_mse(w, scale, zp, qmin, qmax, err_axis)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
        best_err = torch.minimum(err, best_err)
    return best_scale, best_zp
