"""Post-LayerNorm activation quantization by scale reparameterization (RepQ-ViT).

Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision Transformers", ICCV 2023.
The outputs of a ViT's LayerNorms (the inputs of ``attn.qkv`` and ``mlp.fc1``) vary strongly from channel to
channel, so one scale for the whole tensor wastes most integer levels on the few wide channels. RepQ-ViT calibrates
one ``(scale s_c, zero point z_c)`` per channel, then folds the per-channel part into the LayerNorm's affine and the
next Linear's input columns, so that the deployed model quantizes the (folded) LayerNorm output per tensor with
``(s~, z~)`` and produces the same integer codes.

Derivation (``y`` the LayerNorm output of channel ``c``, ``[qmin, qmax]`` the integer range)::

    per channel : q_c = clamp(round(y_c / s_c) + z_c, qmin, qmax)
    per tensor  : q_c = clamp(round(y'_c / s~) + z~, qmin, qmax)       (same clamp bounds)

With ``s~ = mean(s)``, ``z~ = round(mean(z))``, ``r1 = s / s~`` and ``r2 = z - z~`` (an integer vector), choose
``y'_c = y_c / r1_c + s~ r2_c``. Then ``y'_c / s~ = y_c / s_c + r2_c``, and since ``r2_c`` is an integer,
``round(y_c / s_c + r2_c) + z~ = round(y_c / s_c) + z_c``: the codes are identical. ``y = gamma * n + beta`` (``n``
the normalized input), so the folded LayerNorm is::

    gamma' = gamma / r1,    beta' = beta / r1 + s~ r2.

The dequantized values relate by ``x_hat_c = (q_c - z_c) s_c = r1_c ((q_c - z~) s~ - s~ r2_c) = r1_c (x'_hat_c -
s~ r2_c)``, so the next Linear ``W x_hat + b`` equals ``W' x'_hat + b'`` with::

    W' = W diag(r1)          (input columns scaled),    b' = b - W' (s~ r2).

``z~`` must be an integer for the codes to match exactly (RepQ-ViT's reference code keeps the unrounded mean);
rounding it costs nothing because ``z~`` only shifts where the range sits. In floating point the two sides can still
disagree by one code where ``y_c / s_c`` lies within rounding error of a half-integer, and at exact ties when ``r2_c``
is odd (round-half-to-even rounds ``k + 0.5`` and ``k + 0.5 + r2`` to levels that differ by ``r2 - 1`` or ``r2 + 1``).

With weight quantization the deployment quantizes ``W'`` (per output channel), not ``W``. :func:`simulated_linear`
reproduces that deployment on the unfolded modules, so a fake-quant model can keep its original LayerNorm and
Linear (and its state dict) and still report the accuracy of the folded integer model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.functional import fake_quantize, quant_range
from lit_mpq.quant.modules import ActivationQuantizer
from lit_mpq.quant.observers import MSEObserver, Observer, fold_sign_codes

__all__ = [
    "ChannelwiseActivationQuantizer",
    "ChannelwiseMinMaxObserver",
    "ChannelwiseMSEObserver",
    "Reparameterization",
    "WeightQuantizeFn",
    "fold_into_layernorm",
    "fold_into_linear",
    "fold_layernorm",
    "reparameterize",
    "simulated_linear",
    "simulated_linear_params",
]

WeightQuantizeFn = Callable[[Tensor], Tensor]
"""Maps a weight ``[out, in]`` to its fake-quantized copy (e.g. per output channel, symmetric, at some bit width)."""


class ChannelwiseMinMaxObserver(Observer):
    """Running minimum and maximum of every channel along the last dimension (``torch.ao``'s per-channel observer).

    The buffers are sized at construction, not on the first batch, so every rank holds buffers of the same shape
    before calibration and :func:`~lit_mpq.quant.observers.sync_observers` can reduce them, and a state dict loads
    into a freshly built model.

    Args:
        num_channels: Size of the last dimension of the observed tensors.
        symmetric: Derive symmetric (signed, zero point 0) parameters instead of asymmetric ones.
    """

    REDUCTIONS = {"min_val": "min", "max_val": "max"}

    def __init__(self, num_channels: int, symmetric: bool = False) -> None:
        if num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels}")
        super().__init__(symmetric)
        self.num_channels = num_channels
        self.register_buffer("min_val", torch.full((num_channels,), float("inf")))
        self.register_buffer("max_val", torch.full((num_channels,), float("-inf")))

    def forward(self, x: Tensor) -> Tensor:
        """Record the per-channel min and max of ``x`` (channels last); return ``x``.

        Raises:
            ValueError: If the last dimension of ``x`` is not ``num_channels``.
        """
        _check_channels(x, self.num_channels, type(self).__name__)
        if x.numel():
            low, high = torch.aminmax(x.detach().reshape(-1, self.num_channels), dim=0)
            self.min_val.copy_(torch.minimum(self.min_val, low.float()))
            self.max_val.copy_(torch.maximum(self.max_val, high.float()))
        return x

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_channels={self.num_channels}, symmetric={self.symmetric}"


class ChannelwiseMSEObserver(ChannelwiseMinMaxObserver):
    """Per-channel histograms and, per bit width, each channel's squared-error-minimising clipping range.

    At 4 bits a channel's min/max range wastes its 16 levels on its few extreme values; RepQ-ViT's reference code
    searches each channel's range by its quantization error instead. Each channel keeps the sign-split histogram of
    :class:`~lit_mpq.quant.observers.HistogramObserver` (``bins_per_octave`` bins per octave), and
    :meth:`clip_range` runs :class:`~lit_mpq.quant.observers.MSEObserver`'s search on every channel's histogram, both
    ends searched independently; the histograms read every fourth token, the min and max every one. On DeiT-Tiny with
    float weights and only the ``qkv`` and ``fc1`` inputs at 4 bits this gives 80.5 % against 79.2 % with per-channel
    min/max ranges (650 images, ``docs/vit.md``).

    From ``minmax_from_bits`` up the ranges are each channel's min/max instead: with 64 levels and more the search
    clips channel tails the network needs (DeiT-Tiny with every post-LayerNorm range searched: W6A6 79.77 against
    80.62 with min/max ranges, W8A8 81.54 against 81.85; ``docs/vit.md``).

    Args:
        num_channels: Size of the last dimension of the observed tensors.
        symmetric: Derive symmetric parameters.
        bins_per_octave: Histogram resolution (a power of two; 8 keeps 192 channels' histograms small).
        num_candidates: Resolution of each channel's range search.
        minmax_from_bits: The width from which min/max ranges are used (None: searched at every width).
    """

    REDUCTIONS = {"min_val": "min", "max_val": "max", "hist": "sum"}
    TOKEN_STRIDE = 4
    """The histograms read every ``TOKEN_STRIDE``-th row (token) of each observed tensor."""

    def __init__(
        self,
        num_channels: int,
        symmetric: bool = False,
        bins_per_octave: int = 8,
        num_candidates: int = 100,
        minmax_from_bits: int | None = 6,
    ) -> None:
        super().__init__(num_channels, symmetric)
        self.bins_per_octave, self.num_candidates = bins_per_octave, num_candidates
        self.minmax_from_bits = minmax_from_bits
        layout = self._search_observer()  # the histogram layout of one channel (validates bins_per_octave)
        self._shift, self._codes_per_sign = layout._shift, layout._codes_per_sign
        self._num_bins, self._first_code = layout.num_bins, layout._first_code
        self.register_buffer("hist", torch.zeros(num_channels, len(layout.hist), dtype=torch.int64))

    def _search_observer(self) -> MSEObserver:
        """A one-channel MSE observer, not a submodule (no state of its own to save or synchronise)."""
        return MSEObserver(self.symmetric, self.num_candidates, self.bins_per_octave)

    def reset(self) -> None:
        """Forget all statistics."""
        super().reset()
        self.hist.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Record the per-channel min, max and histogram of ``x`` (channels last); return ``x``."""
        super().forward(x)
        if not x.numel():
            return x
        per_sign = self._codes_per_sign
        # every TOKEN_STRIDE-th token: thousands of samples per channel and batch at a fraction of the binning work
        # (min and max above still see every token)
        values = x.detach().float().reshape(-1, self.num_channels)[:: self.TOKEN_STRIDE].contiguous()
        # HistogramObserver's binning (sign, exponent and top mantissa bits in one shift), offset per channel
        codes = torch.bitwise_right_shift(values.view(torch.int32), self._shift)
        codes = codes.bitwise_and_(2 * per_sign - 1).long()
        codes += torch.arange(self.num_channels, device=codes.device) * (2 * per_sign)
        raw = torch.zeros(self.num_channels * 2 * per_sign, dtype=torch.int64, device=codes.device)
        raw.index_add_(0, codes.view(-1), torch.ones((), dtype=torch.int64, device=codes.device).expand(codes.numel()))
        fold_sign_codes(self.hist, raw.view(self.num_channels, 2, per_sign), self._num_bins, self._first_code)
        return x

    def clip_range(self, bits: int) -> tuple[Tensor, Tensor]:
        """Per-channel error-minimising ``(low, high)`` at ``bits`` (min/max from ``minmax_from_bits`` up)."""
        if self.minmax_from_bits is not None and bits >= self.minmax_from_bits:
            return super().clip_range(bits)
        search = self._search_observer().to(self.hist.device)
        lows, highs = torch.empty_like(self.min_val), torch.empty_like(self.max_val)
        for channel in range(self.num_channels):
            search.hist.copy_(self.hist[channel])
            search.min_val.copy_(self.min_val[channel])
            search.max_val.copy_(self.max_val[channel])
            lows[channel], highs[channel] = search.clip_range(bits)
        return lows, highs

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, mse_ranges_below_bits={self.minmax_from_bits}"


@dataclass(frozen=True, eq=False)
class Reparameterization:
    """Per-channel activation parameters and the per-tensor parameters they fold into (see the module docstring).

    Attributes:
        bits: Activation bit width the parameters are for.
        symmetric: Whether the integer range is the signed symmetric one.
        channel_scale: Per-channel scales ``s``, float32 ``[C]``.
        channel_zero_point: Per-channel zero points ``z``, int64 ``[C]``.
        scale: Per-tensor scale ``s~ = mean(s)``, float32 scalar.
        zero_point: Per-tensor zero point ``z~ = round(mean(z))``, int64 scalar.
        r1: Scale ratios ``s / s~``, float32 ``[C]``.
        r2: Zero-point offsets ``z - z~``, int64 ``[C]``.
    """

    bits: int
    symmetric: bool
    channel_scale: Tensor
    channel_zero_point: Tensor
    scale: Tensor
    zero_point: Tensor
    r1: Tensor
    r2: Tensor

    @property
    def num_channels(self) -> int:
        """Number of channels ``C``."""
        return self.r1.numel()

    @property
    def shift(self) -> Tensor:
        """``s~ r2`` (float32 ``[C]``): what the folded LayerNorm adds to each channel and the folded bias removes."""
        return self.scale * self.r2.float()

    def fake_quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize a folded LayerNorm output per tensor with ``(s~, z~)`` (straight-through gradient)."""
        qmin, qmax = quant_range(self.bits, self.symmetric)
        return fake_quantize(x, self.scale.to(x.device), self.zero_point.to(x.device), qmin, qmax)


def reparameterize(scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool = False) -> Reparameterization:
    """Fold per-channel ``(scale, zero_point)`` into per-tensor ``(s~, z~)`` and the ratios ``r1``, ``r2``.

    Args:
        scale: Per-channel scales, ``[C]``, positive.
        zero_point: Per-channel integer zero points, ``[C]``.
        bits: Bit width the parameters were derived for.
        symmetric: Whether they use the signed symmetric range (then every zero point, and ``z~``, is 0).

    Raises:
        ValueError: If the shapes are not one matching ``[C]`` each, or a scale is not positive.
    """
    if scale.dim() != 1 or zero_point.shape != scale.shape:
        raise ValueError(
            f"expected one scale and zero point per channel ([C] each), got {tuple(scale.shape)} and "
            f"{tuple(zero_point.shape)}"
        )
    if not bool((scale > 0).all()):
        raise ValueError("per-channel scales must be positive")
    # float64 for the means and the ratio; r1 is taken against the float32 s~ that the per-tensor quantizer
    # actually uses, so that r1 * s~ reproduces s as closely as float32 allows.
    tensor_scale = scale.double().mean().float()
    tensor_zero_point = zero_point.double().mean().round().long()
    r1 = (scale.double() / tensor_scale.double()).float()
    r2 = zero_point.long() - tensor_zero_point
    return Reparameterization(
        bits=bits,
        symmetric=symmetric,
        channel_scale=scale.float(),
        channel_zero_point=zero_point.long(),
        scale=tensor_scale,
        zero_point=tensor_zero_point,
        r1=r1,
        r2=r2,
    )


class ChannelwiseActivationQuantizer(ActivationQuantizer):
    """Per-channel (last dimension) activation quantizer for post-LayerNorm activations, with its reparameterization.

    The modes are those of :class:`~lit_mpq.quant.modules.ActivationQuantizer`: ``"observe"`` records per-channel
    statistics and returns the input, ``"quant"`` fake-quantizes every channel with its own ``(s_c, z_c)``, and
    ``"off"`` (or ``bits = None``) passes the input through. :meth:`reparameterization` gives the per-tensor form
    the deployed model uses; :func:`fold_layernorm` and :func:`simulated_linear` consume it.

    Args:
        observer: A per-channel observer with a ``num_channels`` attribute (e.g. :class:`ChannelwiseMinMaxObserver`);
            its ``symmetric`` flag decides the integer range (RepQ-ViT uses the asymmetric one).
        bits: Initial bit width (None = FP32).

    Raises:
        TypeError: If ``observer`` is not a per-channel observer.
    """

    supports_power_of_two = False  # its levels are not one uniform step: the power-of-two target refuses it

    def __init__(self, observer: Observer, bits: int | None = 8) -> None:
        if not isinstance(getattr(observer, "num_channels", None), int):
            raise TypeError(
                f"ChannelwiseActivationQuantizer needs a per-channel observer (with num_channels), e.g. "
                f"ChannelwiseMinMaxObserver; got {type(observer).__name__}"
            )
        super().__init__(observer, bits)

    @property
    def num_channels(self) -> int:
        """Number of channels (size of the last dimension) this quantizer is calibrated for."""
        return self.observer.num_channels

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        """Fake-quantize ``x`` per channel along its last dimension at ``bits``, regardless of the mode.

        Raises:
            ValueError: If the last dimension of ``x`` is not :attr:`num_channels`.
        """
        _check_channels(x, self.num_channels, type(self).__name__)
        scale, zero_point = self.qparams(bits)
        qmin, qmax = quant_range(bits, self.symmetric)
        # torch's per-channel kernels reject a negative axis.
        return fake_quantize(x, scale.to(x.device), zero_point.to(x.device), qmin, qmax, axis=x.dim() - 1)

    def reparameterization(self, bits: int | None = None) -> Reparameterization:
        """The per-tensor reparameterization of this quantizer's per-channel parameters at ``bits``.

        Args:
            bits: Bit width (default: the quantizer's current ``bits``).

        Raises:
            ValueError: If neither ``bits`` nor the quantizer's ``bits`` is set.
            RuntimeError: If nothing has been observed yet.
        """
        bits = self.bits if bits is None else bits
        if bits is None:
            raise ValueError("no bit width: pass bits, or set the quantizer's bits")
        scale, zero_point = self.qparams(bits)
        return reparameterize(scale, zero_point, bits, self.symmetric)


def fold_into_layernorm(norm: nn.LayerNorm, rep: Reparameterization) -> nn.LayerNorm:
    """A copy of ``norm`` whose output is ``y / r1 + s~ r2`` (``gamma' = gamma / r1``, ``beta' = beta / r1 + s~ r2``).

    A LayerNorm without affine parameters (or without a bias) gets them: the fold needs both.

    Raises:
        ValueError: If ``norm`` does not normalize over exactly ``rep.num_channels`` features.
    """
    if tuple(norm.normalized_shape) != (rep.num_channels,):
        raise ValueError(
            f"the reparameterization has {rep.num_channels} channels, but the LayerNorm normalizes over "
            f"{tuple(norm.normalized_shape)}: RepQ-ViT folds a LayerNorm over the last dimension only"
        )
    folded = copy.deepcopy(norm)
    reference = next(folded.parameters(), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else rep.r1.device
    gamma = folded.weight.detach().double() if folded.weight is not None else torch.ones(rep.num_channels).double()
    beta = folded.bias.detach().double() if folded.bias is not None else torch.zeros(rep.num_channels).double()
    r1 = rep.r1.double().to(gamma.device)
    new_gamma = gamma / r1
    new_beta = beta / r1 + rep.shift.double().to(beta.device)
    # Assigning Parameters (rather than copying into existing ones) also covers the affine-free LayerNorm.
    folded.weight = nn.Parameter(new_gamma.to(device=device, dtype=dtype))
    folded.bias = nn.Parameter(new_beta.to(device=device, dtype=dtype))
    folded.elementwise_affine = True
    return folded


def fold_into_linear(linear: nn.Linear, rep: Reparameterization) -> nn.Linear:
    """A copy of ``linear`` that takes the folded LayerNorm's output: ``W' = W diag(r1)``, ``b' = b - W' (s~ r2)``.

    The bias is folded with the float ``W'``: weight quantization comes after the fold and quantizes ``W'``
    (see :func:`simulated_linear`). A Linear without a bias gets one.

    Raises:
        ValueError: If ``linear.in_features`` is not ``rep.num_channels``.
    """
    _check_linear(linear, rep)
    folded = copy.deepcopy(linear)
    weight = folded.weight.detach().double()
    new_weight = weight * rep.r1.double().to(weight.device)
    new_bias = -(new_weight @ rep.shift.double().to(weight.device))
    if folded.bias is not None:
        new_bias = new_bias + folded.bias.detach().double()
    dtype, device = folded.weight.dtype, folded.weight.device
    folded.weight = nn.Parameter(new_weight.to(dtype))
    folded.bias = nn.Parameter(new_bias.to(device=device, dtype=dtype))
    return folded


def fold_layernorm(norm: nn.LayerNorm, linear: nn.Linear, rep: Reparameterization) -> tuple[nn.LayerNorm, nn.Linear]:
    """Copies of ``norm`` and ``linear`` with ``rep`` folded in; the originals are left untouched.

    Feeding the folded LayerNorm's output, fake-quantized per tensor with ``(rep.scale, rep.zero_point)``
    (:meth:`Reparameterization.fake_quantize`), to the folded Linear gives what the original Linear gives on the
    per-channel fake-quantized output of the original LayerNorm. A LayerNorm that feeds several Linears (separate
    q, k, v projections) folds once with :func:`fold_into_layernorm` and each Linear with :func:`fold_into_linear`.

    Args:
        norm: LayerNorm over the last dimension, ``C`` features.
        linear: The Linear consuming the LayerNorm's output, ``C`` input features.
        rep: The reparameterization of the per-channel quantizer between them.

    Returns:
        ``(folded_norm, folded_linear)``.
    """
    return fold_into_layernorm(norm, rep), fold_into_linear(linear, rep)


def simulated_linear_params(
    linear: nn.Linear, rep: Reparameterization, weight_quantize_fn: WeightQuantizeFn
) -> tuple[Tensor, Tensor]:
    """Weight and bias that make the unfolded ``linear`` compute what the folded, weight-quantized one computes.

    The folded deployment computes ``Q(W') x'_hat + b'`` with ``W' = W diag(r1)``, ``b' = b - W' (s~ r2)`` and
    ``x'_hat = x_hat / r1 + s~ r2`` (``x_hat`` the per-channel fake-quantized input of the unfolded model; see the
    module docstring). Substituting::

        Q(W') x'_hat + b' = Q(W') diag(1/r1) x_hat + Q(W') (s~ r2) + b - W' (s~ r2)
                          = Q(W') diag(1/r1) x_hat + b + (Q(W') - W') (s~ r2).

    So the unfolded Linear takes the weight ``Q(W') diag(1/r1)`` and the bias ``b + (Q(W') - W') (s~ r2)``: the
    weight's quantization error as the folded model sees it, plus the shift that the error of ``Q(W')`` makes on the
    constant ``s~ r2`` the fold moved into the activation. Gradients flow through ``weight_quantize_fn`` (its STE)
    to ``linear.weight`` and ``linear.bias``.

    Args:
        linear: The original (unfolded) Linear.
        rep: The reparameterization of the quantizer in front of it.
        weight_quantize_fn: Fake-quantizes a weight ``[out, in]``, as the deployment quantizes ``W'``.

    Returns:
        ``(weight, bias)`` for ``F.linear``.

    Raises:
        ValueError: If ``linear.in_features`` is not ``rep.num_channels``.
    """
    _check_linear(linear, rep)
    r1 = rep.r1.to(device=linear.weight.device, dtype=linear.weight.dtype)
    shift = rep.shift.to(device=linear.weight.device, dtype=linear.weight.dtype)
    folded_weight = linear.weight * r1
    quantized = weight_quantize_fn(folded_weight)
    bias = (quantized - folded_weight) @ shift
    if linear.bias is not None:
        bias = bias + linear.bias
    return quantized / r1, bias


def simulated_linear(
    x_hat: Tensor, linear: nn.Linear, rep: Reparameterization, weight_quantize_fn: WeightQuantizeFn
) -> Tensor:
    """The folded deployment's Linear output, computed on the unfolded modules (see :func:`simulated_linear_params`).

    Args:
        x_hat: The original LayerNorm's output fake-quantized per channel (``ChannelwiseActivationQuantizer``).
        linear: The original (unfolded) Linear.
        rep: The reparameterization of that quantizer.
        weight_quantize_fn: Fake-quantizes a weight ``[out, in]``, as the deployment quantizes ``W'``.

    Returns:
        ``Q(W') diag(1/r1) x_hat + b + (Q(W') - W') (s~ r2)``, which equals ``Q(W') x'_hat + b'`` of the folded model.
    """
    weight, bias = simulated_linear_params(linear, rep, weight_quantize_fn)
    return F.linear(x_hat, weight, bias)


def _check_linear(linear: nn.Linear, rep: Reparameterization) -> None:
    if linear.in_features != rep.num_channels:
        raise ValueError(
            f"the reparameterization has {rep.num_channels} channels, but the Linear has {linear.in_features} "
            "input features"
        )


def _check_channels(x: Tensor, num_channels: int, owner: str) -> None:
    if x.dim() == 0 or x.shape[-1] != num_channels:
        raise ValueError(
            f"{owner} expects {num_channels} channels in the last dimension, got an input of shape {tuple(x.shape)}"
        )
