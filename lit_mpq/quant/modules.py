"""Fake-quantized drop-in replacements for ``nn.Conv2d`` and ``nn.Linear``.

``QuantConv2d`` and ``QuantLinear`` subclass the float layers and share their ``weight`` and ``bias``
parameters, so state-dict keys of the original model stay valid. Each carries two quantizers:

- ``weight_quantizer`` (:class:`WeightQuantizer`): parameters derived from the weight itself;
- ``input_quantizer`` (:class:`ActivationQuantizer`): an observer collecting input statistics during
  calibration, and the fake-quantizer that uses them afterwards.

A quantizer's ``mode`` is ``"off"`` (pass-through), ``"observe"`` (record statistics, pass-through) or
``"quant"`` (fake-quantize at its current ``bits``; ``bits = None`` is pass-through too).
"""

from __future__ import annotations

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.functional import fake_quantize, quant_range
from lit_mpq.quant.observers import Observer
from lit_mpq.quant.weights import weight_qparams

MODES = ("off", "observe", "quant")


class _Quantizer(nn.Module):
    def __init__(self, bits: int | None, symmetric: bool) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.mode = "off"
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"quantizer mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._cache.clear()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, mode={self.mode}"


class WeightQuantizer(_Quantizer):
    """Fake-quantizes a weight tensor with parameters computed from the weight.

    Args:
        bits: Initial bit width (None = FP32).
        symmetric: Symmetric signed range.
        per_channel: One scale per output channel.
        method: ``"minmax"`` or ``"mse"``.
    """

    def __init__(self, bits: int | None = 8, symmetric: bool = True, per_channel: bool = True, method: str = "minmax"):
        super().__init__(bits, symmetric)
        self.per_channel = per_channel
        self.method = method

    def qparams(self, weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point for ``weight`` at ``bits``, cached until the weight changes."""
        key = (bits, weight.data_ptr(), weight._version)
        if key not in self._cache:
            self._cache[key] = weight_qparams(weight, bits, self.symmetric, self.per_channel, self.method)
        return self._cache[key]

    def quantize(self, weight: Tensor, bits: int) -> Tensor:
        """Fake-quantize ``weight`` at ``bits`` regardless of the mode."""
        scale, zero_point = self.qparams(weight, bits)
        qmin, qmax = quant_range(bits, self.symmetric)
        return fake_quantize(weight, scale, zero_point, qmin, qmax, 0 if self.per_channel else None)

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantized weight in ``quant`` mode, the weight itself otherwise."""
        if self.mode != "quant" or self.bits is None:
            return weight
        return self.quantize(weight, self.bits)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, per_channel={self.per_channel}, method={self.method}"


class ActivationQuantizer(_Quantizer):
    """Observes a layer's input during calibration and fake-quantizes it afterwards (per tensor).

    Args:
        observer: Statistics collector; its ``symmetric`` flag decides the integer range.
        bits: Initial bit width (None = FP32).
    """

    def __init__(self, observer: Observer, bits: int | None = 8) -> None:
        super().__init__(bits, observer.symmetric)
        self.observer = observer

    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point at ``bits`` from the observer's statistics (cached per bit width)."""
        if bits not in self._cache:
            self._cache[bits] = self.observer.qparams(bits)
        return self._cache[bits]

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        """Fake-quantize ``x`` at ``bits`` regardless of the mode."""
        scale, zero_point = self.qparams(bits)
        qmin, qmax = quant_range(bits, self.symmetric)
        return fake_quantize(x, scale.to(x.device), zero_point.to(x.device), qmin, qmax)

    def forward(self, x: Tensor) -> Tensor:
        """Observe, fake-quantize or pass ``x`` through, by mode."""
        if self.mode == "observe":
            return self.observer(x)
        if self.mode != "quant" or self.bits is None:
            return x
        return self.quantize(x, self.bits)


class QuantLayerMixin:
    """What :class:`QuantConv2d` and :class:`QuantLinear` share: their quantizers and a float forward."""

    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        """The layer's float computation with an optional replacement weight."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Quantize the input and the weight as the quantizers' modes say, then compute."""
        return self.float_forward(self.input_quantizer(x), self.weight_quantizer(self.weight))


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input; shares the original layer's parameters."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer):
        """Wrap ``conv`` (its parameters are shared, not copied)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer.weight_quantizer = weight_quantizer
        layer.input_quantizer = input_quantizer
        return layer

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Convolution with ``weight`` (default: the layer's own)."""
        return self._conv_forward(x, self.weight if weight is None else weight, self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; shares the original layer's parameters."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer):
        """Wrap ``linear`` (its parameters are shared, not copied)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight_quantizer = weight_quantizer
        layer.input_quantizer = input_quantizer
        return layer

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Affine map with ``weight`` (default: the layer's own)."""
        return F.linear(x, self.weight if weight is None else weight, self.bias)


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)


def is_quant_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of lit_mpq's fake-quantized layers."""
    return isinstance(module, QUANT_LAYER_TYPES)
