"""Twin-uniform quantization of post-GELU activations (Yuan et al., PTQ4ViT, ECCV 2022).

GELU's output has a short negative side (its minimum is about -0.17) and a long positive tail. One uniform grid over
``[min, clip]`` has a step set by the tail, so at 4 bits (step about 0.2 on DeiT-Tiny) the whole negative side rounds
to 0 or to one level, or, when ``|min|`` is under half a step, the zero point rounds to 0 and every negative value is
clipped to 0. A squared-error range search does not mind (the negative values are small), but the network does: on
DeiT-Tiny with float weights and only the ``mlp.fc2`` inputs at 4 bits, setting the negative values to 0 costs 65
points, and giving them three levels of their own recovers the full 5.5 points that a uniform 4-bit grid loses there
(``docs/vit.md``).

PTQ4ViT's twin-uniform quantizer gives each side its own grid. For ``b`` bits here, with ``H = 2^(b-1)``:

.. code-block:: text

    x >= 0:  Δp · clamp(round(x / Δp), 0, H - 1)          positive codes 0 .. H-1
    x <  0: -Δn · clamp(round(-x / Δn), 0, H)             negative codes 1 .. H (a code 0 is the positive zero)
    Δn = Δp / 2^m,  m = max(0, floor(log2(H · Δp / |min|)))

so the ``2^b`` codes are one sign bit and ``b - 1`` magnitude bits (the negative side gets the extra level that the
positive side's zero leaves free), and ``Δn`` is the finest power-of-two fraction of ``Δp`` whose ``H`` levels still
reach the observed minimum. Because the ratio is a power of two, shifting the positive codes left by ``m`` turns
both sides into one signed integer grid of step ``Δn`` (``b + m`` bits): the next Linear layer's integer dot product
needs no second scale, as with FQ-ViT's power-of-two factors. ``Δp`` minimises the expected squared error of the
positive values over ``H - 1`` steps (the same histogram search as :class:`~lit_mpq.quant.observers.MSEObserver`,
on the positive bins only). PTQ4ViT searches ``Δp`` with its Hessian-guided metric and fixes ``Δn`` for the GELU
minimum; here ``Δn`` follows the observed minimum, so the quantizer also serves any input with a short negative side.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_mpq.quant.modules import ActivationQuantizer
from lit_mpq.quant.observers import HistogramObserver, candidate_errors, range_pairs, shrink_factors

MAX_NEGATIVE_SHIFT = 16
"""Largest ``m`` (``Δp / Δn = 2^m``) for inputs whose negative side is tiny or absent."""


def twin_uniform_steps(
    observer: HistogramObserver, bits: int, num_candidates: int = 200, range_factor: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(Δp, Δn)`` at ``bits`` from a calibrated histogram (module docstring).

    Args:
        observer: Histogram of the calibration data.
        bits: Code width, at least 2.
        num_candidates: Resolution of the positive clipping search (multiples of ``max / num_candidates``).
        range_factor: Multiplies the chosen positive clipping point (a searched refinement's factor; 1 = none).

    Raises:
        ValueError: If ``bits`` is below 2.
        RuntimeError: If nothing has been observed yet.
    """
    if bits < 2:
        raise ValueError(f"a twin-uniform quantizer needs at least 2 bits (one sign bit), got {bits}")
    if not observer.has_data:
        raise RuntimeError("TwinUniformQuantizer has no statistics: run calibration (the Calibration callback) first")
    half = 2 ** (bits - 1)
    lower, upper, counts = observer.signed_distribution()
    values = (lower + upper) / 2
    keep = (counts > 0) & (values >= 0)
    values, counts = values[keep], counts[keep]
    high = observer.max_val.double().clamp(min=0)
    tiny = torch.finfo(torch.float32).tiny
    if len(values) == 0 or float(high) <= tiny:
        positive_step = torch.tensor(tiny, dtype=torch.float64)
    else:
        lows, highs = range_pairs(
            high.new_zeros(()), high, shrink_factors(num_candidates, 1.0 / num_candidates, high.device), None
        )
        noise = (highs / (half - 1)) ** 2 / 12 if half > 1 else highs**2
        best = int(torch.argmin(candidate_errors(values, counts, lows, highs, noise)))
        positive_step = highs[best] / max(half - 1, 1)
    positive_step = (positive_step * range_factor).float().clamp_min(tiny)
    negative_min = float(-observer.min_val.clamp(max=0))
    if negative_min <= 0:
        shift = MAX_NEGATIVE_SHIFT
    else:
        shift = int(min(max(math.floor(math.log2(half * float(positive_step) / negative_min)), 0), MAX_NEGATIVE_SHIFT))
    return positive_step, positive_step / 2**shift


def twin_uniform_quantize(x: Tensor, positive_step: Tensor, negative_step: Tensor, bits: int) -> Tensor:
    """Round ``x`` to the twin-uniform grid of ``bits`` (module docstring)."""
    half = 2 ** (bits - 1)
    positive_step = positive_step.to(device=x.device, dtype=x.dtype)
    negative_step = negative_step.to(device=x.device, dtype=x.dtype)
    positive = torch.round(x / positive_step).clamp(0, half - 1) * positive_step
    negative = -torch.round(-x / negative_step).clamp(0, half) * negative_step
    return torch.where(x < 0, negative, positive)


class TwinUniformQuantizer(ActivationQuantizer):
    """Activation quantizer with separate uniform grids for the negative and positive values (PTQ4ViT).

    Modes as :class:`~lit_mpq.quant.modules.ActivationQuantizer` (``observe`` fills a histogram, ``quant``
    fake-quantizes at ``bits`` with a straight-through gradient). :meth:`qparams` gives the positive grid as
    ``(Δp, 0)``; :meth:`negative_step` gives ``Δn``.

    Args:
        bits: Initial bit width (None = FP32).
        num_candidates: Resolution of the positive clipping search.
    """

    supports_power_of_two = False  # its levels are not one uniform step: the power-of-two target refuses it

    def __init__(self, bits: int | None = 8, num_candidates: int = 200) -> None:
        super().__init__(HistogramObserver(symmetric=False), bits)
        self.num_candidates = num_candidates

    def steps(self, bits: int) -> tuple[Tensor, Tensor]:
        """``(Δp, Δn)`` at ``bits`` (cached per bit width; a range factor scales ``Δp``)."""
        if bits not in self._cache:
            factor = self.range_factors.get(bits, 1.0)
            self._cache[bits] = twin_uniform_steps(self.observer, bits, self.num_candidates, factor)
        return self._cache[bits]

    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """The positive grid's ``(scale, zero_point)``: ``(Δp, 0)``."""
        return self.steps(bits)[0], torch.zeros((), dtype=torch.int64)

    def negative_step(self, bits: int) -> Tensor:
        """``Δn``, the step of the negative values at ``bits``."""
        return self.steps(bits)[1]

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        """Fake-quantize ``x`` at ``bits`` regardless of the mode."""
        quantized = twin_uniform_quantize(x.detach(), *self.steps(bits), bits)
        return x + (quantized - x).detach() if x.requires_grad else quantized

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, twin_uniform"
