"""Activation observers: bit-independent, mergeable statistics from which any bit width's parameters derive.

An observer's ``forward(x)`` records statistics and returns ``x`` unchanged (the torchao contract). Every
statistic is a buffer registered at construction, with its cross-rank reduction declared in ``REDUCTIONS``
(the torchmetrics ``add_state(dist_reduce_fx=...)`` rule), so :func:`sync_observers` merges them across DDP
ranks and one calibration pass serves every candidate bit width.

- :class:`MinMaxObserver`: running min and max (reductions ``min`` / ``max``).
- :class:`PercentileObserver`: a fixed-edge, log-spaced histogram of magnitudes, split by sign; the clipping
  range is the configured percentile of the distribution (TensorRT-style percentile calibration).
- :class:`MSEObserver`: the same histogram; the clipping range minimises the expected quantization error for
  the requested bit width (rounding noise inside the range, clipping error outside), as in Banner et al.,
  "Post-training 4-bit quantization" (NeurIPS 2019) and Brevitas' MSE statistics.

The histogram uses edges fixed in advance (``2^(k / bins_per_octave)`` for ``k`` over 2^-24 .. 2^24), so
histograms from different ranks or batches add exactly, and the relative resolution (about 2 % with 32 bins per
octave) is the same at every scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lit_mpq.quant.functional import qparams_from_range, quant_range

ReduceFn = Callable[[Tensor, str], Tensor]
"""``reduce(tensor, op)`` with ``op`` in ``{"sum", "min", "max"}``, returning the reduced tensor."""


class Observer(nn.Module):
    """Base class: statistics as registered buffers, ``forward`` returns its input, ranges derived on demand.

    Args:
        symmetric: Derive symmetric (signed, zero point 0) parameters instead of asymmetric ones.
    """

    REDUCTIONS: dict[str, str] = {}
    """Buffer name -> cross-rank reduction (``sum``, ``min`` or ``max``)."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        self.symmetric = symmetric

    @property
    def has_data(self) -> bool:
        """Whether any finite value has been observed."""
        return bool(torch.isfinite(self.min_val).all() and torch.isfinite(self.max_val).all())

    def reset(self) -> None:
        """Forget all statistics."""
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def clip_range(self, bits: int) -> tuple[Tensor, Tensor]:
        """Clipping range ``(low, high)`` for ``bits``; the base class uses the observed min and max."""
        return self.min_val, self.max_val

    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` for ``bits``, derived from the statistics collected so far.

        Raises:
            RuntimeError: If nothing has been observed yet (calibration did not run or saw no data).
        """
        if not self.has_data:
            raise RuntimeError(
                f"{type(self).__name__} has no statistics: run calibration (the Calibration callback) first"
            )
        low, high = self.clip_range(bits)
        return qparams_from_range(low, high, bits, self.symmetric)

    def _update_min_max(self, x: Tensor) -> None:
        low, high = torch.aminmax(x)  # one pass over x instead of two; NaN propagates as with min() and max()
        self.min_val.copy_(torch.minimum(self.min_val, low.float()))
        self.max_val.copy_(torch.maximum(self.max_val, high.float()))


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything observed (``torch.ao``'s ``MinMaxObserver``)."""

    REDUCTIONS = {"min_val": "min", "max_val": "max"}

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__(symmetric)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x: Tensor) -> Tensor:
        """Record min and max of ``x``; return ``x``."""
        if x.numel():
            self._update_min_max(x.detach())
        return x


class HistogramObserver(Observer):
    """Sign-split, log-spaced magnitude histogram with fixed edges, plus exact min and max.

    Args:
        symmetric: Derive symmetric parameters.
        bins_per_octave: Histogram resolution; bin ``k`` holds magnitudes in
            ``[2^(MIN_EXP + k / bins_per_octave), 2^(MIN_EXP + (k + 1) / bins_per_octave))``.
    """

    MIN_EXP = -24
    MAX_EXP = 24
    REDUCTIONS = {"min_val": "min", "max_val": "max", "pos_hist": "sum", "neg_hist": "sum", "zero_count": "sum"}

    def __init__(self, symmetric: bool = False, bins_per_octave: int = 32) -> None:
        super().__init__(symmetric)
        if bins_per_octave < 1:
            raise ValueError(f"bins_per_octave must be a positive integer, got {bins_per_octave}")
        self.bins_per_octave = bins_per_octave
        self.num_bins = (self.MAX_EXP - self.MIN_EXP) * bins_per_octave
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("pos_hist", torch.zeros(self.num_bins, dtype=torch.int64))
        self.register_buffer("neg_hist", torch.zeros(self.num_bins, dtype=torch.int64))
        self.register_buffer("zero_count", torch.zeros((), dtype=torch.int64))

    def reset(self) -> None:
        """Forget all statistics."""
        super().reset()
        self.pos_hist.zero_()
        self.neg_hist.zero_()
        self.zero_count.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Add ``x`` to the histogram; return ``x``."""
        if not x.numel():
            return x
        values = x.detach().float().flatten()
        self._update_min_max(values)
        magnitude = values.abs()
        tiny = magnitude < 2.0**self.MIN_EXP
        self.zero_count.add_(tiny.sum())
        index = torch.floor((torch.log2(magnitude.clamp_min(2.0**self.MIN_EXP)) - self.MIN_EXP) * self.bins_per_octave)
        index = index.clamp_(0, self.num_bins - 1).long()
        positive = (values > 0) & ~tiny
        negative = (values < 0) & ~tiny
        self.pos_hist.add_(torch.bincount(index[positive], minlength=self.num_bins))
        self.neg_hist.add_(torch.bincount(index[negative], minlength=self.num_bins))
        return x

    # ------------------------------------------------------------------------------------------- helpers
    def _edges(self) -> Tensor:
        exps = torch.arange(self.num_bins + 1, dtype=torch.float64) / self.bins_per_octave + self.MIN_EXP
        return torch.pow(2.0, exps)

    def signed_distribution(self) -> tuple[Tensor, Tensor, Tensor]:
        """The histogram as ascending signed bins: ``(lower_edges, upper_edges, counts)``, float64.

        Negative bins come first (largest magnitude first), then one zero-width bin for the values that round to
        zero, then the positive bins. The outermost edges are tightened to the observed min and max.
        """
        edges = self._edges().to(self.pos_hist.device)
        lo_neg, hi_neg = -edges[1:].flip(0), -edges[:-1].flip(0)
        lower = torch.cat([lo_neg, torch.zeros(1, dtype=edges.dtype, device=edges.device), edges[:-1]])
        upper = torch.cat([hi_neg, torch.zeros(1, dtype=edges.dtype, device=edges.device), edges[1:]])
        counts = torch.cat([self.neg_hist.flip(0), self.zero_count.reshape(1), self.pos_hist]).double()
        lower = torch.maximum(lower, self.min_val.double())
        upper = torch.minimum(upper, self.max_val.double())
        upper = torch.maximum(upper, lower)
        return lower, upper, counts

    def quantile(self, q: float) -> Tensor:
        """Approximate ``q``-quantile (``0 <= q <= 1``) of the observed values, linear within a bin."""
        lower, upper, counts = self.signed_distribution()
        total = counts.sum()
        cdf = torch.cumsum(counts, 0)
        target = q * total
        k = int(torch.searchsorted(cdf, target.reshape(1)).clamp(max=len(cdf) - 1))
        before = cdf[k] - counts[k]
        frac = ((target - before) / counts[k]).clamp(0, 1) if counts[k] > 0 else torch.tensor(1.0, dtype=cdf.dtype)
        return (lower[k] + frac * (upper[k] - lower[k])).float()


class PercentileObserver(HistogramObserver):
    """Clip at a percentile of the observed distribution instead of its extremes.

    Symmetric quantizers clip at the ``percentile`` of ``|x|``; asymmetric ones at the ``100 - percentile`` and
    ``percentile`` quantiles of ``x`` (each never beyond the observed min/max).

    Args:
        percentile: Percentage of values kept inside the range, e.g. 99.9 or 99.99.
        symmetric: Derive symmetric parameters.
        bins_per_octave: Histogram resolution.
    """

    def __init__(self, percentile: float = 99.99, symmetric: bool = False, bins_per_octave: int = 32) -> None:
        super().__init__(symmetric, bins_per_octave)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], e.g. 99.9 or 99.99; got {percentile}")
        self.percentile = percentile

    def clip_range(self, bits: int) -> tuple[Tensor, Tensor]:
        """Percentile range (independent of ``bits``)."""
        p = self.percentile / 100.0
        if self.symmetric:
            magnitude = self._magnitude_quantile(p)
            return -magnitude, magnitude
        return self.quantile(1.0 - p), self.quantile(p)

    def _magnitude_quantile(self, p: float) -> Tensor:
        edges = self._edges().to(self.pos_hist.device)
        counts = torch.cat([self.zero_count.reshape(1), self.pos_hist + self.neg_hist]).double()
        lower = torch.cat([torch.zeros(1, dtype=edges.dtype, device=edges.device), edges[:-1]])
        upper = torch.cat([torch.zeros(1, dtype=edges.dtype, device=edges.device), edges[1:]])
        abs_max = torch.maximum(self.max_val.abs(), self.min_val.abs()).double()
        upper = torch.minimum(upper, abs_max)
        lower = torch.minimum(lower, upper)
        cdf = torch.cumsum(counts, 0)
        target = p * cdf[-1]
        k = int(torch.searchsorted(cdf, target.reshape(1)).clamp(max=len(cdf) - 1))
        before = cdf[k] - counts[k]
        frac = ((target - before) / counts[k]).clamp(0, 1) if counts[k] > 0 else torch.tensor(1.0, dtype=cdf.dtype)
        return (lower[k] + frac * (upper[k] - lower[k])).float()


class MSEObserver(HistogramObserver):
    """Clipping range that minimises the expected squared quantization error at the requested bit width.

    The range is searched over ``num_candidates`` shrinkings ``alpha * [min, max]`` with ``alpha`` in
    ``(0, 1]``; the error of a bin whose representative value ``v`` lies inside the range is rounding noise,
    ``min(v^2, step^2 / 12)`` (values under half a step round to zero exactly), and ``(v - clip)^2`` outside.

    Args:
        symmetric: Derive symmetric parameters.
        num_candidates: Number of shrink factors searched.
        bins_per_octave: Histogram resolution.
    """

    def __init__(self, symmetric: bool = False, num_candidates: int = 200, bins_per_octave: int = 32) -> None:
        super().__init__(symmetric, bins_per_octave)
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be a positive integer, got {num_candidates}")
        self.num_candidates = num_candidates

    def clip_range(self, bits: int) -> tuple[Tensor, Tensor]:
        """Error-minimising range for ``bits``."""
        lower, upper, counts = self.signed_distribution()
        keep = counts > 0
        # Geometric bin centre for the log-spaced bins, zero for the zero bin.
        values = torch.where(lower * upper > 0, torch.sign(upper) * torch.sqrt(lower * upper), (lower + upper) / 2)
        values, counts = values[keep], counts[keep]
        low, high = self.min_val.double().clamp(max=0), self.max_val.double().clamp(min=0)
        if self.symmetric:
            bound = torch.maximum(-low, high)
            low, high = -bound, bound
        qmin, qmax = quant_range(bits, self.symmetric)
        alphas = torch.linspace(1.0, 0.0, self.num_candidates + 1, dtype=torch.float64, device=values.device)[:-1]
        lows, highs = alphas[:, None] * low, alphas[:, None] * high  # [C, 1]
        step = (highs - lows) / (qmax - qmin)
        inside = (values[None, :] >= lows) & (values[None, :] <= highs)
        rounding = torch.minimum(values[None, :] ** 2, step**2 / 12)
        clipping = (values[None, :] - values[None, :].clamp(lows, highs)) ** 2
        error = (torch.where(inside, rounding, clipping) * counts[None, :]).sum(dim=1)
        best = int(torch.argmin(error))  # first minimum: the widest range among ties
        return lows[best, 0].float(), highs[best, 0].float()


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}
"""Activation observer aliases accepted in configs."""


def build_observer(name: str, symmetric: bool = False, percentile: float = 99.99) -> Observer:
    """Create an activation observer by alias.

    Raises:
        ValueError: If ``name`` is not one of :data:`OBSERVERS`.
    """
    if name not in OBSERVERS:
        raise ValueError(f"unknown activation observer {name!r}; choose one of {sorted(OBSERVERS)}")
    if name == "percentile":
        return PercentileObserver(percentile=percentile, symmetric=symmetric)
    return OBSERVERS[name](symmetric=symmetric)


def sync_observers(module: nn.Module, reduce: ReduceFn) -> int:
    """Merge the statistics of every module that declares ``REDUCTIONS`` (observers, bias correction) across ranks.

    Args:
        module: Model containing observers.
        reduce: ``reduce(tensor, op)``, e.g. an ``all_reduce`` through the Lightning strategy; identity on one
            device.

    Returns:
        Number of observers synchronised.
    """
    count = 0
    for stats in module.modules():
        reductions = getattr(stats, "REDUCTIONS", None)
        if reductions:
            for name, op in reductions.items():
                buffer = getattr(stats, name)
                buffer.copy_(reduce(buffer.clone(), op))
            count += 1
    return count
