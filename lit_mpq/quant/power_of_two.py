"""Power-of-Two Factor (PTF) activation quantization for inputs with a few huge channels (Lin et al., FQ-ViT).

Some activations of a vision transformer hold a few channels whose values are tens of times larger than the rest:
the post-GELU inputs of ``mlp.fc2`` in ViT-Tiny (AugReg) are the example lit_mpq met. One per-tensor range then
either spends its levels on those channels (min/max: every other channel is rounded coarsely) or clips them
(percentile, MSE: the network loses the very values it relies on). Per-channel ranges fix both but need a per-channel
requantization that integer hardware does not want. FQ-ViT ("FQ-ViT: Post-Training Quantization for Fully Quantized
Vision Transformer", Lin et al., IJCAI 2022) keeps one base scale ``s`` for the tensor and gives each channel ``c`` a
power-of-two factor, so its step is ``s · 2^α_c`` with ``α_c`` in ``0..K``: the factor is a bit shift of the
integer codes before the integer dot product, and the next Linear layer needs no other change.

Here, for ``b`` bits and ``L = 2^b - 1`` levels (asymmetric, as for any activation; the range always includes 0):

.. code-block:: text

    span_c = max(max_c, 0) - min(min_c, 0)                 per-channel min/max of the calibration data
    s      = max_c span_c / (L · 2^K)                      the widest channel gets exactly its min/max range at α = K
    α_c    = clamp(ceil(log2(span_c / (L · s))), 0, K)     the smallest factor that clips nothing in channel c
    step_c = s · 2^α_c,   z_c = clamp(round(-min(min_c, 0) / step_c), 0, L)

so no channel is clipped, and every channel's step is at most twice its own per-channel min/max step (or ``s``, for
the channels narrower than ``L · s``). FQ-ViT chooses ``α_c`` by the smallest quantization error; this never-clip rule
is the same choice for a channel whose values reach its ends, and it needs no stored data. The zero point is per
channel (``z_c`` in units of the channel's own step): the term ``Σ_c W[:, c] · step_c · z_c`` it contributes to a
Linear layer's output is a constant that folds into the bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mpq.quant.functional import fake_quantize, quant_range
from lit_mpq.quant.layernorm import ChannelwiseMinMaxObserver, _check_channels
from lit_mpq.quant.modules import ActivationQuantizer

DEFAULT_MAX_SHIFT = 3
"""FQ-ViT's ``K``: channel factors 1, 2, 4 and 8."""


def power_of_two_qparams(
    min_val: Tensor, max_val: Tensor, bits: int, max_shift: int = DEFAULT_MAX_SHIFT
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(step, zero_point, shift)`` of the power-of-two-factor scheme (module docstring).

    Args:
        min_val: Per-channel minimum of the calibration data.
        max_val: Per-channel maximum, same shape.
        bits: Code width (asymmetric codes ``0 .. 2^bits - 1``).
        max_shift: ``K``, the largest factor exponent.

    Returns:
        ``step_c = s · 2^shift_c`` (float32), the zero points (int64) and the shifts ``α_c`` (int64).
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be 0 or more, got {max_shift}")
    levels = 2**bits - 1
    low, high = min_val.float().clamp(max=0), max_val.float().clamp(min=0)
    span = high - low
    tiny = torch.finfo(torch.float32).tiny
    base = (span.max() / (levels * 2**max_shift)).clamp_min(tiny)
    # a small relative margin keeps a channel whose span is exactly L·s·2^α at that α despite float rounding
    shift = torch.ceil(torch.log2((span / (levels * base)).clamp_min(tiny)) - 1e-6).clamp(0, max_shift)
    step = base * torch.exp2(shift)
    zero_point = torch.round(-low / step).clamp(0, levels).to(torch.int64)
    return step, zero_point, shift.to(torch.int64)


class PowerOfTwoFactorQuantizer(ActivationQuantizer):
    """Activation quantizer with one base scale and a power-of-two factor per channel (last dimension).

    Modes as :class:`~lit_mpq.quant.modules.ActivationQuantizer`: ``"observe"`` records per-channel min/max,
    ``"quant"`` fake-quantizes channel ``c`` with step ``s · 2^α_c``. It has no ``reparameterization``: the factors
    are shifts of the integer codes, not a fold into the previous layer, so a Linear layer behind it quantizes its own
    weight as usual.

    Args:
        num_channels: Size of the last dimension of the inputs (a Linear layer's ``in_features``).
        max_shift: ``K``: factors ``2^0 .. 2^K`` (FQ-ViT uses 3).
        bits: Initial bit width (None = FP32).
    """

    supports_power_of_two = False  # its levels are not one uniform step: the power-of-two target refuses it

    def __init__(self, num_channels: int, max_shift: int = DEFAULT_MAX_SHIFT, bits: int | None = 8) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be 0 or more, got {max_shift}")
        super().__init__(ChannelwiseMinMaxObserver(num_channels, symmetric=False), bits)
        self.max_shift = max_shift

    def set_range_factor(self, bits: int, factor: float) -> None:
        """Not supported: the range of every channel is its own min/max (raises)."""
        raise NotImplementedError("a power-of-two-factor quantizer keeps every channel's min/max range")

    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """Per-channel step and zero point at ``bits`` (cached per bit width).

        Raises:
            RuntimeError: If nothing has been observed yet.
        """
        if bits not in self._cache:
            if not self.observer.has_data:
                raise RuntimeError(
                    "PowerOfTwoFactorQuantizer has no statistics: run calibration (the Calibration callback) first"
                )
            step, zero_point, _ = power_of_two_qparams(
                self.observer.min_val, self.observer.max_val, bits, self.max_shift
            )
            self._cache[bits] = (step, zero_point)
        return self._cache[bits]

    def shifts(self, bits: int) -> Tensor:
        """The per-channel exponents ``α_c`` at ``bits`` (what a deployment shifts the integer codes by)."""
        return power_of_two_qparams(self.observer.min_val, self.observer.max_val, bits, self.max_shift)[2]

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        """Fake-quantize ``x`` (channels last) at ``bits``, regardless of the mode."""
        _check_channels(x, self.observer.num_channels, type(self).__name__)
        step, zero_point = self.qparams(bits)
        qmin, qmax = quant_range(bits, symmetric=False)
        return fake_quantize(x, step.to(x.device), zero_point.to(x.device), qmin, qmax, axis=x.dim() - 1)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, power_of_two_factors=K{self.max_shift}"
