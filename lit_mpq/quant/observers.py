"""Activation observers: bit-independent, mergeable statistics from which any bit width's parameters derive.

An observer's ``forward(x)`` records statistics and returns ``x`` unchanged (the torchao contract). Every
statistic is a buffer registered at construction, with its cross-rank reduction declared in ``REDUCTIONS``
(the torchmetrics ``add_state(dist_reduce_fx=...)`` rule), so :func:`sync_observers` merges them across DDP
ranks and one calibration pass serves every candidate bit width.

- :class:`MinMaxObserver`: running min and max (reductions ``min`` / ``max``).
- :class:`PercentileObserver`: a fixed-edge histogram of magnitudes per octave, split by sign; the clipping
  range is the configured percentile of the distribution (TensorRT-style percentile calibration).
- :class:`MSEObserver`: the same histogram; the clipping range (both ends searched independently when
  asymmetric) minimises the expected quantization error for the requested bit width (rounding noise inside the
  range, clipping error outside), as in Banner et al., "Post-training 4-bit quantization" (NeurIPS 2019) and
  Brevitas' MSE statistics.

The histogram uses edges fixed in advance: every octave from 2^-24 to 2^24 cut into ``bins_per_octave`` equal bins
(a power of two), i.e. the float32 exponent and top mantissa bits, so one integer shift bins a value, histograms
from different ranks or batches add exactly, and the relative resolution (1.6-3.1 % with 32 bins per octave) is the
same at every scale.
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
    """Sign-split magnitude histogram with fixed edges read off the float32 bit pattern, plus exact min and max.

    Each octave ``[2^e, 2^(e+1))`` for ``e`` in ``MIN_EXP .. MAX_EXP - 1`` is cut into ``bins_per_octave`` bins of
    equal width, so magnitude bin ``k`` (``e = MIN_EXP + k // bins_per_octave``, ``j = k % bins_per_octave``) holds
    ``[2^e (1 + j / bins_per_octave), 2^e (1 + (j + 1) / bins_per_octave))``. With ``bins_per_octave = 2^s`` that is
    exactly the float32 exponent and the top ``s`` mantissa bits, so one shift of the raw bits bins every value (no
    logarithm). Magnitudes under ``2^MIN_EXP`` (zeros, denormals) count in one zero bin; ``2^MAX_EXP`` and beyond,
    infinities and NaN in the top bin of their sign (a NaN or an infinity also reaches ``min_val``/``max_val``, which
    :func:`lit_mpq.quant.checks.check_calibrated` reports, so those counts are never used).

    Args:
        symmetric: Derive symmetric parameters.
        bins_per_octave: Histogram resolution: a power of two from 1 to :attr:`MAX_BINS_PER_OCTAVE`.

    Raises:
        ValueError: If ``bins_per_octave`` is not such a power of two.
    """

    MIN_EXP = -24
    MAX_EXP = 24
    MAX_BINS_PER_OCTAVE = 1024
    """Largest resolution (0.1 %); the per-batch scratch histogram holds ``512 * bins_per_octave`` counts."""
    REDUCTIONS = {"min_val": "min", "max_val": "max", "hist": "sum"}

    _FLOAT32_MANTISSA_BITS = 23
    _FLOAT32_EXP_BIAS = 127

    def __init__(self, symmetric: bool = False, bins_per_octave: int = 32) -> None:
        super().__init__(symmetric)
        if not (
            isinstance(bins_per_octave, int)
            and 1 <= bins_per_octave <= self.MAX_BINS_PER_OCTAVE
            and bins_per_octave & (bins_per_octave - 1) == 0
        ):
            raise ValueError(
                f"bins_per_octave must be a power of two from 1 to {self.MAX_BINS_PER_OCTAVE} (the bins are the "
                f"float32 exponent and top mantissa bits), got {bins_per_octave}"
            )
        self.bins_per_octave = bins_per_octave
        self.num_bins = (self.MAX_EXP - self.MIN_EXP) * bins_per_octave
        """Magnitude bins per sign; ``hist`` has ``2 * num_bins + 1`` entries."""
        mantissa_bits = bins_per_octave.bit_length() - 1
        self._shift = self._FLOAT32_MANTISSA_BITS - mantissa_bits
        self._codes_per_sign = 256 * bins_per_octave  # 8 exponent bits, then the top mantissa bits
        self._first_code = (self.MIN_EXP + self._FLOAT32_EXP_BIAS) * bins_per_octave  # the code of 2^MIN_EXP
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        # Ascending signed order: negative bins (largest magnitude first), the zero bin, then the positive bins.
        self.register_buffer("hist", torch.zeros(2 * self.num_bins + 1, dtype=torch.int64))

    def reset(self) -> None:
        """Forget all statistics."""
        super().reset()
        self.hist.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Add ``x`` to the histogram; return ``x``."""
        if not x.numel():
            return x
        values = x.detach().float()  # not flattened: that would copy a strided input (attention's q, k, v)
        self._update_min_max(values)
        # Sign, exponent and top mantissa bits in one arithmetic shift, written contiguously whatever the input's
        # strides; the mask drops the sign extension, which leaves the positive codes first and the negative ones
        # after them, all non-negative. Then one scatter.
        codes = torch.empty(values.shape, dtype=torch.int32, device=values.device)
        torch.bitwise_right_shift(values.view(torch.int32), self._shift, out=codes)
        codes = codes.view(-1).bitwise_and_(2 * self._codes_per_sign - 1)
        raw = torch.zeros(2 * self._codes_per_sign, dtype=torch.int64, device=codes.device)
        # index_add_ rather than bincount: bincount first scans the input twice more for its minimum and maximum.
        raw.index_add_(0, codes, torch.ones((), dtype=torch.int64, device=codes.device).expand(codes.numel()))
        self._add_codes(raw.view(2, self._codes_per_sign))
        return x

    def _add_codes(self, raw: Tensor) -> None:
        """Fold per-code counts ``[sign, code]`` (sign 0 positive, 1 negative) into :attr:`hist`."""
        fold_sign_codes(self.hist, raw, self.num_bins, self._first_code)

    # ------------------------------------------------------------------------------------------- helpers
    def _edges(self) -> Tensor:
        """The ``num_bins + 1`` magnitude edges, float64 (exact: each is a float32 with a short mantissa)."""
        k = torch.arange(self.num_bins + 1, dtype=torch.float64)
        octave = torch.div(k, self.bins_per_octave, rounding_mode="floor")
        step = k - octave * self.bins_per_octave
        return torch.pow(2.0, octave + self.MIN_EXP) * (1.0 + step / self.bins_per_octave)

    def _magnitude_bins(self) -> tuple[Tensor, Tensor]:
        """Lower and upper magnitude edges of the zero bin and then the ``num_bins`` bins, float64.

        The top bin is open above: it also holds ``2^MAX_EXP`` and beyond, so callers tighten it to the observed
        extremes like every other edge.
        """
        edges = self._edges().to(self.hist.device)
        zero = torch.zeros(1, dtype=edges.dtype, device=edges.device)
        top = torch.full((1,), float("inf"), dtype=edges.dtype, device=edges.device)
        return torch.cat([zero, edges[:-1]]), torch.cat([zero, edges[1:-1], top])

    def signed_distribution(self) -> tuple[Tensor, Tensor, Tensor]:
        """The histogram as ascending signed bins: ``(lower_edges, upper_edges, counts)``, float64.

        Negative bins come first (largest magnitude first), then one zero-width bin for the values that round to
        zero, then the positive bins. The outermost edges are tightened to the observed min and max.
        """
        low, high = self._magnitude_bins()
        lower = torch.cat([-high[1:].flip(0), low[:1], low[1:]])
        upper = torch.cat([-low[1:].flip(0), high[:1], high[1:]])
        lower = torch.maximum(lower, self.min_val.double())
        upper = torch.minimum(upper, self.max_val.double())
        upper = torch.maximum(upper, lower)
        return lower, upper, self.hist.double()

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


def fold_sign_codes(hist: Tensor, raw: Tensor, num_bins: int, first_code: int) -> None:
    """Add per-code counts ``raw[..., sign, code]`` into sign-split histograms ``hist[..., 2 * num_bins + 1]``.

    The layout of :class:`HistogramObserver`: negative bins (largest magnitude first), the zero bin, positive bins.
    Codes under ``first_code`` (magnitudes under ``2^MIN_EXP``) count in the zero bin, codes from ``first_code +
    num_bins`` on in the top bin of their sign. Leading dimensions are independent histograms (one per channel).
    """
    n, first = num_bins, first_code
    bins = raw[..., first : first + n]
    hist[..., n + 1 :].add_(bins[..., 0, :])
    hist[..., :n].add_(bins[..., 1, :].flip(-1))
    hist[..., n].add_(raw[..., :first].sum(dim=(-2, -1)))  # under 2^MIN_EXP, both signs: the zero bin
    overflow = raw[..., first + n :].sum(dim=-1)  # 2^MAX_EXP and beyond: the top bin of each sign
    hist[..., -1].add_(overflow[..., 0])
    hist[..., 0].add_(overflow[..., 1])


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
        n = self.num_bins
        counts = torch.cat([self.hist[n : n + 1], self.hist[n + 1 :] + self.hist[:n].flip(0)]).double()
        lower, upper = self._magnitude_bins()
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

    Symmetric quantizers search ``num_candidates`` shrinkings ``alpha * [-m, m]`` with ``alpha`` in ``(0, 1]``.
    Asymmetric ones search the two ends independently, ``[a * min, b * max]``: a skewed distribution (post-GELU,
    a residual stream with one heavy tail) wants its long tail clipped and its short one kept, which one shared
    factor cannot do. The error of a bin whose representative value ``v`` lies inside the range is rounding noise,
    ``min(v^2, step^2 / 12)`` (values under half a step round to zero exactly), and ``(v - clip)^2`` outside.

    Args:
        symmetric: Derive symmetric parameters.
        num_candidates: Resolution of the search: shrink factors are multiples of ``1 / num_candidates`` (per end
            when asymmetric).
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
        # The bins are linear within their octave, so a bin's values centre on its midpoint (the zero bin's is 0).
        values = (lower + upper) / 2
        values, counts = values[keep], counts[keep]
        low, high = self.min_val.double().clamp(max=0), self.max_val.double().clamp(min=0)
        qmin, qmax = quant_range(bits, self.symmetric)

        def best_of(lows: Tensor, highs: Tensor) -> tuple[Tensor, Tensor]:
            noise = ((highs - lows) / (qmax - qmin)) ** 2 / 12
            best = int(torch.argmin(candidate_errors(values, counts, lows, highs, noise)))  # first: widest of ties
            return lows[best], highs[best]

        n = self.num_candidates
        full = shrink_factors(n, step=1.0 / n, device=values.device)
        if self.symmetric:
            bound = torch.maximum(-low, high)
            best_low, best_high = best_of(*range_pairs(-bound, bound, full, None))
            return best_low.float(), best_high.float()
        # Both ends: all pairs on a grid ten times coarser, then all pairs of full-resolution factors within one
        # coarse step of the coarse optimum: about 2 * (n / 10)^2 candidates instead of n^2.
        coarse_step = min(10.0 / n, 1.0)
        coarse = shrink_factors(max(n // 10, 1), step=coarse_step, device=values.device)
        coarse_low, coarse_high = best_of(*range_pairs(low, high, coarse, coarse))
        near_low, near_high = (
            near(full, ratio(end, whole), coarse_step) for end, whole in ((coarse_low, low), (coarse_high, high))
        )
        best_low, best_high = best_of(*range_pairs(low, high, near_low, near_high))
        return best_low.float(), best_high.float()


def ratio(end: Tensor, whole: Tensor) -> float:
    """``end / whole`` as a shrink factor (1 for an empty side)."""
    return float(end / whole) if whole != 0 else 1.0


def shrink_factors(count: int, step: float, device: torch.device) -> Tensor:
    """The shrink factors ``1, 1 - step, 1 - 2 step, ...``: ``count`` of them, those above 0, float64."""
    alphas = 1.0 - step * torch.arange(count, dtype=torch.float64, device=device)
    return alphas[alphas > 0]


def near(alphas: Tensor, centre: float, radius: float) -> Tensor:
    """The factors within ``radius`` of ``centre`` (tolerating float rounding), in their order."""
    return alphas[(alphas - centre).abs() <= radius * (1 + 1e-9)]


def range_pairs(low: Tensor, high: Tensor, low_alphas: Tensor, high_alphas: Tensor | None) -> tuple[Tensor, Tensor]:
    """Candidate ranges ``[a * low, b * high]``, widest first so that the first of tied minima is the widest.

    Args:
        low: Lower end of the full range (``<= 0``), float64 scalar.
        high: Upper end (``>= 0``).
        low_alphas: Shrink factors of the lower end, descending.
        high_alphas: Shrink factors of the upper end, each paired with every lower one; ``None`` shrinks both
            ends by the same factor (``low_alphas``). An end at 0 keeps a single candidate.

    Returns:
        ``(lows, highs)``, float64.
    """
    if high_alphas is None:
        return low_alphas * low, low_alphas * high
    low_alphas = low_alphas if low < 0 else low_alphas[:1]
    high_alphas = high_alphas if high > 0 else high_alphas[:1]
    lows = (low_alphas[:, None] * low).expand(len(low_alphas), len(high_alphas)).reshape(-1)
    highs = (high_alphas[None, :] * high).expand(len(low_alphas), len(high_alphas)).reshape(-1)
    order = torch.argsort(highs - lows, descending=True, stable=True)
    return lows[order], highs[order]


def candidate_errors(values: Tensor, counts: Tensor, lows: Tensor, highs: Tensor, noise: Tensor) -> Tensor:
    """Total squared error of a histogram under each candidate clipping range, from prefix sums.

    For candidate ``i`` that is ``sum(counts * e)`` with ``e = (v - clamp(v, lows[i], highs[i]))^2`` outside the
    range and ``min(v^2, noise[i])`` inside it. The sums over the values clipped below, clipped above, inside with
    ``v^2 <= noise`` and inside with more are each a difference of prefix sums of ``counts``, ``counts * v`` and
    ``counts * v^2`` between positions found by binary search, so the cost is ``O((K + C) log K)`` instead of
    evaluating all ``C x K`` pairs.

    Args:
        values: Bin values, ascending (``K``), float64.
        counts: Their counts (``K``).
        lows: Lower ends of the candidate ranges (``C``), each ``<= 0``.
        highs: Upper ends (``C``), each ``>= 0``.
        noise: Rounding noise of a value that does not round to zero, per candidate (``C``).

    Returns:
        The error of each candidate (``C``), float64.
    """
    zero = values.new_zeros(1)
    p0, p1, p2 = (torch.cat([zero, torch.cumsum(t, 0)]) for t in (counts, counts * values, counts * values**2))
    first, last = torch.zeros_like(lows, dtype=torch.long), torch.full_like(lows, len(values), dtype=torch.long)
    below = torch.searchsorted(values, lows, side="left")  # values[:below] < low
    above = torch.searchsorted(values, highs, side="right")  # values[above:] > high
    # Inside the range, v^2 <= noise exactly where |v| <= sqrt(noise): one interval around zero.
    root = noise.sqrt()
    small_from = torch.searchsorted(values, torch.maximum(lows, -root), side="left")
    small_to = torch.searchsorted(values, torch.minimum(highs, root), side="right")

    def between(prefix: Tensor, start: Tensor, stop: Tensor) -> Tensor:
        return prefix[stop] - prefix[start]

    def clipped(start: Tensor, stop: Tensor, bound: Tensor) -> Tensor:  # sum of counts * (v - bound)^2
        return between(p2, start, stop) - 2 * bound * between(p1, start, stop) + bound**2 * between(p0, start, stop)

    small = between(p2, small_from, small_to)
    large = noise * (between(p0, below, above) - between(p0, small_from, small_to))
    return clipped(first, below, lows) + clipped(above, last, highs) + small + large


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
