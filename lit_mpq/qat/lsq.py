"""Learned step size quantization (LSQ; Esser et al., "Learned Step Size Quantization", ICLR 2020).

The quantizer's step ``s`` is a parameter trained with the network. With ``v`` the input, ``z`` the integer zero
point and ``[qmin, qmax]`` the integer range, the forward value is the usual round trip
``s * (clamp(round(v / s) + z, qmin, qmax) - z)`` (bit for bit :func:`~lit_mpq.quant.functional.quantize_dequantize`),
and the gradients are the paper's (its equation 3, with ``-Q_N = qmin - z`` and ``Q_P = qmax - z``):

* ``d out / d v = 1`` where ``-Q_N < v / s < Q_P``, else 0 (straight-through inside the range);
* ``d out / d s = round(v / s) - v / s`` inside the range, ``-Q_N`` below it, ``Q_P`` above it,

and the step's gradient is multiplied by the paper's scale ``g = 1 / sqrt(N * Q_P)`` (``N``: the number of weights
per step, or the input's features per image for an activation), which keeps the step's updates in proportion to
the weights'.

:class:`LearnedStepWeightQuantizer` and :class:`LearnedStepActivationQuantizer` are the lit_mpq quantizers with such a
step. Swapped in for the usual ones before training (:func:`add_learned_steps`), they behave exactly like them until
:func:`init_learned_steps` copies the calibrated parameters at each quantizer's bit width into the steps; from then
on that bit width is trained (other widths, e.g. a probe's, still use the calibrated parameters).
:func:`freeze_learned_steps` turns them back into the usual quantizers with the learned steps as fixed parameters,
which the packed checkpoint and the ONNX export read like any calibrated model's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_mpq.quant.functional import _broadcast, quant_range, quantize_dequantize
from lit_mpq.quant.modules import ActivationQuantizer, WeightQuantizer

__all__ = [
    "LearnedStepActivationQuantizer",
    "LearnedStepWeightQuantizer",
    "add_learned_steps",
    "freeze_learned_steps",
    "init_learned_steps",
    "learned_step_fake_quantize",
    "lsq_gradient_scale",
]

MIN_STEP = 1e-8
"""Smallest step used in a forward pass: a step driven to zero or below by an update would divide by zero."""


MAX_LEARNED_BITS = 8
"""Steps are learned up to this width. Above it a step is ~1e-5 of the range (16 bits): one update at the weights'
learning rate moves it by more than itself, and a step driven to :data:`MIN_STEP` collapses the layer (a W16A16 run
fell to chance); the rounding error there is negligible anyway, so the calibrated step stays."""


def lsq_gradient_scale(elements_per_step: int, qmax: int) -> float:
    """The paper's step-gradient scale ``1 / sqrt(N * Q_P)`` (``N`` elements share the step, ``Q_P = qmax``)."""
    return 1.0 / math.sqrt(max(int(elements_per_step), 1) * max(int(qmax), 1))


class _LearnedStepFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, axis, grad_scale):  # noqa: D102
        ctx.save_for_backward(x, step, zero_point)
        ctx.qmin, ctx.qmax, ctx.axis, ctx.grad_scale = qmin, qmax, axis, grad_scale
        return quantize_dequantize(x, step.detach(), zero_point, qmin, qmax, axis)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        x, step, zero_point = ctx.saved_tensors
        axis = ctx.axis
        # v / s as the forward computes it (times the reciprocal), so that "inside" matches the forward's rounding
        v = x * _broadcast(1.0 / step, x, axis)
        zp = _broadcast(zero_point.to(x.dtype), x, axis)
        low, high = ctx.qmin - zp, ctx.qmax - zp  # -Q_N and Q_P of the paper, per channel
        below, above = v <= low, v >= high
        inside = ~(below | above)
        grad_x = grad_output * inside
        d_step = torch.where(below, low, torch.where(above, high, torch.round(v) - v))
        contribution = grad_output * d_step
        if axis is None or step.dim() == 0:
            grad_step = contribution.sum().reshape(step.shape)
        else:
            grad_step = contribution.transpose(0, axis).reshape(x.shape[axis], -1).sum(dim=1)
        return grad_x, grad_step * ctx.grad_scale, None, None, None, None, None


def learned_step_fake_quantize(
    x: Tensor,
    step: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_scale: float = 1.0,
) -> Tensor:
    """Fake-quantize ``x`` with a trainable ``step`` (LSQ gradients for ``x`` and ``step``).

    Args:
        x: Input tensor.
        step: Scalar step, or one per channel along ``axis``; values below :data:`MIN_STEP` are raised to it.
        zero_point: Integer zero point(s) of ``step``'s shape (not trained).
        qmin: Lowest integer level.
        qmax: Highest integer level.
        axis: Channel axis of a per-channel step, None for one step.
        grad_scale: Factor on the step's gradient (:func:`lsq_gradient_scale`).
    """
    step = step.clamp_min(MIN_STEP)
    return _LearnedStepFakeQuantize.apply(x, step, zero_point, qmin, qmax, axis, grad_scale)


class LearnedStepWeightQuantizer(WeightQuantizer):
    """A :class:`~lit_mpq.quant.modules.WeightQuantizer` whose step at one bit width is a trained parameter.

    Args:
        out_channels: Steps of a per-channel quantizer (ignored per tensor).
        bits, symmetric, per_channel, method: As for :class:`~lit_mpq.quant.modules.WeightQuantizer`.
    """

    supports_power_of_two = False  # its levels are not one uniform step: the power-of-two target refuses it

    def __init__(
        self,
        out_channels: int,
        bits: int | None = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        method: str = "minmax",
    ) -> None:
        super().__init__(bits, symmetric, per_channel, method)
        self.step = nn.Parameter(torch.ones(out_channels if per_channel else ()))
        self.register_buffer("zero_point", torch.zeros(out_channels if per_channel else (), dtype=torch.int32))
        self.step_bits: int | None = None
        """The bit width the step is trained at; None until :meth:`init_step` (the quantizer is then the usual one)."""

    @classmethod
    def from_quantizer(cls, quantizer: WeightQuantizer, out_channels: int) -> LearnedStepWeightQuantizer:
        """The same quantizer (settings, mode, roundings, fixed parameters) with an uninitialized step."""
        learned = cls(out_channels, quantizer.bits, quantizer.symmetric, quantizer.per_channel, quantizer.method)
        learned.mode = quantizer.mode
        learned.rounded = dict(quantizer.rounded)
        learned.fixed_qparams = dict(quantizer.fixed_qparams)
        learned.rounding_version = quantizer.rounding_version
        return learned.to(quantizer_device(quantizer, learned.step.device))

    @torch.no_grad()
    def init_step(self, weight: Tensor, version: tuple[int, ...] | None = None) -> None:
        """Start the step at this quantizer's current parameters for ``weight`` at its bit width (up to 8 bits)."""
        if self.bits is None or self.bits > MAX_LEARNED_BITS:
            self.step_bits = None
            return
        scale, zero_point = super().qparams(weight, self.bits, version)
        self.step.copy_(scale.reshape(self.step.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.step_bits = self.bits
        self._cache.clear()

    def qparams(self, weight: Tensor, bits: int, version: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
        """The learned step (detached) at the trained width, the usual parameters at any other."""
        if bits != self.step_bits:
            return super().qparams(weight, bits, version)
        return self.step.detach().clamp_min(MIN_STEP), self.zero_point

    def quantize(self, weight: Tensor, bits: int, version: tuple[int, ...] | None = None) -> Tensor:
        """LSQ fake quantization at the trained width (no caching: the step changes every update)."""
        if bits != self.step_bits:
            return super().quantize(weight, bits, version)
        qmin, qmax = quant_range(bits, self.symmetric)
        axis = 0 if self.per_channel else None
        elements = weight[0].numel() if self.per_channel else weight.numel()
        return learned_step_fake_quantize(
            weight, self.step, self.zero_point, qmin, qmax, axis, lsq_gradient_scale(elements, qmax)
        )

    def frozen(self) -> WeightQuantizer:
        """The usual quantizer with the learned step as its fixed parameters at the trained width."""
        plain = WeightQuantizer(self.bits, self.symmetric, self.per_channel, self.method)
        plain.mode = self.mode
        plain.fixed_qparams = dict(self.fixed_qparams)
        if self.step_bits is not None:
            step, zero_point = self.qparams(self.step, self.step_bits)
            plain.fixed_qparams[self.step_bits] = (step.clone(), zero_point.clone())
        return plain


class LearnedStepActivationQuantizer(ActivationQuantizer):
    """An :class:`~lit_mpq.quant.modules.ActivationQuantizer` (per tensor) whose step at one bit width is trained.

    The observer and its statistics are kept: other bit widths, and the observed range, are as calibrated.
    """

    supports_power_of_two = False  # its levels are not one uniform step: the power-of-two target refuses it

    def __init__(self, observer: nn.Module, bits: int | None = 8) -> None:
        super().__init__(observer, bits)
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.step_bits: int | None = None
        """The bit width the step is trained at; None until :meth:`init_step`."""

    @classmethod
    def from_quantizer(cls, quantizer: ActivationQuantizer) -> LearnedStepActivationQuantizer:
        """The same quantizer (observer, mode, range factors) with an uninitialized step."""
        learned = cls(quantizer.observer, quantizer.bits)
        learned.mode = quantizer.mode
        learned.range_factors = dict(quantizer.range_factors)
        learned.fixed_qparams = dict(quantizer.fixed_qparams)
        return learned.to(quantizer_device(quantizer, learned.step.device))

    @torch.no_grad()
    def init_step(self) -> None:
        """Start the step at the calibrated parameters at this quantizer's bit width (up to 8 bits)."""
        if self.bits is None or self.bits > MAX_LEARNED_BITS:
            self.step_bits = None
            return
        scale, zero_point = super().qparams(self.bits)
        self.step.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()))
        self.step_bits = self.bits

    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """The learned step (detached) at the trained width, the calibrated parameters at any other."""
        if bits != self.step_bits:
            return super().qparams(bits)
        return self.step.detach().clamp_min(MIN_STEP), self.zero_point

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        """LSQ fake quantization at the trained width."""
        if bits != self.step_bits:
            return super().quantize(x, bits)
        qmin, qmax = quant_range(bits, self.symmetric)
        features = x[0].numel() if x.dim() > 1 else x.numel()
        return learned_step_fake_quantize(
            x, self.step, self.zero_point, qmin, qmax, None, lsq_gradient_scale(features, qmax)
        )

    def frozen(self) -> ActivationQuantizer:
        """The usual quantizer with the learned step as its fixed parameters at the trained width."""
        plain = ActivationQuantizer(self.observer, self.bits)
        plain.mode = self.mode
        plain.range_factors = dict(self.range_factors)
        plain.fixed_qparams = dict(self.fixed_qparams)
        if self.step_bits is not None:
            step, zero_point = self.qparams(self.step_bits)
            plain.fixed_qparams[self.step_bits] = (step.clone(), zero_point.clone())
        return plain


def quantizer_device(quantizer: nn.Module, default: torch.device) -> torch.device:
    """The device of ``quantizer``'s tensors (its observer's buffers), else ``default``."""
    for tensor in (*quantizer.parameters(), *quantizer.buffers()):
        return tensor.device
    return default


def add_learned_steps(model: nn.Module) -> list[str]:
    """Swap every uniform weight and activation quantizer of ``model``'s quantized layers for a learned-step twin.

    Only the plain uniform quantizers are swapped (exactly :class:`WeightQuantizer` / :class:`ActivationQuantizer`):
    the special ones (log√2 softmax, twin-uniform, per-channel LayerNorm inputs) keep their calibrated parameters.
    The twins act exactly as before until :func:`init_learned_steps`.

    Returns:
        The names of the swapped quantizers.
    """
    from lit_mpq.quant.apply import quant_layers

    swapped = []
    for name, layer in quant_layers(model).items():
        weight_quantizer = getattr(layer, "weight_quantizer", None)
        if type(weight_quantizer) is WeightQuantizer:
            layer.weight_quantizer = LearnedStepWeightQuantizer.from_quantizer(weight_quantizer, layer.weight.shape[0])
            swapped.append(f"{name}.weight_quantizer")
        input_quantizer = getattr(layer, "input_quantizer", None)
        if type(input_quantizer) is ActivationQuantizer:
            layer.input_quantizer = LearnedStepActivationQuantizer.from_quantizer(input_quantizer)
            swapped.append(f"{name}.input_quantizer")
    return swapped


def init_learned_steps(model: nn.Module) -> int:
    """Start every learned step at its quantizer's calibrated parameters at its current bit width.

    Returns:
        The number of steps that are now trained (quantizers at None bits are left float, those above
        :data:`MAX_LEARNED_BITS` keep their calibrated parameters).
    """
    from lit_mpq.quant.apply import quant_layers

    trained = 0
    for layer in quant_layers(model).values():
        weight_quantizer = getattr(layer, "weight_quantizer", None)
        if isinstance(weight_quantizer, LearnedStepWeightQuantizer):
            weight_quantizer.init_step(layer.effective_weight(), layer.weight_version())
            trained += weight_quantizer.step_bits is not None
        input_quantizer = getattr(layer, "input_quantizer", None)
        if isinstance(input_quantizer, LearnedStepActivationQuantizer):
            input_quantizer.init_step()
            trained += input_quantizer.step_bits is not None
    return trained


def freeze_learned_steps(model: nn.Module) -> int:
    """Replace every learned-step quantizer by the usual one with its learned step as fixed parameters.

    The model's outputs do not change; it is then packed and exported like any calibrated model.

    Returns:
        The number of quantizers replaced.
    """
    from lit_mpq.quant.apply import quant_layers

    replaced = 0
    for layer in quant_layers(model).values():
        for attribute in ("weight_quantizer", "input_quantizer"):
            quantizer = getattr(layer, attribute, None)
            if isinstance(quantizer, LearnedStepWeightQuantizer | LearnedStepActivationQuantizer):
                setattr(layer, attribute, quantizer.frozen())
                replaced += 1
    return replaced
