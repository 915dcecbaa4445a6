"""Fake-quantized drop-in replacements for ``nn.Conv2d`` and ``nn.Linear``, and for their subclasses.

``QuantConv2d`` and ``QuantLinear`` subclass the float layers and share their ``weight`` and ``bias``
parameters, so state-dict keys of the original model stay valid. Each carries two quantizers:

- ``weight_quantizer`` (:class:`WeightQuantizer`): parameters derived from the weight itself;
- ``input_quantizer`` (:class:`ActivationQuantizer`): an observer collecting input statistics during
  calibration, and the fake-quantizer that uses them afterwards.

A quantizer's ``mode`` is ``"off"`` (pass-through), ``"observe"`` (record statistics, pass-through) or
``"quant"`` (fake-quantize at its current ``bits``; ``bits = None`` is pass-through too).

Subclasses of the float layers (timm's ``StdConv2d``, ``Conv2dSame``, ``Linear``, torch's
``NonDynamicallyQuantizableLinear``, ...) get a twin of their own class from :func:`quant_class`: a subclass of both
``QuantConv2d``/``QuantLinear`` and the float class (the way ``torch.nn.utils.parametrize`` derives
``Parametrized<Class>``), so ``isinstance`` checks, extra attributes and extra parameters (``ScaledStdConv2d.gain``)
survive. A layer's computation is split into :meth:`~QuantLayerMixin.effective_weight` (the kernel that actually
multiplies the input) and :meth:`~QuantLayerMixin.float_forward` (the convolution or affine map, with any padding
the layer does itself); the quantizers sit between the two. Only forwards listed in :func:`known_forwards` are
reproduced: a subclass with any other ``forward`` is not quantized, and :func:`unsupported_reason` says why.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Collection
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.functional import fake_quantize, power_of_two_qparams, qparams_from_range, quant_range
from lit_mpq.quant.observers import Observer
from lit_mpq.quant.weights import weight_qparams

MODES = ("off", "observe", "quant")


def _tensor_version(t: Tensor) -> tuple[int, int]:
    return t.data_ptr(), t._version


class _Quantizer(nn.Module):
    def __init__(self, bits: int | None, symmetric: bool) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.mode = "off"
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.power_of_two = False
        """Round every scale up to a power of two (a target that rescales by shifts: :mod:`lit_mpq.quant.targets`)."""

    supports_power_of_two: ClassVar[bool] = True
    """Whether :attr:`power_of_two` is honoured (False for quantizers whose levels are not one uniform step)."""

    def _snap(self, qparams: tuple[Tensor, Tensor], bits: int) -> tuple[Tensor, Tensor]:
        """``qparams`` with the scale rounded up to a power of two when :attr:`power_of_two` is set."""
        if not self.power_of_two:
            return qparams
        return power_of_two_qparams(*qparams, bits, self.symmetric)

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
        self.rounded: dict[int, tuple[Tensor, Tensor]] = {}
        """``{bits: (source, rounded)}``: weights rounded by a data-driven method (:mod:`lit_mpq.rounding`) on this
        quantizer's grid, used instead of nearest rounding at ``bits`` while the weight equals ``source``."""
        self.fixed_qparams: dict[int, tuple[Tensor, Tensor]] = {}
        """``{bits: (scale, zero_point)}`` used as they are instead of being derived from the weight (a model loaded
        from a packed checkpoint, whose weights are already the dequantized codes)."""
        self._stale_warned = False
        self.rounding_version = 0
        """Counts changes of :attr:`rounded` (part of the keys of results derived from the quantized weight)."""

    def set_rounded(self, bits: int, source: Tensor, rounded: Tensor) -> None:
        """Use ``rounded`` for ``source`` at ``bits`` from now on (what GPTQ/GPFQ produced); forgets cached weights."""
        if source.shape != rounded.shape:
            raise ValueError(f"rounded weight {tuple(rounded.shape)} does not match its source {tuple(source.shape)}")
        self.rounded[bits] = (source.detach().clone(), rounded.detach().to(source.dtype).clone())
        self.rounding_version += 1
        self._stale_warned = False
        self._cache.clear()

    def clear_rounded(self) -> None:
        """Back to nearest rounding at every width."""
        if self.rounded:
            self.rounded.clear()
            self.rounding_version += 1
            self._cache.clear()

    def rounded_weight(self, weight: Tensor, bits: int) -> Tensor | None:
        """The data-driven rounding of ``weight`` at ``bits``, or None (nearest rounding applies).

        None also when ``weight`` is no longer the weight that was rounded (it was trained or edited since): then a
        warning says so once, as the rounding is lost.
        """
        entry = self.rounded.get(bits)
        if entry is None:
            return None
        source, rounded = entry
        if source.shape != weight.shape or source.device != weight.device or not torch.equal(source, weight.detach()):
            if not self._stale_warned:
                warnings.warn(
                    f"a weight changed after it was rounded at {bits} bits; it falls back to nearest rounding (run the "
                    "rounding again after changing weights)",
                    stacklevel=3,
                )
                self._stale_warned = True
            return None
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight + (rounded - weight).detach()  # straight-through, as the nearest fake-quantizer
        return rounded

    def qparams(self, weight: Tensor, bits: int, version: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
        """Scale and zero point for ``weight`` at ``bits``, cached until the weight changes.

        Args:
            weight: The weight to quantize.
            bits: Bit width.
            version: What identifies the weight's content (default: its storage and version counter). A weight
                computed afresh in every forward (a standardized weight) needs the version of the parameters it is
                computed from: a new tensor may reuse a freed one's storage with the same version 0.
        """
        fixed = self.fixed_qparams.get(bits)
        if fixed is not None:
            return fixed
        key = (bits, *(version or _tensor_version(weight)))
        cached = self._cache.get(key)  # get, not `in` + index: rounding runs forwards in threads (lit_mpq.rounding)
        if cached is None:
            cached = self._snap(weight_qparams(weight, bits, self.symmetric, self.per_channel, self.method), bits)
            self._cache[key] = cached
        return cached

    def quantize(self, weight: Tensor, bits: int, version: tuple[int, ...] | None = None) -> Tensor:
        """Fake-quantize ``weight`` at ``bits`` regardless of the mode (cached while no gradient is needed).

        ``version`` identifies the weight's content, as in :meth:`qparams`.
        """
        version = version or _tensor_version(weight)
        # Inference-mode results must not leak into gradient passes: the mode is part of the key.
        key = ("w", bits, *version, torch.is_inference_mode_enabled())
        frozen = not (torch.is_grad_enabled() and weight.requires_grad)
        cached = self._cache.get(key) if frozen else None
        if cached is not None:  # a data-driven rounding too: set_rounded clears the cache, so no stale entry survives
            return cached
        quantized = self.rounded_weight(weight, bits) if self.rounded else None
        if quantized is None:
            scale, zero_point = self.qparams(weight, bits, version)
            qmin, qmax = quant_range(bits, self.symmetric)
            quantized = fake_quantize(weight, scale, zero_point, qmin, qmax, 0 if self.per_channel else None)
        if frozen:
            kept = {k: v for k, v in self._cache.items() if k[0] != "w" or k[1] != bits}
            kept[key] = quantized
            self._cache = kept  # one assignment: a concurrent reader sees the old or the new dict
        return quantized

    def forward(self, weight: Tensor, version: tuple[int, ...] | None = None) -> Tensor:
        """Fake-quantized weight in ``quant`` mode, the weight itself otherwise (``version`` as in :meth:`qparams`)."""
        if self.mode != "quant" or self.bits is None:
            return weight
        return self.quantize(weight, self.bits, version)

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
        self.range_factors: dict[int, float] = {}
        """``{bits: factor}``: the observer's clipping range at ``bits`` is multiplied by ``factor`` (set by a search
        such as the ranking-aware refinement; 1 when absent)."""
        self.fixed_qparams: dict[int, tuple[Tensor, Tensor]] = {}
        """``{bits: (scale, zero_point)}`` used as they are instead of being derived from the observer (steps learned
        by quantization-aware training, :mod:`lit_mpq.qat`)."""

    def set_range_factor(self, bits: int, factor: float) -> None:
        """Scale the clipping range used at ``bits`` by ``factor`` (> 0); forgets the cached parameters."""
        if not factor > 0:
            raise ValueError(f"a range factor must be positive, got {factor}")
        self.range_factors[bits] = float(factor)
        self._cache.pop(bits, None)

    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point at ``bits`` from the observer's statistics (cached per bit width), or as fixed."""
        fixed = self.fixed_qparams.get(bits)
        if fixed is not None:
            return fixed
        if bits not in self._cache:
            factor = self.range_factors.get(bits, 1.0)
            if factor == 1.0:
                self._cache[bits] = self._snap(self.observer.qparams(bits), bits)
            else:
                if not self.observer.has_data:
                    self.observer.qparams(bits)  # raises the observer's own "run calibration first" error
                low, high = self.observer.clip_range(bits)
                qparams = qparams_from_range(low * factor, high * factor, bits, self.symmetric)
                self._cache[bits] = self._snap(qparams, bits)
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
        """Add the column sums ``feature_sum`` of ``rows`` input rows to the running sum.

        ``feature_sum`` is one batch's sum (float32 is enough for a batch, and summing a whole activation in float64
        would first copy it); the running sum over every batch is float64.
        """
        self.input_sum.add_(feature_sum.detach().double())
        self.count.add_(rows)
        self._cache.clear()

    def correction(self, weight: Tensor, quantized: Tensor, key: tuple, groups: int = 1) -> Tensor:
        """Per-output-channel shift ``(W - W_q) @ E[x]`` (zeros when nothing was observed), cached under ``key``."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        cout = weight.shape[0]
        if float(self.count) == 0:
            return torch.zeros(cout, dtype=weight.dtype, device=weight.device)
        mean = (self.input_sum / self.count).to(weight.dtype).to(weight.device)
        delta = (weight - quantized).detach().reshape(groups, cout // groups, -1)
        shift = torch.einsum("gof,gf->go", delta, mean.reshape(groups, -1)).reshape(cout)
        self._cache = {key: shift}
        return shift


class QuantLayerMixin:
    """What every fake-quantized layer shares: its quantizers, the quantized forward, and the float round trip.

    A layer computes ``float_forward(input_quantizer(x), weight_quantizer(effective_weight()))``; with both
    quantizers off that is, operation for operation, the float layer's own forward.
    """

    float_class: ClassVar[type[nn.Module]]
    """The float layer type this class is the fake-quantized twin of."""

    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer
    bias_correction: BiasCorrection | None  # set per instance by from_float: a class default would shadow modules

    @classmethod
    def from_float(
        cls, float_layer: nn.Module, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer
    ) -> QuantLayerMixin:
        """Wrap ``float_layer`` in its twin of :func:`quant_class` (its parameters are shared, not copied).

        Raises:
            TypeError: If the twin of ``float_layer``'s class is not a ``cls`` (a Linear given to ``QuantConv2d``),
                or the layer cannot be quantized (see :func:`unsupported_reason`).
        """
        target = quant_class(type(float_layer))
        if not issubclass(target, cls):
            raise TypeError(f"{cls.__name__}.from_float got a {type(float_layer).__name__}, whose twin is {target}")
        layer = _rebuild(float_layer, target)
        layer.weight_quantizer = weight_quantizer
        layer.input_quantizer = input_quantizer
        layer.bias_correction = None
        return layer

    def to_float(self) -> nn.Module:
        """The float layer again: an instance of :attr:`float_class` sharing this layer's parameters, no quantizers."""
        return _rebuild(self, self.float_class, drop=("weight_quantizer", "input_quantizer", "bias_correction"))

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # The twins of subclasses are created at run time, so pickle cannot find them by name: rebuild the class
        # from the float class (which pickle can find) instead. copy.deepcopy goes through here too.
        return _new_quant_layer, (self.float_class,), self.__getstate__()

    def quantizer(self, kind: str) -> WeightQuantizer | ActivationQuantizer:
        """The quantizer of the plan's tensor ``kind``: ``"w"`` the weight, ``"a"`` the input."""
        return self.weight_quantizer if kind == "w" else self.input_quantizer

    def effective_weight(self) -> Tensor:
        """The kernel the layer multiplies its input with: what the weight quantizer quantizes."""
        return self.weight

    def weight_version(self) -> tuple[int, ...]:
        """Identifies the content of :meth:`effective_weight`: storage and version of each of the layer's parameters."""
        return tuple(v for p in self._parameters.values() if p is not None for v in _tensor_version(p))

    def quantize_weight(self, bits: int) -> Tensor:
        """The effective weight fake-quantized at ``bits``, whatever the weight quantizer's mode."""
        return self.weight_quantizer.quantize(self.effective_weight(), bits, self.weight_version())

    def pad_input(self, x: Tensor) -> Tensor:
        """``x`` with the padding the layer adds itself before its convolution (timm's SAME convolutions; none here).

        A convolution's ``float_forward(x, w)`` is ``_conv_forward(pad_input(x), w, bias)``: code that recomputes a
        layer's linear map with other weights or inputs (the sensitivity probes) pads once, then convolves.
        """
        return x

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        """The layer's float computation with ``weight`` as the effective weight (default: :meth:`effective_weight`)."""
        raise NotImplementedError

    def input_feature_sum(self, x: Tensor) -> tuple[Tensor, int]:  # pragma: no cover - abstract
        """Column sums of the input as ``[rows, features]`` rows matching the flattened weight, and the row count."""
        raise NotImplementedError

    def enable_bias_correction(self) -> None:
        """Attach a :class:`BiasCorrection` (collects statistics during the next calibration)."""
        if self.bias_correction is None:
            features = self.weight[0].numel() * getattr(self, "groups", 1)
            self.bias_correction = BiasCorrection(features).to(self.weight.device)

    def _output_shift(self, weight: Tensor, quantized_weight: Tensor, y: Tensor) -> Tensor:
        # The rounding version: a data-driven rounding changes the quantized weight, not the weight's version.
        key = (self.weight_quantizer.bits, self.weight_quantizer.rounding_version, *self.weight_version())
        shift = self.bias_correction.correction(weight, quantized_weight, key, getattr(self, "groups", 1))
        shape = [1] * y.dim()
        shape[1 if isinstance(self, nn.Conv2d) else -1] = -1
        return y + shift.reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        """Quantize the input and the effective weight as the quantizers' modes say, then compute."""
        if self.bias_correction is not None and self.input_quantizer.mode == "observe":
            self.bias_correction.observe(*self.input_feature_sum(x.detach()))
        weight = self.effective_weight()
        quantized = self.weight_quantizer(weight, self.weight_version())
        y = self.float_forward(self.input_quantizer(x), quantized)
        if self.bias_correction is not None and quantized is not weight:
            y = self._output_shift(weight, quantized, y)
        return y


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input; shares the original layer's parameters."""

    float_class = nn.Conv2d

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Convolution of the padded input with ``weight`` (default: the effective weight)."""
        return self._conv_forward(self.pad_input(x), self.effective_weight() if weight is None else weight, self.bias)

    def input_feature_sum(self, x: Tensor) -> tuple[Tensor, int]:
        """Column sums of im2col(x) (one row per output position); im2col is linear, so the batch is summed first."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise NotImplementedError("bias correction supports zero-padded convolutions with numeric padding")
        # Padding is linear too: sum the batch first (in float32 at least), pad and unfold the one summed image.
        batch_sum = x.sum(dim=0, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        summed = self.pad_input(batch_sum).double()
        cols = F.unfold(summed, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return cols[0].sum(dim=1), x.shape[0] * cols.shape[-1]


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; shares the original layer's parameters."""

    float_class = nn.Linear

    def float_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Affine map with ``weight`` (default: the effective weight)."""
        return F.linear(x, self.effective_weight() if weight is None else weight, self.bias)

    # ----------------------------------------------------------------- post-LayerNorm reparameterization (RepQ-ViT)
    # When the input quantizer is per channel (lit_mpq.quant.layernorm), the deployed model folds its per-channel
    # scales into the LayerNorm before this layer and into this layer's weight (W' = W diag(r1)): the weight that
    # gets quantized is W', and the layer computes what the folded model computes (simulated_linear_params).

    def _reparameterization(self, active: bool):
        """The input quantizer's reparameterization, or None.

        None for a per-tensor input quantizer, one without statistics, or, with ``active``, an input that is not
        quantized now (then nothing is folded).
        """
        quantizer = self.input_quantizer
        if not hasattr(quantizer, "reparameterization") or not quantizer.observer.has_data:
            return None
        if active and (quantizer.mode != "quant" or quantizer.bits is None):
            return None
        return quantizer.reparameterization(quantizer.bits or 8)

    def _fake_quantize_uncached(self, weight: Tensor, bits: int) -> Tensor:
        quantizer = self.weight_quantizer
        if quantizer.rounded:  # the folded weight W diag(r1) is what a rounding method rounded
            rounded = quantizer.rounded_weight(weight, bits)
            if rounded is not None:
                return rounded
        scale, zero_point = weight_qparams(weight, bits, quantizer.symmetric, quantizer.per_channel, quantizer.method)
        qmin, qmax = quant_range(bits, quantizer.symmetric)
        return fake_quantize(weight, scale, zero_point, qmin, qmax, 0 if quantizer.per_channel else None)

    def quantize_weight(self, bits: int) -> Tensor:
        """The effective weight fake-quantized at ``bits``; with a reparameterized input, ``Q(W diag(r1)) / r1``."""
        rep = self._reparameterization(active=False)
        if rep is None:
            return super().quantize_weight(bits)
        r1 = rep.r1.to(self.weight)
        return self._fake_quantize_uncached(self.effective_weight() * r1, bits) / r1

    def forward(self, x: Tensor) -> Tensor:
        """As :meth:`QuantLayerMixin.forward`; with a reparameterized input, the folded deployment's output."""
        rep = self._reparameterization(active=True)
        if rep is None:
            return super().forward(x)
        x_hat = self.input_quantizer(x)
        bits = self.weight_quantizer.bits
        if self.weight_quantizer.mode != "quant" or bits is None:
            return F.linear(x_hat, self.effective_weight(), self.bias)  # float weights: the fold is exact
        frozen = getattr(self, "frozen_simulated", None)
        if frozen is not None and frozen[0] == bits:  # loaded from a packed checkpoint (lit_mpq.deploy.checkpoint)
            return F.linear(x_hat, frozen[1], frozen[2])
        weight, bias = self._simulated_params(rep, bits)
        return F.linear(x_hat, weight, bias)

    def _simulated_params(self, rep, bits: int) -> tuple[Tensor, Tensor | None]:
        """The folded deployment's weight and bias, cached while neither the parameters nor the input ranges change.

        Quantizing ``W diag(r1)`` (an MSE weight search, per channel) costs far more than the layer itself, so it is
        done once per weight width, weight content and input-range parameters, not in every forward.
        """
        from lit_mpq.quant.layernorm import simulated_linear_params  # imports this module

        quantizer = self.weight_quantizer
        input_scale = self.input_quantizer.qparams(self.input_quantizer.bits or 8)[0]  # the cached object rep used
        frozen = not (torch.is_grad_enabled() and self.weight.requires_grad)
        bias_version = _tensor_version(self.bias) if self.bias is not None else ()
        key = ("reparam", bits, *self.weight_version(), *bias_version, torch.is_inference_mode_enabled())
        cached = quantizer._cache.get(key) if frozen else None
        if cached is not None and cached[0] is input_scale:  # identity: recomputed ranges are new tensors
            return cached[1], cached[2]
        weight, bias = simulated_linear_params(self, rep, lambda w: self._fake_quantize_uncached(w, bits))
        if frozen:
            stale = [k for k in quantizer._cache if k[0] == "reparam"]
            for k in stale:
                quantizer._cache.pop(k, None)
            quantizer._cache[key] = (input_scale, weight, bias)
        return weight, bias

    def input_feature_sum(self, x: Tensor) -> tuple[Tensor, int]:
        """Column sums of ``x`` flattened to ``[tokens, in_features]``, and the token count."""
        rows = x.reshape(-1, self.in_features)
        # One batch in float32 (at least): a float64 sum would copy the whole activation first.
        return rows.sum(dim=0, dtype=torch.promote_types(rows.dtype, torch.float32)), rows.shape[0]


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)


def is_quant_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of lit_mpq's fake-quantized layers (the twins of subclasses included)."""
    return isinstance(module, QUANT_LAYER_TYPES)


# ------------------------------------------------------------------------------------- subclasses of the float layers
# Each mixin reproduces one step of a float subclass's own forward; quant_class stacks them in front of
# QuantConv2d. The tests check every known forward bit for bit against the float layer with the quantizers off.


def _pad_same(x: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """TensorFlow's "SAME" padding for the input's own size (timm.layers.padding.pad_same: extra pixel right/bottom)."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom), value=0)


class _SamePadding:
    """Pads the input to TensorFlow "SAME" for its own size before convolving (timm ``*Conv2dSame*``).

    The input is quantized before it is padded, as an integer kernel would pad its integer input: zero is always a
    quantization level (every range contains 0), so the order does not change a value.
    """

    def pad_input(self, x: Tensor) -> Tensor:
        # Conv2dSame always pads itself; the *StdConv2dSame layers only when SAME padding could not be made static
        # at construction (then `same_pad` is True and `padding` is 0).
        if getattr(self, "same_pad", True):
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        return x


class _StandardizedWeight:
    """Weight standardization (timm ``StdConv2d``, ``StdConv2dSame``; Qiao et al., arXiv:1903.10520).

    The kernel that multiplies the input is the standardized weight, and that is what an integer deployment stores
    (the standardization is folded into the weight once, offline). So the standardized weight is what gets
    quantized: quantizing the raw parameter and standardizing afterwards would put a tensor the hardware never sees
    on the integer grid and leave the kernel it does use off the grid.
    """

    def _gain(self) -> Tensor | None:
        return None

    def effective_weight(self) -> Tensor:
        # The same call as timm's forward, so that the float result is bit for bit the float layer's.
        gain = self._gain()
        return F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=gain,
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)


class _ScaledStandardizedWeight(_StandardizedWeight):
    """Scaled weight standardization with a learned gain (timm ``ScaledStdConv2d``; Brock et al., arXiv:2101.08692)."""

    def _gain(self) -> Tensor | None:
        return (self.gain * self.scale).view(-1)


@functools.cache
def known_forwards() -> dict[type[nn.Module], tuple[type, ...]]:
    """``{class defining a forward: mixins that reproduce it}`` for every forward lit_mpq can quantize.

    A layer is supported when the class whose ``forward`` it runs (the first in its MRO that defines one) is a key;
    the mixins go in front of ``QuantConv2d``/``QuantLinear`` in its twin. timm's layers are listed when timm is
    installed (lit_mpq.quant itself does not need it).
    """
    forwards: dict[type[nn.Module], tuple[type, ...]] = {nn.Conv2d: (), nn.Linear: ()}
    try:
        from timm.layers import Linear as TimmLinear
        from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
        from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency of lit_mpq, but not of this package
        return forwards
    forwards.update(
        {
            TimmLinear: (),  # F.linear(x, weight, bias); a dtype cast under TorchScript only
            Conv2dSame: (_SamePadding,),
            Conv2dSameExport: (_SamePadding,),  # pads with an nn.ZeroPad2d made on the first call: the same zeros
            StdConv2d: (_StandardizedWeight,),
            StdConv2dSame: (_SamePadding, _StandardizedWeight),
            ScaledStdConv2d: (_ScaledStandardizedWeight,),
            ScaledStdConv2dSame: (_SamePadding, _ScaledStandardizedWeight),
        }
    )
    return forwards


def _forward_owner(cls: type[nn.Module]) -> type:
    """The class whose ``forward`` instances of ``cls`` run."""
    return next(klass for klass in cls.__mro__ if "forward" in vars(klass))


def unsupported_reason(module: nn.Module | type[nn.Module]) -> str | None:
    """Why ``module`` (a layer or a layer class) cannot be swapped for a fake-quantized twin; ``None`` when it can."""
    cls = module if isinstance(module, type) else type(module)
    if issubclass(cls, QUANT_LAYER_TYPES):
        return "already quantized"
    if not issubclass(cls, nn.Conv2d | nn.Linear):
        return f"{cls.__name__} is not supported: lit_mpq quantizes Conv2d and Linear layers (and known subclasses)"
    if issubclass(cls, nn.modules.lazy.LazyModuleMixin):  # its shapes are set by a hook the twin would not have
        return f"{cls.__name__} is not initialized yet: run one forward pass before quantizing"
    owner = _forward_owner(cls)
    if owner not in known_forwards():
        return (
            f"{cls.__name__} runs its own forward ({owner.__module__}.{owner.__qualname__}.forward), which lit_mpq "
            f"does not know how to reproduce with quantized weights and inputs"
        )
    return None


_TWINS: dict[type[nn.Module], type[QuantLayerMixin]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quant_class(float_cls: type[nn.Module]) -> type[QuantLayerMixin]:
    """The fake-quantized twin of ``float_cls``: ``QuantConv2d``, ``QuantLinear``, or a subclass made once per class.

    The twin of a subclass derives from the mixins of :func:`known_forwards`, then ``QuantConv2d``/``QuantLinear``,
    then ``float_cls`` itself, so its instances are still ``float_cls`` instances with all their attributes.

    Raises:
        TypeError: If ``float_cls`` cannot be quantized (see :func:`unsupported_reason`).
    """
    if float_cls not in _TWINS:
        reason = unsupported_reason(float_cls)
        if reason is not None:
            raise TypeError(f"cannot quantize {float_cls.__module__}.{float_cls.__qualname__}: {reason}")
        base = QuantConv2d if issubclass(float_cls, nn.Conv2d) else QuantLinear
        mixins = known_forwards()[_forward_owner(float_cls)]
        _TWINS[float_cls] = type(
            f"Quant{float_cls.__name__}",
            (*mixins, base, float_cls),
            {
                "__module__": __name__,
                "__doc__": f"Fake-quantized ``{float_cls.__module__}.{float_cls.__qualname__}``; made by quant_class.",
                "float_class": float_cls,
            },
        )
    return _TWINS[float_cls]


def _new_quant_layer(float_cls: type[nn.Module]) -> QuantLayerMixin:
    """An empty instance of ``float_cls``'s twin, for unpickling (its state is set afterwards)."""
    cls = quant_class(float_cls)
    return cls.__new__(cls)


def _rebuild(source: nn.Module, cls: type[nn.Module], drop: Collection[str] = ()) -> Any:
    """A new ``cls`` instance with ``source``'s attributes, parameters, buffers and children (shared, not copied).

    Like ``copy.copy`` into another class: ``cls.__init__`` is not run (a subclass's signature is unknown), and
    neither are ``source``'s hooks carried over (the layer is a new module). Entries named in ``drop`` are left out.
    """
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for key, value in vars(source).items():
        if key in drop:
            continue
        if key in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[key] = type(value)((k, v) for k, v in value.items() if k not in drop)
        elif key == "_non_persistent_buffers_set":
            layer.__dict__[key] = set(value) - set(drop)
        elif key == "training" or key not in layer.__dict__:  # Module's own hook dictionaries stay fresh
            layer.__dict__[key] = value
    return layer
