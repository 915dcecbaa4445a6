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

import torch
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
        if mode == "observe" or self.mode == "observe":  # statistics may change: derived parameters are stale
            self._cache.clear()
        self.mode = mode

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
        """Fake-quantize ``weight`` at ``bits`` regardless of the mode (cached while no gradient is needed)."""
        # Inference-mode results must not leak into gradient passes: the mode is part of the key.
        key = ("w", bits, weight.data_ptr(), weight._version, torch.is_inference_mode_enabled())
        frozen = not (torch.is_grad_enabled() and weight.requires_grad)
        if frozen and key in self._cache:
            return self._cache[key]
        scale, zero_point = self.qparams(weight, bits)
        qmin, qmax = quant_range(bits, self.symmetric)
        quantized = fake_quantize(weight, scale, zero_point, qmin, qmax, 0 if self.per_channel else None)
        if frozen:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "w" or k[1] != bits}
            self._cache[key] = quantized
        return quantized

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


class BiasCorrection(nn.Module):
    """Empirical bias correction for weight quantization (Nagel et al., "Data-free quantization", ICCV 2019).

    Quantizing weights shifts each output channel's mean by ``(W - W_q) @ E[x]``; this module records ``E[x]``
    over the calibration data (per input feature, or per input patch position of a convolution, padding
    included) and adds the shift back. The statistics are bit-independent and merge across ranks by summation.
    """

    REDUCTIONS = {"input_sum": "sum", "count": "sum"}

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("input_sum", torch.zeros(num_features, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self._cache: dict[tuple, Tensor] = {}

    def observe(self, feature_sum: Tensor, rows: int) -> None:
        """Add the column sums ``feature_sum`` of ``rows`` input rows to the running sum."""
        self.input_sum.add_(feature_sum.detach().double())
        self.count.add_(rows)
        self._cache.clear()

    def correction(self, weight: Tensor, quantized: Tensor, key: tuple, groups: int = 1) -> Tensor:
        """Per-output-channel shift ``(W - W_q) @ E[x]`` (zeros when nothing was observed), cached under ``key``."""
        if key in self._cache:
            return self._cache[key]
        cout = weight.shape[0]
        if float(self.count) == 0:
            return torch.zeros(cout, dtype=weight.dtype, device=weight.device)
        mean = (self.input_sum / self.count).to(weight.dtype).to(weight.device)
        delta = (weight - quantized).detach().reshape(groups, cout // groups, -1)
        shift = torch.einsum("gof,gf->go", delta, mean.reshape(groups, -1)).reshape(cout)
        self._cache = {key: shift}
        return shift


class QuantLayerMixin:
    """What :class:`QuantConv2d` and :class:`QuantLinear` share: their quantizers and a float forward."""

    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer
    bias_correction: BiasCorrection | None  # set per instance by from_float: a class default would shadow modules

    def _share(self, float_layer: nn.Module, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer):
        """Take over ``float_layer``'s parameters (shared, not copied) and attach the quantizers; returns self."""
        self.weight = float_layer.weight
        self.bias = float_layer.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.bias_correction = None
        return self

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        """The layer's float computation with an optional replacement weight."""
        raise NotImplementedError

    def input_feature_sum(self, x: Tensor) -> tuple[Tensor, int]:  # pragma: no cover - abstract
        """Column sums of the input as ``[rows, features]`` rows matching the flattened weight, and the row count."""
        raise NotImplementedError

    def enable_bias_correction(self) -> None:
        """Attach a :class:`BiasCorrection` (collects statistics during the next calibration)."""
        if self.bias_correction is None:
            features = self.weight[0].numel() * getattr(self, "groups", 1)
            self.bias_correction = BiasCorrection(features).to(self.weight.device)

    def _output_shift(self, quantized_weight: Tensor, y: Tensor) -> Tensor:
        key = (self.weight_quantizer.bits, self.weight.data_ptr(), self.weight._version)
        shift = self.bias_correction.correction(self.weight, quantized_weight, key, getattr(self, "groups", 1))
        shape = [1] * y.dim()
        shape[1 if isinstance(self, nn.Conv2d) else -1] = -1
        return y + shift.reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        """Quantize the input and the weight as the quantizers' modes say, then compute."""
        if self.bias_correction is not None and self.input_quantizer.mode == "observe":
            self.bias_correction.observe(*self.input_feature_sum(x.detach()))
        weight = self.weight_quantizer(self.weight)
        y = self.float_forward(self.input_quantizer(x), weight)
        if self.bias_correction is not None and weight is not self.weight:
            y = self._output_shift(weight, y)
        return y


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
        return layer._share(conv, weight_quantizer, input_quantizer)

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Convolution with ``weight`` (default: the layer's own)."""
        return self._conv_forward(x, self.weight if weight is None else weight, self.bias)

    def input_feature_sum(self, x: Tensor) -> tuple[Tensor, int]:
        """Column sums of im2col(x) (one row per output position); im2col is linear, so the batch is summed first."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise NotImplementedError("bias correction supports zero-padded convolutions with numeric padding")
        summed = x.double().sum(dim=0, keepdim=True)
        cols = F.unfold(summed, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return cols[0].sum(dim=1), x.shape[0] * cols.shape[-1]


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; shares the original layer's parameters."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer):
        """Wrap ``linear`` (its parameters are shared, not copied)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        return layer._share(linear, weight_quantizer, input_quantizer)

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Affine map with ``weight`` (default: the layer's own)."""
        return F.linear(x, self.weight if weight is None else weight, self.bias)

    def input_feature_sum(self, x: Tensor) -> tuple[Tensor, int]:
        """Column sums of ``x`` flattened to ``[tokens, in_features]``, and the token count."""
        rows = x.reshape(-1, self.in_features)
        return rows.double().sum(dim=0), rows.shape[0]


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)


def is_quant_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of lit_mpq's fake-quantized layers."""
    return isinstance(module, QUANT_LAYER_TYPES)
