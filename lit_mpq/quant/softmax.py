"""Quantizers for softmax outputs (attention probabilities): logarithmic levels, as in FQ-ViT and RepQ-ViT.

Attention probabilities lie in ``[0, 1]`` and are heavily skewed: most are tiny, a few carry the mass. A uniform
``b``-bit grid spends its levels evenly over ``[0, max]``, so at 4 bits every probability under ``max / 30`` becomes
zero. Logarithmic levels follow the distribution instead (Lin et al., "FQ-ViT: Post-Training Quantization for Fully
Quantized Vision Transformer", IJCAI 2022, log2; Li et al., "RepQ-ViT", ICCV 2023, log√2), and multiplying by a power
of two is a shift, so ``softmax · V`` needs no multiplier.

A ``b``-bit logarithmic code here is honest about its ``2^b`` codes: ``2^b - 1`` of them are exponents ``k`` with the
value ``scale · 2^(-k / r)`` (``r = 1`` for log2, ``r = 2`` for log√2) and the last one is an exact zero, for every
value too small for the smallest exponent. Exponents are rounded in the log domain (``k = round(-r · log2(x /
scale))``), as both papers do.

**The zero code's value.** At 4 bits log√2 levels end at ``scale · 2^-7``: a DeiT-Tiny attention row spreads over 197
keys, so most probabilities are below that and all of them become 0; each row then loses the mass of its many small
probabilities, and the softmax·V output shrinks. That costs DeiT-Tiny 4.2 points at 4 bits with everything else in
float, and giving the zero code the mean of the calibration values it stands for (the Lloyd-Max value of that bin)
recovers all but 0.5 of them (``docs/vit.md``). ``underflow="mean"`` does that, with the mean snapped to the
nearest level of the same logarithmic grid (an exponent past the last one), so the code stays a shift in the
``softmax · V`` datapath; ``underflow="zero"`` (the papers' choice) keeps the exact zero. The mean comes from a
histogram of the observed values (:class:`SoftmaxObserver`, eight bins per octave), so it is known for any
bit width and range factor after one calibration pass.

Logarithmic levels have a relative error floor (up to 19 % between log√2 levels) that more bits do not lower, while a
uniform grid's error shrinks by 4x per added bit: on DeiT-Tiny, log√2 keeps W4A4 alive (8.6 points over uniform) but
costs 0.1-0.3 points at 6 and 8 bits (``docs/vit.md``). ``uniform_from_bits`` takes the better of both: the uniform
grid over ``[observed minimum, observed maximum]`` from that width up, logarithmic levels below it. The choice is per
bit width, so one quantizer serves every width a mixed-precision plan or a sweep gives it, and a range factor set by
the ranking-aware refinement scales the largest level (logarithmic widths) or both ends of the range (uniform
widths), each width's factor searched for its own grid.

Example:
    >>> import torch
    >>> log_quantize_dequantize(torch.tensor([1.0, 0.3, 0.01, 0.0]), torch.tensor(1.0), bits=3, steps_per_octave=1)
    tensor([1.0000, 0.2500, 0.0000, 0.0000])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_mpq.quant.modules import ActivationQuantizer
from lit_mpq.quant.observers import MinMaxObserver

SOFTMAX_QUANTIZERS = {"uniform": None, "log2": 1, "log_sqrt2": 2}
"""Post-softmax quantizer names accepted in configs -> exponent steps per octave (``None``: the uniform grid)."""

UNDERFLOW_VALUES = ("zero", "mean")
"""What a logarithmic code's zero code dequantizes to: exact zero, or the mean of the values it stands for."""


def log_quantize_dequantize(
    x: Tensor, scale: Tensor, bits: int, steps_per_octave: int = 1, underflow_value: Tensor | float = 0.0
) -> Tensor:
    """Round ``x >= 0`` to the nearest level ``scale · 2^(-k / steps_per_octave)`` or to the zero code.

    The levels are ``k = 0 .. 2^bits - 2``.
    Values above ``scale`` clip to ``scale``; values below ``scale · 2^(-(2^bits - 1.5) / steps_per_octave)`` (the
    log-domain midpoint under the smallest level) and non-positive values take the zero code, whose value is
    ``underflow_value`` (0 by default).

    Args:
        x: Non-negative input (softmax output).
        scale: Largest level (a scalar tensor; the observed maximum, 1 for probabilities).
        bits: Code width, at least 2.
        steps_per_octave: 1 for log2 levels, 2 for log√2 levels.
        underflow_value: The zero code's value.
    """
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    zero_code = 2**bits - 1
    scale = scale.to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        ratio = (x / scale).clamp_min(0)
        exponent = torch.round(-torch.log2(ratio) * steps_per_octave).clamp_min(0)  # log2(0) = -inf: exponent inf
        value = scale * torch.exp2(-exponent / steps_per_octave)
        underflow = torch.as_tensor(underflow_value, dtype=value.dtype, device=value.device)
        return torch.where(exponent >= zero_code, underflow.expand_as(value), value)


class SoftmaxObserver(MinMaxObserver):
    """Min/max plus a histogram (count and sum per bin) of the observed values, for the mean under a threshold.

    The bins are those of :class:`~lit_mpq.quant.observers.HistogramObserver` at 8 bins per octave: the float32
    exponent and top three mantissa bits of a value, so one shift of the raw bits bins it (no logarithm), and bin
    ``c`` holds ``[2^(e - 127) (1 + j / 8), 2^(e - 127) (1 + (j + 1) / 8))`` with ``e = c // 8``, ``j = c % 8``.
    Zeros, denormals and negative values count in bin 0 with the value 0. The mean of the values under a threshold is
    then read to a bin without keeping the data. The histogram reads every fourth row (a sample of the query rows of
    an attention map), min and max every value.
    """

    MANTISSA_BITS = 3
    ROW_STRIDE = 4
    """The histogram reads every ``ROW_STRIDE``-th row (second-to-last dimension) of each observed tensor."""
    NUM_BINS = 256 << MANTISSA_BITS
    REDUCTIONS = {**MinMaxObserver.REDUCTIONS, "bin_counts": "sum", "bin_sums": "sum"}

    def __init__(self) -> None:
        super().__init__(symmetric=False)
        self.register_buffer("bin_counts", torch.zeros(self.NUM_BINS, dtype=torch.float64))
        self.register_buffer("bin_sums", torch.zeros(self.NUM_BINS, dtype=torch.float64))

    def reset(self) -> None:
        """Forget all statistics."""
        super().reset()
        self.bin_counts.zero_()
        self.bin_sums.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Record min, max and the histogram of ``x``; return ``x``."""
        super().forward(x)
        if not x.numel():
            return x
        rows = x.detach().float()
        # a quarter of the query rows: a DeiT-Tiny batch still gives the histogram millions of probabilities, at a
        # quarter of the binning work (min and max above still see every value)
        rows = rows[..., :: self.ROW_STRIDE, :] if rows.dim() >= 2 else rows
        values = rows.reshape(-1).clamp_min(0)  # negatives: the zero bin, value 0
        codes = torch.bitwise_right_shift(values.view(torch.int32), 23 - self.MANTISSA_BITS)
        # index_add_ rather than bincount (which scans its input for min and max first); within a batch float32 sums
        # are exact to about 1e-7 relative, and batches add up in float64
        counts = torch.zeros(self.NUM_BINS, dtype=torch.float32, device=values.device)
        sums = torch.zeros(self.NUM_BINS, dtype=torch.float32, device=values.device)
        counts.index_add_(0, codes, torch.ones((), dtype=torch.float32, device=values.device).expand(codes.numel()))
        sums.index_add_(0, codes, values)
        self.bin_counts += counts
        self.bin_sums += sums
        return x

    def _upper_edges(self) -> Tensor:
        codes = torch.arange(self.NUM_BINS, dtype=torch.float64, device=self.bin_counts.device)
        per_octave = 1 << self.MANTISSA_BITS
        octave, step = torch.div(codes, per_octave, rounding_mode="floor"), torch.remainder(codes, per_octave)
        return torch.pow(2.0, octave - 127) * (1 + (step + 1) / per_octave)

    def mean_below(self, threshold: float) -> float:
        """Mean of the observed values in the bins entirely under ``threshold`` (zeros included); 0 if none."""
        if threshold <= 0:
            return 0.0
        below = int((self._upper_edges() <= threshold).sum())  # bins ascend with their values
        count = float(self.bin_counts[:below].sum())
        return float(self.bin_sums[:below].sum()) / count if count > 0 else 0.0


class LogQuantizer(ActivationQuantizer):
    """Logarithmic fake-quantizer for softmax outputs; its scale is the largest value seen in calibration.

    Same modes contract as :class:`~lit_mpq.quant.modules.ActivationQuantizer` (``observe`` records the range with a
    :class:`~lit_mpq.quant.observers.MinMaxObserver`, ``quant`` fake-quantizes at ``bits``). The gradient is passed
    straight through.

    Args:
        steps_per_octave: 1 for log2 (FQ-ViT), 2 for log√2 (RepQ-ViT).
        bits: Initial bit width (None = FP32).
        uniform_from_bits: From this width up, use the uniform grid over the observed range instead of logarithmic
            levels (None: logarithmic at every width).
        underflow: The zero code's value at logarithmic widths: ``"zero"``, or ``"mean"`` (the mean of the
            calibration values under the smallest level, snapped to the logarithmic grid; module docstring).
    """

    supports_power_of_two = False  # its levels are not one uniform step: the power-of-two target refuses it

    def __init__(
        self,
        steps_per_octave: int = 1,
        bits: int | None = 8,
        uniform_from_bits: int | None = None,
        underflow: str = "zero",
    ) -> None:
        super().__init__(SoftmaxObserver(), bits)
        if steps_per_octave not in (1, 2):
            raise ValueError(f"steps_per_octave must be 1 (log2) or 2 (log√2), got {steps_per_octave}")
        if underflow not in UNDERFLOW_VALUES:
            raise ValueError(f"underflow must be one of {list(UNDERFLOW_VALUES)}, got {underflow!r}")
        self.steps_per_octave = steps_per_octave
        self.uniform_from_bits = uniform_from_bits
        self.underflow = underflow

    def is_uniform(self, bits: int) -> bool:
        """Whether ``bits`` uses the uniform grid (``bits >= uniform_from_bits``) rather than logarithmic levels."""
        return self.uniform_from_bits is not None and bits >= self.uniform_from_bits

    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)``: the largest level (observed maximum) and 0; the uniform grid's at uniform widths.

        Raises:
            RuntimeError: If nothing has been observed yet.
        """
        if self.is_uniform(bits):
            return super().qparams(bits)
        if bits not in self._cache:
            if not self.observer.has_data:
                raise RuntimeError("LogQuantizer has no statistics: run calibration (the Calibration callback) first")
            scale = self.observer.max_val * self.range_factors.get(bits, 1.0)
            scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
            self._cache[bits] = (scale, torch.zeros((), dtype=torch.int64, device=scale.device))
        return self._cache[bits]

    def set_range_factor(self, bits: int, factor: float) -> None:
        """Scale the range used at ``bits`` by ``factor``; forgets the cached parameters and zero-code value."""
        super().set_range_factor(bits, factor)
        self._cache.pop(("underflow", bits), None)

    def underflow_value(self, bits: int) -> Tensor:
        """The zero code's value at logarithmic width ``bits``: 0, or the snapped mean of what it stands for.

        Cached per width next to the scale (every forward at that width needs it; the cache is cleared with it).
        """
        key = ("underflow", bits)
        if key not in self._cache:
            self._cache[key] = self._underflow_value(bits)
        return self._cache[key]

    def _underflow_value(self, bits: int) -> Tensor:
        scale, _ = self.qparams(bits)
        if self.underflow == "zero":
            return torch.zeros((), dtype=scale.dtype, device=scale.device)
        r = self.steps_per_octave
        zero_code = 2**bits - 1
        threshold = float(scale) * 2.0 ** (-(zero_code - 0.5) / r)  # the log-domain midpoint under the last level
        mean = self.observer.mean_below(threshold)
        if mean <= 0:
            return torch.zeros((), dtype=scale.dtype, device=scale.device)
        exponent = max(round(-r * math.log2(mean / float(scale))), zero_code)  # a level past the last one
        return scale * 2.0 ** (-exponent / r)

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        """Fake-quantize ``x`` at ``bits`` regardless of the mode (straight-through gradient at logarithmic widths)."""
        if self.is_uniform(bits):
            return super().quantize(x, bits)
        scale, _ = self.qparams(bits)
        quantized = log_quantize_dequantize(x, scale, bits, self.steps_per_octave, self.underflow_value(bits))
        return x + (quantized - x).detach() if x.requires_grad else quantized

    def extra_repr(self) -> str:  # noqa: D102
        levels = "log2" if self.steps_per_octave == 1 else "log_sqrt2"
        uniform = "" if self.uniform_from_bits is None else f", uniform_from_bits={self.uniform_from_bits}"
        return f"{super().extra_repr()}, levels={levels}{uniform}, underflow={self.underflow}"


def build_softmax_quantizer(
    name: str, uniform_from_bits: int | None = None, underflow: str = "zero"
) -> ActivationQuantizer:
    """The quantizer of an attention's softmax output by config name (see :data:`SOFTMAX_QUANTIZERS`).

    The uniform grid spans ``[0, observed maximum]`` whatever the run's activation observer: a percentile or MSE range
    would clip the few large probabilities (a head attending to one token), which carry the attention, to serve the
    many tiny ones, and that costs DeiT-Tiny two points at W8A8.

    Args:
        name: ``"uniform"``, ``"log2"`` or ``"log_sqrt2"``.
        uniform_from_bits: With a logarithmic ``name``: the width from which the uniform grid is used instead (None:
            logarithmic at every width). Ignored by ``"uniform"``.
        underflow: With a logarithmic ``name``: the zero code's value, ``"zero"`` or ``"mean"``.

    Raises:
        ValueError: On an unknown name.
    """
    if name not in SOFTMAX_QUANTIZERS:
        raise ValueError(f"softmax_quantizer {name!r} is not known; choose one of {list(SOFTMAX_QUANTIZERS)}")
    steps = SOFTMAX_QUANTIZERS[name]
    if steps is None:
        return ActivationQuantizer(MinMaxObserver(symmetric=False))
    return LogQuantizer(steps, uniform_from_bits=uniform_from_bits, underflow=underflow)
