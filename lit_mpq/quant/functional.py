"""Uniform affine fake-quantization math: integer ranges, quantization parameters, and the STE round trip.

All functions are pure PyTorch and work per tensor or per channel (``axis`` given). The round trip matches
PyTorch's own ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``:
``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``, with
round-half-to-even, and a straight-through estimator whose gradient is 1 inside the clipping range and 0
outside.

Example:
    >>> import torch
    >>> qmin, qmax = quant_range(4, symmetric=True)
    >>> scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), 4, symmetric=True)
    >>> fake_quantize(torch.tensor([0.3]), scale, zp, qmin, qmax)
    tensor([0.2667])
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = torch.finfo(torch.float32).eps


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide quantizer.

    Symmetric quantizers use the signed range ``[-2^(b-1), 2^(b-1) - 1]`` with zero point 0; asymmetric ones the
    unsigned range ``[0, 2^b - 1]`` with a learned zero point (the conventions of ``torch.ao``'s ``qint8`` and
    ``quint8`` observers).

    Args:
        bits: Bit width, at least 2.
        symmetric: Signed symmetric range if True, unsigned asymmetric range otherwise.
    """
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams_from_range(min_val: Tensor, max_val: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` (always widened to contain 0) onto the integer range.

    Follows ``torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams``: symmetric
    ``scale = max(|min|, max) / ((qmax - qmin) / 2)``, asymmetric ``scale = (max - min) / (qmax - qmin)`` and
    ``zero_point = qmin - round(min / scale)``; scales are floored at float32 eps.

    Args:
        min_val: Lower end of the range (scalar or one per channel).
        max_val: Upper end of the range, same shape.
        bits: Bit width.
        symmetric: Symmetric (zero point 0) or asymmetric quantization.

    Returns:
        ``(scale, zero_point)``: float32 scale and int64 zero point of ``min_val``'s shape.
    """
    qmin, qmax = quant_range(bits, symmetric)
    min_neg = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_pos = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    if symmetric:
        max_abs = torch.maximum(-min_neg, max_pos)
        scale = max_abs / ((qmax - qmin) / 2)
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.clamp(scale, min=_EPS)
        zero_point = qmin - torch.round(min_neg / scale).to(torch.int64)
        zero_point = torch.clamp(zero_point, qmin, qmax)
    return scale, zero_point


def power_of_two_qparams(scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The scale rounded up to the next power of two, and the zero point that keeps the range's low end.

    A power-of-two scale turns every rescaling on integer hardware into a shift (MCT's power-of-two platform,
    Jacob et al.'s fixed-point multiplier with no mantissa). Rounding up never clips what ``scale`` kept: the grid's
    span ``(qmax - qmin) * scale`` only grows. An asymmetric range keeps its low end ``(qmin - zero_point) * scale``
    to within half a new step.

    Args:
        scale: Positive float scales (scalar or one per channel).
        zero_point: Integer zero points of the same shape.
        bits: Bit width.
        symmetric: Symmetric (zero point stays 0) or asymmetric.

    Returns:
        ``(2^ceil(log2 scale), zero_point')``.
    """
    qmin, qmax = quant_range(bits, symmetric)
    snapped = torch.exp2(torch.ceil(torch.log2(scale.float())))
    if symmetric:
        return snapped, zero_point
    low = (qmin - zero_point.to(torch.float32)) * scale.float()
    shifted = torch.clamp(qmin - torch.round(low / snapped).to(torch.int64), qmin, qmax)
    return snapped, shifted


def _broadcast(param: Tensor, x: Tensor, axis: int | None) -> Tensor:
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize_dequantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """The non-differentiable round trip ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``.

    Float32 inputs go through PyTorch's fused ``torch.fake_quantize_per_{tensor,channel}_affine`` kernels (one
    pass over memory); other dtypes through the same arithmetic spelled out, multiplying by the reciprocal of the
    scale as PyTorch's kernels do, so both paths agree bit for bit.
    """
    if x.dtype == torch.float32 and (axis is None or scale.dim() == 1):
        with torch.no_grad():
            return _fused(x, scale, zero_point, qmin, qmax, axis)
    inv_scale = _broadcast(1.0 / scale, x, axis)
    zp = _broadcast(zero_point.to(x.dtype), x, axis)
    q = torch.clamp(torch.round(x * inv_scale) + zp, qmin, qmax)
    return (q - zp) * _broadcast(scale.to(x.dtype), x, axis)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """``(codes - zero_point) * scale`` in float32, per channel along ``axis``.

    Bit for bit the values :func:`quantize_dequantize` gives for inputs that round to ``codes``.
    """
    codes = codes.float()
    zero_point = _broadcast(zero_point.to(codes.dtype), codes, axis)
    return (codes - zero_point) * _broadcast(scale.to(codes.dtype), codes, axis)


def _fused(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
    scale = scale.to(device=x.device, dtype=torch.float32)
    zero_point = zero_point.to(device=x.device, dtype=torch.int32)
    if axis is None or scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Fake-quantize ``x`` with a straight-through estimator.

    The forward value is :func:`quantize_dequantize`; the gradient with respect to ``x`` is 1 where the rounded
    level ``round(x / scale) + zp`` lies in ``[qmin, qmax]`` and 0 where it is clipped, which is the gradient of
    ``torch.fake_quantize_per_tensor_affine``.

    Args:
        x: Input tensor.
        scale: Scalar scale, or one per channel along ``axis``.
        zero_point: Integer zero point(s) of the same shape as ``scale``.
        qmin: Lowest integer level.
        qmax: Highest integer level.
        axis: Channel axis for per-channel parameters, None for per-tensor.
    """
    if not x.requires_grad:
        return quantize_dequantize(x, scale, zero_point, qmin, qmax, axis)
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, axis)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Straight-through estimator; a custom Function keeps the forward value bit-identical to the no-grad path."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # noqa: D102
        # Mask on the rounded level, as torch's fake_quantize does (not on the clipping bounds of x).
        level = torch.round(x * _broadcast(1.0 / scale, x, axis)) + _broadcast(zero_point.to(x.dtype), x, axis)
        ctx.save_for_backward((level >= qmin) & (level <= qmax))
        return quantize_dequantize(x, scale, zero_point, qmin, qmax, axis)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None, None, None


def quantization_mse(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
    """Mean squared round-trip error, per channel along ``axis`` (a scalar when ``axis`` is None)."""
    err = (quantize_dequantize(x, scale, zero_point, qmin, qmax, axis) - x) ** 2
    if axis is None:
        return err.mean()
    return err.transpose(0, axis).reshape(x.shape[axis], -1).mean(dim=1)
